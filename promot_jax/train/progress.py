"""What the user sees during training: one line per N steps, and TensorBoard summaries.

TensorBoard event files are written locally; for a remote MODEL_DIR (gs://) they go to a
local scratch directory and are copied to MODEL_DIR/<stage>/tb through the path layer (at
most every MIRROR_S seconds, and when the stage ends), so they reach any storage the run
itself reaches (TensorFlow's own GCS client knows no emulator).
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from typing import Mapping, Optional

import jax
from clu import metric_writers

from promot_jax import paths

MIRROR_S = 30.0


class Progress:
  """Step, loss, learning rate, tokens/s, seconds/step and ETA; only process 0 writes."""

  def __init__(self, name: str, total_steps: int, start_step: int, tokens_per_step: int,
               logdir: Optional[str] = None, stream=None):
    self.name, self.total, self.tokens_per_step = name, total_steps, tokens_per_step
    self.stream = stream or sys.stdout
    self.is_writer = jax.process_index() == 0
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._writer = None
    self._mirror: Optional[tuple[str, str]] = None   # (local scratch dir, remote logdir)
    self._mirrored_at = 0.0
    if logdir:
      self.open_tensorboard(logdir)

  def open_tensorboard(self, logdir: str) -> None:
    """Start writing TensorBoard summaries to `logdir` (process 0 only)."""
    if self.is_writer and self._writer is None:
      if paths.is_remote(logdir):
        self._mirror = (tempfile.mkdtemp(prefix='promot_tb_'), logdir)
        logdir = self._mirror[0]
      self._writer = metric_writers.create_default_writer(logdir, asynchronous=False)

  def log(self, message: str) -> None:
    if self.is_writer:
      print(f'[{self.name}] {message}', file=self.stream, flush=True)

  def step(self, step: int, metrics: Mapping[str, float], learning_rate: float) -> dict:
    """Report training metrics at `step` (the number of steps done); returns throughput."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    sec_per_step = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    tokens_per_s = self.tokens_per_step / max(sec_per_step, 1e-9)
    eta = datetime.timedelta(seconds=int(sec_per_step * (self.total - step)))
    self.log(f'step {step}/{self.total}  loss {metrics["loss"]:.4f}  '
             f'acc {metrics.get("token_accuracy", float("nan")):.3f}  lr {learning_rate:g}  '
             f'{tokens_per_s:,.0f} tok/s  {sec_per_step:.3f} s/step  ETA {eta}')
    extra = {'seconds_per_step': sec_per_step, 'tokens_per_second': tokens_per_s,
             'learning_rate': learning_rate}
    self.scalars(step, {**{f'train/{k}': v for k, v in metrics.items()}, **extra})
    return extra

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is not None:
      self._writer.write_scalars(step, {k: float(v) for k, v in values.items()})
      self._writer.flush()
      if self._mirror and time.monotonic() - self._mirrored_at > MIRROR_S:
        self.mirror()

  def mirror(self) -> None:
    """Copy the local event files to the remote logdir (a remote MODEL_DIR only)."""
    if not self._mirror:
      return
    local, remote = self._mirror
    for name in os.listdir(local):
      with open(os.path.join(local, name), 'rb') as f:
        paths.write_bytes(paths.join(remote, name), f.read())
    self._mirrored_at = time.monotonic()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self.mirror()
