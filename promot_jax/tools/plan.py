"""`promot plan`: will a run's stages fit a TPU slice, and how fast could they go?

Before renting a pod, compile each stage's train step (and the eval greedy decode) for a
TPU topology on this CPU host: libtpu describes the slice's devices without owning any,
jax lowers the real step (train.sharding.build_sharded_step, the trainer's shardings) with
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

With SCAN_LAYERS the step is the one the trainer runs over the stacked tree
(train.sharding.build_stage_layout), and its FLOPs
come from the unrolled step's HLO cost analysis, because XLA's compiled cost analysis counts a
loop body once. TPU chips, topologies and memory accounting live in plan_hardware.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax._src import xla_bridge

from promot_jax import mesh as partitioning, tree_util
from promot_jax.checkpoints import loading
from promot_jax.ginconf import loaders
from promot_jax.model import decoding, formats, layers, transformer as model
from promot_jax.tools.plan_hardware import (CHIPS, GIB, Chip, Topology,  # noqa: F401 (re-exported)
                                            compile_row, known_sizes, libtpu_available,
                                            make_plan_mesh, model_flops, parse_topology,
                                            per_device_bytes, topology_devices, total_bytes)
from promot_jax.train import sharding
from promot_jax.train.optimizer import make_optimizer
from promot_jax.train.stages import check_modules, split_params, uses_modules
from promot_jax.train.step import (FEATURES, PROMPT_IDS, TrainState, batch_features,
                                   make_train_step)

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
  cfg = run.model_config
  check_modules(stage, cfg)
  params = model.abstract_params(cfg, stacked=stacked)
  return params if uses_modules(stage, params) else formats.without_modules(params)


def _add_speed(row: dict, budget: Budget, num_devices: int) -> dict:
  flops = row.get('flops_per_device')
  row['flops_total'] = flops * num_devices if flops else None
  step = flops / budget.peak_flops if flops and budget.peak_flops else None
  row['best_step_s'] = step
  row['tokens_per_s'] = row['tokens_per_step'] / step if step else None
  mf = row.get('model_flops')
  row['model_step_s'] = mf / (num_devices * budget.peak_flops) if mf and budget.peak_flops else None
  return row


def _lowered_for(mesh, lower, *args):
  """lower(*args), traced with the model's layouts for the mesh's platform (a TPU slice's on
  this CPU host: no CPU-only head copies; layers.compiling_for)."""
  with layers.compiling_for(mesh.devices.flat[0].platform):
    return lower(*args)


def build_step(run, stage, mesh, params):
  """The step the trainer jits (train.sharding.build_stage_layout of the t5x tree `params`):
  over the stacked tree with SCAN_LAYERS."""
  cfg, rules, lnf = run.model_config, run.rules(), run.loss_normalizing_factor
  return sharding.build_stage_layout(cfg, stage, mesh, rules, params, lnf).step


def _abstract_args(run, stage, params, abstract_opt, batch_size: int) -> tuple:
  """(state, frozen, batch, rng) as ShapeDtypeStructs: the train step's arguments."""
  lengths = run.task_feature_lengths
  trainable, frozen = split_params(params, stage)
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), trainable, abstract_opt)
  batch = {k: jax.ShapeDtypeStruct(
      (batch_size, lengths['inputs' if k == 'encoder_input_tokens' else 'targets']), jnp.int32)
      for k in FEATURES}
  if PROMPT_IDS in batch_features(run.model_config):
    batch[PROMPT_IDS] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  return state, frozen, batch, jax.eval_shape(lambda: jax.random.PRNGKey(0))


def hlo_flops(run, stage, batch_size: int) -> float:
  """FLOPs of the unrolled (unscanned) step by XLA's cost analysis of its HLO, all devices.

  Compiled cost analysis counts a loop body once, so scanned layers need this instead.
  """
  cfg = run.model_config.replace(scan_layers=False)
  params = stage_params(run, stage)
  optimizer = make_optimizer(stage, split_params(params, stage)[0])
  opt = jax.eval_shape(optimizer.init, split_params(params, stage)[0])
  step = jax.jit(make_train_step(cfg, stage, optimizer, run.loss_normalizing_factor))
  cost = step.lower(*_abstract_args(run, stage, params, opt, batch_size)).cost_analysis()
  return float((cost or {}).get('flops', 0.0))


def plan_train(run, stage, mesh, batch_size: int, budget: Budget) -> dict:
  """Compile the stage's train step exactly as the trainer builds it; one result row."""
  cfg, lengths = run.model_config, run.task_feature_lengths
  sharded = build_step(run, stage, mesh, stage_params(run, stage))
  params = stage_params(run, stage, stacked=cfg.scan_layers)
  args = _abstract_args(run, stage, params, sharded.abstract_opt_state, batch_size)
  trainable, frozen = split_params(params, stage)
  mesh_text = 'x'.join(map(str, mesh.shape.values()))
  row, _ = compile_row(lambda: _lowered_for(mesh, sharded.step_fn.lower, *args), budget.hbm_bytes,
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
  row, _ = compile_row(lambda: _lowered_for(mesh, fn.lower, params, tokens), budget.hbm_bytes,
                        f'{stage.name} greedy decode (batch {batch_size})')
  row.update(stage=stage.name, step='decode', mesh=dict(mesh.shape), batch=batch_size,
             tokens_per_step=batch_size * lengths['targets'], model_flops=None,
             note='XLA counts the decode loop body once: FLOPs = encoder + one decoder step')
  return _add_speed(row, budget, mesh.devices.size)


def plan(run, topo: Topology, budget: Budget, stage_names: Sequence[str] = (),
         mesh_shape: Optional[tuple[int, int]] = None, decode: bool = True) -> list[dict]:
  """Rows for every selected stage: its train step and (unless decode=False) its decode."""
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


def plan_eval(run, mesh, batch_size: int, lengths: tuple[int, int], beam_size: int,
              budget: Budget, restore_dtype: Optional[str] = None) -> dict:
  """Compile `promot eval`'s decode of one batch exactly as the suite runs it: the t5x tree
  laid out by the run's rules (checkpoints.loading.param_shardings; cast to `restore_dtype`),
  the batch over the data axis, the prompt attached (the fine-tuned task: the longest input),
  beam search with the cache (beam_size > 1) or greedy."""
  cfg = run.model_config.replace(dropout_rate=0.0, scan_layers=False)
  inputs, targets = lengths
  flat = tree_util.flatten(model.abstract_params(cfg))
  shardings = loading.param_shardings(cfg, {p: v.shape for p, v in flat.items()}, mesh,
                                      run.rules())
  dtype = jnp.dtype(restore_dtype) if restore_dtype else None
  params = tree_util.unflatten({p: jax.ShapeDtypeStruct(v.shape, dtype or v.dtype,
                                                        sharding=shardings[p])
                                for p, v in flat.items()})
  tokens = jax.ShapeDtypeStruct((batch_size, inputs), jnp.int32,
                                sharding=partitioning.data_sharding(mesh))
  with_prompt = cfg.prompt_length > 0
  if beam_size > 1:
    fn = jax.jit(lambda p, t: decoding.beam_search_jitted(
        cfg, p, t, targets, beam_size, jnp.float32(0.6), with_prompt, jnp.int32(1)).tokens)
    what = f'beam-{beam_size} decode'
  else:
    fn = jax.jit(lambda p, t: decoding.greedy_decode_jitted(cfg, p, t, targets, with_prompt,
                                                            jnp.int32(1)))
    what = 'greedy decode'
  row, _ = compile_row(lambda: _lowered_for(mesh, fn.lower, params, tokens), budget.hbm_bytes,
                        f'eval {what} (batch {batch_size}, inputs {inputs}, targets {targets})')
  row.update(stage='eval', step=what, mesh=dict(mesh.shape), batch=batch_size,
             tokens_per_step=batch_size * targets, model_flops=None,
             param_bytes_per_device=per_device_bytes(params, jax.tree_util.tree_map(
                 lambda x: x.sharding, params)),
             restore_dtype=restore_dtype or 'float32',
             note='XLA counts the decode loop body once: FLOPs = encoder + one decoder step')
  return _add_speed(row, budget, mesh.devices.size)


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
  cfg, lengths = run.model_config, run.task_feature_lengths
  n = tree_util.count_params(model.abstract_params(cfg))
  where = (f'{topo.name}: {topo.num_chips} x TPU {topo.chip.name} chips ({topo.libtpu_name}, '
           f'{topo.num_hosts} host(s)), {topo.chip.hbm_gib:g} GiB HBM and '
           f'{topo.chip.peak_tflops:g} TFLOP/s bf16 per chip' if topo.chip else
           f'local devices ({num_devices})')
  budget_text = (f'budget/device: HBM {_gib(budget.hbm_bytes)}, peak '
                 f'{_num(budget.peak_flops, " TFLOP/s", 1e12)}')
  scan = '; scanned layers (SCAN_LAYERS)' if cfg.scan_layers else ''
  return (f'plan for {where}\n{budget_text}\nmodel: {n / 1e9:.2f}B parameters, activations '
          f'{cfg.dtype}, remat {cfg.remat_policy}; batch {run.batch_size}, inputs '
          f'{lengths["inputs"]} + prompt {cfg.prompt_length}, targets {lengths["targets"]}{scan}')


FORMULA = ('model FLOPs: M = 2 x weights x positions each weight sees, A = attention scores; '
           'weights train: 3M + 3A; prompt only: 2M + 3A. best step = compiler FLOPs per device / '
           'peak; peak = args + outputs - aliased + temps + code (per device).')


# ---------------------------------------------------------------------------- command


def _prefer_cpu_backend() -> None:
  """Plans never run anything: keep jax off any accelerator (TPU devices here are compile-only)."""
  if not os.environ.get('JAX_PLATFORMS') and not xla_bridge.backends_are_initialized():
    jax.config.update('jax_platforms', 'cpu')


def _parse_mesh(text: Optional[str]) -> Optional[tuple[int, int]]:
  if not text:
    return None
  m = re.fullmatch(r'\s*(\d+)\s*[,x]\s*(\d+)\s*', text)
  if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
    raise ValueError(f'--mesh {text!r}: expected DATA,MODEL, e.g. --mesh 4,8')
  return int(m.group(1)), int(m.group(2))


def _parse_pair(text: str, flag: str) -> tuple[int, int]:
  m = re.fullmatch(r'\s*(\d+)\s*,\s*(\d+)\s*', text or '')
  if not m:
    raise ValueError(f'{flag} {text!r}: expected INPUTS,TARGETS, e.g. 1024,128')
  return int(m.group(1)), int(m.group(2))


def command(args: argparse.Namespace) -> int:
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
  run = loaders.load_run(args.gin_file, ["MODEL_DIR='/tmp/promot_plan_unused'", *args.gin_flags],
                         getattr(args, 'gin_search_paths', None) or ())
  run.validate()
  budget = Budget.for_topology(topo, args.hbm_gib, args.peak_tflops)
  stages = [args.stage] if args.stage else []
  if args.search:
    rows = search(run, topo, budget, stages, batch_sizes, args.max_model)
  elif args.eval:
    devices = topology_devices(topo)
    data, model_axis = mesh_shape or (len(devices) // run.num_partitions, run.num_partitions)
    mesh = make_plan_mesh(devices, data, model_axis)
    partitioning.check_batch_divisible(args.eval_batch, mesh)
    rows = [plan_eval(run, mesh, args.eval_batch, _parse_pair(args.eval_lengths, '--eval_lengths'),
                      args.beam_size, budget, args.restore_dtype)]
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
