"""What a TPU slice is and what a compiled step costs on it, for `promot plan`.

Chips (HBM, peak bf16 rate), topology names as Cloud TPU spells them, the devices libtpu
describes for a slice without owning one, the counted model FLOPs of a step, and the memory
figures of XLA's compiled programs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import topologies

from promot_jax import mesh as partitioning

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM per chip, peak bf16 FLOP/s per chip, how its slices are named."""
  name: str
  hbm_gib: float
  peak_tflops: float
  cores_per_chip: int        # accelerator type v4-N / v5p-N counts cores; v5e/v6e count chips
  topology_prefix: str       # libtpu's topology name prefix ('v4:2x4x4')
  chip_config: str           # 'megacore': one JAX device per chip (two cores)


CHIPS = {
    'v4': Chip('v4', 32, 275, 2, 'v4', 'megacore'),
    'v5e': Chip('v5e', 16, 197, 1, 'v5e', 'default'),
    'v5p': Chip('v5p', 95, 459, 2, 'v5', 'megacore'),
    'v6e': Chip('v6e', 32, 918, 1, 'v6e', 'default'),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e'}
# Slice shapes by number of chips (Cloud TPU docs: v4 and v5p 3-D tori, v5e and v6e 2-D).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 192: (4, 4, 12), 256: (4, 8, 8), 384: (4, 8, 12), 512: (8, 8, 8),
             768: (8, 8, 12), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
             6144: (16, 16, 24)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
# Accelerator types Cloud TPU offers (launch/tpu.py validates against the same sizes).
SIZES = {'v4': (8, 16, 32, 64, 128, 256, 384, 512, 1024, 1536, 2048, 4096),
         'v5e': (1, 4, 8, 16, 32, 64, 128, 256),
         'v5p': (8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, 12288),
         'v6e': (1, 4, 8, 16, 32, 64, 128, 256)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                  # as the user wrote it ('v4-64') or 'cpu'
  chip: Optional[Chip]       # None for the local devices
  num_chips: int
  shape: tuple = ()

  @property
  def libtpu_name(self) -> str:
    return f'{self.chip.topology_prefix}:' + 'x'.join(map(str, self.shape))

  @property
  def host_bounds(self) -> tuple:
    """Chips per host: whole slice on one host up to 8 chips, else 4 (2x2x1) per host."""
    if self.num_chips <= 8:
      return tuple(self.shape) + (1,) * (3 - len(self.shape))
    return (2, 2, 1)

  @property
  def num_hosts(self) -> int:
    return max(1, self.num_chips // math.prod(self.host_bounds))


def known_sizes(generation: str) -> list[int]:
  """The N of every valid '<generation>-N' name (cores for v4/v5p, chips for v5e/v6e)."""
  return list(SIZES[generation])


def parse_topology(name: str) -> Topology:
  """'v4-64' | 'v5e-256' | 'v5litepod-16' | 'v5p-128' | 'v6e-8' | 'cpu' -> Topology."""
  if name == 'cpu':
    return Topology('cpu', None, 0)
  m = re.fullmatch(r'(v4|v5e|v5p|v6e|v5litepod|v5lite)-(\d+)', name.strip().lower())
  if not m:
    raise ValueError(f'Unknown topology {name!r}; use e.g. v4-64, v5e-256, v5p-128, v6e-64 or '
                     'cpu (this machine\'s devices).')
  gen = ALIASES.get(m.group(1), m.group(1))
  chip, n = CHIPS[gen], int(m.group(2))
  if n not in SIZES[gen]:
    unit = 'TensorCores (2 per chip)' if chip.cores_per_chip == 2 else 'chips'
    raise ValueError(f'{name}: {gen}-N counts {unit}; known sizes: '
                     f'{", ".join(f"{gen}-{k}" for k in SIZES[gen])}.')
  chips = n // chip.cores_per_chip
  return Topology(name, chip, chips, (SHAPES_3D if chip.cores_per_chip == 2 else SHAPES_2D)[chips])


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(topo: Topology) -> list:
  """Compile-only devices of a TPU slice (libtpu), or this machine's devices for 'cpu'."""
  if topo.chip is None:
    return list(jax.devices())
  if not libtpu_available():
    raise ValueError(f'Planning for {topo.name} needs libtpu, which is not installed here. '
                     'Install it with: pip install -e ".[tpu]" (jax[tpu]==0.10.2; works on a CPU '
                     'host), or plan on this machine\'s devices with --topology cpu.')
  if not os.path.exists('/dev/accel0') and not os.path.exists('/dev/vfio'):
    # Not a TPU VM: tell libtpu so instead of letting it probe for one.
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', topo.name)
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  try:
    desc = topologies.get_topology_desc(
        topology_name=topo.libtpu_name, platform='tpu', chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=topo.host_bounds, num_slices=1)
  except Exception as e:  # noqa: BLE001 - libtpu's errors are RuntimeErrors of many kinds
    raise ValueError(f'libtpu cannot describe {topo.name} ({topo.libtpu_name}): {e}') from e
  return list(desc.devices)


def make_plan_mesh(devices: Sequence, data: int, model: int):
  """The ('data', 'model') mesh the trainer builds (mesh.make_mesh) over the topology's devices."""
  if data * model != len(devices):
    raise ValueError(f'--mesh {data},{model} needs {data * model} devices; the topology has '
                     f'{len(devices)}.')
  return partitioning.make_mesh(model, devices)   # the trainer's own mesh construction


# ---------------------------------------------------------------------------- FLOPs


def model_flops(cfg, batch: int, inputs: int, targets: int, with_prompt: bool,
                trains_weights: bool) -> float:
  """Counted FLOPs of one train step (see the module docstring for the formula)."""
  d, hk, ff = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
  s_e = inputs + (cfg.prompt_length if with_prompt else 0)
  s_d = targets
  mlp = (len(cfg.mlp_activations) + 1) * d * ff
  enc_weights_per_pos = cfg.num_encoder_layers * (4 * d * hk + mlp)
  cross_kv_per_enc_pos = cfg.num_decoder_layers * 2 * d * hk
  dec_weights_per_pos = cfg.num_decoder_layers * (6 * d * hk + mlp) + d * cfg.vocab_size
  matmul = 2 * batch * (s_e * (enc_weights_per_pos + cross_kv_per_enc_pos)
                        + s_d * dec_weights_per_pos)
  attn = 4 * batch * hk * (cfg.num_encoder_layers * s_e * s_e
                           + cfg.num_decoder_layers * (s_d * s_d + s_d * s_e))
  return float((3 if trains_weights else 2) * matmul + 3 * attn)


def cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))


# ---------------------------------------------------------------------------- memory

_OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'Ran out of memory', 'out of memory')


def is_oom(error: BaseException) -> bool:
  return any(m in str(error) for m in _OOM_MARKERS)


def oom_summary(error: BaseException) -> str:
  """The compiler's one-line account of an out-of-memory compile."""
  text = str(error).strip().splitlines()
  line = next((l for l in text if any(m in l for m in _OOM_MARKERS)), text[0] if text else '')
  return line.strip()[:400]


def memory_row(stats, hbm_bytes: Optional[float]) -> dict:
  """Per-device bytes from compiled.memory_analysis(); peak = args + outputs - aliased + temps."""
  arg, out = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
  alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
  peak = arg + out - alias + temp + int(getattr(stats, 'generated_code_size_in_bytes', 0) or 0)
  return {'argument_bytes': arg, 'output_bytes': out, 'alias_bytes': alias, 'temp_bytes': temp,
          'peak_bytes': peak, 'hbm_bytes': hbm_bytes,
          'fits': True if hbm_bytes is None else peak <= hbm_bytes}


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds of an abstract tree laid out by `shardings`."""
  leaves = jax.tree_util.tree_leaves(abstract_tree)
  shards = jax.tree_util.tree_leaves(shardings)
  return int(sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
                 for x, s in zip(leaves, shards)))


def total_bytes(abstract_tree: Any) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(abstract_tree))


def _log(text: str) -> None:
  print(f'promot plan: {text}', file=sys.stderr, flush=True)


def compile_row(lower_fn, hbm_bytes: Optional[float], what: str = '') -> tuple[dict, Any]:
  """Compile; an out-of-memory compile becomes a 'does not fit' row instead of a traceback."""
  start = time.perf_counter()
  try:
    compiled = lower_fn().compile()
  except Exception as e:  # noqa: BLE001 - the compiler's error types vary by backend
    if not is_oom(e):
      raise
    if what:
      _log(f'{what}: does not fit ({time.perf_counter() - start:.0f}s)')
    return {'fits': False, 'oom': oom_summary(e), 'hbm_bytes': hbm_bytes,
            'compile_s': time.perf_counter() - start}, None
  if what:
    _log(f'{what}: compiled in {time.perf_counter() - start:.0f}s')
  stats = compiled.memory_analysis()
  row = memory_row(stats, hbm_bytes) if stats is not None else {'fits': None, 'hbm_bytes': hbm_bytes}
  row['flops_per_device'] = cost_flops(compiled)
  row['compile_s'] = time.perf_counter() - start
  return row, compiled
