"""`promot bench` and the speed properties it relies on, checked structurally (no timing asserts).

- stage 1 computes no weight gradient: its compiled step has no matmul or scatter that yields
  an array of a frozen weight's shape (stage 2's does, so the check can fail), and it costs
  fewer FLOPs than stage 2;
- the trainer's jitted step, evaluation and decoding compile once: no compilation after the
  first checkpoint period of a real `promot train`;
- `promot bench --quick` writes every figure the README table shows.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from promot_jax import cli, tree_util
from promot_jax.tools.bench import common, floor, jax_bench
from promot_jax.tools.bench.common import BenchConfig, CompileCounter, synthetic_batch

# Shapes chosen so that no activation has the shape of a weight: tokens (3 * 11 encoder
# positions with the prompt, 3 * 5 decoder positions) never equal 32, 64 or 512.
SHAPES = BenchConfig(model='mt5_tiny', batch=3, inputs=7, targets=5, prompt_length=4, repeats=1)


@pytest.fixture(scope='module')
def params():
  return jax_bench.random_params(SHAPES)


@pytest.fixture(scope='module')
def batch():
  return synthetic_batch(SHAPES, jax_bench.model_config(SHAPES).vocab_size)


def weight_shaped_results(step: jax_bench.StageStep, frozen_only: bool) -> list[str]:
  """Matmul / scatter instructions of the compiled step whose result has a weight's shape."""
  flat = tree_util.flatten(step.frozen if frozen_only else
                           {**tree_util.flatten(step.frozen),
                            **tree_util.flatten(step.state.trainable)})
  shapes = {f'f32[{",".join(map(str, v.shape))}]' for v in flat.values() if v.ndim == 2}
  found = re.findall(r'= (f32\[[0-9,]+\])\S* (dot|scatter|convolution|custom-call)\(',
                     step.compiled.as_text())
  return [f'{op} {shape}' for shape, op in found if shape in shapes]


def test_stage1_step_computes_no_weight_gradient(params, batch):
  stage1 = jax_bench.StageStep(SHAPES, jax_bench.stage_for('prompt_tuning'), params, batch)
  stage2 = jax_bench.StageStep(SHAPES, jax_bench.stage_for('model_tuning'), params, batch)
  assert weight_shaped_results(stage1, frozen_only=True) == []
  # The same probe finds stage 2's weight gradients (dW matmuls, the embedding scatter).
  found = weight_shaped_results(stage2, frozen_only=False)
  assert any(f.startswith('dot') for f in found) and any(f.startswith('scatter') for f in found)
  # Forward + activation gradients only: well under stage 2's forward + both gradients.
  assert stage1.info()['xla_flops'] < 0.7 * stage2.info()['xla_flops']


def test_stage1_optimizer_state_is_prompt_sized(params, batch):
  info = jax_bench.StageStep(SHAPES, jax_bench.stage_for('prompt_tuning'), params,
                             batch).info()
  assert info['trainable_params'] == SHAPES.prompt_length * jax_bench.model_config(SHAPES).emb_dim
  # Adafactor, unfactored [4, 32] prompt: one second-moment array of the prompt's size + counts.
  assert info['optimizer_state_bytes'] <= 4 * info['trainable_params'] + 64


@pytest.mark.parametrize('stage', ['prompt_tuning', 'model_tuning'])
def test_train_step_does_not_recompile_after_the_first_step(params, batch, stage):
  counts = jax_bench.count_step_compiles(SHAPES, params, batch, stage, steps=3)
  assert counts['first_step_compiles'] >= 1          # the counter sees compilations at all
  assert counts['later_step_compiles'] == 0


@pytest.mark.slow   # a whole `promot train` with three checkpoints (validation + decoding)
def test_a_real_stage_compiles_nothing_after_its_first_checkpoint(tmp_path, monkeypatch):
  """Steps, teacher-forced validation and greedy decoding all reuse their programs."""
  from promot_jax.checkpoints.manager import StageCheckpoints
  seen: list[int] = []
  original = StageCheckpoints.update_metrics

  def record(self, step, metrics):
    seen.append(counter.count)
    return original(self, step, metrics)

  monkeypatch.setattr(StageCheckpoints, 'update_metrics', record)
  with CompileCounter() as counter:
    code = cli.main(['train', '--gin_file', 'runs/promot_tiny_cpu.gin', '--stage',
                     'prompt_tuning', f"--gin.MODEL_DIR='{tmp_path}'",
                     '--gin.PROMPT_TUNING_STEPS=6', '--gin.PROMPT_CHECKPOINT_PERIOD=2'])
  assert code == 0 and len(seen) == 3
  assert seen[0] > 0                                   # compiled during the first period
  assert seen[2] == seen[1], f'compilations at checkpoints: {seen}'


def test_compile_counter_counts_only_inside_its_block():
  import jax
  import numpy as np
  f = jax.jit(lambda x: x * 3 + 1)
  seven, five = np.ones((7, 3), np.float32), np.ones((5, 3), np.float32)
  with CompileCounter() as c:
    f(seven)
    f(seven)
  f(five)                                              # a new shape, outside the block
  assert c.count == 1


@pytest.mark.slow   # the CLI end to end (imports every plugged subcommand)
def test_bench_quick_train_section(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert cli.main(['bench', '--quick', '--no-hf', '--sections', 'train', '--repeats', '1',
                   '--json', str(out)]) == 0
  result = json.loads(out.read_text())
  assert set(result['train']) == {'prompt_tuning', 'model_tuning', 'finetune'}
  for row in result['train'].values():
    assert row['step_s'] > 0 and row['compile_s'] > 0 and row['tokens_per_s'] > 0
  assert result['ratios']['prompt_tuning / model_tuning'] > 0
  assert result['ratios']['finetune / hf_full_finetune'] is None   # --no-hf
  for name in result['train']:
    assert result['ratios'][f'{name} step / floor'] > 0
  printed = capsys.readouterr().out
  assert 'ratio prompt_tuning / model_tuning' in printed
  # the floor is timed inside the rounds, beside the steps: one time per round
  for name, row in result['train'].items():
    assert len(row['floor']['floor_times_s']) == 1
    assert row['floor']['floor_s'] == row['floor']['floor_times_s'][0]
    assert re.search(rf'round 1/1: .*promot_jax/{name} [\d.]+ s.*floor/{name} [\d.]+ s', printed)


@pytest.mark.slow
def test_bench_quick_writes_every_section_with_hf(tmp_path):
  pytest.importorskip('peft')
  out = tmp_path / 'bench.json'
  assert cli.main(['bench', '--quick', '--repeats', '1', '--profile', '--json', str(out)]) == 0
  result = json.loads(out.read_text())
  assert set(result['train']) == {'prompt_tuning', 'model_tuning', 'finetune'}
  for row in result['train'].values():
    assert row['step_s'] > 0 and row['compile_s'] > 0 and row['tokens_per_s'] > 0
  pt, mt = result['train']['prompt_tuning'], result['train']['model_tuning']
  assert pt['optimizer_state_bytes'] < mt['optimizer_state_bytes']
  assert set(result['decode']) == {'promot_jax/greedy', 'promot_jax/beam4', 'hf/greedy',
                                   'hf/beam4'}
  assert result['data']['examples_per_s'] > 0
  assert set(result['hf_train']) == {'peft_prompt_tuning', 'full_finetune'}
  # greedy decoding picks tokens through head_select's int8 copy with a float32 fallback in a
  # conditional branch: no floor for it; every other ratio is there
  assert result['decode_floor']['promot_jax/greedy'] is None
  assert result['decode_floor']['promot_jax/beam4']['dots'] > 0
  assert len(result['decode_floor']['promot_jax/beam4']['floor_times_s']) == 1   # in the round
  no_floor = {'greedy / floor', 'greedy floor / hf_greedy'}
  assert all(r is None for n, r in result['ratios'].items() if n in no_floor)
  assert all(r is not None and r > 0 for n, r in result['ratios'].items() if n not in no_floor)
  assert set(result['profile']['finetune']) >= {'forward', 'forward+backward', 'optimizer'}


def test_bench_scan_section_compiles_both_layouts(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert cli.main(['bench', '--quick', '--no-hf', '--sections', 'scan', '--repeats', '1',
                   '--json', str(out)]) == 0
  result = json.loads(out.read_text())
  assert set(result['scan']) == {'unrolled', 'scanned'}
  for row in result['scan'].values():
    assert row['step_s'] > 0 and row['compile_s'] > 0
  assert result['ratios']['scanned / unrolled compile (model_tuning)'] > 0
  assert 'ratio scanned / unrolled step (model_tuning)' in capsys.readouterr().out


def test_synthetic_batch_has_no_padding_and_shifted_decoder_inputs():
  b = synthetic_batch(common.PRESETS['quick'], 512)
  assert (b['encoder_input_tokens'] >= 2).all() and (b['decoder_target_tokens'] >= 2).all()
  assert (b['decoder_input_tokens'][:, 0] == 0).all()
  assert (b['decoder_input_tokens'][:, 1:] == b['decoder_target_tokens'][:, :-1]).all()


def test_floor_finds_every_dot_of_a_program_with_its_flops():
  import jax
  import jax.numpy as jnp

  def program(a, b, c, q, k):
    h = jnp.tanh(a @ b)                                    # [64, 48] x [48, 80]
    return h @ c, jnp.einsum('bqd,bkd->bqk', q, k)         # [64, 80] x [80, 16]; batched
  args = [jnp.ones(s, jnp.float32) for s in ((64, 48), (48, 80), (80, 16), (3, 5, 8), (3, 7, 8))]
  dots = floor.dots_of_hlo(jax.jit(program).lower(*args).compile().as_text())
  assert sorted(d.flops for d in dots) == sorted([2 * 64 * 48 * 80, 2 * 64 * 80 * 16,
                                                  2 * 3 * 5 * 7 * 8])
  assert floor.time_dot(dots[0], repeats=1) > 0


@pytest.mark.parametrize('dtype', ['float32', 'int8', 'bfloat16'])
def test_floor_operands_are_varied_integers_in_int8_range(dtype):
  import jax.numpy as jnp
  x = np.asarray(floor.operand((64, 300), jnp.dtype(dtype), 0).astype(jnp.float32))
  assert x.shape == (64, 300) and x.min() == -60 and x.max() == 60
  assert np.array_equal(x, np.round(x)) and len(np.unique(x)) == 121
  assert not np.array_equal(x, np.asarray(floor.operand((64, 300), jnp.dtype(dtype), 1),
                                          np.float32))   # the two operands differ


def test_a_floor_timer_sums_each_shape_times_its_count(monkeypatch):
  import jax
  import jax.numpy as jnp

  def program(a, b, c):
    return (a @ b) @ c + jnp.tanh(a @ b) @ c     # a @ b once, then two [64, 80] x [80, 16]
  args = [jnp.ones(s, jnp.float32) for s in ((64, 48), (48, 80), (80, 16))]
  timer = floor.FloorTimer(floor.dots_of_hlo(jax.jit(program).lower(*args).compile().as_text()),
                           calls_per_shape=2)
  assert floor.facts(timer.dots) == {'dots': 3, 'distinct_shapes': 2,
                                     'dot_flops': 2 * 64 * 48 * 80 + 2 * (2 * 64 * 80 * 16)}
  assert timer() > 0
  seconds = {(64, 48): 0.5, (64, 80): 0.25}     # per call, by the lhs shape
  timed = []

  def fake_time_shape(fn, make, calls):
    timed.append((make()[0].shape, calls))
    return seconds[timed[-1][0]]
  monkeypatch.setattr(floor, 'time_shape', fake_time_shape)
  assert timer() == 0.5 + 2 * 0.25
  assert sorted(timed) == [((64, 48), 2), ((64, 80), 2)]   # each shape timed once per call
  found = floor.summary(floor.facts(timer.dots), [3.0, 1.0, 2.0])
  assert found['floor_s'] == 2.0 and found['floor_times_s'] == [3.0, 1.0, 2.0]
  assert found['gflops'] == pytest.approx(found['dot_flops'] / 2.0 / 1e9)
  assert floor.summary(floor.facts(timer.dots), []) is None
  assert floor.summary(None, [1.0]) is None


def test_floor_is_not_computed_for_a_dot_inside_a_loop():
  import jax
  import jax.numpy as jnp

  def program(a, n):
    return jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ a), a)
  compiled = jax.jit(program).lower(jnp.ones((16, 16)), 3).compile()
  assert floor.dots_of_hlo(compiled.as_text()) is None
  assert floor.matmul_floor(compiled) is None


def test_floor_counts_a_loops_dots_once_per_trip_when_told_the_trips():
  import jax
  import jax.numpy as jnp

  def program(a, b, m):
    first = a @ b                                           # [16, 24] x [24, 16], once
    return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ m), first)   # [16, 16] x [16, 16]
  args = (jnp.ones((16, 24)), jnp.ones((24, 16)), jnp.ones((16, 16)))
  compiled = jax.jit(program).lower(*args).compile()
  dots = floor.dots_of_hlo(compiled.as_text(), loop_trips=5)
  assert sorted(d.flops for d in dots) == [2 * 16 * 16 * 16] * 5 + [2 * 16 * 24 * 16]
  assert floor.matmul_floor(compiled, repeats=1, loop_trips=5)['dots'] == 6


def test_floor_is_not_computed_for_a_dot_in_a_branch_or_a_loop_in_a_loop():
  import jax
  import jax.numpy as jnp
  a = jnp.ones((16, 16))
  branch = jax.jit(lambda a, p: jax.lax.cond(p, lambda x: x @ x, jnp.tanh, a))
  assert floor.dots_of_hlo(branch.lower(a, True).compile().as_text()) is None
  inner = lambda x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y @ a), x)   # noqa: E731
  nested = jax.jit(lambda a: jax.lax.fori_loop(0, 2, lambda i, x: inner(x), a))
  assert floor.dots_of_hlo(nested.lower(a).compile().as_text(), loop_trips=2) is None


def test_floor_times_an_int8_dot_as_int8():
  import jax
  import jax.numpy as jnp
  program = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                     preferred_element_type=jnp.int32))
  text = program.lower(jnp.ones((4, 32), jnp.int8), jnp.ones((64, 32), jnp.int8)).compile()
  [dot] = floor.dots_of_hlo(text.as_text())
  assert (dot.dtype, dot.out_dtype, dot.flops) == ('s8', 's32', 2 * 4 * 64 * 32)
  assert floor.time_dot(dot, repeats=1) > 0


def test_floor_of_a_train_step_counts_its_matmul_flops(params, batch):
  step = jax_bench.StageStep(SHAPES, jax_bench.stage_for('model_tuning'), params, batch)
  found = floor.matmul_floor(step.compiled, repeats=1)
  # the products are a part of XLA's count (which adds the elementwise work), and most of it
  assert 0.5 * step.info()['xla_flops'] < found['dot_flops'] <= step.info()['xla_flops']
  assert found['floor_s'] > 0 and found['dots'] >= found['distinct_shapes'] > 0


def test_scaling_growth_compares_the_time_factor_with_the_size_factor():
  from promot_jax.tools.bench import scaling
  bc = BenchConfig(batch=8, inputs=128, prompt_length=100)
  rows = [{'stage': 'model_tuning', 'batch': b, 'inputs': 128, 'prompt_length': 100, 'step_s': t}
          for b, t in ((4, 1.0), (8, 1.5), (16, 2.0))]
  rows += [{'stage': 'model_tuning', 'batch': 8, 'inputs': 128, 'prompt_length': p, 'step_s': t}
           for p, t in ((0, 1.0), (200, 3.0))]
  assert scaling.growth(rows, 'model_tuning', 'batch', bc) == pytest.approx(0.5)  # 2x for 4x
  # the prompt grows the encoder from 128 to 328 positions: 3x the time for 2.5625x the size
  assert scaling.growth(rows, 'model_tuning', 'prompt_length', bc) == pytest.approx(3 / 2.5625)
  assert scaling.growth(rows, 'model_tuning', 'inputs', bc) is None   # one point only
  assert len(scaling.points(bc)) == 6


@pytest.mark.slow
def test_bench_scaling_section_times_every_point(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert cli.main(['bench', '--quick', '--no-hf', '--sections', 'scaling', '--repeats', '1',
                   '--json', str(out)]) == 0
  result = json.loads(out.read_text())['scaling']
  stage1 = [r for r in result['steps'] if r['stage'] == 'prompt_tuning']
  stage2 = [r for r in result['steps'] if r['stage'] == 'model_tuning']
  assert len(stage1) == 4 and len(stage2) == 5      # no stage 1 without a prompt
  assert all(r['step_s'] > 0 for r in result['steps'])
  assert {(r['layers'], r['scanned']) for r in result['compile']} == {
      (1, False), (1, True), (2, False), (2, True)}
  assert result['growth']['model_tuning']['batch'] > 0
  assert 'stage 2 compile time by depth' in capsys.readouterr().out


@pytest.mark.slow   # three worker processes start (each imports jax and compiles)
def test_bench_isolate_times_each_workload_in_its_own_process(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert cli.main(['bench', '--quick', '--no-hf', '--isolate', '--sections', 'train,decode',
                   '--repeats', '2', '--json', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['isolate'] is True
  for name in jax_bench.STAGE_NAMES:
    row = result['train'][name]
    assert len(row['step_times_s']) == 2 and all(t > 0 for t in row['step_times_s'])
    assert row['compile_s'] > 0 and row['floor']['floor_s'] > 0
    # timed in the step's own process, once in each round
    assert len(row['floor']['floor_times_s']) == 2 and 'dots' not in row
  assert result['ratios']['prompt_tuning / model_tuning'] > 0
  assert len(result['decode_floor']['promot_jax/beam4']['floor_times_s']) == 2
  assert set(result['decode']) == {'promot_jax/greedy', 'promot_jax/beam4'}
  # one peak RSS per worker process
  assert sorted(result['memory']) == sorted(f'promot_jax/{n} (own process)'
                                            for n in jax_bench.STAGE_NAMES)
  assert 'own process' in capsys.readouterr().out


def test_an_isolated_workload_that_fails_to_build_is_a_clear_error():
  from promot_jax.tools.bench import isolate
  with pytest.raises(RuntimeError, match="(?s)bench worker x failed:.*unknown workload kind 'bogus'"):
    isolate.start([('bogus', 'x')], common.PRESETS['quick'])


@pytest.mark.parametrize('workload,sparse,extra', [('finetune', 'off', []), ('beam4', 'auto', []),
                                                   ('head', 'auto', []),
                                                   ('head', 'auto', ['--stored'])])
def test_bench_alone_times_one_workload_back_to_back(workload, sparse, extra, capsys):
  from promot_jax.tools.bench import alone
  out = alone.main([workload, '--quick', '--calls', '2', '--sparse-embedding', sparse] + extra)
  assert out['workload'] == workload and len(out['times_s']) == 2
  assert all(t > 0 for t in out['times_s']) and out['median_s'] > 0
  # this process's CPU time: positive, at most every core busy for the slowest call
  assert 0 < out['median_cpu_s'] <= (os.cpu_count() or 1) * max(out['times_s']) + 0.5
  assert (out['compile_s'] is not None) == (workload == 'finetune')
  assert f'{workload} (sparse_embedding {sparse}' in capsys.readouterr().out


def test_bench_alone_overrides_the_stages_dropout(monkeypatch, capsys):
  from promot_jax.tools.bench import alone, jax_bench
  seen = []
  real = jax_bench.StageStep

  def recording(bc, stage, *args, **kwargs):
    seen.append(stage.dropout_rate)
    return real(bc, stage, *args, **kwargs)

  monkeypatch.setattr(jax_bench, 'StageStep', recording)
  out = alone.main(['finetune', '--quick', '--calls', '1', '--dropout', '0'])
  alone.main(['finetune', '--quick', '--calls', '1'])
  assert seen == [0.0, jax_bench.stage_for('finetune').dropout_rate] and seen[1] > 0
  assert out['dropout'] == 0.0 and 'dropout 0)' in capsys.readouterr().out
  with pytest.raises(SystemExit):
    alone.main(['finetune', '--quick', '--dropout', '1'])


@pytest.mark.parametrize('workload', ['hf/full_finetune', 'hf/greedy'])
def test_bench_alone_times_transformers_side(workload, capsys):
  pytest.importorskip('transformers')
  pytest.importorskip('torch')
  from promot_jax.tools.bench import alone
  out = alone.main([workload, '--quick', '--calls', '2'])
  assert out['workload'] == workload and len(out['times_s']) == 2 and out['median_s'] > 0
  assert out['compile_s'] is None and workload in capsys.readouterr().out
