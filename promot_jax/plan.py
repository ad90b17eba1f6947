"""`promot plan`: will a run's stages fit a TPU slice, and how fast could they go?

Before renting a pod, compile each stage's train step (and the eval greedy decode) for a
TPU topology on this CPU host: libtpu describes the slice's devices without owning any,
jax lowers the real step (trainer.build_sharded_step, the trainer's shardings) with
abstract parameters (jax.eval_shape, nothing allocated) and XLA's TPU compiler reports
per-device memory and FLOPs. A compile that runs out of HBM is reported as "does not fit".

Topology names follow Cloud TPU's accelerator types: v4-N and v5p-N count TensorCores
(2 per chip, one JAX device per chip: v4-64 = 32 chips), v5e-N (= v5litepod-N) and v6e-N
count chips (1 TensorCore each). `--topology cpu` plans on this machine's own devices.

Model FLOPs (counted, independent of the compiler), per step, M = matmul FLOPs of one forward
pass (2 x weights x the tokens each weight sees: encoder weights and cross-attention key/value
see batch x (inputs + prompt) positions, the other decoder weights and the logits see
batch x targets) and A = attention-score FLOPs (QK^T and AV, 4 x B x Sq x Sk x heads x kv per
attention layer):
  model weights train (model_tuning, finetune, joint): 3M + 3A  (forward, activation grads, weight grads)
  only the prompt trains (prompt_tuning):              2M + 3A  (no weight gradients)

With scan_layers=True the step is built by scan_layout.build_scanned_step (the trainer does
not run scanned layers yet) and its FLOPs come from the unrolled step's HLO cost analysis,
because XLA's compiled cost analysis counts a loop body once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM per chip, peak bf16 FLOP/s per chip, how its slices are named."""
  name: str
  hbm_gib: float
  peak_tflops: float
  cores_per_chip: int        # accelerator type v4-N / v5p-N counts cores; v5e/v6e count chips
  topology_prefix: str       # libtpu's topology name prefix ('v4:2x4x4')
  chip_config: str           # 'megacore': one JAX device per chip (two cores)


CHIPS = {
    'v4': Chip('v4', 32, 275, 2, 'v4', 'megacore'),
    'v5e': Chip('v5e', 16, 197, 1, 'v5e', 'default'),
    'v5p': Chip('v5p', 95, 459, 2, 'v5', 'megacore'),
    'v6e': Chip('v6e', 32, 918, 1, 'v6e', 'default'),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e'}
# Slice shapes by number of chips (Cloud TPU docs: v4 and v5p 3-D tori, v5e and v6e 2-D).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 192: (4, 4, 12), 256: (4, 8, 8), 384: (4, 8, 12), 512: (8, 8, 8),
             768: (8, 8, 12), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
             6144: (16, 16, 24)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
# Accelerator types Cloud TPU offers (launch/tpu.py validates against the same sizes).
SIZES = {'v4': (8, 16, 32, 64, 128, 256, 384, 512, 1024, 1536, 2048, 4096),
         'v5e': (1, 4, 8, 16, 32, 64, 128, 256),
         'v5p': (8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, 12288),
         'v6e': (1, 4, 8, 16, 32, 64, 128, 256)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                  # as the user wrote it ('v4-64') or 'cpu'
  chip: Optional[Chip]       # None for the local devices
  num_chips: int
  shape: tuple = ()

  @property
  def libtpu_name(self) -> str:
    return f'{self.chip.topology_prefix}:' + 'x'.join(map(str, self.shape))

  @property
  def host_bounds(self) -> tuple:
    """Chips per host: whole slice on one host up to 8 chips, else 4 (2x2x1) per host."""
    if self.num_chips <= 8:
      return tuple(self.shape) + (1,) * (3 - len(self.shape))
    return (2, 2, 1)

  @property
  def num_hosts(self) -> int:
    return max(1, self.num_chips // math.prod(self.host_bounds))


def known_sizes(generation: str) -> list[int]:
  """The N of every valid '<generation>-N' name (cores for v4/v5p, chips for v5e/v6e)."""
  return list(SIZES[generation])


def parse_topology(name: str) -> Topology:
  """'v4-64' | 'v5e-256' | 'v5litepod-16' | 'v5p-128' | 'v6e-8' | 'cpu' -> Topology."""
  if name == 'cpu':
    return Topology('cpu', None, 0)
  m = re.fullmatch(r'(v4|v5e|v5p|v6e|v5litepod|v5lite)-(\d+)', name.strip().lower())
  if not m:
    raise ValueError(f'Unknown topology {name!r}; use e.g. v4-64, v5e-256, v5p-128, v6e-64 or '
                     'cpu (this machine\'s devices).')
  gen = ALIASES.get(m.group(1), m.group(1))
  chip, n = CHIPS[gen], int(m.group(2))
  if n not in SIZES[gen]:
    unit = 'TensorCores (2 per chip)' if chip.cores_per_chip == 2 else 'chips'
    raise ValueError(f'{name}: {gen}-N counts {unit}; known sizes: '
                     f'{", ".join(f"{gen}-{k}" for k in SIZES[gen])}.')
  chips = n // chip.cores_per_chip
  return Topology(name, chip, chips, (SHAPES_3D if chip.cores_per_chip == 2 else SHAPES_2D)[chips])


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(topo: Topology) -> list:
  """Compile-only devices of a TPU slice (libtpu), or this machine's devices for 'cpu'."""
  import jax
  if topo.chip is None:
    return list(jax.devices())
  if not libtpu_available():
    raise ValueError(f'Planning for {topo.name} needs libtpu, which is not installed here. '
                     'Install it with: pip install -e ".[tpu]" (jax[tpu]==0.10.2; works on a CPU '
                     'host), or plan on this machine\'s devices with --topology cpu.')
  if not os.path.exists('/dev/accel0') and not os.path.exists('/dev/vfio'):
    # Not a TPU VM: tell libtpu so instead of letting it probe for one.
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', topo.name)
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  from jax.experimental import topologies
  try:
    desc = topologies.get_topology_desc(
        topology_name=topo.libtpu_name, platform='tpu', chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=topo.host_bounds, num_slices=1)
  except Exception as e:  # noqa: BLE001 - libtpu's errors are RuntimeErrors of many kinds
    raise ValueError(f'libtpu cannot describe {topo.name} ({topo.libtpu_name}): {e}') from e
  return list(desc.devices)


def make_plan_mesh(devices: Sequence, data: int, model: int):
  """A ('data', 'model') mesh; on TPU devices the model axis follows the physical torus."""
  from jax.sharding import Mesh
  import numpy as np
  from promot_jax import partitioning
  if data * model != len(devices):
    raise ValueError(f'--mesh {data},{model} needs {data * model} devices; the topology has '
                     f'{len(devices)}.')
  if devices[0].platform == 'tpu':
    try:
      from jax.experimental import mesh_utils
      return Mesh(mesh_utils.create_device_mesh((data, model), list(devices)), ('data', 'model'))
    except (ValueError, NotImplementedError, AssertionError):
      pass
  return Mesh(np.asarray(partitioning.make_mesh(model, devices).devices), ('data', 'model'))


# ---------------------------------------------------------------------------- FLOPs


def model_flops(cfg, batch: int, inputs: int, targets: int, with_prompt: bool,
                trains_weights: bool) -> float:
  """Counted FLOPs of one train step (see the module docstring for the formula)."""
  d, hk, ff = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
  s_e = inputs + (cfg.prompt_length if with_prompt else 0)
  s_d = targets
  mlp = (len(cfg.mlp_activations) + 1) * d * ff
  enc_weights_per_pos = cfg.num_encoder_layers * (4 * d * hk + mlp)
  cross_kv_per_enc_pos = cfg.num_decoder_layers * 2 * d * hk
  dec_weights_per_pos = cfg.num_decoder_layers * (6 * d * hk + mlp) + d * cfg.vocab_size
  matmul = 2 * batch * (s_e * (enc_weights_per_pos + cross_kv_per_enc_pos)
                        + s_d * dec_weights_per_pos)
  attn = 4 * batch * hk * (cfg.num_encoder_layers * s_e * s_e
                           + cfg.num_decoder_layers * (s_d * s_d + s_d * s_e))
  return float((3 if trains_weights else 2) * matmul + 3 * attn)


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))


# ---------------------------------------------------------------------------- memory

_OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'Ran out of memory', 'out of memory')


def is_oom(error: BaseException) -> bool:
  return any(m in str(error) for m in _OOM_MARKERS)


def oom_summary(error: BaseException) -> str:
  """The compiler's one-line account of an out-of-memory compile."""
  text = str(error).strip().splitlines()
  line = next((l for l in text if any(m in l for m in _OOM_MARKERS)), text[0] if text else '')
  return line.strip()[:400]


def memory_row(stats, hbm_bytes: Optional[float]) -> dict:
  """Per-device bytes from compiled.memory_analysis(); peak = args + outputs - aliased + temps."""
  arg, out = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
  alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
  peak = arg + out - alias + temp + int(getattr(stats, 'generated_code_size_in_bytes', 0) or 0)
  return {'argument_bytes': arg, 'output_bytes': out, 'alias_bytes': alias, 'temp_bytes': temp,
          'peak_bytes': peak, 'hbm_bytes': hbm_bytes,
          'fits': True if hbm_bytes is None else peak <= hbm_bytes}


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds of an abstract tree laid out by `shardings`."""
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves(abstract_tree)
  shards = jax.tree_util.tree_leaves(shardings)
  return int(sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
                 for x, s in zip(leaves, shards)))


def total_bytes(abstract_tree: Any) -> int:
  import jax
  import numpy as np
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(abstract_tree))


def _log(text: str) -> None:
  print(f'promot plan: {text}', file=sys.stderr, flush=True)


def _compile_row(lower_fn, hbm_bytes: Optional[float], what: str = '') -> tuple[dict, Any]:
  """Compile; an out-of-memory compile becomes a 'does not fit' row instead of a traceback."""
  start = time.perf_counter()
  try:
    compiled = lower_fn().compile()
  except Exception as e:  # noqa: BLE001 - the compiler's error types vary by backend
    if not is_oom(e):
      raise
    if what:
      _log(f'{what}: does not fit ({time.perf_counter() - start:.0f}s)')
    return {'fits': False, 'oom': oom_summary(e), 'hbm_bytes': hbm_bytes,
            'compile_s': time.perf_counter() - start}, None
  if what:
    _log(f'{what}: compiled in {time.perf_counter() - start:.0f}s')
  stats = compiled.memory_analysis()
  row = memory_row(stats, hbm_bytes) if stats is not None else {'fits': None, 'hbm_bytes': hbm_bytes}
  row['flops_per_device'] = _cost_flops(compiled)
  row['compile_s'] = time.perf_counter() - start
  return row, compiled


# ---------------------------------------------------------------------------- stages


@dataclasses.dataclass(frozen=True)
class Budget:
  """What one device can hold and do (None: unknown, e.g. a CPU without --hbm_gib)."""
  hbm_bytes: Optional[float]
  peak_flops: Optional[float]

  @classmethod
  def for_topology(cls, topo: Topology, hbm_gib: Optional[float] = None,
                   peak_tflops: Optional[float] = None) -> 'Budget':
    hbm = hbm_gib if hbm_gib is not None else (topo.chip.hbm_gib if topo.chip else None)
    peak = peak_tflops if peak_tflops is not None else (topo.chip.peak_tflops if topo.chip else None)
    return cls(None if hbm is None else hbm * GIB, None if peak is None else peak * 1e12)


def stage_params(run, stage, stacked: bool = False) -> dict:
  """Abstract parameters as the stage starts from them (prompt only if it uses one)."""
  from promot_jax import model
  cfg = run.model_config
  needs_prompt = stage.with_prompt or stage.is_trainable('prompt/prompt')
  if needs_prompt and cfg.prompt_length <= 0:
    raise ValueError(f'Stage {stage.name} uses the prompt but PROMPT_LENGTH is 0; set '
                     '--gin.PROMPT_LENGTH=100 (the paper uses 100).')
  params = model.abstract_params(cfg, stacked=stacked)
  if not needs_prompt:
    params.pop('prompt', None)
  return params


def _add_speed(row: dict, budget: Budget, num_devices: int) -> dict:
  flops = row.get('flops_per_device')
  row['flops_total'] = flops * num_devices if flops else None
  step = flops / budget.peak_flops if flops and budget.peak_flops else None
  row['best_step_s'] = step
  row['tokens_per_s'] = row['tokens_per_step'] / step if step else None
  mf = row.get('model_flops')
  row['model_step_s'] = mf / (num_devices * budget.peak_flops) if mf and budget.peak_flops else None
  return row


def build_step(run, stage, mesh, params):
  """trainer.build_sharded_step; with scan_layers its twin over the stacked tree."""
  from promot_jax import scan_layout, trainer
  cfg, rules, lnf = run.model_config, run.rules(), run.loss_normalizing_factor
  build = scan_layout.build_scanned_step if cfg.scan_layers else trainer.build_sharded_step
  return build(cfg, stage, mesh, rules, params, lnf)


def _abstract_args(run, stage, params, abstract_opt, batch_size: int) -> tuple:
  """(state, frozen, batch, rng) as ShapeDtypeStructs: the train step's arguments."""
  import jax
  import jax.numpy as jnp
  from promot_jax.stages import split_params
  from promot_jax.train_step import FEATURES, TrainState
  lengths = run.task_feature_lengths
  trainable, frozen = split_params(params, stage)
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), trainable, abstract_opt)
  batch = {k: jax.ShapeDtypeStruct(
      (batch_size, lengths['inputs' if k == 'encoder_input_tokens' else 'targets']), jnp.int32)
      for k in FEATURES}
  return state, frozen, batch, jax.eval_shape(lambda: jax.random.PRNGKey(0))


def hlo_flops(run, stage, batch_size: int) -> float:
  """FLOPs of the unrolled (unscanned) step by XLA's cost analysis of its HLO, all devices.

  Compiled cost analysis counts a loop body once, so scanned layers need this instead.
  """
  import jax
  from promot_jax.optim import make_optimizer
  from promot_jax.stages import split_params
  from promot_jax.train_step import make_train_step
  cfg = run.model_config.replace(scan_layers=False)
  params = stage_params(run, stage)
  optimizer = make_optimizer(stage, split_params(params, stage)[0])
  opt = jax.eval_shape(optimizer.init, split_params(params, stage)[0])
  step = jax.jit(make_train_step(cfg, stage, optimizer, run.loss_normalizing_factor))
  cost = step.lower(*_abstract_args(run, stage, params, opt, batch_size)).cost_analysis()
  return float((cost or {}).get('flops', 0.0))


def plan_train(run, stage, mesh, batch_size: int, budget: Budget) -> dict:
  """Compile the stage's train step exactly as the trainer builds it; one result row."""
  from promot_jax import tree_util
  from promot_jax.stages import split_params
  cfg, lengths = run.model_config, run.task_feature_lengths
  params = stage_params(run, stage, stacked=cfg.scan_layers)
  sharded = build_step(run, stage, mesh, params)
  args = _abstract_args(run, stage, params, sharded.abstract_opt_state, batch_size)
  trainable, frozen = split_params(params, stage)
  mesh_text = 'x'.join(map(str, mesh.shape.values()))
  row, _ = _compile_row(lambda: sharded.step_fn.lower(*args), budget.hbm_bytes,
                        f'{stage.name} train step (mesh {mesh_text}, batch {batch_size}'
                        + (', scanned layers)' if cfg.scan_layers else ')'))
  if cfg.scan_layers:
    row['flops_per_device_compiled'] = row.get('flops_per_device')
    row['flops_per_device'] = hlo_flops(run, stage, batch_size) / mesh.devices.size
    row['flops_source'] = 'HLO cost analysis of the unrolled step / devices (scan loop)'
  trains_weights = any(k != 'prompt' for k in trainable)
  prompt = cfg.prompt_length if stage.with_prompt else 0
  row.update(
      stage=stage.name, step='train', mesh=dict(mesh.shape), batch=batch_size,
      tokens_per_step=batch_size * (lengths['inputs'] + lengths['targets'] + prompt),
      trainable_params=tree_util.count_params(trainable),
      frozen_params=tree_util.count_params(frozen),
      trainable_bytes_per_device=per_device_bytes(trainable, sharded.trainable_sharding),
      frozen_bytes_per_device=per_device_bytes(frozen, sharded.frozen_sharding),
      opt_state_bytes_per_device=per_device_bytes(sharded.abstract_opt_state,
                                                  sharded.state_sharding.opt_state),
      opt_state_bytes_total=total_bytes(sharded.abstract_opt_state),
      model_flops=model_flops(cfg, batch_size, lengths['inputs'], lengths['targets'],
                              stage.with_prompt, trains_weights))
  if row['fits'] is False and 'argument_bytes' not in row:  # out of memory: the state it holds
    row['argument_bytes'] = (row['trainable_bytes_per_device'] + row['frozen_bytes_per_device']
                             + row['opt_state_bytes_per_device'])
  return _add_speed(row, budget, mesh.devices.size)


def plan_decode(run, stage, mesh, batch_size: int, budget: Budget) -> dict:
  """Compile the eval suite's greedy decode (targets-length outputs) with the stage's prompt use."""
  import jax
  import jax.numpy as jnp
  from promot_jax import decoding, model, partitioning, tree_util
  cfg, lengths = run.model_config.replace(dropout_rate=0.0), run.task_feature_lengths
  params = stage_params(run, stage, stacked=cfg.scan_layers)
  if not stage.with_prompt:
    params.pop('prompt', None)
  specs = tree_util.flatten(model.logical_axes(cfg, stacked=cfg.scan_layers))
  specs = tree_util.unflatten({p: specs[p] for p in tree_util.flatten(params)})
  p_shard = partitioning.logical_to_sharding(specs, mesh, run.rules())
  data = partitioning.data_sharding(mesh)
  fn = jax.jit(functools.partial(decoding.greedy_decode, cfg, max_decode_length=lengths['targets'],
                                 with_prompt=stage.with_prompt),
               in_shardings=(p_shard, data), out_shardings=data)
  tokens = jax.ShapeDtypeStruct((batch_size, lengths['inputs']), jnp.int32)
  row, _ = _compile_row(lambda: fn.lower(params, tokens), budget.hbm_bytes,
                        f'{stage.name} greedy decode (batch {batch_size})')
  row.update(stage=stage.name, step='decode', mesh=dict(mesh.shape), batch=batch_size,
             tokens_per_step=batch_size * lengths['targets'], model_flops=None,
             note='XLA counts the decode loop body once: FLOPs = encoder + one decoder step')
  return _add_speed(row, budget, mesh.devices.size)


def plan(run, topo: Topology, budget: Budget, stage_names: Sequence[str] = (),
         mesh_shape: Optional[tuple[int, int]] = None, decode: bool = True) -> list[dict]:
  """Rows for every selected stage: its train step and (unless decode=False) its decode."""
  from promot_jax import partitioning
  devices = topology_devices(topo)
  data, model_axis = mesh_shape or (len(devices) // run.num_partitions, run.num_partitions)
  mesh = make_plan_mesh(devices, data, model_axis)
  partitioning.check_batch_divisible(run.batch_size, mesh)
  rows = []
  for stage in _selected(run, stage_names):
    rows.append(plan_train(run, stage, mesh, run.batch_size, budget))
    if decode:
      rows.append(plan_decode(run, stage, mesh, run.batch_size, budget))
  return rows


def search(run, topo: Topology, budget: Budget, stage_names: Sequence[str] = (),
           batch_sizes: Sequence[int] = (), max_model: int = 16) -> list[dict]:
  """Train-step rows for every (data, model) split x batch size; fitting ones first, fastest first."""
  devices = topology_devices(topo)
  n = len(devices)
  splits = [m for m in (2 ** k for k in range(13)) if m <= min(n, max_model) and n % m == 0]
  rows = []
  for stage in _selected(run, stage_names):
    for m in splits:
      mesh = make_plan_mesh(devices, n // m, m)
      for b in batch_sizes or (run.batch_size,):
        if b % (n // m) == 0:
          rows.append(plan_train(run, stage, mesh, b, budget))
  return sorted(rows, key=lambda r: (r['stage'], r.get('fits') is not True,
                                     -(r.get('tokens_per_s') or 0), r.get('peak_bytes') or 0))


def _selected(run, names: Sequence[str]) -> list:
  return [run.get_stage(n)[0] for n in names] if names else list(run.stages)


# ---------------------------------------------------------------------------- output


def _gib(b: Optional[float]) -> str:
  """Bytes, binary units: 31.25G, 512.0M, 3.2K, 524B."""
  if b is None:
    return '-'
  for unit, size in (('G', GIB), ('M', 2 ** 20), ('K', 2 ** 10)):
    if abs(b) >= size:
      return f'{b / size:.2f}G' if unit == 'G' else f'{b / size:.1f}{unit}'
  return f'{int(b)}B'


def _num(x: Optional[float], unit: str = '', scale: float = 1.0, fmt: str = '.3g') -> str:
  return '-' if not x else f'{x / scale:{fmt}}{unit}'


def format_table(rows: Sequence[dict]) -> str:
  cols = ('stage', 'step', 'mesh', 'batch', 'fits', 'args', 'out', 'temp', 'peak', 'HBM',
          'TFLOP/dev', 'model TFLOP', 'best step', 'tokens/s')
  lines = [cols]
  for r in rows:
    fits = {True: 'yes', False: 'NO', None: '?'}[r.get('fits')]
    lines.append((r['stage'], r['step'], 'x'.join(str(v) for v in r['mesh'].values()),
                  str(r['batch']), fits, _gib(r.get('argument_bytes')), _gib(r.get('output_bytes')),
                  _gib(r.get('temp_bytes')), _gib(r.get('peak_bytes')), _gib(r.get('hbm_bytes')),
                  _num(r.get('flops_per_device'), '', 1e12), _num(r.get('model_flops'), '', 1e12),
                  _num(r.get('best_step_s'), 's', 1.0, '.3g'), _num(r.get('tokens_per_s'), '', 1, ',.0f')))
  widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
  out = ['  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
  for r in rows:
    if r.get('oom'):
      out.append(f'{r["stage"]} {r["step"]} does not fit: {r["oom"]}')
    if r['step'] == 'train' and 'trainable_params' in r:
      out.append(f'{r["stage"]}: trains {r["trainable_params"]:,} parameters '
                 f'({_gib(r["trainable_bytes_per_device"])}/device), frozen {r["frozen_params"]:,} '
                 f'({_gib(r["frozen_bytes_per_device"])}/device); optimizer state '
                 f'{r["opt_state_bytes_total"]:,} bytes in all, '
                 f'{r["opt_state_bytes_per_device"]:,} bytes/device')
  return '\n'.join(out)


def _header(run, topo: Topology, budget: Budget, num_devices: int) -> str:
  from promot_jax import model, tree_util
  cfg, lengths = run.model_config, run.task_feature_lengths
  n = tree_util.count_params(model.abstract_params(cfg))
  where = (f'{topo.name}: {topo.num_chips} x TPU {topo.chip.name} chips ({topo.libtpu_name}, '
           f'{topo.num_hosts} host(s)), {topo.chip.hbm_gib:g} GiB HBM and '
           f'{topo.chip.peak_tflops:g} TFLOP/s bf16 per chip' if topo.chip else
           f'local devices ({num_devices})')
  budget_text = (f'budget/device: HBM {_gib(budget.hbm_bytes)}, peak '
                 f'{_num(budget.peak_flops, " TFLOP/s", 1e12)}')
  scan = ('; scanned layers (the trainer does not run them yet; without remat their memory '
          'exceeds the unrolled step\'s)' if cfg.scan_layers else '')
  return (f'plan for {where}\n{budget_text}\nmodel: {n / 1e9:.2f}B parameters, activations '
          f'{cfg.dtype}, remat {cfg.remat_policy}; batch {run.batch_size}, inputs '
          f'{lengths["inputs"]} + prompt {cfg.prompt_length}, targets {lengths["targets"]}{scan}')


FORMULA = ('model FLOPs: M = 2 x weights x positions each weight sees, A = attention scores; '
           'weights train: 3M + 3A; prompt only: 2M + 3A. best step = compiler FLOPs per device / '
           'peak; peak = args + outputs - aliased + temps + code (per device).')


# ---------------------------------------------------------------------------- command


def _prefer_cpu_backend() -> None:
  """Plans never run anything: keep jax off any accelerator (TPU devices here are compile-only)."""
  import jax
  from jax._src import xla_bridge
  if not os.environ.get('JAX_PLATFORMS') and not xla_bridge.backends_are_initialized():
    jax.config.update('jax_platforms', 'cpu')


def _parse_mesh(text: Optional[str]) -> Optional[tuple[int, int]]:
  if not text:
    return None
  m = re.fullmatch(r'\s*(\d+)\s*[,x]\s*(\d+)\s*', text)
  if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
    raise ValueError(f'--mesh {text!r}: expected DATA,MODEL, e.g. --mesh 4,8')
  return int(m.group(1)), int(m.group(2))


def _cmd_plan(args: argparse.Namespace) -> int:
  from promot_jax.cli import load_run
  topo = parse_topology(args.topology)
  mesh_shape = _parse_mesh(args.mesh)
  try:
    batch_sizes = [int(b) for b in args.batch_sizes.split(',')] if args.batch_sizes else []
  except ValueError:
    raise ValueError(f'--batch_sizes {args.batch_sizes!r}: expected integers, e.g. 32,64,128')
  if topo.chip is not None and not libtpu_available():
    topology_devices(topo)  # raises the install hint before any slow work
  _prefer_cpu_backend()
  # Plans need no data, vocabulary or MODEL_DIR: tasks are not imported and nothing is written.
  run = load_run(args.gin_file, ["MODEL_DIR='/tmp/promot_plan_unused'", *args.gin_flags])
  run.validate()
  budget = Budget.for_topology(topo, args.hbm_gib, args.peak_tflops)
  stages = [args.stage] if args.stage else []
  if args.search:
    rows = search(run, topo, budget, stages, batch_sizes, args.max_model)
  else:
    rows = plan(run, topo, budget, stages, mesh_shape, decode=not args.skip_decode)
  num_devices = math.prod(rows[0]['mesh'].values()) if rows else 0
  print(_header(run, topo, budget, num_devices))
  print(format_table([r for r in rows if not args.search or r.get('fits')] or rows))
  if args.search:
    print(f'{sum(1 for r in rows if r.get("fits"))} of {len(rows)} configurations fit '
          '(fitting ones listed, fastest first).')
  print(FORMULA)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'topology': topo.name, 'devices': num_devices,
                 'chip': dataclasses.asdict(topo.chip) if topo.chip else None,
                 'hbm_bytes_per_device': budget.hbm_bytes, 'peak_flops_per_device': budget.peak_flops,
                 'formula': FORMULA, 'rows': rows}, f, indent=2)
    print(f'wrote {args.json}')
  return 0


def add_subcommand(subparsers) -> None:
  text = ('compile a run\'s stages for a TPU topology (no TPU needed): memory per device, FLOPs, '
          'best-case step time')
  p = subparsers.add_parser('plan', help=text, description=text + '. Gin overrides: --gin.NAME=VALUE.')
  p.add_argument('--gin_file', action='append', required=True, help='gin run file (repeatable)')
  p.add_argument('--topology', default='v4-64',
                 help='v4-N / v5p-N (N TensorCores), v5e-N / v5litepod-N / v6e-N (N chips), or cpu '
                      '(default v4-64)')
  p.add_argument('--stage', default=None, help='plan one stage (default: every stage)')
  p.add_argument('--mesh', default=None, help='DATA,MODEL (default: devices/NUM_PARTITIONS, NUM_PARTITIONS)')
  p.add_argument('--search', action='store_true', help='try (data, model) splits and batch sizes')
  p.add_argument('--batch_sizes', default=None, help='with --search: e.g. 32,64,128 (default BATCH_SIZE)')
  p.add_argument('--max_model', type=int, default=16, help='with --search: largest model axis tried')
  p.add_argument('--skip_decode', action='store_true', help='do not compile the greedy decode')
  p.add_argument('--hbm_gib', type=float, default=None, help='override the HBM budget per device')
  p.add_argument('--peak_tflops', type=float, default=None, help='override the peak per device')
  p.add_argument('--json', default=None, help='also write the results to this JSON file')
  p.set_defaults(fn=_cmd_plan)
