"""Stop cleanly on SIGTERM/SIGINT: finish the step, checkpoint, exit with a resumable code.

Cloud TPU VMs get SIGTERM before maintenance or preemption; a user presses Ctrl-C. Either
way the trainer finishes the current step, writes a checkpoint (with the data position), and
exits with EXIT_PREEMPTED; running the same command again resumes. On several hosts a
signal reaches one host or all of them at different moments; every host asks the others at
each step (one tiny all-gather) and all stop at the same step when any was signalled.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "try again later" is exactly the advice


class Preempted(RuntimeError):
  """Training stopped on request after writing a checkpoint; rerun the command to resume."""
  exit_code = EXIT_PREEMPTED   # what `promot` exits with


class StopRequest:
  """Context manager: while active, the first SIGTERM/SIGINT only sets a flag."""

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._previous = {}

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    self.signal_name = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    """True (on every host, at the same step) once a stop was requested on any host.

    With several processes every one of them must call this at the same points (the
    trainer does, once per step): it is a collective.
    """
    del step  # the same call sequence on every host is what aligns the decision
    if jax.process_count() > 1:
      mine = np.asarray([self.signal_name is not None], np.int32)
      if not multihost_utils.process_allgather(mine).any():
        return False
      self.signal_name = self.signal_name or 'a signal on another host'
      return True
    return self.signal_name is not None
