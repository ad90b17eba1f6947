"""promot_jax's Adafactor against optax.adafactor: same updates, same state, several steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from promot_jax.train import adafactor


def _tree(rng):
  """Every kind of leaf the model has: wide and tall factored kernels, small unfactored ones."""
  return {'head': jnp.asarray(rng.normal(size=(130, 20000)), jnp.float32),   # wide: dot sums
          'embed': jnp.asarray(rng.normal(size=(3000, 130)), jnp.float32),   # tall
          'kernel': jnp.asarray(rng.normal(size=(256, 128)), jnp.float32),
          'prompt': jnp.asarray(rng.normal(size=(100, 130)), jnp.float32),   # 100 < 128
          'scale': jnp.asarray(rng.normal(size=(130,)), jnp.float32),
          'tiny': jnp.full((4,), 1e-5, jnp.float32)}                           # rms < min_scale


@pytest.mark.parametrize('scale_by_param,clip', [(True, 1.0), (False, 1.0), (True, None)])
def test_matches_optax_over_steps(scale_by_param, clip):
  rng = np.random.default_rng(0)
  params = _tree(rng)
  ours = adafactor.adafactor(1e-3, 0.8, scale_by_param, clip)
  ref = optax.adafactor(learning_rate=1e-3, decay_rate=0.8,
                        multiply_by_parameter_scale=scale_by_param, clipping_threshold=clip,
                        factored=True, min_dim_size_to_factor=128)
  s_ours, s_ref = ours.init(params), ref.init(params)
  assert jax.tree_util.tree_structure(s_ours) == jax.tree_util.tree_structure(s_ref)
  p_ours = p_ref = params
  step_ours, step_ref = jax.jit(ours.update), jax.jit(ref.update)
  for step in range(3):
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * (step + 1), x.dtype), params)
    # columns and a row of the wide leaf that never get a gradient: their second moments stay
    # at eps, where the update must still be exactly zero
    grads['head'] = grads['head'].at[:, :50].set(0.0).at[7].set(0.0)
    u_ours, s_ours = step_ours(grads, s_ours, p_ours)
    u_ref, s_ref = step_ref(grads, s_ref, p_ref)
    for a, b in zip(jax.tree_util.tree_leaves((u_ours, s_ours)),
                    jax.tree_util.tree_leaves((u_ref, s_ref))):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-12)
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
  assert int(s_ours[0].count) == 3


def test_needs_params():
  tx = adafactor.adafactor(1e-3)
  params = {'w': jnp.ones((4,))}
  with pytest.raises(ValueError, match='parameters'):
    tx.update(params, tx.init(params), None)


def test_three_dimensional_factored_leaves_fall_back_to_optax():
  params = {'w': jnp.ones((130, 140, 3))}
  grads = {'w': jnp.full((130, 140, 3), 0.5)}
  ours, ref = adafactor.adafactor(1e-3), optax.adafactor(learning_rate=1e-3)
  u1, _ = ours.update(grads, ours.init(params), params)
  u2, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(np.asarray(u1['w']), np.asarray(u2['w']), rtol=1e-6)
