"""`promot bench`: how fast promot_jax trains and decodes here, next to transformers.

  promot bench                       # mT5-small shapes (batch 8, inputs 128, targets 16, prompt 100)
  promot bench --quick --no-hf       # a tiny model, seconds: what the tests run
  promot bench --json out.json --profile

Sections (each a median over --repeats calls, compile time apart):
  train   seconds per step of prompt_tuning, model_tuning and finetune (the trainer's jitted
          step), tokens/s, optimizer-state bytes, XLA FLOPs and memory, peak host/device memory;
          transformers full fine-tuning and PEFT prompt tuning at the same shapes, run
          round-robin with the promot_jax steps so every ratio comes from one run; each
          step's matmul floor (bench/floor.py: its dots timed alone at their shapes, in the
          same rounds, by a process of its own) and step / floor. --isolate: each workload in
          a process of its own (bench/isolate.py)
  decode  greedy and beam search with the cache vs transformers' generate; each program's matmul
          floor (its decoding loop runs once per position), decode / floor, and floor / generate:
          the lowest ratio to transformers that doing nothing but the products would reach
  data    seqio input pipeline examples/s
  scan    stage 2's step unrolled vs scanned (SCAN_LAYERS): compile time and step time
  scaling step time vs batch, inputs and prompt length (stages 1 and 2), compile time vs depth
          (unrolled and scanned); bench/scaling.py
  profile (--profile) where a step's time goes: forward / backward / optimizer, logits share
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, Callable, Optional

import jax

from promot_jax.tools.bench import (floor as floor_lib, hf_bench, isolate as isolate_lib,
                                    jax_bench, profile as profile_lib, scaling)
from promot_jax.tools.bench.common import (PRESETS, BenchConfig, Timer, reset_peak_rss,
                                           run_round_robin, synthetic_batch)


def _load() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _environment() -> dict:
  return {'machine': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(),
          'jax': jax.__version__, 'backend': jax.default_backend(),
          'devices': [str(d) for d in jax.devices()], 'load_average_start': _load(),
          # what `promot` set (promot_jax.host_memory: huge pages, freed memory kept);
          # it applies to the whole process, so to transformers' side of a ratio as well
          'glibc_tunables': os.environ.get('GLIBC_TUNABLES')}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  return a / b if a and b else None


def ratios(result: dict) -> dict:
  """The headline ratios (promot_jax / reference; < 1 means promot_jax is faster)."""
  train, hf = result.get('train', {}), result.get('hf_train', {})
  dec = result.get('decode', {})
  s = lambda d, k: (d.get(k) or {}).get('step_s')  # noqa: E731
  beam = f'beam{result["config"]["beam_size"]}'
  scan = result.get('scan')
  out = {
      'prompt_tuning / hf_peft_prompt_tuning': _ratio(s(train, 'prompt_tuning'),
                                                      s(hf, 'peft_prompt_tuning')),
      'finetune / hf_full_finetune': _ratio(s(train, 'finetune'), s(hf, 'full_finetune')),
      'prompt_tuning / model_tuning': _ratio(s(train, 'prompt_tuning'), s(train, 'model_tuning')),
      'greedy / hf_greedy': _ratio(dec.get('promot_jax/greedy'), dec.get('hf/greedy')),
      f'{beam} / hf_{beam}': _ratio(dec.get(f'promot_jax/{beam}'), dec.get(f'hf/{beam}')),
  }
  for name, row in train.items():   # how far each step is from its products alone
    out[f'{name} step / floor'] = _ratio(row.get('step_s'), (row.get('floor') or {}).get('floor_s'))
  for method in ('greedy', beam):     # the same for decoding, and the lowest ratio to
    floor_s = ((result.get('decode_floor') or {}).get(f'promot_jax/{method}') or {}).get(
        'floor_s')                    # transformers that doing only the products would give
    out[f'{method} / floor'] = _ratio(dec.get(f'promot_jax/{method}'), floor_s)
    out[f'{method} floor / hf_{method}'] = _ratio(floor_s, dec.get(f'hf/{method}'))
  if scan:   # --sections scan
    out['scanned / unrolled compile (model_tuning)'] = _ratio(scan['scanned']['compile_s'],
                                                              scan['unrolled']['compile_s'])
    out['scanned / unrolled step (model_tuning)'] = _ratio(s(scan, 'scanned'), s(scan, 'unrolled'))
  return out


def _log_floor(log: Callable[[str], None], name: str, floor: Optional[dict]) -> None:
  if floor:
    log(f'  {name}: {floor["dots"]} dots ({floor["distinct_shapes"]} shapes), '
        f'{floor["dot_flops"] / 1e9:.1f} GFLOP, alone {floor["floor_s"]:.3f} s '
        f'({floor["gflops"]:.0f} GFLOP/s)')


class Floors:
  """The matmul floors of programs ({name: their dots, or None where they cannot be counted}),
  each timed by a worker process of its own (bench/floor.py, bench/isolate.py): `timers` go
  into the timing rounds beside the programs; `summary(name)` after them."""

  def __init__(self, programs: dict, bc: BenchConfig):
    self.programs = programs
    counted = [(name, dots) for name, dots in programs.items() if dots is not None]
    workers = isolate_lib.start([('floor', f'floor/{name}', dots) for name, dots in counted], bc)
    self._timers = {name: Timer(f'floor/{name}', w, self_timed=True)
                    for (name, _), w in zip(counted, workers)}

  @property
  def timers(self) -> list[Timer]:
    return list(self._timers.values())

  def summary(self, name: str) -> Optional[dict]:
    dots, timer = self.programs[name], self._timers.get(name)
    return floor_lib.summary(floor_lib.facts(dots), timer.times) if timer else None

  def __enter__(self) -> 'Floors':
    return self

  def __exit__(self, *exc: Any) -> None:
    isolate_lib.close([t.call for t in self._timers.values()])


# The train section's groups, each timed round-robin with its transformers counterpart:
# stage 1 and stage 2 with PEFT prompt tuning; fine-tuning with full fine-tuning.
_TRAIN_GROUPS = ((('prompt_tuning', 'model_tuning'), 'peft_prompt_tuning'),
                 (('finetune',), 'full_finetune'))


def _hf_row(timer: Timer, optimizer_state_bytes: Optional[int]) -> dict:
  return {'step_s': timer.median_s, 'first_call_s': timer.first_s, 'step_times_s': timer.times,
          'optimizer_state_bytes': optimizer_state_bytes}


def run_bench(bc: BenchConfig, with_hf: bool = True, sections=('train', 'decode', 'data'),
              profile: bool = False, log: Callable[[str], None] = print,
              isolate: bool = False) -> dict:
  """Run the benchmark sections; a JSON-serialisable dict of every figure.

  `isolate`: the train and decode workloads each in a process of their own (bench/isolate.py).
  """
  cfg = jax_bench.model_config(bc)
  result: dict[str, Any] = {'config': bc.__dict__.copy(), 'environment': _environment()}
  log(f'bench: {bc.model} batch {bc.batch}, inputs {bc.inputs}, targets {bc.targets}, '
      f'prompt {bc.prompt_length}; devices {result["environment"]["devices"]}; '
      f'load {result["environment"]["load_average_start"]}')
  params = jax_bench.random_params(bc)
  batch = synthetic_batch(bc, cfg.vocab_size)
  if with_hf:
    result['environment'].update(hf_bench.torch_info())

  if isolate:
    result['isolate'] = True
    log('each workload in its own process (--isolate)')
  if 'train' in sections and isolate:
    result['train'], result['hf_train'], result['memory'] = {}, {}, {}
    for group, hf_name in _TRAIN_GROUPS:
      hf_name = hf_name if with_hf else None
      specs = [('promot_jax', n) for n in group] + ([('hf', hf_name)] if hf_name else [])
      workers = isolate_lib.start(specs, bc)
      try:
        timers = [Timer(f'{kind}/{name}', w, self_timed=True)
                  for (kind, name), w in zip(specs, workers)]
        for name, w in zip(group, workers):
          log(f'  promot_jax {name}: compiled in {w.info["compile_s"]:.1f} s (own process)')
        # each step's products alone, timed within the rounds by workers of their own
        with Floors({name: w.info.pop('dots') for name, w in zip(group, workers)}, bc) as floors:
          log(f'train {" + ".join(t.name for t in timers)} ({bc.repeats} rounds)')
          run_round_robin(timers + floors.timers, bc.repeats, log)
        finished = {w.name: w.finish(bc.repeats) for w in workers}
      finally:
        isolate_lib.close(workers)
      result['train'].update(jax_bench.finish_train_rows(
          timers[:len(group)], {w.name: w.info for w in workers[:len(group)]}))
      for t in timers[:len(group)]:
        name = t.name.rsplit('/', 1)[1]
        result['train'][name]['floor'] = floors.summary(name)
        _log_floor(log, t.name, result['train'][name]['floor'])
      if hf_name:
        result['hf_train'][hf_name] = _hf_row(timers[-1],
                                              finished[hf_name]['optimizer_state_bytes'])
      for (kind, name), _ in zip(specs, workers):
        result['memory'][f'{kind}/{name} (own process)'] = {
            'peak_host_rss_bytes': finished[name]['peak_host_rss_bytes'],
            'peak_device_bytes': None}
  elif 'train' in sections:
    # Group 1: stage 1 vs stage 2 vs PEFT prompt tuning; group 2: finetune vs HF full.
    result['train'], result['hf_train'], result['memory'] = {}, {}, {}
    for group, hf_name in _TRAIN_GROUPS:
      reset_peak_rss()
      timers, infos = jax_bench.train_step_timers(bc, params, batch, group, log)
      ours = list(timers)
      hf_steps = {}
      if with_hf:
        build = getattr(hf_bench, hf_name)
        hf_steps[hf_name] = build(cfg, bc, batch, jax_bench.stage_for(group[0]))
        timers.append(Timer(f'hf/{hf_name}', hf_steps[hf_name]))
      # each step's products alone, timed within the rounds by workers of their own
      with Floors({t.name.rsplit('/', 1)[1]: floor_lib.dots_of_hlo(t.call.compiled.as_text())
                   for t in ours}, bc) as floors:
        log(f'train {" + ".join(t.name for t in timers)} ({bc.repeats} rounds)')
        run_round_robin(timers + floors.timers, bc.repeats, log)
      result['train'].update(jax_bench.finish_train_rows(ours, infos))
      for t in ours:
        name = t.name.rsplit('/', 1)[1]
        result['train'][name]['floor'] = floors.summary(name)
        _log_floor(log, t.name, result['train'][name]['floor'])
      for t in timers:
        if t.name.startswith('hf/'):
          result['hf_train'][t.name[3:]] = _hf_row(
              t, hf_bench.optimizer_state_bytes(hf_steps[t.name[3:]]))
      result['memory'][' + '.join(group)] = jax_bench.memory_now()
      del timers, hf_steps

  if 'decode' in sections:
    # each decoding program's products alone (its loop's dots once per position), timed
    # within the rounds by workers of their own
    programs = {name: floor_lib.dots_of_hlo(compiled.as_text(), bc.decode_length)
                for name, compiled in jax_bench.decode_programs(bc, params, batch).items()}
    if isolate:
      names = [f'{side}/{method}' for side in ('promot_jax', 'hf')[:2 if with_hf else 1]
               for method in ('greedy', f'beam{bc.beam_size}')]
      workers = isolate_lib.start([('decode', n) for n in names], bc)
      timers = [Timer(n, w, self_timed=True) for n, w in zip(names, workers)]
    else:
      workers = []
      timers = jax_bench.decode_timers(bc, params, batch)
      if with_hf:
        timers += hf_bench.generate_timers(cfg, bc, batch)
    try:
      with Floors(programs, bc) as floors:
        log(f'decode {" + ".join(t.name for t in timers)} ({bc.repeats} rounds)')
        run_round_robin(timers + floors.timers, bc.repeats, log)
    finally:
      isolate_lib.close(workers)
    result['decode'] = {t.name: t.median_s for t in timers}
    result['decode_tokens_per_s'] = {t.name: bc.batch * bc.decode_length / t.median_s
                                     for t in timers}
    result['decode_floor'] = {name: floors.summary(name) for name in programs}
    for name, found in result['decode_floor'].items():
      if found:
        _log_floor(log, name, found)
      else:
        log(f'  {name}: no floor (a dot in a conditional branch runs a data-dependent number '
            'of times)')

  if 'data' in sections:
    log('data pipeline')
    result['data'] = jax_bench.optional(lambda: jax_bench.data_pipeline(bc), log)
    if result['data']:
      log(f'  {result["data"]["examples_per_s"]:.0f} examples/s')

  if 'scan' in sections:
    timers, infos = jax_bench.scan_timers(bc, params, batch, log=log)
    log(f'scan {" + ".join(t.name for t in timers)} ({bc.repeats} rounds)')
    run_round_robin(timers, bc.repeats, log)
    result['scan'] = jax_bench.finish_train_rows(timers, infos)
    del timers

  if 'scaling' in sections:
    log('scaling: step time by batch, inputs and prompt length; compile time by depth')
    quick = bc.model == 'mt5_tiny'
    result['scaling'] = scaling.run(bc, scaling.QUICK_GRID if quick else scaling.GRID,
                                    scaling.QUICK_LAYERS if quick else scaling.LAYERS, log)

  if profile:
    log('profile: where a step\'s time goes')
    result['profile'] = profile_lib.breakdown(bc, params, batch, log)

  result['ratios'] = ratios(result)
  result['environment']['load_average_end'] = _load()
  return result


def format_summary(result: dict) -> str:
  """A short human-readable table of the headline figures."""
  lines = ['']
  if result.get('train') or result.get('hf_train') or result.get('scan') or result.get('decode'):
    lines.append(f'{"workload":<34}{"step s":>10}{"first s":>10}{"tokens/s":>11}{"opt bytes":>14}')
  for name, row in (result.get('train') or {}).items():
    lines.append(f'promot_jax {name:<23}{row["step_s"]:>10.3f}{row["first_call_s"]:>10.2f}'
                 f'{row["tokens_per_s"]:>11.0f}{row["optimizer_state_bytes"]:>14,}')
  for name, row in (result.get('hf_train') or {}).items():
    lines.append(f'hf {name:<31}{row["step_s"]:>10.3f}{row["first_call_s"]:>10.2f}'
                 f'{"":>11}{row["optimizer_state_bytes"]:>14,}')
  for name, row in (result.get('scan') or {}).items():
    lines.append(f'promot_jax model_tuning {name:<11}{row["step_s"]:>10.3f}'
                 f'{row["first_call_s"]:>10.2f}{row["tokens_per_s"]:>11.0f}   compile '
                 f'{row["compile_s"]:.1f} s')
  for name, tps in (result.get('decode_tokens_per_s') or {}).items():
    lines.append(f'decode {name:<27}{result["decode"][name]:>10.3f}{"":>10}{tps:>11.1f}')
  if result.get('data'):
    lines.append(f'data pipeline: {result["data"]["examples_per_s"]:.0f} examples/s')
  if result.get('scaling'):
    lines += scaling.summary(result['scaling'], BenchConfig(**result['config']))
  lines.append('')
  for name, r in result['ratios'].items():   # '-': a side of the ratio was not run
    lines.append(f'ratio {name:<44} {"-" if r is None else f"{r:.3f}"}')
  env = result['environment']
  lines.append(f'load average: start {env["load_average_start"]}, end {env["load_average_end"]}'
               f' on {env["cpu_count"]} CPUs')
  return '\n'.join(lines)


def command(args: argparse.Namespace) -> int:
  bc = PRESETS['quick' if args.quick else args.config]
  overrides = {k: getattr(args, k) for k in ('batch', 'inputs', 'targets', 'prompt_length',
                                             'repeats') if getattr(args, k) is not None}
  bc = bc.replace(**overrides)
  start = time.perf_counter()
  result = run_bench(bc, with_hf=not args.no_hf, sections=tuple(args.sections.split(',')),
                     profile=args.profile, isolate=args.isolate)
  result['wall_s'] = time.perf_counter() - start
  print(format_summary(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'wrote {args.json}')
  return 0
