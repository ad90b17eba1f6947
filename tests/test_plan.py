"""`promot plan`: topology names, the chip table, model FLOPs, "does not fit" reporting, and
plans compiled for this machine's CPU devices. Tests marked `libtpu` compile for real TPU
topologies and are skipped unless libtpu is installed (make test-tpu)."""

import json
import os
import re
import types

import pytest

from promot_jax import cli
from promot_jax.ginconf import loaders
from promot_jax.model import config
from promot_jax.tools import plan

TINY = 'runs/promot_tiny_cpu.gin'


def needs_libtpu(test):
  """Marked `libtpu`; skipped where libtpu is missing unless PROMOT_REQUIRE_LIBTPU is set
  (`make test-tpu` sets it, so a broken libtpu install fails there instead of skipping)."""
  skip = pytest.mark.skipif(
      not plan.libtpu_available() and not os.environ.get('PROMOT_REQUIRE_LIBTPU'),
      reason='libtpu is not installed in this interpreter; run `make test-tpu` (a .venv-tpu with '
             '.[tpu]) to compile for TPU topologies')
  return pytest.mark.libtpu(skip(test))


def run_cli(*args):
  return cli.main([str(a) for a in args])


# ---------------------------------------------------------------------------- names and chips


@pytest.mark.parametrize('name, chips, shape, libtpu_name, hosts', [
    ('v4-8', 4, (2, 2, 1), 'v4:2x2x1', 1),
    ('v4-64', 32, (2, 4, 4), 'v4:2x4x4', 8),
    ('v4-4096', 2048, (8, 16, 16), 'v4:8x16x16', 512),
    ('v5e-256', 256, (16, 16), 'v5e:16x16', 64),
    ('v5litepod-8', 8, (2, 4), 'v5e:2x4', 1),
    ('v5p-128', 64, (4, 4, 4), 'v5:4x4x4', 16),
    ('v6e-64', 64, (8, 8), 'v6e:8x8', 16),
])
def test_topology_names_count_cores_or_chips(name, chips, shape, libtpu_name, hosts):
  topo = plan.parse_topology(name)
  assert (topo.num_chips, topo.shape, topo.libtpu_name, topo.num_hosts) == (
      chips, shape, libtpu_name, hosts)


@pytest.mark.parametrize('name, message', [
    ('v4-4', 'v4-N counts TensorCores (2 per chip)'),
    ('v4-63', 'known sizes: v4-8, v4-16'),
    ('v5e-3', 'v5e-N counts chips'),
    ('tpu-8', "Unknown topology 'tpu-8'"),
])
def test_bad_topology_names(name, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    plan.parse_topology(name)


def test_chip_table():
  got = {k: (c.hbm_gib, c.peak_tflops, c.cores_per_chip) for k, c in plan.CHIPS.items()}
  assert got == {'v4': (32, 275, 2), 'v5e': (16, 197, 1), 'v5p': (95, 459, 2), 'v6e': (32, 918, 1)}
  budget = plan.Budget.for_topology(plan.parse_topology('v5e-16'))
  assert budget.hbm_bytes == 16 * 2 ** 30 and budget.peak_flops == 197e12
  cpu = plan.Budget.for_topology(plan.parse_topology('cpu'), hbm_gib=0.5)
  assert cpu.hbm_bytes == 2 ** 29 and cpu.peak_flops is None


# ---------------------------------------------------------------------------- model FLOPs


def test_model_flops_formula_by_hand():
  cfg = config.T5Config(vocab_size=100, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16,
                        num_encoder_layers=1, num_decoder_layers=1, prompt_length=3)
  # weights one encoder / decoder position meets; attention scores per layer
  enc = 4 * 8 * 8 + 3 * 8 * 16 + 2 * 8 * 8          # self-attn + mlp + cross-attn key/value
  dec = 6 * 8 * 8 + 3 * 8 * 16 + 8 * 100            # self-attn, cross q/o, mlp, logits
  m = 2 * 2 * ((5 + 3) * enc + 4 * dec)             # batch 2, 5 inputs + 3 prompt, 4 targets
  a = 4 * 2 * 8 * (8 * 8 + 4 * 4 + 4 * 8)
  assert plan.model_flops(cfg, 2, 5, 4, True, trains_weights=True) == 3 * m + 3 * a
  assert plan.model_flops(cfg, 2, 5, 4, True, trains_weights=False) == 2 * m + 3 * a


def test_model_flops_stage1_well_below_stage2_for_mt5_xxl():
  cfg = config.get_config('mt5_xxl', prompt_length=100)
  s1 = plan.model_flops(cfg, 64, 512, 64, True, trains_weights=False)
  s2 = plan.model_flops(cfg, 64, 512, 64, True, trains_weights=True)
  assert 0.6 < s1 / s2 < 0.7
  # 6 x 12.9B parameters x all tokens would double-count: an encoder position meets only the
  # encoder's weights (and cross-attention keys/values), a target only the decoder's
  assert 0.35 < s2 / (6 * 12.9e9 * 64 * (612 + 64)) < 0.55


# ---------------------------------------------------------------------------- does not fit


class FakeLowered:
  def __init__(self, error=None, stats=None):
    self.error, self.stats = error, stats

  def compile(self):
    if self.error:
      raise self.error
    return types.SimpleNamespace(memory_analysis=lambda: self.stats,
                                 cost_analysis=lambda: {'flops': 1e12})


def stats(**kw):
  base = dict(argument_size_in_bytes=0, output_size_in_bytes=0, alias_size_in_bytes=0,
              temp_size_in_bytes=0, generated_code_size_in_bytes=0)
  return types.SimpleNamespace(**{**base, **kw})


def test_out_of_memory_compile_is_a_row_not_a_traceback():
  err = RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for '
                     'HLO temporaries (48.12G) exceeds available HBM (30.75G).\nmore detail')
  row, compiled = plan.compile_row(lambda: FakeLowered(err), 32 * 2 ** 30)
  assert compiled is None and row['fits'] is False
  assert '(48.12G) exceeds available HBM (30.75G)' in row['oom'] and '\n' not in row['oom']
  with pytest.raises(ValueError, match='shape mismatch'):   # anything else still raises
    plan.compile_row(lambda: FakeLowered(ValueError('shape mismatch')), None)


def test_peak_memory_against_the_budget():
  s = stats(argument_size_in_bytes=10, output_size_in_bytes=8, alias_size_in_bytes=6,
            temp_size_in_bytes=20)
  row, _ = plan.compile_row(lambda: FakeLowered(stats=s), hbm_bytes=32)
  assert row['peak_bytes'] == 32 and row['fits'] is True and row['flops_per_device'] == 1e12
  row, _ = plan.compile_row(lambda: FakeLowered(stats=s), hbm_bytes=31)
  assert row['fits'] is False
  text = plan.format_table([dict(row, stage='model_tuning', step='train', mesh={'data': 4, 'model': 8},
                                 batch=64)])
  assert 'model_tuning  train' in text and ' NO ' in text


# ---------------------------------------------------------------------------- the command on CPU


@pytest.fixture(scope='module')
def cpu_plan(tmp_path_factory):
  out = tmp_path_factory.mktemp('plan') / 'plan.json'
  assert run_cli('plan', f'--gin_file={TINY}', '--topology', 'cpu', '--hbm_gib', 4,
                 '--peak_tflops', 1, '--json', out) == 0
  return json.loads(out.read_text())


def test_cpu_plan_compiles_train_and_decode_for_both_stages(cpu_plan):
  rows = {(r['stage'], r['step']): r for r in cpu_plan['rows']}
  assert set(rows) == {(s, k) for s in ('prompt_tuning', 'model_tuning') for k in ('train', 'decode')}
  for r in rows.values():
    assert r['fits'] is True and 0 < r['peak_bytes'] < 4 * 2 ** 30 and r['flops_per_device'] > 0
    assert r['best_step_s'] == pytest.approx(r['flops_per_device'] / 1e12)
  s1, s2 = rows['prompt_tuning', 'train'], rows['model_tuning', 'train']
  # no weight gradients in stage 1: fewer FLOPs; the counted formula agrees with XLA's count
  assert s1['flops_per_device'] < 0.85 * s2['flops_per_device']
  for r in (s1, s2):
    assert 0.8 < r['flops_per_device'] / r['model_flops'] < 1.25
  # stage 1's optimizer state is the prompt's alone (a [4, 32] prompt, Adafactor unfactored)
  assert s1['trainable_params'] == 4 * 32 and s1['opt_state_bytes_total'] < 5 * 4 * 32 * 4
  assert s2['opt_state_bytes_total'] > 100 * s1['opt_state_bytes_total']
  assert cpu_plan['topology'] == 'cpu' and cpu_plan['formula'].startswith('model FLOPs')


def test_cpu_search_with_a_tiny_hbm_budget_reports_does_not_fit(tmp_path, capsys):
  out = tmp_path / 's.json'
  assert run_cli('plan', f'--gin_file={TINY}', '--topology', 'cpu', '--search', '--stage',
                 'prompt_tuning', '--batch_sizes', '8,16', '--hbm_gib', 1e-5, '--peak_tflops', 1,
                 '--json', out) == 0
  rows = json.loads(out.read_text())['rows']
  assert sorted(r['batch'] for r in rows) == [8, 16]
  for r in rows:
    assert r['fits'] is False and r['peak_bytes'] > r['hbm_bytes'] == pytest.approx(1e-5 * 2 ** 30)
  speeds = [r['tokens_per_s'] for r in rows]
  assert speeds == sorted(speeds, reverse=True)      # fastest first
  text = capsys.readouterr().out
  assert '0 of 2 configurations fit' in text and text.count(' NO ') == 2


@pytest.mark.parametrize('argv, message', [
    (['--topology', 'v4-63'], 'known sizes'),
    (['--topology', 'cpu', '--mesh', '3'], "--mesh '3': expected DATA,MODEL"),
    (['--topology', 'cpu', '--mesh', '2,2'], '--mesh 2,2 needs 4 devices'),
    (['--topology', 'cpu', '--stage', 'nope'], "No stage 'nope'"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
  assert run_cli('plan', f'--gin_file={TINY}', *argv) == 2
  err = capsys.readouterr().err
  assert message in err and err.startswith('promot plan: error:')


def test_without_libtpu_a_tpu_topology_says_how_to_install(monkeypatch, capsys):
  monkeypatch.setattr(plan, 'libtpu_available', lambda: False)
  assert run_cli('plan', f'--gin_file={TINY}', '--topology', 'v4-8') == 2
  err = capsys.readouterr().err
  assert 'pip install -e ".[tpu]"' in err and '--topology cpu' in err


# ---------------------------------------------------------------------------- real TPU topologies


def _run(gin, *flags):
  return loaders.load_run([gin], ["MODEL_DIR='/tmp/unused'", *flags])


@needs_libtpu
def test_mt5_small_compiles_for_v4_8():
  run = _run('runs/promot_rte_mt5_small.gin', 'BATCH_SIZE=8',
             "TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 16}", "ACTIVATION_DTYPE='bfloat16'")
  topo = plan.parse_topology('v4-8')
  rows = plan.plan(run, topo, plan.Budget.for_topology(topo), mesh_shape=(2, 2), decode=False)
  assert len(rows) == 2 and all(r['fits'] for r in rows)
  s1, s2 = (next(r for r in rows if r['stage'] == s and r['step'] == 'train')
            for s in ('prompt_tuning', 'model_tuning'))
  assert s1['flops_per_device'] < s2['flops_per_device'] and s2['best_step_s'] > 0
  assert s2['peak_bytes'] < 32 * 2 ** 30 and s1['opt_state_bytes_total'] < 10 * 100 * 512 * 4


@needs_libtpu
def test_oversized_model_does_not_fit_v4_8():
  # mT5-XXL width and vocabulary with 16+16 layers (9.3B parameters), unsharded (model axis 1):
  # the float32 weights alone (37 GB) exceed a v4 chip's 32 GiB. (With 8+8 layers, 23 GB of
  # weights, the step fits since the embedding's gradient is the batch's rows: train/sparse.py.)
  run = _run('runs/promot_rte_mt5_xxl.gin', 'BATCH_SIZE=4', 'config.T5Config.num_encoder_layers=16',
             'config.T5Config.num_decoder_layers=16',
             "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}")
  topo = plan.parse_topology('v4-8')
  (row,) = plan.plan(run, topo, plan.Budget.for_topology(topo), ['model_tuning'], (4, 1),
                     decode=False)
  assert row['fits'] is False and ('oom' in row or row['peak_bytes'] > 32 * 2 ** 30)


@needs_libtpu
def test_a_model_axis_that_splits_a_torus_axis_gets_a_mesh_of_neighbours():
  # v5e-256 is a 16x16 torus: an 8-way model axis (the XXL run files) is half of one axis
  mesh = plan.make_plan_mesh(plan.topology_devices(plan.parse_topology('v5e-256')), 32, 8)
  assert dict(mesh.shape) == {'data': 32, 'model': 8}
  for group in mesh.devices:
    coords = sorted(tuple(d.coords) for d in group)
    assert len({c[1] for c in coords}) == 1                       # one row of the torus
    assert [c[0] for c in coords] == list(range(coords[0][0], coords[0][0] + 8))  # adjacent


@needs_libtpu
def test_eval_decode_of_mt5_small_compiles_for_v4_8_and_bf16_halves_the_weights():
  run = _run('runs/promot_rte_mt5_small.gin', "ACTIVATION_DTYPE='bfloat16'", 'NUM_PARTITIONS=2')
  topo = plan.parse_topology('v4-8')
  mesh = plan.make_plan_mesh(plan.topology_devices(topo), 2, 2)
  budget = plan.Budget.for_topology(topo)
  f32 = plan.plan_eval(run, mesh, 8, (256, 16), 4, budget)
  bf16 = plan.plan_eval(run, mesh, 8, (256, 16), 4, budget, 'bfloat16')
  assert f32['fits'] and bf16['fits'] and f32['step'] == 'beam-4 decode'
  assert bf16['param_bytes_per_device'] * 2 == f32['param_bytes_per_device']
  assert bf16['peak_bytes'] < f32['peak_bytes']


def test_cpu_eval_plan_of_the_tiny_run(tmp_path):
  import jax

  from promot_jax.model import transformer as model
  out = tmp_path / 'eval.json'
  assert run_cli('plan', f'--gin_file={TINY}', '--topology', 'cpu', '--eval', '--eval_batch', 4,
                 '--eval_lengths', '48,8', '--json', out) == 0
  (row,) = json.loads(out.read_text())['rows']
  assert row['stage'] == 'eval' and row['step'] == 'beam-4 decode' and row['fits'] is True
  cfg = config.get_config('mt5_tiny', prompt_length=4)
  from_shapes = sum(4 * x.size for x in jax.tree_util.tree_leaves(
      model.abstract_params(cfg)))
  assert row['param_bytes_per_device'] == from_shapes


# ---------------------------------------------------------------------------- scanned layers


@pytest.fixture(scope='module')
def scan_setup(tiny_prompt_config, tiny_params):
  import jax
  enc = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 1, 500)
  dec = jax.random.randint(jax.random.PRNGKey(3), (2, 6), 1, 500)
  return tiny_prompt_config, tiny_params, enc, dec


def test_scanned_layers_give_the_same_logits_from_the_same_t5x_params(scan_setup):
  import numpy as np

  from promot_jax.model import transformer as model
  cfg, params, enc, dec = scan_setup
  ref = model.compute_logits(cfg, params, enc, dec, dec, with_prompt=True)
  scanned = cfg.replace(scan_layers=True, remat_policy='full')  # remat 'none': next test
  out = model.compute_logits(scanned, params, enc, dec, dec, with_prompt=True)   # t5x tree in
  np.testing.assert_allclose(out, ref, atol=1e-5)
  stacked = model.stack_layers(params, cfg)
  np.testing.assert_allclose(model.compute_logits(scanned, stacked, enc, dec, dec, with_prompt=True),
                             ref, atol=1e-5)


def test_stacked_tree_round_trips_and_matches_the_scanned_network(scan_setup):
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec

  from promot_jax import tree_util
  from promot_jax.model import transformer as model
  cfg, params, _, _ = scan_setup
  stacked = tree_util.flatten(model.stack_layers(params, cfg))
  assert stacked['encoder/layers/attention/query/kernel'].shape == (2, 32, 32)
  assert not any('layers_' in p for p in stacked) and 'decoder/relpos_bias/rel_embedding' in stacked
  back = tree_util.flatten(model.unstack_layers(model.stack_layers(params, cfg), cfg))
  flat = tree_util.flatten(params)
  assert back.keys() == flat.keys() and all(np.array_equal(back[p], flat[p]) for p in flat)
  # what nn.scan itself creates: same shapes, logical axes with a leading 'layers'
  shapes = {p: v.shape for p, v in tree_util.flatten(model.abstract_params(cfg, stacked=True)).items()}
  assert shapes == {p: v.shape for p, v in stacked.items()}
  axes = tree_util.flatten(model.logical_axes(cfg, stacked=True))
  assert axes == tree_util.flatten(model.stack_layers(model.logical_axes(cfg), cfg))
  assert axes['encoder/layers/mlp/wi_0/kernel'] == PartitionSpec('layers', 'embed', 'mlp')
  # users keep seeing the t5x tree, whatever scan_layers says
  user = tree_util.flatten(model.abstract_params(cfg.replace(scan_layers=True)))
  assert user.keys() == flat.keys()
  sds = model.unstack_layers(model.abstract_params(cfg, stacked=True), cfg)
  assert jax.tree_util.tree_map(lambda x: x.shape, sds) == jax.tree_util.tree_map(
      lambda x: x.shape, params)


def test_scanned_decoding_and_gradients_match(scan_setup):
  import jax
  import numpy as np

  from promot_jax import tree_util
  from promot_jax.model import decoding, transformer as model
  cfg, params, enc, dec = scan_setup
  scanned, stacked = cfg.replace(scan_layers=True), model.stack_layers(params, cfg)
  np.testing.assert_array_equal(decoding.greedy_decode(cfg, params, enc, 3, with_prompt=True),
                                decoding.greedy_decode(scanned, stacked, enc, 3, with_prompt=True))

  @jax.jit
  def grads(p, p_stacked):
    loss = lambda q, c: model.Transformer(c).apply(  # noqa: E731
        {'params': q}, enc, dec, dec, with_prompt=True).std()
    return jax.grad(loss)(p, cfg), jax.grad(loss)(p_stacked, scanned)
  want, got = grads(params, stacked)
  want, got = tree_util.flatten(want), tree_util.flatten(model.unstack_layers(got, cfg))
  for p in want:
    np.testing.assert_allclose(got[p], want[p], atol=1e-6, rtol=1e-4, err_msg=p)


def test_cpu_plan_of_scanned_layers_counts_flops_of_the_unrolled_step(tmp_path):
  out = tmp_path / 'scan.json'
  assert run_cli('plan', f'--gin_file={TINY}', '--topology', 'cpu', '--stage', 'prompt_tuning',
                 '--skip_decode', '--gin.config.T5Config.scan_layers=True', '--json', out) == 0
  (row,) = json.loads(out.read_text())['rows']
  assert row['fits'] is True and row['flops_source'].startswith('HLO cost analysis')
  # XLA's compiled count sees the scan body once; the reported count is the whole step
  assert row['flops_per_device_compiled'] < row['flops_per_device']
  assert 0.8 < row['flops_per_device'] / row['model_flops'] < 1.25
