"""LoRA: low-rank adapters beside chosen kernels, a removable format module like the prompt.

A targeted kernel W [in, out] gets two parameters in its own module scope,

  .../attention/query/lora_a  [in, rank]   logical axes (W's input axis, 'lora_rank')
  .../attention/query/lora_b  [rank, out]  logical axes ('lora_rank', W's output axis)

and, while attached, the layer computes x W + (alpha / rank) (x A) B (the seam is
`layers.Dense`). A starts like PEFT's (uniform, bound 1/sqrt(in)) and B at zero, so a fresh
adapter leaves the network exactly the pretrained one. Which kernels: every Dense whose module
path (the parameter path without '/kernel', e.g. 'encoder/layers_3/attention/query', or
'encoder/layers/attention/query' with scanned layers) the regex `T5Config.lora_targets` finds;
the default `attention/(query|value)$` is PEFT's ["q", "v"] for T5: the query and value of
the encoder's self-attention and the decoder's self- and cross-attention.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from promot_jax import tree_util

LORA_PARAMS = ('lora_a', 'lora_b')
LORA_RANK_AXIS = 'lora_rank'
LORA_PATH_REGEX = r'/lora_[ab]$'


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Where adapters go and how they scale (hashable: modules carry it as an attribute)."""
  rank: int
  alpha: float
  targets: str

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def applies(self, module_path: str) -> bool:
    return re.search(self.targets, module_path) is not None


def spec_of(cfg) -> Optional[LoraSpec]:
  """The config's LoraSpec, or None when it has no adapters."""
  if cfg.lora_rank <= 0:
    return None
  try:
    re.compile(cfg.lora_targets)
  except re.error as e:
    raise ValueError(f'LORA_TARGETS {cfg.lora_targets!r} is not a valid regex: {e}') from e
  return LoraSpec(cfg.lora_rank, float(cfg.lora_alpha), cfg.lora_targets)


def a_init(rng, shape, dtype=jnp.float32):
  """PEFT's A initialiser (kaiming uniform with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
  bound = 1.0 / np.sqrt(shape[0])
  return jax.random.uniform(rng, shape, dtype, minval=-bound, maxval=bound)


def is_lora_path(path: str) -> bool:
  return re.search(LORA_PATH_REGEX, path) is not None


def has_lora(params: Mapping[str, Any]) -> bool:
  return any(is_lora_path(p) for p in tree_util.flatten(params))


def targeted_kernels(params: Mapping[str, Any], spec: LoraSpec) -> list[str]:
  """Paths of the kernels (t5x tree) that `spec` adapts, in sorted order."""
  return sorted(p for p in tree_util.flatten(params)
                if p.endswith('/kernel') and spec.applies(p[:-len('/kernel')]))


def initialize_lora(params: Mapping[str, Any], cfg, rng: Optional[jax.Array] = None
                    ) -> dict[str, Any]:
  """`params` (t5x tree) plus fresh adapters for every targeted kernel (others untouched).

  Each adapter's A draws from its own key (the run's key folded with a hash of its path), so
  the values do not depend on which other kernels are targeted.
  """
  spec = spec_of(cfg)
  if spec is None:
    raise ValueError('initialize_lora needs a config with lora_rank > 0 (LORA_RANK).')
  rng = jax.random.PRNGKey(0) if rng is None else rng
  flat = tree_util.flatten(params)
  kernels = targeted_kernels(params, spec)
  if not kernels:
    raise ValueError(f'LORA_TARGETS {spec.targets!r} matches no kernel; module paths look like '
                     f'{sorted(p[:-7] for p in flat if p.endswith("/kernel"))[:3]}.')
  for path in kernels:
    fan_in, fan_out = flat[path].shape
    module = path[:-len('/kernel')]
    key = jax.random.fold_in(rng, zlib.crc32(module.encode()) & 0x7FFFFFFF)
    flat[f'{module}/lora_a'] = np.asarray(a_init(key, (fan_in, spec.rank)))
    flat[f'{module}/lora_b'] = np.zeros((spec.rank, fan_out), np.float32)
  return tree_util.unflatten(flat)


def merged_kernels(params: Mapping[str, Any], cfg) -> dict[str, Any]:
  """The t5x tree with each adapter folded into its kernel (W + scale A B) and the adapters
  dropped: the same network as attached, as a plain model (export, inspection)."""
  spec = spec_of(cfg)
  flat = tree_util.flatten(params)
  out = {p: v for p, v in flat.items() if not is_lora_path(p)}
  for path in [p for p in flat if p.endswith('/lora_a')]:
    module = path[:-len('/lora_a')]
    a, b = np.asarray(flat[path], np.float32), np.asarray(flat[f'{module}/lora_b'], np.float32)
    out[f'{module}/kernel'] = np.asarray(flat[f'{module}/kernel'], np.float32) + spec.scale * a @ b
  return tree_util.unflatten(out)
