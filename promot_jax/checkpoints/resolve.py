"""Which checkpoint a path means, what it is called in results, and loading it for inference.

A path may be one checkpoint (params/ + promot.json), a stage directory (its kept
checkpoint, as the manager records it in kept.json), or pretrained weights in another
format (checkpoints.loading decides).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import jax
import jax.numpy as jnp

from promot_jax import paths
from promot_jax.checkpoints import loading, orbax_io
from promot_jax.checkpoints.manager import StageCheckpoints
from promot_jax.model import formats
from promot_jax.model.config import T5Config


def resolve_checkpoint(path: str) -> str:
  """A checkpoint dir as given, or a stage dir's kept checkpoint (kept.json)."""
  path = paths.absolute(path)
  if not paths.exists(path):
    raise FileNotFoundError(f'No checkpoint at {path}: the path does not exist.')
  if orbax_io.is_orbax_checkpoint(path):
    return path
  kept = StageCheckpoints(path).kept()
  if kept is not None:
    for candidate in (kept.get('path', ''), paths.join(path, f"checkpoint_{kept.get('step')}")):
      if candidate and orbax_io.is_orbax_checkpoint(candidate):
        return candidate
    raise FileNotFoundError(f'{paths.join(path, "kept.json")} names {kept.get("path")}, '
                            'which is not a checkpoint.')
  if any(n.startswith('checkpoint_') for n in paths.listdir(path)):
    raise FileNotFoundError(f'{path} holds checkpoints but no kept.json; pass one '
                            'checkpoint_<step> directory with --checkpoint.')
  return path  # maybe a pretrained HF / t5x checkpoint: loading.load_pretrained decides


def checkpoint_name(resolved: str) -> str:
  """'<stage>_checkpoint_<step>' for a stage's checkpoint, else the directory's name."""
  base = paths.basename(resolved)
  if re.fullmatch(r'checkpoint_\d+', base):
    return f'{paths.basename(paths.dirname(resolved))}_{base}'
  return base


def checkpoint_has_prompt(resolved: str) -> bool:
  """Whether the checkpoint holds a format module (a prompt or LoRA adapters; metadata only
  for promot_jax checkpoints)."""
  fmt = loading.detect_format(resolved)
  if fmt == 'orbax':
    return bool(formats.module_paths(orbax_io.param_shapes(resolved)))
  return fmt == 't5x' and bool(formats.module_paths(
      loading.load_pretrained(resolved, fmt='t5x')[1]))


def checkpoint_method(resolved: str) -> Optional[str]:
  """The method label the trainer wrote with a checkpoint (train/methods.py), if any."""
  state = paths.join(resolved, 'state.json')
  return paths.read_json(state).get('method') if paths.exists(state) else None


def load_checkpoint(resolved: str, mesh=None, rules=None,
                    dtype: Any = None) -> tuple[T5Config, Any]:
  """(config without dropout, params) from any readable checkpoint.

  Without `mesh` the params go to the default device. With it they are global arrays laid
  out by the logical axis `rules` on the mesh, read shard by shard (loading.load_on_mesh),
  cast to `dtype` (e.g. 'bfloat16') while reading.
  """
  if mesh is not None:
    cfg, params = loading.load_on_mesh(resolved, mesh, rules, dtype=dtype)
    return cfg.replace(dropout_rate=0.0), params
  if orbax_io.is_orbax_checkpoint(resolved) and orbax_io.read_meta(resolved).get('base') is None:
    cfg, params = orbax_io.read_config(resolved), orbax_io.restore_params(resolved)
  else:   # other formats, and stage-1 checkpoints rebuilt from their base
    cfg, params = loading.load_pretrained(resolved)
  # Host arrays would be copied to the device at every batch: place them once.
  params = jax.tree_util.tree_map(
      lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), params)
  if dtype is not None:
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(
        x.dtype, jnp.floating) else x, params)
  return cfg.replace(dropout_rate=0.0), params


def expand_checkpoints(path: str, every: bool = False) -> list[str]:
  """The checkpoints a --checkpoint path means.

  A checkpoint: itself. A stage directory: its kept checkpoint, or with `every` each of its
  complete checkpoints. A run's MODEL_DIR (stage directories inside): the same for each stage,
  in the order the stages ran. Anything else (pretrained weights): itself.
  """
  path = paths.absolute(path)
  if not paths.exists(path):
    raise FileNotFoundError(f'No checkpoint at {path}: the path does not exist.')
  if orbax_io.is_orbax_checkpoint(path):
    return [path]

  def of_stage(stage_dir: str) -> list[str]:
    ckpts = StageCheckpoints(stage_dir)
    if every:
      return [ckpts.path(step) for step in ckpts.steps()]
    return [resolve_checkpoint(stage_dir)]

  if StageCheckpoints(path).steps():
    return of_stage(path)
  stages = [paths.join(path, n) for n in sorted(paths.listdir(path))
            if paths.isdir(paths.join(path, n)) and StageCheckpoints(paths.join(path, n)).steps()]
  if stages:
    stages.sort(key=_stage_order(path))
    return [c for stage_dir in stages for c in of_stage(stage_dir)]
  return [path]


def _stage_order(model_dir: str):
  """Sort key: the stage order run.json records, else by name."""
  order: list[str] = []
  run_json = paths.join(model_dir, 'run.json')
  if paths.exists(run_json):
    try:
      order = [s['name'] if isinstance(s, dict) else str(s)
               for s in paths.read_json(run_json).get('stages', [])]
    except (ValueError, OSError, KeyError, TypeError):
      order = []
  return lambda stage_dir: (order.index(paths.basename(stage_dir))
                            if paths.basename(stage_dir) in order else len(order),
                            paths.basename(stage_dir))
