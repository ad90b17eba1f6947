"""The device mesh and the logical-axis rules that lay parameters, state and batches on it.

One ('data', 'model') mesh over every device of every host (t5x's convention). Each
parameter carries logical axis names (see layers.py); the rules below map them to mesh axes,
so one table partitions any model size. These are t5x's standard 1-D rules plus the prompt's
axes, which stay replicated: the prompt is tiny and every data shard needs all of it.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from promot_jax import tree_util

LogicalRules = Sequence[tuple[str, Optional[str]]]

STANDARD_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ('batch', 'data'),
    ('vocab', 'model'),
    ('embed', None),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('joined_kv', 'model'),
    ('relpos_buckets', None),
    ('abspos_buckets', None),
    ('length', None),
    ('layers', None),
    ('stack', None),
    ('mlp_activations', None),
    ('prompt', None),
    ('prompt_embed', None),
    ('lora_rank', None),        # LoRA adapters: the rank axis is tiny; the other follows the kernel
)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """jax.distributed.initialize once per process (every host runs the same command). On Cloud
  TPU every argument is discovered; CPU processes (a rehearsal) talk through gloo."""
  if jax.distributed.is_initialized():
    return
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes,
                                  process_id=process_id).items() if v is not None}
  jax.distributed.initialize(**kwargs)


def standard_logical_axis_rules(additional_rules: LogicalRules = ()) -> tuple:
  """t5x's standard rules; `additional_rules` (e.g. from gin) take precedence."""
  overridden = {name for name, _ in additional_rules}
  return tuple(additional_rules) + tuple(r for r in STANDARD_RULES if r[0] not in overridden)


def make_mesh(num_partitions: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, model) mesh over all devices (all hosts); `num_partitions` devices per model shard.

  On TPU the layout follows the physical torus (jax's mesh_utils, as t5x and MaxText do),
  across slices a hybrid mesh (the data axis spans slices, the model axis stays inside one).
  Elsewhere devices are ordered by (process, id), so a model group fills one host before it
  spans the next.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_partitions < 1 or len(devices) % num_partitions:
    raise ValueError(f'num_partitions={num_partitions} must divide the {len(devices)} devices; '
                     f'choose one of {[d for d in range(1, len(devices) + 1) if len(devices) % d == 0]}.')
  data = len(devices) // num_partitions
  if devices[0].platform == 'tpu':
    slices = len({getattr(d, 'slice_index', 0) for d in devices})
    if slices > 1:
      grid = mesh_utils.create_hybrid_device_mesh((data // slices, num_partitions), (slices, 1),
                                                  devices)
    else:
      try:
        grid = mesh_utils.create_device_mesh((data, num_partitions), devices)
      except (ValueError, NotImplementedError, AssertionError):
        # A model axis that is no product of whole torus axes (8 on v5e-256's 16x16): split a
        # physical axis, still keeping each model group on neighbouring chips.
        grid = mesh_utils.create_device_mesh((data, num_partitions), devices,
                                             allow_split_physical_axes=True)
  else:
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.asarray(ordered).reshape(data, num_partitions)
  return Mesh(grid, ('data', 'model'))


def host_data_shard(mesh: Mesh, process_index: Optional[int] = None) -> tuple[int, int]:
  """(shard index, number of shards) of the global batch that one process reads.

  A process feeds the rows of the 'data' positions its devices hold. When the model axis spans
  several processes, those processes hold the same positions and so read the same shard (what
  jax.make_array_from_process_local_data expects); otherwise each reads its own.
  """
  me = jax.process_index() if process_index is None else process_index
  positions = sorted({i for (i, _), d in np.ndenumerate(mesh.devices) if d.process_index == me})
  if not positions:
    raise ValueError(f'Process {me} holds no device of the mesh.')
  count, data = len(positions), mesh.shape['data']
  if positions != list(range(positions[0], positions[0] + count)) or positions[0] % count:
    raise ValueError(f'Process {me} holds data positions {positions} of {data}: not one '
                     'aligned block, so its rows of a batch are not one shard. Use a '
                     'NUM_PARTITIONS that divides the devices per host, or a multiple of it.')
  return positions[0] // count, data // count


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """A tree of logical PartitionSpecs -> NamedShardings on `mesh`."""
  return jax.tree_util.tree_map(
      lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)), logical_specs,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batches: rows split over 'data', replicated over 'model' ([batch] or [batch, length])."""
  return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
  data = mesh.shape['data']
  if batch_size % data:
    raise ValueError(f'BATCH_SIZE={batch_size} is not divisible by the mesh\'s data axis ({data} = '
                     f'{mesh.devices.size} devices / {mesh.shape["model"]} model partitions). '
                     f'Use a multiple of {data}, e.g. {((batch_size // data) + 1) * data}, or '
                     'change NUM_PARTITIONS.')


def global_batch_from_host(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each host's shard of the batch (host_data_shard) into global arrays over 'data'."""
  sharding = data_sharding(mesh)
  if jax.process_count() == 1:
    return {k: jax.device_put(v, sharding) for k, v in host_batch.items()}
  _, num_shards = host_data_shard(mesh)
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (v.shape[0] * num_shards,) + v.shape[1:]) for k, v in host_batch.items()}


def check_divisible(params: Any, shardings: Any, mesh) -> None:
  """A clear error when a parameter's dimension does not split over its mesh axis."""
  flat_params, flat_shardings = tree_util.flatten(params), tree_util.flatten(shardings)
  for path, value in flat_params.items():
    spec = flat_shardings[path].spec
    for dim, axes in zip(value.shape, spec):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      parts = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      if dim % parts:
        raise ValueError(
            f'{path} {tuple(value.shape)}: a dimension of {dim} cannot be split over the mesh '
            f'axis {names} of size {parts} (mesh {dict(mesh.shape)}). Choose NUM_PARTITIONS '
            f'that divides the model\'s heads, mlp and vocabulary sizes, or override the rule '
            'for that axis in LOGICAL_AXIS_RULES.')


def global_array(host_global: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array laid out by `sharding` from the whole value, which every process holds
  (each process places only the pieces its devices hold)."""
  return jax.make_array_from_callback(host_global.shape, sharding,
                                      lambda index: host_global[index])


def batch_array(host_global: np.ndarray, mesh: Mesh) -> jax.Array:
  """A whole batch (every process holds all of it) laid out over the mesh's 'data' axis."""
  return global_array(np.asarray(host_global), data_sharding(mesh))


def to_host(array: jax.Array) -> np.ndarray:
  """The whole value of a (possibly multi-host) global array on every process, as numpy."""
  if jax.process_count() == 1 or array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))
