"""Adafactor as optax.adafactor computes it, written for XLA's CPU backend.

The arithmetic is optax's `adafactor(learning_rate, decay_rate, multiply_by_parameter_scale,
clipping_threshold, factored=True, min_dim_size_to_factor)`: the same factored second
moments, update clipping by block RMS, constant learning rate and parameter-RMS scaling, and
the same state (`init` is optax's, so checkpoints, shardings and `sharding.opt_state_shardings` see
no difference). `tests/test_adafactor.py` checks updates and state against optax.

What differs is how the reductions are written. On mT5's [512, 250112] output head kernel
XLA:CPU reduces the 512-long leading axis of a wide array in 0.9 s and the long axis in
0.2 s (`jnp.sum`), while the same sums as a matrix-vector product with a ones vector take
0.09 s and 0.10 s; on the tall [250112, 512] embedding `jnp.sum` is already fast (0.04 s).
optax's `safe_root_mean_squares` also reduces the parameter twice (a second pass through a
`where`); here once. Together these took the optimizer update of mT5-small's 300M weights
from 2.2 s to well under a second on the 2-core CPU of `promot bench` (README, Performance).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from promot_jax.train import sparse
# A reduction over an array whose minor (last) dimension is at least this long goes through
# a dot with a ones vector (see the module docstring for the measurements).
_WIDE = 16384


def _sum(x: jax.Array, axis: int) -> jax.Array:
  """jnp.sum(x, axis) for 2-D x, as a matrix-vector product when x is wide."""
  if x.ndim != 2 or x.shape[1] < _WIDE:
    return jnp.sum(x, axis=axis)
  ones = jnp.ones((x.shape[axis],), x.dtype)
  if axis == 0:
    return jnp.dot(ones, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.dot(x, ones, precision=jax.lax.Precision.HIGHEST)


def _mean(x: jax.Array, axis: int) -> jax.Array:
  return _sum(x, axis) / x.shape[axis]


def _factored_dims(shape, min_dim_size_to_factor: int):
  """optax's choice: the two largest axes, if the smaller of them is long enough."""
  if len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def adafactor(learning_rate: float, decay_rate: float = 0.8,
              multiply_by_parameter_scale: bool = True, clipping_threshold: float = 1.0,
              min_dim_size_to_factor: int = 128, eps: float = 1e-30,
              min_scale: float = 1e-3,
              batched: Optional[Callable[[str], bool]] = None) -> optax.GradientTransformation:
  """optax.adafactor(...) with factored=True, no momentum and no weight decay.

  `batched(path) -> bool`: leaves whose leading axis is a batch of independent parameters
  (stacked layers; see the module docstring). None: no such leaves.
  """
  reference = optax.adafactor(learning_rate=learning_rate, decay_rate=decay_rate,
                              multiply_by_parameter_scale=multiply_by_parameter_scale,
                              clipping_threshold=clipping_threshold, factored=True,
                              min_dim_size_to_factor=min_dim_size_to_factor, eps=eps)

  def init(params: Any):
    if batched is None:
      return reference.init(params)
    # optax's state for one slice of each batched leaf, its moments then given the batch axis
    slices = jax.tree_util.tree_map_with_path(
        lambda path, p: jax.ShapeDtypeStruct(p.shape[1:], p.dtype) if batched(_name(path)) else p,
        params)
    state = reference.init(slices)
    grow = lambda path, x, p: (  # noqa: E731
        jnp.zeros((p.shape[0],) + x.shape, x.dtype) if batched(_name(path)) else x)
    factored = state[0]
    factored = factored._replace(
        v_row=jax.tree_util.tree_map_with_path(grow, factored.v_row, params),
        v_col=jax.tree_util.tree_map_with_path(grow, factored.v_col, params),
        v=jax.tree_util.tree_map_with_path(grow, factored.v, params))
    return (factored,) + tuple(state[1:])

  def update(grads: Any, state: Any, params: Any = None):
    if params is None:
      raise ValueError('adafactor needs the parameters (multiply_by_parameter_scale).')
    factored_state = state[0]
    t = jnp.asarray(factored_state.count + 1, jnp.float32)
    beta = 1.0 - t ** (-decay_rate)

    def one(g, v_row, v_col, v, p):
      if sparse.is_sparse(g):
        return _sparse_rows_update(g, v_row, v_col, v, p)
      dims = _factored_dims(g.shape, min_dim_size_to_factor)
      if dims == (0, 1) and g.shape[1] >= _WIDE:
        return _wide_update(g, v_row, v_col, v, p)
      if dims is not None:                 # 2-D (larger factored shapes go to optax, below)
        d1, d0 = dims                      # d0: the longest axis, reduced for v_row
        g_sq = g * g + eps
        new_row = (beta * v_row + (1.0 - beta) * _mean(g_sq, d0)).astype(v_row.dtype)
        new_col = (beta * v_col + (1.0 - beta) * _mean(g_sq, d1)).astype(v_col.dtype)
        row_factor = jax.lax.rsqrt(new_row / jnp.mean(new_row))
        col_factor = jax.lax.rsqrt(new_col)
        u = g * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
        new_v = v
      else:
        new_v = (beta * v + (1.0 - beta) * (g * g + eps)).astype(v.dtype)
        u = g * jax.lax.rsqrt(new_v)
        new_row, new_col = v_row, v_col
      scale = _scale(_mean_all(u * u), p)
      return (-scale * u).astype(p.dtype), new_row, new_col, new_v

    def _wide_update(g, v_row, v_col, v, p):
      """`one` for a wide [rows, columns] leaf (the [512, 250112] output head kernel).

      Every statistic comes from one materialised g^2 through products, two passes over it:
      its column sums (v_col), then its row sums (v_row) together with g^2 cf^2, which gives
      the update's mean square, sum_rc g^2 rf_r^2 cf_c^2 = rf^2 . (g^2 cf^2) (the eps of
      g^2 + eps added to the means), so the update itself is formed only where it is
      applied. The barrier keeps XLA:CPU from fusing g * g into the column sum, which it
      then emits as a strided loop.
      """
      rows, cols = g.shape
      g2 = jax.lax.optimization_barrier(g * g)
      new_col = (beta * v_col + (1.0 - beta) * (_sum(g2, 0) / rows + eps)).astype(v_col.dtype)
      col_factor = jax.lax.rsqrt(new_col)
      # g^2's row sums and g^2 cf^2 in one pass over g^2: a product with [ones, cf^2]
      both = jnp.dot(g2, jnp.stack([jnp.ones_like(col_factor), col_factor * col_factor], 1),
                     precision=jax.lax.Precision.HIGHEST)
      new_row = (beta * v_row + (1.0 - beta) * (both[:, 0] / cols + eps)).astype(v_row.dtype)
      row_factor = jax.lax.rsqrt(new_row / jnp.mean(new_row))
      u_sum_sq = jnp.vdot(row_factor * row_factor, both[:, 1])
      scale = _scale(u_sum_sq / (rows * cols), p)
      u = g * row_factor[:, None] * col_factor[None, :]
      return (-scale * u).astype(p.dtype), new_row, new_col, v

    def _scale(u_mean_square, p):
      """The learning rate after update clipping and parameter-RMS scaling."""
      scale = learning_rate
      if clipping_threshold is not None:
        u_rms = jnp.sqrt(u_mean_square)
        scale = scale / jnp.maximum(1.0, u_rms / clipping_threshold)
      if multiply_by_parameter_scale:
        p_rms = jnp.sqrt(_mean_all(p * p))
        scale = scale * jnp.where(p_rms <= min_scale, min_scale, p_rms)
      return scale

    def _sparse_rows_update(g, v_row, v_col, v, p):
      """`one` for a [vocab, embed] gradient that is zero outside rows `g.ids`.

      The factored statistics in closed form: v_row [embed] averages g^2 + eps over all
      vocab rows, of which only the K given are non-zero; v_col [vocab] decays to
      beta v_col + (1 - beta) eps at every other row. The update is zero there, so only the
      K rows of it are returned (SparseRows); its RMS still counts every vocab x embed entry.
      """
      if _factored_dims(g.shape, min_dim_size_to_factor) != (1, 0):
        raise ValueError(f'A sparse-rows gradient needs a factored [rows, columns] leaf with '
                         f'more rows than columns; got shape {g.shape}.')
      vocab, embed = g.shape
      g_sq = g.values * g.values                                       # [K, embed]
      new_row = (beta * v_row + (1.0 - beta) * (jnp.sum(g_sq, 0) / vocab + eps)
                 ).astype(v_row.dtype)
      new_col = (beta * v_col + (1.0 - beta) * eps).at[g.ids].add(
          (1.0 - beta) * jnp.mean(g_sq, 1), indices_are_sorted=True).astype(v_col.dtype)
      row_factor = jax.lax.rsqrt(new_row / jnp.mean(new_row))
      col_factor = jax.lax.rsqrt(jnp.take(new_col, g.ids))
      u = g.values * row_factor[None, :] * col_factor[:, None]         # [K, embed]
      scale = _scale(jnp.sum(u * u) / (vocab * embed), p)
      update = sparse.SparseRows(g.ids, (-scale * u).astype(p.dtype), g.shape)
      return update, new_row, new_col, v

    def general(g, v_row, v_col, v, p):
      """optax's own update of one leaf (factored leaves of more than two dimensions)."""
      one_state = (factored_state._replace(v_row=v_row, v_col=v_col, v=v),) + tuple(state[1:])
      u, new_state = reference.update(g, one_state, p)
      return u, new_state[0].v_row, new_state[0].v_col, new_state[0].v

    def update_leaf(path, g, v_row, v_col, v, p):
      stacked = batched(_name(path))
      shape = g.shape[1:] if stacked else g.shape
      fn = general if len(shape) > 2 and _factored_dims(shape, min_dim_size_to_factor) else one
      return jax.vmap(fn)(g, v_row, v_col, v, p) if stacked else fn(g, v_row, v_col, v, p)

    trees = (grads, factored_state.v_row, factored_state.v_col, factored_state.v, params)
    if batched is not None:
      out = jax.tree_util.tree_map_with_path(update_leaf, *trees)
    elif any(len(g.shape) > 2 and _factored_dims(g.shape, min_dim_size_to_factor) is not None
             for g in jax.tree_util.tree_leaves(grads)):
      return reference.update(grads, state, params)   # not a shape this model has
    else:
      out = jax.tree_util.tree_map(one, *trees)
    treedef = jax.tree_util.tree_structure(grads)
    leaves = treedef.flatten_up_to(out)
    pick = lambda i: treedef.unflatten([leaf[i] for leaf in leaves])  # noqa: E731
    new_factored = factored_state._replace(count=optax.safe_increment(factored_state.count),
                                           v_row=pick(1), v_col=pick(2), v=pick(3))
    return pick(0), (new_factored,) + tuple(state[1:])

  return optax.GradientTransformation(init, update)


def _name(path) -> str:
  """A leaf's parameter path ('encoder/layers/mlp/wo/kernel') from its pytree key path."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _mean_all(x: jax.Array) -> jax.Array:
  """The mean of every element (a full reduction is fast in any layout)."""
  return jnp.mean(x)
