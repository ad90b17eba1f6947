"""Scanned layers: the stacked parameter layout and its conversion to and from t5x's tree.

With T5Config.scan_layers the encoder and decoder run their layers under nn.scan, whose
parameters are stacked on a leading [num_layers] axis with logical axis 'layers':

  t5x tree (users, checkpoints)                 stacked tree (inside the jitted step)
  encoder/layers_0/mlp/wi_0/kernel [E, M]  ...  encoder/layers/mlp/wi_0/kernel [L, E, M]
  encoder/layers_{L-1}/mlp/wi_0/kernel [E, M]

Everything outside the layer stacks (embeddings, relpos_bias, final norms, logits, prompt)
is the same in both. Conversions work on arrays, ShapeDtypeStructs and PartitionSpecs, so
the same functions move parameters, their shapes and their logical axes.

train.sharding.build_sharded_step lays out either tree (the logical axes of the stacked
one come from transformer.logical_axes(cfg, stacked=True)).

Optimizer states convert the same way (`stack_opt_state` / `unstack_opt_state`): every
parameter-shaped subtree of the state (optax's v_row, v_col, v, mu, nu ...) is stacked or
unstacked like the parameters, and everything else (step counts, empty states) is passed
through. The optimizer of a stacked tree (train.optimizer.make_optimizer) keeps per-layer
statistics stacked on the same axis, so the t5x tree's optimizer state is what checkpoints
hold in either layout.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from promot_jax import tree_util

# Paths of stacked leaves start with one of these; their leading axis is the layer.
STACKED_PREFIXES = ('encoder/layers/', 'decoder/layers/')


def _stacks(cfg) -> tuple[tuple[str, int], ...]:
  return (('encoder', cfg.num_encoder_layers), ('decoder', cfg.num_decoder_layers))


def is_stacked(params: Mapping[str, Any]) -> bool:
  """Whether a parameter (or spec) tree holds scanned layers (encoder/ or decoder/layers/...)."""
  return any(isinstance(params.get(s), Mapping) and 'layers' in params[s]
             for s in ('encoder', 'decoder'))


def is_stacked_path(path: str) -> bool:
  """Whether the '/'-joined parameter path names a stacked leaf ([num_layers, ...])."""
  return path.startswith(STACKED_PREFIXES)


def _stack_leaves(leaves: list) -> Any:
  first = leaves[0]
  if not isinstance(first, PartitionSpec) and not jax.tree_util.tree_leaves(first):
    return first        # an empty node (optax.MaskedNode, None): the same in every layer
  if isinstance(first, PartitionSpec):
    return PartitionSpec('layers', *first)
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
  if isinstance(first, np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _unstack_leaf(leaf: Any, i: int) -> Any:
  if not isinstance(leaf, PartitionSpec) and not jax.tree_util.tree_leaves(leaf):
    return leaf
  if isinstance(leaf, PartitionSpec):
    return PartitionSpec(*leaf[1:])
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
  return leaf[i]


def stack_layers(params: Mapping[str, Any], cfg) -> dict[str, Any]:
  """t5x tree (layers_0 .. layers_{N-1}) -> scanned tree (layers, leading [N] axis).

  Works on arrays (numpy or jax), ShapeDtypeStructs and PartitionSpecs (which gain a
  leading 'layers' axis). Everything outside the layer stacks is passed through.
  """
  if is_stacked(params):
    return dict(params)
  flat = tree_util.flatten(params)
  out = {p: v for p, v in flat.items()
         if not any(p.startswith(f'{s}/layers_') for s, _ in _stacks(cfg))}
  for stack, n in _stacks(cfg):
    names = [p[len(f'{stack}/layers_0/'):] for p in flat if p.startswith(f'{stack}/layers_0/')]
    for name in names:
      try:
        leaves = [flat[f'{stack}/layers_{i}/{name}'] for i in range(n)]
      except KeyError as e:
        raise ValueError(f'Cannot stack {stack} layers: {e} is missing (expected {n} layers).')
      out[f'{stack}/layers/{name}'] = _stack_leaves(leaves)
  return tree_util.unflatten(out)


def unstack_layers(params: Mapping[str, Any], cfg) -> dict[str, Any]:
  """Scanned tree -> the t5x tree (inverse of `stack_layers`)."""
  if not is_stacked(params):
    return dict(params)
  out = {}
  for p, v in tree_util.flatten(params).items():
    stack = next((s for s, _ in _stacks(cfg) if p.startswith(f'{s}/layers/')), None)
    if stack is None:
      out[p] = v
      continue
    name, n = p[len(f'{stack}/layers/'):], dict(_stacks(cfg))[stack]
    for i in range(n):
      out[f'{stack}/layers_{i}/{name}'] = _unstack_leaf(v, i)
  return tree_util.unflatten(out)


def _is_param_tree(node: Any) -> bool:
  return isinstance(node, Mapping) and ('encoder' in node or 'decoder' in node)


def _map_param_trees(fn, opt_state: Any) -> Any:
  """`fn` applied to each parameter-shaped subtree (a mapping holding encoder/ or decoder/)."""
  return jax.tree_util.tree_map(lambda node: fn(node) if _is_param_tree(node) else node,
                                opt_state, is_leaf=_is_param_tree)


def stack_opt_state(opt_state: Any, cfg) -> Any:
  """The optimizer state of the t5x tree -> that of the stacked tree (see the module docstring).

  Works on any optax state (nested tuples, NamedTuples, masked and multi_transform states) of
  arrays or ShapeDtypeStructs; step counts and other scalars are passed through unchanged.
  """
  return _map_param_trees(lambda tree: stack_layers(tree, cfg), opt_state)


def unstack_opt_state(opt_state: Any, cfg) -> Any:
  """The optimizer state of the stacked tree -> that of the t5x tree (inverse of
  `stack_opt_state`): the layout checkpoints keep."""
  return _map_param_trees(lambda tree: unstack_layers(tree, cfg), opt_state)
