"""How the cost grows (`promot bench --sections scaling`): step time of stage 1 and stage 2 as
one shape grows with the others at the run's base shapes, and stage 2's compile time as the
model deepens, with unrolled and scanned layers.

Each point is its own compiled step (AOT, as the train section's), timed for `repeats` calls
after a first call (median). Stage 1 with no prompt has nothing to train, so that point is left
out; stage 2 with no prompt is fine-tuning (the `finetune` stage, the same paper settings).
`growth` compares the step-time factor with the size factor between a shape's smallest and
largest value: 1.0 is linear, below 1 grows slower (fixed costs: the optimizer over every
weight, the output head), above 1 faster (attention's square in the sequence length).
"""

from __future__ import annotations

from typing import Callable, Optional

from promot_jax.tools.bench import jax_bench
from promot_jax.tools.bench.common import BenchConfig, Timer, run_round_robin, synthetic_batch

GRID = {'batch': (4, 8, 16), 'inputs': (128, 512), 'prompt_length': (0, 100, 200)}
LAYERS = (2, 4, 8)
# The tiny 'quick' model (tests): the same sweep at its shapes.
QUICK_GRID = {'batch': (2, 4), 'inputs': (32, 64), 'prompt_length': (0, 4, 8)}
QUICK_LAYERS = (1, 2)
STAGES = ('prompt_tuning', 'model_tuning')


def points(bc: BenchConfig, grid=GRID) -> list[BenchConfig]:
  """Every distinct configuration of the grid: one shape varied, the others at bc's."""
  out: list[BenchConfig] = []
  for axis, values in grid.items():
    for value in values:
      c = bc.replace(**{axis: value})
      if c not in out:
        out.append(c)
  return out


def _stage_name(stage: str, c: BenchConfig) -> Optional[str]:
  if c.prompt_length:
    return stage
  return None if stage == 'prompt_tuning' else 'finetune'


def _inputs(c: BenchConfig) -> tuple[dict, dict]:
  """Random parameters and a synthetic batch at c's shapes."""
  return jax_bench.random_params(c), synthetic_batch(c, jax_bench.model_config(c).vocab_size)


def step_times(bc: BenchConfig, grid=GRID, log: Callable[[str], None] = print) -> list[dict]:
  """A row per (stage, configuration): shapes, step_s, compile_s, tokens_per_s."""
  rows = []
  for c in points(bc, grid):
    params, batch = _inputs(c)
    for stage in STAGES:
      name = _stage_name(stage, c)
      if name is None:
        continue
      step = jax_bench.StageStep(c, jax_bench.stage_for(name), params, batch)
      timer = Timer(f'{stage} batch {c.batch} inputs {c.inputs} prompt {c.prompt_length}', step)
      run_round_robin([timer], c.repeats, log=lambda _: None)
      rows.append({'stage': stage, 'runs_as': name, 'batch': c.batch, 'inputs': c.inputs,
                   'prompt_length': c.prompt_length, 'step_s': timer.median_s,
                   'compile_s': step.compile_s,
                   'tokens_per_s': step.tokens_per_step() / timer.median_s})
      log(f'  {timer.name}: compiled in {step.compile_s:.1f} s, step {timer.median_s:.3f} s')
      del step, timer
  return rows


def compile_times(bc: BenchConfig, layers=LAYERS, log: Callable[[str], None] = print
                  ) -> list[dict]:
  """Stage 2's compile time per depth (encoder and decoder layers each), unrolled and scanned."""
  rows = []
  for n in layers:
    c = bc.replace(layers=n)
    params, batch = _inputs(c)
    for scan in (False, True):
      step = jax_bench.StageStep(c, jax_bench.stage_for('model_tuning'), params, batch,
                                 scan_layers=scan)
      rows.append({'layers': n, 'scanned': scan, 'compile_s': step.compile_s})
      log(f'  model_tuning {n}+{n} layers {"scanned" if scan else "unrolled"}: compiled in '
          f'{step.compile_s:.1f} s')
      del step
  return rows


def growth(rows: list[dict], stage: str, axis: str, bc: BenchConfig) -> Optional[float]:
  """(step-time factor) / (size factor) from the smallest to the largest value of `axis`
  (for the prompt: of the encoder positions inputs + prompt), the other shapes at bc's."""
  fixed = {k: getattr(bc, k) for k in GRID if k != axis}
  line = sorted((r[axis], r['step_s']) for r in rows   # (stage 1 has no prompt-0 row)
                if r['stage'] == stage and all(r[k] == v for k, v in fixed.items()))
  if len(line) < 2:
    return None
  (v0, s0), (v1, s1) = line[0], line[-1]
  size = (bc.inputs + v1) / (bc.inputs + v0) if axis == 'prompt_length' else v1 / v0
  return (s1 / s0) / size


def summary(result: dict, bc: BenchConfig) -> list[str]:
  rows, lines = result['steps'], ['', 'step time as one shape grows (others at '
                                      f'batch {bc.batch}, inputs {bc.inputs}, prompt '
                                      f'{bc.prompt_length}):']
  for axis in GRID:
    for stage in STAGES:
      cells = [f'{r[axis]}: {r["step_s"]:.3f} s' for r in sorted(rows, key=lambda r: r[axis])
               if r['stage'] == stage and all(r[k] == getattr(bc, k) for k in GRID if k != axis)]
      g = result['growth'][stage][axis]
      lines.append(f'  {stage:<14}{axis:<14}' + ', '.join(cells) +
                   ('' if g is None else f'   growth {g:.2f}'))
  lines.append('stage 2 compile time by depth (encoder + decoder layers):')
  for n in sorted({r['layers'] for r in result['compile']}):
    by = {r['scanned']: r['compile_s'] for r in result['compile'] if r['layers'] == n}
    lines.append(f'  {n}+{n}: unrolled {by[False]:.1f} s, scanned {by[True]:.1f} s')
  return lines


def run(bc: BenchConfig, grid=GRID, layers=LAYERS, log: Callable[[str], None] = print) -> dict:
  result = {'steps': step_times(bc, grid, log), 'compile': compile_times(bc, layers, log)}
  result['growth'] = {stage: {axis: growth(result['steps'], stage, axis, bc) for axis in grid}
                      for stage in STAGES}
  return result
