"""Small helpers for parameter trees keyed by '/'-joined paths (t5x's naming)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Leaves are anything that is not a Mapping."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def map_with_path(fn: Callable[[str, Any], Any], tree: Mapping[str, Any]) -> dict[str, Any]:
  return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def count_params(tree: Mapping[str, Any]) -> int:
  return int(sum(int(np.prod(v.shape)) for v in flatten(tree).values()))


def check_tree_matches(loaded: Mapping[str, Any], expected: Mapping[str, Any],
                       source: str, ignore_missing: Any = ()) -> None:
  """Raise a clear error unless `loaded` has exactly `expected`'s paths and shapes.

  `expected` may hold jax.ShapeDtypeStruct leaves (from jax.eval_shape). Paths whose first
  component is in `ignore_missing` (e.g. 'prompt', which checkpoints of a pretrained model lack),
  or for which `ignore_missing` (a predicate on the path) is true, may be absent from `loaded`.
  """
  got, want = flatten(loaded), flatten(expected)
  may_miss = ignore_missing if callable(ignore_missing) else (
      lambda p: p.split('/')[0] in ignore_missing)
  missing = [p for p in want if p not in got and not may_miss(p)]
  extra = [p for p in got if p not in want]
  problems = []
  if missing:
    problems.append(f'missing from {source}: {missing[:8]}' + (' ...' if len(missing) > 8 else ''))
  if extra:
    problems.append(f'not in the model config: {extra[:8]}' + (' ...' if len(extra) > 8 else ''))
  for p, v in got.items():
    if p in want and tuple(v.shape) != tuple(want[p].shape):
      problems.append(f'parameter {p}: {source} has shape {tuple(v.shape)}, the model config '
                      f'expects {tuple(want[p].shape)}')
  if problems:
    raise ValueError(
        f'The parameters in {source} do not match the model config:\n  - ' + '\n  - '.join(problems)
        + '\nPick the model config that matches the checkpoint (e.g. --model=mt5_small or the '
        'matching gin/models/*.gin).')


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
  """One nested tree of both; where both hold a leaf, `top`'s wins."""
  return unflatten({**flatten(base), **flatten(top)})
