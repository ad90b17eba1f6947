"""Training with scanned (stacked) layers equals training the t5x (unrolled) tree.

Adafactor's statistics (factored moments, parameter-RMS scale, update clipping) are per
parameter; with `scan_layers` a stacked leaf [L, ...] holds L layers' parameters, and
make_optimizer treats its leading axis as L separate parameters. These tests run both stages
in both layouts from the same parameters and compare losses, parameters and the optimizer
state (converted with stacking.unstack_opt_state), and show that the whole-stack optimizer
does not pass the same comparison.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_inputs import host_params, toy_batch

from promot_jax import mesh as partitioning, tree_util
from promot_jax.model import config, stacking
from promot_jax.train import adafactor, stages
from promot_jax.train.optimizer import make_optimizer
from promot_jax.train.sharding import build_sharded_step, init_state_on_mesh, place_params
from promot_jax.train.step import init_train_state, make_train_step

CFG = config.get_config('mt5_tiny', prompt_length=4, dropout_rate=0.0)
# Wide enough (emb 128, mlp 256) for Adafactor to factor every layer's kernels.
FACTORED_CFG = CFG.replace(emb_dim=128, mlp_dim=256, head_dim=32)
STAGES = {'prompt_tuning': stages.prompt_tuning(learning_rate=0.3),
          'model_tuning': stages.model_tuning(dropout_rate=0.0, learning_rate=1e-2)}
STEPS = 3


def _params(cfg, scan: bool):
  params = host_params(cfg)
  return stacking.stack_layers(params, cfg) if scan else params


def _train(cfg, params, stage, optimizer=None, steps=STEPS):
  """(final parameters, final optimizer state, per-step losses) of `steps` jitted steps."""
  trainable, frozen = stages.split_params(params, stage)
  optimizer = optimizer or make_optimizer(stage, trainable)
  state = init_train_state(trainable, optimizer)
  step = jax.jit(make_train_step(cfg, stage, optimizer))
  seen = []
  for i in range(steps):
    state, metrics = step(state, frozen, toy_batch(i), jax.random.PRNGKey(0))
    assert bool(metrics['finite'])
    seen.append(float(metrics['loss']))
  host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
  return host(stages.merge_params(state.trainable, frozen)), host(state.opt_state), seen


@functools.lru_cache(maxsize=None)
def _run(stage_name: str, scan: bool, remat: str = 'none', factored: bool = False):
  base = FACTORED_CFG if factored else CFG
  cfg = base.replace(scan_layers=scan, remat_policy=remat)
  return _train(cfg, _params(base, scan), STAGES[stage_name])


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# Float noise. Scanned and unrolled layers compute the same gradients up to float32 rounding
# (~1e-7 relative), and Adafactor divides each unfactored gradient element by its own RMS, so
# an element whose gradient is small comes out with a relative error of its update far above
# 1e-7. After 3 steps the measured gap between the layouts is at most 1.6e-4 of a leaf's
# largest trained change (2.6e-5 absolute on the stage-1 prompt, lr 0.3, whose optimizer sees
# no stacked leaf at all) and 1.1e-4 of an optimizer-state leaf's largest entry; two unrolled
# runs that differ only in remat_policy='full' differ by as much (up to 4e-4 and 2.3e-4). The
# whole-stack optimizer is off by up to 0.9 of the change (at least 3e-3 on every leaf). So
# parameters are compared with
# rtol 1e-5 plus an atol of 1e-3 of the leaf's trained change (at least 1e-6), states with
# rtol 1e-5 plus 1e-3 of the leaf's largest entry; losses with rtol 1e-5 alone.
NOISE = 1e-3


def _assert_trained_close(got, want, start):
  """Trained parameters `got` equal `want` (both trained from `start`) up to float noise."""
  got, want, start = (tree_util.flatten(t) for t in (got, want, start))
  assert sorted(got) == sorted(want)
  for path, y in want.items():
    x, y = np.asarray(got[path]), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, path
    change = float(np.abs(y - np.asarray(start[path])).max())
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=max(1e-6, NOISE * change), err_msg=path)


def _max_relative_difference(a, b, atol=1e-6):
  fa, fb = tree_util.flatten(a), tree_util.flatten(b)
  return max(float(np.max(np.abs(fa[p] - fb[p]) / (atol + np.abs(fb[p])))) for p in fa)


def _assert_states_close(got, want):
  """Optimizer states: step counts equal, moments equal up to float noise."""
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
    if not np.issubdtype(y.dtype, np.floating):
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
      continue
    scale = float(np.abs(y).max()) if y.size else 0.0
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=max(1e-30, NOISE * scale),
                               err_msg=jax.tree_util.keystr(path))


# Training: both stages, both layouts.

@pytest.mark.parametrize('stage_name', ['prompt_tuning', 'model_tuning'])
def test_stacked_training_matches_unrolled(stage_name):
  params, opt_state, seen = _run(stage_name, scan=False)
  s_params, s_opt_state, s_seen = _run(stage_name, scan=True)
  np.testing.assert_allclose(s_seen, seen, rtol=1e-5)
  assert stacking.is_stacked(s_params)
  assert stacking.is_stacked(s_opt_state[0].v) == (stage_name == 'model_tuning')
  _assert_trained_close(stacking.unstack_layers(s_params, CFG), params, host_params(CFG))
  # the optimizer state converts to the t5x tree's, step count included (one scalar)
  _assert_states_close(stacking.unstack_opt_state(s_opt_state, CFG), opt_state)
  counts = [x for x in jax.tree_util.tree_leaves(s_opt_state) if x.dtype == np.int32]
  assert counts and all(x.shape == () and int(x) == STEPS for x in counts)
  # and back: the stacked state is the t5x state stacked
  _assert_states_close(stacking.stack_opt_state(opt_state, CFG), s_opt_state)
  # what trained did move
  trainable, _ = stages.split_params(params, STAGES[stage_name])
  start, _ = stages.split_params(host_params(CFG), STAGES[stage_name])
  assert _max_relative_difference(trainable, start) > 1e-3


def test_stacked_training_matches_unrolled_with_factored_moments():
  """A config whose kernels Adafactor factors: per-layer v_row / v_col, stacked [L, ...]."""
  params, opt_state, seen = _run('model_tuning', scan=False, factored=True)
  s_params, s_opt_state, s_seen = _run('model_tuning', scan=True, factored=True)
  np.testing.assert_allclose(s_seen, seen, rtol=1e-5)
  _assert_trained_close(stacking.unstack_layers(s_params, FACTORED_CFG), params,
                        host_params(FACTORED_CFG))
  _assert_states_close(stacking.unstack_opt_state(s_opt_state, FACTORED_CFG), opt_state)
  v_row = tree_util.flatten(s_opt_state[0].v_row)
  assert v_row['encoder/layers/mlp/wi_0/kernel'].shape == (FACTORED_CFG.num_encoder_layers, 128)
  assert v_row['token_embedder/embedding'].shape == (128,)


def test_the_whole_stack_optimizer_does_not_match():
  """Adafactor over whole [L, ...] leaves (what make_optimizer did before) fails the comparison
  above: the equivalence test can fail."""
  stage = STAGES['model_tuning']
  whole_stack = adafactor.adafactor(learning_rate=stage.learning_rate,
                                    decay_rate=stage.decay_rate,
                                    multiply_by_parameter_scale=True, clipping_threshold=1.0,
                                    min_dim_size_to_factor=128)
  naive, _, _ = _train(CFG.replace(scan_layers=True), _params(CFG, True), stage, whole_stack)
  params, _, _ = _run('model_tuning', scan=False)
  assert _max_relative_difference(stacking.unstack_layers(naive, CFG), params) > 1e-3
  with pytest.raises(AssertionError):
    _assert_trained_close(stacking.unstack_layers(naive, CFG), params, host_params(CFG))


def test_full_remat_under_scan_gives_the_same_training():
  params, _, seen = _run('model_tuning', scan=False)
  r_params, _, r_seen = _run('model_tuning', scan=True, remat='full')
  np.testing.assert_allclose(r_seen, seen, rtol=1e-5)
  _assert_trained_close(stacking.unstack_layers(r_params, CFG), params, host_params(CFG))


def test_sharded_step_with_stacked_layers_matches_unrolled():
  """build_sharded_step (the trainer's builder) lays out the per-layer optimizer state."""
  stage = STAGES['model_tuning']
  cfg = FACTORED_CFG.replace(scan_layers=True)
  params = _params(FACTORED_CFG, True)
  mesh = partitioning.make_mesh(1, jax.devices()[:1])
  sharded = build_sharded_step(cfg, stage, mesh, partitioning.standard_logical_axis_rules(),
                               params)
  trainable, frozen = place_params(sharded, params, stage)
  state = init_state_on_mesh(sharded, trainable)
  seen = []
  for i in range(2):
    state, metrics = sharded.step_fn(state, frozen, toy_batch(i), jax.random.PRNGKey(0))
    seen.append(float(metrics['loss']))
  _, _, want = _run('model_tuning', scan=False, factored=True)
  np.testing.assert_allclose(seen, want[:2], rtol=1e-5)


# The optimizer alone: per-layer updates on shapes of every kind.

def _toy_cfg():
  return CFG.replace(num_encoder_layers=3, num_decoder_layers=2)


def _toy_tree(rng):
  """Stacked leaves of every kind (factored tall and wide, unfactored, 3-D factored), each
  layer at its own scale (so whole-stack RMS would be wrong), and unstacked leaves."""
  def layers(n, shape):
    return np.stack([rng.normal(size=shape) * 10.0 ** (i - 1) for i in range(n)]
                    ).astype(np.float32)
  tree = {'encoder': {'layers': {'mlp': {'kernel': layers(3, (256, 128))},
                                 'norm': {'scale': layers(3, (130,))},
                                 'small': {'kernel': layers(3, (100, 130))}},
                      'encoder_norm': {'scale': rng.normal(size=(130,)).astype(np.float32)}},
          'decoder': {'layers': {'out': {'kernel': layers(2, (130, 20000))},      # wide: dots
                                 'attn': {'kernel': layers(2, (130, 140, 3))}}},  # optax's path
          'token_embedder': {'embedding': rng.normal(size=(600, 130)).astype(np.float32)}}
  return tree


@pytest.mark.parametrize('scale_by_param', [True, False])
def test_per_layer_adafactor_matches_optax_on_the_unrolled_tree(scale_by_param):
  cfg = _toy_cfg()
  rng = np.random.default_rng(0)
  stacked = jax.tree_util.tree_map(jnp.asarray, _toy_tree(rng))
  unrolled = stacking.unstack_layers(stacked, cfg)
  ours = adafactor.adafactor(1e-2, 0.8, scale_by_param, 1.0, batched=stacking.is_stacked_path)
  ref = optax.adafactor(learning_rate=1e-2, decay_rate=0.8,
                        multiply_by_parameter_scale=scale_by_param, clipping_threshold=1.0,
                        factored=True, min_dim_size_to_factor=128)
  s_ours, s_ref = ours.init(stacked), ref.init(unrolled)
  _assert_trees_close(stacking.unstack_opt_state(s_ours, cfg), s_ref, rtol=0, atol=0)
  step_ours, step_ref = jax.jit(ours.update), jax.jit(ref.update)
  p_ours, p_ref = stacked, unrolled
  for step in range(3):
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * (step + 1), x.dtype), stacked)
    u_ours, s_ours = step_ours(grads, s_ours, p_ours)
    u_ref, s_ref = step_ref(stacking.unstack_layers(grads, cfg), s_ref, p_ref)
    _assert_trees_close(stacking.unstack_layers(u_ours, cfg), u_ref, rtol=2e-5, atol=1e-12)
    _assert_trees_close(stacking.unstack_opt_state(s_ours, cfg), s_ref, rtol=2e-5, atol=1e-12)
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
  assert int(s_ours[0].count) == 3
  if not scale_by_param:
    return
  # the whole-stack optimizer on the same tree does not give these updates (its parameter
  # scale is the RMS of the whole stack, whose layers here differ 10x in scale)
  whole = adafactor.adafactor(1e-2, 0.8, scale_by_param, 1.0)
  u_whole, _ = jax.jit(whole.update)(grads, whole.init(stacked), stacked)
  u_first, _ = ours.update(grads, ours.init(stacked), stacked)
  assert not np.allclose(np.asarray(u_whole['encoder']['layers']['mlp']['kernel']),
                         np.asarray(u_first['encoder']['layers']['mlp']['kernel']), rtol=1e-3)


# Converting optimizer states.

@pytest.mark.parametrize('factored', [False, True], ids=['tiny', 'factored'])
@pytest.mark.parametrize('stage', [STAGES['prompt_tuning'], STAGES['model_tuning'],
                                   stages.joint(), stages.finetune(optimizer='adam')],
                         ids=lambda s: f'{s.name}-{s.optimizer}')
def test_opt_state_conversion_round_trips_and_matches_the_stacked_optimizer(stage, factored):
  """stack_opt_state(t5x tree's state) has exactly the stacked optimizer's structure and shapes
  (masked and multi_transform states included), and unstack_opt_state inverts it."""
  cfg = FACTORED_CFG if factored else CFG
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    host_params(cfg))
  unrolled, _ = stages.split_params(abstract, stage)
  stacked, _ = stages.split_params(stacking.stack_layers(abstract, cfg), stage)
  want = jax.eval_shape(make_optimizer(stage, stacked).init, stacked)
  state = jax.eval_shape(make_optimizer(stage, unrolled).init, unrolled)
  got = stacking.stack_opt_state(state, cfg)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  assert jax.tree_util.tree_leaves(got) == jax.tree_util.tree_leaves(want)
  back = stacking.unstack_opt_state(got, cfg)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
  assert jax.tree_util.tree_leaves(back) == jax.tree_util.tree_leaves(state)


def test_opt_state_conversion_of_arrays_is_exact():
  _, opt_state, _ = _run('model_tuning', scan=False)
  stacked = stacking.stack_opt_state(opt_state, CFG)
  v = tree_util.flatten(stacked[0].v)['encoder/layers/mlp/wi_0/kernel']
  assert v.shape == (CFG.num_encoder_layers,) + tuple(
      tree_util.flatten(opt_state[0].v)['encoder/layers_0/mlp/wi_0/kernel'].shape)
  _assert_trees_close(stacking.unstack_opt_state(stacked, CFG), opt_state, rtol=0, atol=0)
  # already-converted states pass through
  _assert_trees_close(stacking.stack_opt_state(stacked, CFG), stacked, rtol=0, atol=0)
