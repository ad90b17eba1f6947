"""What every benchmark section shares: the named shapes, a synthetic batch, timing, memory.

Timings are medians over repeated calls, and sections that are compared with each other run
round-robin (A, B, A, B, ...) so that a burst of load from another process slows both sides
alike; only ratios of figures from one run are meant to be compared.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The shapes and repeat counts of one benchmark run."""
  model: str = 'mt5_small'
  batch: int = 8
  inputs: int = 128
  targets: int = 16
  prompt_length: int = 100
  decode_length: int = 16
  beam_size: int = 4
  repeats: int = 3          # timed calls per measurement (the median is reported)
  data_batches: int = 20    # batches read to time the input pipeline
  seed: int = 0
  layers: Optional[int] = None   # encoder and decoder layers each (default: the model's)

  def replace(self, **changes: Any) -> 'BenchConfig':
    return dataclasses.replace(self, **changes)


# Named configurations. 'mt5_small' is the CPU-affordable shape of the issue; 'quick' is a
# tiny model for tests and smoke checks (seconds, not minutes).
PRESETS = {
    'mt5_small': BenchConfig(),
    'quick': BenchConfig(model='mt5_tiny', batch=4, inputs=32, targets=8, prompt_length=4,
                         decode_length=8, repeats=2, data_batches=4),
}


def synthetic_batch(cfg: BenchConfig, vocab_size: int) -> dict[str, np.ndarray]:
  """A full (unpadded) batch of random token ids in seqio's encoder-decoder feature names.

  Ids are drawn from [2, vocab) so that no position is padding (0) or EOS (1): every position
  does work, in promot_jax and in transformers alike.
  """
  rng = np.random.default_rng(cfg.seed)
  enc = rng.integers(2, vocab_size, (cfg.batch, cfg.inputs)).astype(np.int32)
  tgt = rng.integers(2, vocab_size, (cfg.batch, cfg.targets)).astype(np.int32)
  dec = np.pad(tgt, [(0, 0), (1, 0)])[:, :-1]                       # shift right, start id 0
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': np.ones_like(tgt)}


@dataclasses.dataclass
class Timer:
  """One thing to time: `call()` runs it once and returns only when the work is finished."""
  name: str
  call: Callable[[], Any]
  first_s: Optional[float] = None           # the first call (includes any compilation)
  times: list = dataclasses.field(default_factory=list)
  self_timed: bool = False                  # call() returns the seconds it measured itself

  @property
  def median_s(self) -> Optional[float]:
    return statistics.median(self.times) if self.times else None


def run_round_robin(timers: Sequence[Timer], repeats: int,
                    log: Callable[[str], None] = print) -> None:
  """Call each timer once untimed-for-median (its first call), then `repeats` rounds in turn."""
  def timed(t: Timer) -> float:
    start = time.perf_counter()
    out = t.call()
    return out if t.self_timed else time.perf_counter() - start

  for t in timers:
    if t.first_s is None:
      t.first_s = timed(t)
      log(f'  {t.name}: first call {t.first_s:.2f} s')
  for r in range(repeats):
    for t in timers:
      t.times.append(timed(t))
    log(f'  round {r + 1}/{repeats}: ' + ', '.join(f'{t.name} {t.times[-1]:.3f} s'
                                                   for t in timers))


# ----------------------------------------------------------------------------- memory

def reset_peak_rss() -> bool:
  """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_rss_bytes() -> Optional[int]:
  """Peak resident memory of this process since the last reset (VmHWM), in bytes."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def device_peak_bytes() -> Optional[int]:
  """Peak bytes in use on the first jax device (None where the backend does not report it)."""
  stats = jax.devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of a pytree (jax or numpy or torch-free)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree) if hasattr(x, 'shape')))


# ------------------------------------------------------------------- compilation count

class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring events) while active, in this process.

    with CompileCounter() as c:
      ...
    c.count, c.seconds
  """
  _EVENT = '/jax/core/compile/backend_compile_duration'
  _active: list = []
  _lock = threading.Lock()
  _registered = False

  def __init__(self):
    self.count, self.seconds = 0, 0.0

  @classmethod
  def _listen(cls, event: str, duration: float, **_: Any) -> None:
    if event == cls._EVENT:
      with cls._lock:
        for c in cls._active:
          c.count += 1
          c.seconds += duration

  def __enter__(self) -> 'CompileCounter':
    with CompileCounter._lock:
      if not CompileCounter._registered:
        jax.monitoring.register_event_duration_secs_listener(CompileCounter._listen)
        CompileCounter._registered = True
      CompileCounter._active.append(self)
    return self

  def __exit__(self, *exc: Any) -> None:
    with CompileCounter._lock:
      CompileCounter._active.remove(self)
