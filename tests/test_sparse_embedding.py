"""The sparse input-embedding update (train/sparse.py) equals the dense one.

Against optax's own Adafactor (dense gradients) over several steps, with and without
parameter scaling and update clipping; and the whole train step, sparse against dense, for
fine-tuning, the joint stage (prompt and weights under two optimizers) and scanned layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_inputs import toy_batch

from promot_jax import tree_util
from promot_jax.model import config, stacking, transformer as model
from promot_jax.train import adafactor, sparse, stages
from promot_jax.train.optimizer import make_optimizer
from promot_jax.train.step import init_train_state, make_train_step


def _close(a, b, what, rtol=2e-5, atol=1e-10):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=what)


def _sparse_gradient(rng, vocab, embed, used, slots, scale):
  """A gradient non-zero on `used` distinct rows, as SparseRows with `slots` >= used slots
  (unused slots repeat the largest id with zero rows, as sparse.gather makes them) and dense."""
  ids = np.sort(rng.choice(vocab, size=used, replace=False))
  values = rng.normal(size=(used, embed)) * scale * rng.uniform(0.1, 3.0, size=(used, 1))
  ids = np.concatenate([ids, np.full(slots - used, ids[-1])])
  values = np.concatenate([values, np.zeros((slots - used, embed))]).astype(np.float32)
  dense = np.zeros((vocab, embed), np.float32)
  dense[ids[:used]] = values[:used]
  return sparse.SparseRows(jnp.asarray(ids, jnp.int32), jnp.asarray(values), (vocab, embed)), dense


@pytest.mark.parametrize('scale_by_param,clip', [(True, 1.0), (False, 1.0), (True, None)])
def test_sparse_rows_update_matches_optax_dense_adafactor(scale_by_param, clip):
  rng = np.random.default_rng(0)
  vocab, embed = 400, 130            # both axes >= 128: factored as [vocab, embed]
  params = {'embed': jnp.asarray(rng.normal(size=(vocab, embed)) * 0.05, jnp.float32),
            'kernel': jnp.asarray(rng.normal(size=(130, 128)), jnp.float32)}
  ours = adafactor.adafactor(1e-3, 0.8, scale_by_param, clip)
  ref = optax.adafactor(learning_rate=1e-3, decay_rate=0.8,
                        multiply_by_parameter_scale=scale_by_param, clipping_threshold=clip,
                        factored=True, min_dim_size_to_factor=128)
  s_ours, s_ref = ours.init(params), ref.init(params)
  p_ours = p_ref = params
  step_ref = jax.jit(ref.update)

  @jax.jit
  def step_ours(ids, values, kernel_g, state, params):
    """(update with the table's part densified, state, params after it)."""
    grads = {'embed': sparse.SparseRows(ids, values, (vocab, embed)), 'kernel': kernel_g}
    updates, state = ours.update(grads, state, params)
    assert sparse.is_sparse(updates['embed'])
    return (dict(updates, embed=sparse.densify(updates['embed'])), state,
            sparse.apply_updates(params, updates))

  clipped = []
  # few rows and small gradients, then nearly every row (the update's RMS counts the whole
  # table, so only then does clipping act), then few rows with large gradients
  for step, (used, scale) in enumerate([(20, 1.0), (390, 1.0), (380, 5.0), (7, 100.0)]):
    g_sparse, g_dense = _sparse_gradient(rng, vocab, embed, used, slots=395, scale=scale)
    kernel_g = jnp.asarray(rng.normal(size=(130, 128)), jnp.float32)
    u_ours, s_ours, p_ours = step_ours(g_sparse.ids, g_sparse.values, kernel_g, s_ours, p_ours)
    u_ref, s_ref = step_ref({'embed': jnp.asarray(g_dense), 'kernel': kernel_g}, s_ref, p_ref)
    _close(u_ours['embed'], u_ref['embed'], f'step {step} update')
    _close(u_ours['kernel'], u_ref['kernel'], f'step {step} kernel update')
    for a, b in zip(jax.tree_util.tree_leaves(s_ours), jax.tree_util.tree_leaves(s_ref)):
      assert a.shape == b.shape and a.dtype == b.dtype
      _close(a, b, f'step {step} state', atol=1e-30)
    p_ref = optax.apply_updates(p_ref, u_ref)
    _close(p_ours['embed'], p_ref['embed'], f'step {step} params', atol=1e-7)
    # was the update clipped? (its unclipped RMS, lr x p_rms x u_rms, would exceed the clip)
    p_rms = float(jnp.sqrt(jnp.mean(p_ref['embed'] ** 2))) if scale_by_param else 1.0
    clipped.append(float(jnp.sqrt(jnp.mean(u_ref['embed'] ** 2))) / (1e-3 * p_rms))
  if clip is not None:
    assert any(c > 0.999 for c in clipped) and any(c < 0.9 for c in clipped), clipped


def _factored_config(**changes):
  """A tiny model whose [2048, 128] embedding Adafactor factors (both axes >= 128)."""
  return config.get_config('mt5_tiny', dropout_rate=0.0).replace(
      vocab_size=2048, emb_dim=128, num_heads=2, head_dim=16, mlp_dim=64, **changes)


def _run(cfg, params, stage, steps=3):
  trainable, frozen = stages.split_params(params, stage)
  optimizer = make_optimizer(stage, trainable)
  state = init_train_state(trainable, optimizer)
  step = jax.jit(make_train_step(cfg, stage, optimizer))
  for i in range(steps):
    batch = toy_batch(i, vocab=cfg.vocab_size)
    state, metrics = step(state, frozen, batch, jax.random.PRNGKey(3))
    assert bool(metrics['finite'])
  return state, metrics


@pytest.mark.parametrize('kind', ['finetune', 'joint', 'scanned'])
def test_sparse_train_step_equals_dense(kind):
  cfg = _factored_config(prompt_length=4 if kind == 'joint' else 0,
                         scan_layers=kind == 'scanned')
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  if kind == 'scanned':
    params = stacking.stack_layers(params, cfg)
  if kind == 'joint':
    stage = stages.Stage(name='joint', trainable=stages.EVERYTHING_REGEX, with_prompt=True,
                         learning_rate=1e-2, train_steps=3, dropout_rate=0.1,
                         label_smoothing=0.1)
  else:
    stage = stages.model_tuning(dropout_rate=0.1, learning_rate=1e-2).replace(
        with_prompt=False)
  assert sparse.plan(cfg, stage.replace(sparse_embedding=None),
                     stages.split_params(params, stage)[0], toy_batch(0, vocab=2048))
  dense_state, dense_m = _run(cfg, params, stage.replace(sparse_embedding=False))
  sparse_state, sparse_m = _run(cfg, params, stage.replace(sparse_embedding=True))
  for key in ('loss', 'grad_norm'):
    _close(sparse_m[key], dense_m[key], key, rtol=1e-5)
  dense_p, sparse_p = tree_util.flatten(dense_state.trainable), tree_util.flatten(
      sparse_state.trainable)
  assert dense_p.keys() == sparse_p.keys() and sparse.EMBEDDING in dense_p
  for path in dense_p:
    _close(sparse_p[path], dense_p[path], path, rtol=1e-4, atol=1e-6)
  moved = np.abs(np.asarray(sparse_p[sparse.EMBEDDING]) - np.asarray(
      tree_util.flatten(params)[sparse.EMBEDDING]))
  assert moved.max() > 0 and (moved.max(axis=1) > 0).sum() < cfg.vocab_size // 4
  for a, b in zip(jax.tree_util.tree_leaves(sparse_state.opt_state),
                  jax.tree_util.tree_leaves(dense_state.opt_state)):
    # atol stays at eps scale (the closed-form rows decay to ~1e-30); rtol allows float32's
    # reassociation in the two steps' backward passes, squared into the second moments
    _close(a, b, 'optimizer state', rtol=3e-4, atol=1e-30)


def test_plan_decides_when_the_sparse_update_applies():
  cfg = _factored_config()
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  finetune = stages.model_tuning(learning_rate=1e-3).replace(with_prompt=False)
  trainable = stages.split_params(params, finetune)[0]
  small, big = toy_batch(0, vocab=2048), toy_batch(0, batch=64, inputs=12, vocab=2048)
  assert sparse.plan(cfg, finetune, trainable, small)          # 68 positions <= 1024
  assert not sparse.plan(cfg, finetune, trainable, big)        # 1088 positions > 1024
  assert sparse.plan(cfg, finetune.replace(sparse_embedding=True), trainable, big)
  assert not sparse.plan(cfg, finetune.replace(sparse_embedding=False), trainable, small)
  # stage 1: the table is frozen, nothing to do
  prompt_cfg = cfg.replace(prompt_length=4)
  prompt_params = model.init_params(prompt_cfg, jax.random.PRNGKey(0))
  stage1 = stages.prompt_tuning(learning_rate=0.3)
  assert not sparse.plan(prompt_cfg, stage1, stages.split_params(prompt_params, stage1)[0], small)
  # where it can't be exact: a clear error when asked for, dense otherwise
  adam = finetune.replace(optimizer='adam')
  assert not sparse.plan(cfg, adam, trainable, small)
  with pytest.raises(ValueError, match='not adafactor'):
    sparse.plan(cfg, adam.replace(sparse_embedding=True), trainable, small)
  tiny = config.get_config('mt5_tiny')                          # [512, 32]: not factored
  tiny_trainable = stages.split_params(model.init_params(tiny, jax.random.PRNGKey(0)),
                                       finetune)[0]
  assert not sparse.plan(tiny, finetune, tiny_trainable, small)
  with pytest.raises(ValueError, match='not factored'):
    sparse.plan(tiny, finetune.replace(sparse_embedding=True), tiny_trainable, small)


def test_gather_finds_each_token_row():
  table = jnp.arange(20 * 3, dtype=jnp.float32).reshape(20, 3)
  batch = {'encoder_input_tokens': jnp.array([[5, 3, 0, 0], [19, 5, 7, 1]]),
           'decoder_input_tokens': jnp.array([[0, 7], [0, 3]])}
  ids, rows = sparse.gather(table, batch)
  assert ids.tolist() == [0, 1, 3, 5, 7, 19] + [19] * 6
  np.testing.assert_array_equal(rows, np.asarray(table)[np.asarray(ids)])
