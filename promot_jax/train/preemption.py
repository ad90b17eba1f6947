"""Stop cleanly on SIGTERM/SIGINT: finish the step, checkpoint, exit with a resumable code.

Cloud TPU VMs get SIGTERM before maintenance or preemption; a user presses Ctrl-C. Either
way the trainer finishes the current step, writes a checkpoint (with the data position), and
exits with EXIT_PREEMPTED; running the same command again resumes. On several hosts all of
them must stop at the same step, which jax's preemption sync point decides.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import jax
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
      # On several hosts jax's own preemption notifier owns SIGTERM (see should_stop).
      signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
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
    """True (on every host, at the same step) once a stop was requested."""
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or 'SIGTERM'
        return True
      return False
    return self.signal_name is not None
