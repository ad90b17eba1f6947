"""promot_jax's side of the benchmark: train steps per stage, cached decoding, input pipeline.

The train step is the trainer's own: `train.sharding.build_sharded_step` builds and jits it with the
mesh shardings and state donation, and the benchmark only lowers and compiles that jitted
function ahead of time (to report compile time, XLA's memory analysis and FLOPs separately)
before calling it in a loop exactly as the trainer does.
"""

from __future__ import annotations

import importlib
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from promot_jax import mesh as partitioning
from promot_jax.data import pipeline as data
from promot_jax.model import config as config_lib, decoding, formats, prompt, transformer as model
from promot_jax.tools.bench.common import (BenchConfig, CompileCounter, Timer, device_peak_bytes,
                                           peak_rss_bytes, reset_peak_rss, tree_bytes)
from promot_jax.tools.plan_hardware import memory_row
from promot_jax.train import sharding, stages
from promot_jax.train.stages import Stage

STAGE_NAMES = ('prompt_tuning', 'model_tuning', 'finetune')


def model_config(bc: BenchConfig) -> config_lib.T5Config:
  cfg = config_lib.get_config(bc.model, prompt_length=bc.prompt_length)
  if bc.layers:
    cfg = cfg.replace(num_encoder_layers=bc.layers, num_decoder_layers=bc.layers)
  return cfg


def random_params(bc: BenchConfig) -> dict:
  """Random float32 parameters (numpy) with a uniform-initialised prompt attached."""
  cfg = model_config(bc)
  params = model.init_params(cfg.base(), jax.random.PRNGKey(bc.seed))
  params = jax.tree_util.tree_map(np.asarray, params)
  return prompt.initialize_prompt(params, bc.prompt_length, 'uniform',
                                  rng=jax.random.PRNGKey(bc.seed + 1))


def stage_for(name: str) -> Stage:
  """The preset stage (paper settings: lr, dropout, label smoothing) under its own name."""
  return stages.PRESETS[name]()


class StageStep:
  """One stage's jitted train step, compiled ahead of time, with its live (donated) state."""

  def __init__(self, bc: BenchConfig, stage: Stage, params: dict, batch: dict, mesh=None,
               aot: bool = True, scan_layers: bool = False):
    cfg = model_config(bc).replace(scan_layers=scan_layers)
    self.stage, self.bc = stage, bc
    mesh = mesh or partitioning.make_mesh()
    rules = partitioning.standard_logical_axis_rules()
    if not stages.uses_modules(stage, params):
      params = formats.without_modules(params)
    # As the trainer does (train/loop.py): the t5x tree placed, then moved to the step's layout.
    layout = sharding.build_stage_layout(cfg, stage, mesh, rules, params)
    self.sharded = layout.step
    trainable, self.frozen, _ = layout.to_step(*sharding.place_params(layout.t5x, params, stage))
    self.state = sharding.init_state_on_mesh(self.sharded, trainable)
    self.batch = partitioning.global_batch_from_host(batch, mesh)
    self.rng = jax.random.PRNGKey(bc.seed)
    self.compiled, self.compile_s = None, None
    if not aot:   # leave compilation to the first call, as in the trainer
      return
    start = time.perf_counter()
    lowered = self.sharded.step_fn.lower(self.state, self.frozen, self.batch, self.rng)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.metrics: Any = None

  def __call__(self) -> None:
    self.state, self.metrics = self.compiled(self.state, self.frozen, self.batch, self.rng)
    jax.block_until_ready(self.state)

  def tokens_per_step(self) -> int:
    bc = self.bc
    return bc.batch * (bc.inputs + bc.targets + (bc.prompt_length if self.stage.with_prompt
                                                 else 0))

  def info(self) -> dict:
    """Static facts of the step: compile time, optimizer bytes, XLA's FLOPs and memory."""
    cost = self.compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    stats = self.compiled.memory_analysis()
    return {'compile_s': self.compile_s,
            'trainable_params': int(sum(np.prod(x.shape)
                                        for x in jax.tree_util.tree_leaves(self.state.trainable))),
            'optimizer_state_bytes': tree_bytes(self.state.opt_state),
            'xla_flops': float(cost.get('flops', 0.0)) or None,
            'xla_memory': memory_row(stats, None) if stats is not None else None,
            'tokens_per_step': self.tokens_per_step()}


def train_step_timers(bc: BenchConfig, params: dict, batch: dict,
                      names=STAGE_NAMES, log: Callable[[str], None] = print
                      ) -> tuple[list[Timer], dict]:
  """A Timer per stage (calls run the real step) and each stage's static info."""
  timers, infos = [], {}
  for name in names:
    reset_peak_rss()
    step = StageStep(bc, stage_for(name), params, batch)
    infos[name] = step.info()
    log(f'  promot_jax {name}: compiled in {step.compile_s:.1f} s')
    timers.append(Timer(f'promot_jax/{name}', step))
  return timers, infos


def scan_timers(bc: BenchConfig, params: dict, batch: dict, stage_name: str = 'model_tuning',
                log: Callable[[str], None] = print) -> tuple[list[Timer], dict]:
  """The stage's step with unrolled and with scanned layers (SCAN_LAYERS), compiled side by
  side: compile time is what scanning is for; the step time shows what it costs."""
  timers, infos = [], {}
  for name, scan in (('unrolled', False), ('scanned', True)):
    step = StageStep(bc, stage_for(stage_name), params, batch, scan_layers=scan)
    infos[name] = step.info()
    log(f'  promot_jax {stage_name} {name}: compiled in {step.compile_s:.1f} s')
    timers.append(Timer(f'promot_jax/{stage_name}/{name}', step))
  return timers, infos


def finish_train_rows(timers: list[Timer], infos: dict) -> dict:
  rows = {}
  for t in timers:
    name = t.name.rsplit('/', 1)[1]
    row = dict(infos[name], step_s=t.median_s, first_call_s=t.first_s, step_times_s=t.times)
    row['tokens_per_s'] = row['tokens_per_step'] / t.median_s if t.median_s else None
    rows[name] = row
  return rows


# ------------------------------------------------------------------------------ decoding

def _decode_setup(bc: BenchConfig, params: dict, batch: dict):
  cfg = model_config(bc).replace(dropout_rate=0.0)
  return cfg, jax.device_put(prompt.without_prompt(params)), jax.device_put(
      batch['encoder_input_tokens'])


def decode_timers(bc: BenchConfig, params: dict, batch: dict) -> list[Timer]:
  """Greedy and beam search with the cache, without the prompt (as transformers' generate).

  eos_id=-1 never stops early, so every example decodes `decode_length` tokens.
  """
  cfg, dev_params, enc = _decode_setup(bc, params, batch)

  def greedy():
    jax.block_until_ready(decoding.greedy_decode(cfg, dev_params, enc, bc.decode_length,
                                                 eos_id=-1))

  def beam():
    jax.block_until_ready(decoding.beam_search(cfg, dev_params, enc, bc.decode_length,
                                               bc.beam_size, eos_id=-1))

  return [Timer('promot_jax/greedy', greedy), Timer(f'promot_jax/beam{bc.beam_size}', beam)]


def decode_programs(bc: BenchConfig, params: dict, batch: dict) -> dict:
  """{name: compiled program} of what decode_timers runs (for their matmul floor,
  bench/floor.py): their decoding loop runs `decode_length` times (eos_id=-1). Greedy
  decoding's float32 fallback sits in a conditional branch (model/head_select.py), so its dots
  cannot be counted where that head is used."""
  cfg, dev_params, enc = _decode_setup(bc, params, batch)
  greedy = decoding.greedy_decode_jitted.lower(*decoding.greedy_decode_arguments(
      cfg, dev_params, enc, bc.decode_length, eos_id=-1))
  beam = decoding.beam_search_jitted.lower(*decoding.beam_search_arguments(
      cfg, dev_params, enc, bc.decode_length, bc.beam_size, eos_id=-1))
  return {'promot_jax/greedy': greedy.compile(), f'promot_jax/beam{bc.beam_size}': beam.compile()}


# ------------------------------------------------------------------------ input pipeline

def data_pipeline(bc: BenchConfig) -> dict:
  """Examples/s of the seqio pipeline (offline toy task) at the benchmark's lengths."""
  importlib.import_module('promot_tasks.toy')
  lengths = {'inputs': bc.inputs, 'targets': bc.targets}
  start = time.perf_counter()
  it = data.make_batch_iterator('toy_sorted', lengths, 'train', bc.batch, seed=bc.seed)
  next(it)
  setup_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(bc.data_batches):
    next(it)
  elapsed = time.perf_counter() - start
  return {'task': 'toy_sorted', 'setup_s': setup_s, 'batches': bc.data_batches,
          'examples_per_s': bc.data_batches * bc.batch / elapsed}


def memory_now() -> dict:
  return {'peak_host_rss_bytes': peak_rss_bytes(), 'peak_device_bytes': device_peak_bytes()}


def count_step_compiles(bc: BenchConfig, params: dict, batch: dict, stage_name: str,
                        steps: int = 3) -> dict:
  """Compilations during `steps` calls of the trainer's jitted step (not the AOT one)."""
  step = StageStep(bc, stage_for(stage_name), params, batch, aot=False)
  state, fn = step.state, step.sharded.step_fn
  with CompileCounter() as first:
    state, _ = fn(state, step.frozen, step.batch, step.rng)
  with CompileCounter() as later:
    for i in range(steps):
      host = {k: np.roll(v, i + 1, axis=0) for k, v in batch.items()}   # new data, same shapes
      state, _ = fn(state, step.frozen,
                    partitioning.global_batch_from_host(host, partitioning.make_mesh()),
                    step.rng)
    jax.block_until_ready(state)
  return {'first_step_compiles': first.count, 'later_step_compiles': later.count}


def optional(fn: Callable[[], Any], log: Callable[[str], None] = print) -> Optional[Any]:
  """fn(), or None with a logged reason if it raises (one section must not sink the run)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - reported, the other sections still run
    log(f'  skipped: {type(e).__name__}: {e}')
    return None
