"""`promot bench --isolate`: each workload in a process of its own, timed round-robin.

In one process the workloads disturb each other: on the 2-core Xeon of the README the same
compiled stage-2 step took 3.3 s alone in its process and 6.4-7.7 s between stage 1 and PEFT
prompt tuning in the one-process round-robin. Here every workload (a promot_jax train step,
a transformers train step, one decoding method) lives in its own worker process, built and
compiled there; the parent calls them in turn (A, B, A, B, ...) exactly as the in-process
round-robin does, so they still share the machine's load, but not an allocator, caches or
thread pools. Only one worker computes at a time; the others wait on their pipe.

A program's matmul floor (bench/floor.py) is always timed by a worker of its own (kind
'floor', given the program's dots), with or without --isolate: its operands, up to a
[512, 250112] array, then never enter the benchmarked process's memory or peak RSS.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
import traceback
from typing import Any, Callable

from promot_jax.tools.bench import floor as floor_lib, hf_bench, jax_bench
from promot_jax.tools.bench.common import BenchConfig, peak_rss_bytes, synthetic_batch

_HF_TRAIN = {'peft_prompt_tuning': 'prompt_tuning', 'full_finetune': 'finetune'}


@dataclasses.dataclass
class _Workload:
  call: Callable[[], Any]
  info: dict                          # facts known once built
  finish: Callable[[int], dict]       # finish(repeats) -> facts after the timing rounds
  self_timed: bool = False            # call() returns the seconds it measured itself


def _build(kind: str, name: str, bc: BenchConfig, payload: Any = None) -> _Workload:
  if kind == 'floor':                 # payload: the program's dots (bench/floor.py)
    return _Workload(floor_lib.FloorTimer(payload), {}, lambda repeats: {}, self_timed=True)
  cfg = jax_bench.model_config(bc)
  batch = synthetic_batch(bc, cfg.vocab_size)
  if kind == 'promot_jax':
    step = jax_bench.StageStep(bc, jax_bench.stage_for(name), jax_bench.random_params(bc), batch)
    return _Workload(step, dict(step.info(), dots=floor_lib.dots_of_hlo(step.compiled.as_text())),
                     lambda repeats: {'peak_host_rss_bytes': peak_rss_bytes()})
  if kind == 'hf':
    build = getattr(hf_bench, name)
    step = build(cfg, bc, batch, jax_bench.stage_for(_HF_TRAIN[name]))
    return _Workload(step, {}, lambda repeats: {
        'optimizer_state_bytes': hf_bench.optimizer_state_bytes(step),
        'peak_host_rss_bytes': peak_rss_bytes()})
  if kind == 'decode':
    timers = (jax_bench.decode_timers(bc, jax_bench.random_params(bc), batch)
              if name.startswith('promot_jax/') else hf_bench.generate_timers(cfg, bc, batch))
    timer = next(t for t in timers if t.name == name)
    return _Workload(timer.call, {}, lambda repeats: {'peak_host_rss_bytes': peak_rss_bytes()})
  raise ValueError(f'unknown workload kind {kind!r}')


def _serve(conn, kind: str, name: str, bc_fields: dict, payload: Any) -> None:
  """The worker: build the workload, then run what the parent asks until told to stop."""
  try:
    work = _build(kind, name, BenchConfig(**bc_fields), payload)
    conn.send(('ready', work.info))
  except Exception:  # noqa: BLE001 - reported to the parent, which raises it
    conn.send(('error', traceback.format_exc()))
    return
  while True:
    command, arg = conn.recv()
    if command == 'call':
      start = time.perf_counter()
      out = work.call()
      conn.send(('done', out if work.self_timed else time.perf_counter() - start))
    elif command == 'finish':
      conn.send(('done', work.finish(arg)))
    else:
      return


class Worker:
  """A workload in its own process; calling it runs the workload once there."""

  def __init__(self, kind: str, name: str, bc: BenchConfig, payload: Any = None):
    self.name = name
    context = multiprocessing.get_context('spawn')
    self._conn, child = context.Pipe()
    self._process = context.Process(
        target=_serve, args=(child, kind, name, dataclasses.asdict(bc), payload), daemon=True)
    self._process.start()
    child.close()
    self.info = self._receive()

  def _receive(self) -> Any:
    try:
      status, payload = self._conn.recv()
    except EOFError:
      raise RuntimeError(f'bench worker {self.name} exited (code {self._process.exitcode})') from None
    if status == 'error':
      raise RuntimeError(f'bench worker {self.name} failed:\n{payload}')
    return payload

  def __call__(self) -> float:
    """Run the workload once; the seconds it took in the worker."""
    self._conn.send(('call', None))
    return self._receive()

  def finish(self, repeats: int) -> dict:
    self._conn.send(('finish', repeats))
    return self._receive()

  def close(self) -> None:
    if self._process.is_alive():
      try:
        self._conn.send(('stop', None))
      except (BrokenPipeError, OSError):
        pass
      self._process.join(timeout=30)
    if self._process.is_alive():
      self._process.kill()
      self._process.join()
    self._conn.close()


def start(specs: list[tuple], bc: BenchConfig) -> list[Worker]:
  """A worker per (kind, name) or (kind, name, payload), started one after another (each
  compiles alone)."""
  workers: list[Worker] = []
  try:
    for kind, name, *payload in specs:
      workers.append(Worker(kind, name, bc, *payload))
  except BaseException:
    close(workers)
    raise
  return workers


def close(workers: list[Worker]) -> None:
  for w in workers:
    w.close()
