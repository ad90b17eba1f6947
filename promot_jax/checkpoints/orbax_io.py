"""promot_jax's own checkpoint format: an orbax parameter tree plus a small JSON of metadata.

A checkpoint directory holds
  params/       the model parameters (orbax StandardCheckpointer; sharded, atomic)
  promot.json   the T5Config and where the weights came from (format, source path, step ...)
`promot convert` writes one; the trainer's step directories use the same layout (with more
items beside `params/`), so any of them can be restored, inspected and used as the starting
point of a stage.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from promot_jax import paths, tree_util
from promot_jax.model.config import T5Config

PARAMS_DIR = 'params'
META_FILE = 'promot.json'


def is_orbax_checkpoint(path: str) -> bool:
  # promot.json is written after params/ is complete, so it alone marks a checkpoint
  return paths.exists(paths.join(path, META_FILE)) and paths.isdir(paths.join(path, PARAMS_DIR))


def save_params(directory: str, params: Mapping[str, Any], config: T5Config,
                meta: Optional[Mapping[str, Any]] = None, *, overwrite: bool = False) -> str:
  """Write `params` (numpy or jax arrays, possibly sharded) and metadata to `directory`."""
  directory = paths.absolute(directory)
  target = paths.join(directory, PARAMS_DIR)
  if paths.exists(target) and not overwrite:
    raise FileExistsError(f'{directory} already holds a checkpoint; choose another --dst or pass '
                          '--overwrite to replace it.')
  paths.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, dict(params), force=overwrite)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    info = {'config': config.to_dict(), 'num_params': tree_util.count_params(params),
            'has_prompt': 'prompt' in params, **dict(meta or {})}
    paths.write_json(paths.join(directory, META_FILE), info)
  return directory


def read_meta(directory: str) -> dict[str, Any]:
  path = paths.join(directory, META_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(f'{directory} is not a promot_jax checkpoint (no {META_FILE}).')
  return paths.read_json(path)


def read_config(directory: str) -> T5Config:
  return T5Config.from_dict(read_meta(directory)['config'])


def param_shapes(directory: str) -> dict[str, Any]:
  """Shapes/dtypes of the stored parameters, read from orbax metadata (no array I/O)."""
  directory = paths.absolute(directory)   # orbax needs an absolute path
  md = ocp.StandardCheckpointer().metadata(paths.join(directory, PARAMS_DIR))
  tree = md.item_metadata.tree if hasattr(md, 'item_metadata') else md
  return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def restore_params(directory: str, abstract: Optional[Mapping[str, Any]] = None,
                   *, as_numpy: bool = False) -> dict[str, Any]:
  """Restore the parameter tree.

  `abstract` (a tree of jax.ShapeDtypeStruct, with .sharding where the caller wants the arrays
  laid out on a mesh) selects and checks what is read; by default everything is read onto
  the default device.
  """
  directory = paths.absolute(directory)
  if not is_orbax_checkpoint(directory):
    raise FileNotFoundError(
        f'No promot_jax checkpoint at {directory} (expected {PARAMS_DIR}/ and {META_FILE}). '
        'Convert pretrained weights first: promot convert --from {hf,t5x} --src PATH --dst DIR.')
  stored = param_shapes(directory)
  if abstract is not None:
    tree_util.check_tree_matches(stored, abstract, source=directory)
  else:
    abstract = stored
  # Leaves without a sharding go to this process's first device, whatever topology wrote them.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda s: s if getattr(s, 'sharding', None) is not None else
      jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(paths.join(directory, PARAMS_DIR), abstract)
  if as_numpy:
    params = jax.tree_util.tree_map(np.asarray, params)
  return params
