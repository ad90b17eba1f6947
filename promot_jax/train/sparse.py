"""The input embedding's gradient as the rows a batch uses (an exact sparse update).

A batch looks up at most K = batch x (inputs + targets) of mT5's 250,112 embedding rows;
every other row's gradient is zero. Built dense, that gradient is a [vocab, embed] zero fill
and scatter-add, then Adafactor reads and writes all 128M entries of it several times. Here
the train step differentiates with respect to the gathered [K, embed] rows instead
(`layers.Embed`'s GATHERED seam) and hands the optimizer a `SparseRows` gradient;
`train/adafactor.py` updates the factored statistics of the untouched rows in closed form and
the table only at those rows. The result equals the dense update to float tolerance
(tests/test_sparse_embedding.py, against optax's Adafactor and the dense train step).

When it applies (`plan`): Adafactor with the table factored (both axes at least
min_dim_size_to_factor), logits not tied to the table, and, with `Stage.sparse_embedding`
None (auto), a batch of at most vocab / 2 token positions. Elsewhere the step is dense.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from promot_jax import tree_util
from promot_jax.model import layers

EMBEDDING = 'token_embedder/embedding'
# Token features whose rows the model looks up (the encoder's and the decoder's inputs).
TOKEN_FEATURES = ('encoder_input_tokens', 'decoder_input_tokens')


@dataclasses.dataclass(frozen=True)
class SparseRows:
  """A [shape] array that is zero except at rows `ids` ([K], sorted), which hold `values`
  [K, shape[1]]; of an id's repeated slots at most one is non-zero (Adafactor squares each
  slot). Not a pytree: tree functions see it as one leaf, so it travels through
  optax.multi_transform like an array."""
  ids: jax.Array
  values: jax.Array
  shape: tuple[int, int]


def is_sparse(x: Any) -> bool:
  return isinstance(x, SparseRows)


def plan(cfg, stage, trainable: Mapping[str, Any], batch: Mapping[str, Any],
         min_dim_size_to_factor: int = 128) -> bool:
  """Whether this step takes the embedding's gradient as rows (see the module docstring)."""
  flat = tree_util.flatten(trainable)
  if EMBEDDING not in flat or stage.sparse_embedding is False:
    return False
  vocab, embed = flat[EMBEDDING].shape
  reasons = []
  if stage.optimizer != 'adafactor':
    reasons.append(f'the optimizer is {stage.optimizer}, not adafactor')
  if cfg.logits_via_embedding:
    reasons.append('the logits are computed with the embedding table (tied)')
  if min(vocab, embed) < min_dim_size_to_factor or embed > vocab:
    reasons.append(f'the [{vocab}, {embed}] table is not factored as [vocab, embed]')
  if reasons:
    if stage.sparse_embedding:
      raise ValueError(f'Stage {stage.name}: sparse_embedding=True but ' + '; '.join(reasons)
                       + '. Set it to None (auto) or False.')
    return False
  if stage.sparse_embedding is None:
    positions = sum(int(batch[f].size) for f in TOKEN_FEATURES)
    return 2 * positions <= vocab
  return True


def gather(table: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(ids [K], rows [K, embed]): the sorted distinct tokens of the batch's inputs and their
  rows. K is the number of token positions; unused slots repeat the largest id."""
  tokens = jnp.concatenate([batch[f].reshape(-1) for f in TOKEN_FEATURES])
  ids = jnp.unique(tokens, size=tokens.shape[0], fill_value=jnp.max(tokens))
  return ids, jnp.take(table, ids, axis=0)


def gathered_variables(ids: jax.Array, rows: jax.Array) -> dict:
  """The variables that make `layers.Embed` look up `rows` instead of the table."""
  return {layers.GATHERED: {'token_embedder': {'ids': ids, 'rows': rows}}}


def sparse_grads(grads: Mapping[str, Any], ids: jax.Array, row_grads: jax.Array,
                 shape: tuple[int, int]) -> dict:
  """`grads` (without the table) with the table's gradient as SparseRows.

  A repeated id (an unused slot) got no lookup, so its rows' gradient is zero already."""
  flat = dict(tree_util.flatten(grads))
  flat[EMBEDDING] = SparseRows(ids, row_grads, tuple(shape))
  return tree_util.unflatten(flat)


def without_embedding(tree: Mapping[str, Any]) -> dict:
  return tree_util.unflatten({p: v for p, v in tree_util.flatten(tree).items() if p != EMBEDDING})


def sum_of_squares(x: Any) -> jax.Array:
  values = x.values if is_sparse(x) else x
  return jnp.vdot(values.ravel(), values.ravel()).astype(jnp.float32)


def guard(update: Any, finite: jax.Array) -> Any:
  """`update` where `finite`, else zero (sparse or dense)."""
  if is_sparse(update):
    return dataclasses.replace(update, values=jnp.where(finite, update.values, 0.0))
  return jnp.where(finite, update, jnp.zeros_like(update))


def apply_updates(params: Any, updates: Any) -> Any:
  """optax.apply_updates for trees whose updates may include SparseRows."""
  def add(p, u):
    if is_sparse(u):
      return p.at[u.ids].add(u.values.astype(p.dtype), indices_are_sorted=True)
    return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)
  return jax.tree_util.tree_map(add, params, updates)


def tree_map(fn, tree: Any, *rest: Any) -> Any:
  """jax.tree_util.tree_map with SparseRows as leaves of the first tree (and of `rest`)."""
  return jax.tree_util.tree_map(fn, tree, *rest, is_leaf=is_sparse)


def densify(x: Any) -> Optional[jax.Array]:
  """The dense array a SparseRows stands for (tests and debugging)."""
  if not is_sparse(x):
    return x
  return jnp.zeros(x.shape, x.values.dtype).at[x.ids].add(x.values)
