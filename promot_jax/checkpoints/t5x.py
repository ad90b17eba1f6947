"""Read (and, for tests, write) t5x checkpoints without t5x or TensorFlow installed.

Legacy layout, used by the public mT5/T5 checkpoints (gs://t5-data/pretrained_models/t5x/...):

  checkpoint_<step>/
    checkpoint                    msgpack of {'version': 3, 'optimizer': train_state_dict}
    target.encoder.layers_0...    one zarr array per large leaf, named by its dotted tree path

`train_state_dict` is {'target': model params, 'state': {'step': ..., 'param_states': ...}}.
A leaf kept in zarr appears in the msgpack as a TensorStore spec dict (with 'driver', 'kvstore'
and 'metadata' keys) whose kvstore path is relative to the checkpoint directory, so the directory
can be copied or moved; leaves t5x did not partition (e.g. `state/step`) are inline numpy arrays.
Newer t5x can write an orbax layout (`checkpoint_<step>/state/` with `_METADATA`), read here
through orbax-checkpoint.
"""

from __future__ import annotations

import copy
import io
import os
import re
import time
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import msgpack
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import serialization

from promot_jax import mesh as partitioning, tree_util

CHECKPOINT_FILE = 'checkpoint'
_VERSION = 3  # t5x legacy format version; since 3, bfloat16 is stored natively in zarr.
_CHUNK_BYTES = 64 * 1024 * 1024  # t5x keeps zarr chunks within 64 MiB.
_STEP_DIR = re.compile(r'checkpoint_(\d+)')
_ORBAX_MARKERS = ('_METADATA', '_CHECKPOINT_METADATA', 'manifest.ocdbt')
Progress = Callable[[int, int], None]


def _split_gcs(path: str) -> tuple[str, str]:
  m = re.fullmatch(r'gs://([^/]+)/?(.*)', path, re.DOTALL)
  if not m:
    raise ValueError(f'Malformed gs:// path: {path!r} (expected gs://bucket/dir).')
  return m.group(1), m.group(2).rstrip('/')


def _gcs(bucket: str):
  return ts.KvStore.open({'driver': 'gcs', 'bucket': bucket}).result()


def _gcs_keys(path: str, as_dir: bool) -> list[str]:
  """Object names equal to `path`, or (as_dir) under `path/` relative to it."""
  bucket, key = _split_gcs(path)
  lo = f'{key}/' if as_dir and key else key
  hi = (f'{key}0' if as_dir else f'{key}\x00') if key else None  # '0' sorts right after '/'
  rng = ts.KvStore.KeyRange(inclusive_min=lo, exclusive_max=hi) if hi else ts.KvStore.KeyRange()
  return [k.decode()[len(lo):] for k in _gcs(bucket).list(rng).result()]


def _join(base: str, *parts: str) -> str:
  return '/'.join([base.rstrip('/'), *parts]) if base.startswith('gs://') else os.path.join(base, *parts)


def _isfile(path: str) -> bool:
  return bool(_gcs_keys(path, False)) if path.startswith('gs://') else os.path.isfile(path)


def _isdir(path: str) -> bool:
  return bool(_gcs_keys(path, True)) if path.startswith('gs://') else os.path.isdir(path)


def _children(path: str) -> list[str]:
  if path.startswith('gs://'):
    return sorted({k.split('/')[0] for k in _gcs_keys(path, True)})
  return sorted(os.listdir(path))


def _read_bytes(path: str) -> bytes:
  if not path.startswith('gs://'):
    with open(path, 'rb') as f:
      return f.read()
  bucket, key = _split_gcs(path)
  result = _gcs(bucket).read(key).result()
  if result.state != 'value':
    raise FileNotFoundError(f'No such object: {path}')
  return bytes(result.value)


def t5x_checkpoint_steps(model_dir: str) -> list[int]:
  """Steps of the complete `checkpoint_<step>` subdirectories of a t5x model dir, ascending."""
  steps = []
  for name in _children(model_dir) if _isdir(model_dir) else []:
    m = _STEP_DIR.fullmatch(name)  # also skips unfinished `checkpoint_<step>.tmp-<time>` dirs
    if m and (_isfile(_join(model_dir, name, CHECKPOINT_FILE))
              or _isdir(_join(model_dir, name, 'state'))):
      steps.append(int(m.group(1)))
  return sorted(steps)


def latest_t5x_checkpoint(model_dir: str) -> str | None:
  """Path of the highest-step checkpoint directory in a t5x model dir, or None if it has none."""
  steps = t5x_checkpoint_steps(model_dir)
  return _join(model_dir, f'checkpoint_{steps[-1]}') if steps else None


def _is_orbax_dir(path: str) -> bool:
  return any(_isfile(_join(path, m)) for m in _ORBAX_MARKERS)


def _locate(path: str) -> tuple[str, str]:
  """('legacy', msgpack file) or ('orbax', orbax item dir) for a user-given checkpoint path."""
  path = path.rstrip('/') or '/'
  if os.path.basename(path) == CHECKPOINT_FILE and _isfile(path):
    return 'legacy', path
  if not _isdir(path):
    raise FileNotFoundError(f't5x checkpoint not found: {path} does not exist. Pass a '
                            f'`checkpoint_<step>` directory (or the `checkpoint` file in it).')
  if _is_orbax_dir(path):
    return 'orbax', path
  if _isfile(_join(path, CHECKPOINT_FILE)):
    return 'legacy', _join(path, CHECKPOINT_FILE)
  if _isdir(_join(path, 'state')):  # where t5x's orbax CheckpointManager puts the train state
    return 'orbax', _join(path, 'state')
  steps = t5x_checkpoint_steps(path)
  if steps:
    names = ', '.join(_join(path, f'checkpoint_{s}') for s in steps)
    raise ValueError(f'{path} is a t5x model directory, not a single checkpoint; pass one of: '
                     f'{names} (latest is {_join(path, f"checkpoint_{steps[-1]}")}).')
  raise FileNotFoundError(f'{path} has no `{CHECKPOINT_FILE}` file, so it is not a t5x '
                          f'checkpoint; pass the `checkpoint_<step>` directory that holds one.')


def is_t5x_checkpoint(path: str) -> bool:
  """Cheap check that `load_t5x_params(path)` finds a t5x train state there (no arrays read)."""
  try:
    kind, where = _locate(path)
    if kind == 'orbax':  # only t5x's own naming, so other orbax checkpoints are not claimed
      return os.path.basename(where) == 'state' and _is_orbax_dir(where)
    stream = io.BytesIO(_read_bytes(where)) if where.startswith('gs://') else open(where, 'rb')
    with stream:
      return _has_target(msgpack.Unpacker(stream, raw=False), top=True)
  except Exception:  # pylint: disable=broad-except
    return False


def _has_target(unpacker: Any, top: bool) -> bool:
  """Walk msgpack map headers, skipping values, looking for `target` or `optimizer/target`."""
  for _ in range(unpacker.read_map_header()):
    key = unpacker.unpack()
    if key == 'target':
      return True
    if key == 'optimizer' and top:
      return _has_target(unpacker, top=False)
    unpacker.skip()
  return False


def _is_ts_spec(value: Any) -> bool:
  """t5x's test for a leaf written to TensorStore: a dict with driver, kvstore and metadata."""
  return isinstance(value, Mapping) and {'driver', 'kvstore', 'metadata'} <= set(value)


def flatten_target(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Like tree_util.flatten, but TensorStore spec dicts are leaves and empty dicts vanish."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping) and not _is_ts_spec(value):
      out.update(flatten_target(value, path))
    else:
      out[path] = value
  return out


def _absolute_spec(spec: Mapping[str, Any], ckpt_dir: str) -> dict[str, Any]:
  """Resolve a leaf's relative kvstore path against the checkpoint dir (file or gcs driver)."""
  kvstore = dict(spec['kvstore'])
  rel = kvstore.get('path', spec.get('path'))  # tensorstore < 0.1.14 kept `path` at top level
  if rel is None or kvstore.get('driver') not in ('file', 'gfile', 'gcs'):
    raise ValueError(f'Unsupported TensorStore spec in t5x checkpoint: {dict(spec)}')
  if ckpt_dir.startswith('gs://'):  # t5x writes a dummy bucket name; the real one is ours
    bucket, prefix = _split_gcs(ckpt_dir)
    kvstore = {'driver': 'gcs', 'bucket': bucket, 'path': '/'.join(p for p in (prefix, rel) if p)}
  else:
    kvstore = {'driver': 'file', 'path': os.path.join(ckpt_dir, rel)}
  return {'driver': spec.get('driver', 'zarr'), 'kvstore': kvstore}


def _as_dtype(dtype: Any) -> np.dtype:
  try:
    return np.dtype(dtype)
  except TypeError:
    return np.dtype(getattr(ml_dtypes, str(dtype)))


def _is_float(dtype: np.dtype) -> bool:
  return dtype.kind == 'f' or dtype.name.startswith(('bfloat', 'float'))


def _read_zarr(specs: Mapping[str, Mapping[str, Any]], ckpt_dir: str, version: int,
               dtype: np.dtype | None, progress: Progress | None, done: int,
               total: int, shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Open every zarr leaf at once, then read them all concurrently (tensorstore futures).

  With `shardings` ({path: jax Sharding}) each leaf becomes a global jax.Array read piece by
  piece: a process reads only the slices its devices hold, one leaf at a time.
  """
  context = ts.Context({'file_io_concurrency': {'limit': 128}})
  full = {p: _absolute_spec(s, ckpt_dir) for p, s in specs.items()}
  opening = {p: ts.open(s, open=True, read=True, context=context) for p, s in full.items()}

  def fail(path: str, err: Exception) -> FileNotFoundError:
    kv = full[path]['kvstore']
    where = f"gs://{kv['bucket']}/{kv['path']}" if kv['driver'] == 'gcs' else kv['path']
    return FileNotFoundError(f'Cannot read t5x parameter {path}: expected a zarr array in '
                             f'{where} ({err}). Copy the whole checkpoint directory, including '
                             f'its target.* subdirectories.')

  reading = {}
  for path, future in opening.items():
    try:
      store = future.result()
    except Exception as err:  # pylint: disable=broad-except
      raise fail(path, err) from err
    want = specs[path]['metadata'].get('shape')
    if want is not None and tuple(want) != tuple(store.shape):
      raise ValueError(f't5x parameter {path}: the msgpack says shape {tuple(want)} but the zarr '
                       f'array has {tuple(store.shape)}; the checkpoint is inconsistent.')
    if version < 3 and store.dtype == ts.uint16:
      raise ValueError(f't5x parameter {path} is stored as uint16: checkpoint format version '
                       f'{version} kept bfloat16 that way, which is not supported; re-save it '
                       f'with t5x (format 3).')
    if dtype is not None and _is_float(store.dtype.numpy_dtype):
      store = ts.cast(store, dtype)  # cast inside tensorstore: no full-precision copy kept
    if shardings is not None:
      reading[path] = store
    else:
      reading[path] = store.read()
  out = {}
  if shardings is not None:
    for path, store in reading.items():
      try:
        out[path] = jax.make_array_from_callback(
            tuple(store.shape), shardings[path],
            lambda index, store=store: np.asarray(store[index].read().result()))
      except Exception as err:  # pylint: disable=broad-except
        raise fail(path, err) from err
      done += 1
      if progress is not None:
        progress(done, total)
    return out
  for path, future in reading.items():
    try:
      arr = np.asarray(future.result())
    except Exception as err:  # pylint: disable=broad-except
      raise fail(path, err) from err
    out[path] = arr
    done += 1
    if progress is not None:
      progress(done, total)
  return out


def _load_orbax(directory: str) -> dict[str, Any]:
  """Restore a whole orbax PyTree checkpoint with numpy leaves."""
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(directory)
  meta = getattr(getattr(meta, 'item_metadata', meta), 'tree', meta)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return checkpointer.restore(directory, restore_args=args)


def _target(contents: Any, source: str) -> Mapping[str, Any]:
  """The `target` dict: under `optimizer` (t5x format versions >= 1), else at the top (flax)."""
  state = contents.get('optimizer', contents) if isinstance(contents, Mapping) else contents
  if not isinstance(state, Mapping) or not isinstance(state.get('target'), Mapping):
    found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
    raise ValueError(f'{source} has no `target` (model parameters) dict; found {found}. Pass a '
                     f't5x train-state checkpoint (checkpoint_<step>/checkpoint).')
  return state['target']


def _read_msgpack(path: str) -> Any:
  raw = _read_bytes(path)
  if raw.startswith(b'model_checkpoint_path'):
    raise ValueError(f'{path} is a TensorFlow checkpoint index, not a t5x checkpoint; convert '
                     f'Mesh TensorFlow T5 checkpoints with a TF-checkpoint converter instead.')
  try:
    return serialization.msgpack_restore(raw)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f'{path} is not a t5x checkpoint: it is not valid t5x msgpack ({err}). If '
                     f'it is truncated, copy it again.') from err


def load_t5x_params(path: str, *, dtype: Any = None, progress: Progress | None = None,
                    shardings_for: Callable[[dict[str, tuple]], Mapping[str, Any]] | None = None
                    ) -> dict[str, Any]:
  """Load the model parameters (`target`) of a t5x checkpoint as a nested dict of numpy arrays.

  `path` is a `checkpoint_<step>` directory or the `checkpoint` file in it, local or gs://.
  Optimizer state is not read. With `dtype`, floating leaves are cast to it while reading.
  `progress(done, total)` is called as leaves arrive. With `shardings_for` (called once with
  every leaf's shape, returning {path: jax Sharding}) the leaves are global jax.Arrays read
  shard by shard (no leaf is ever whole in host memory unless its sharding replicates it).
  """
  dtype = None if dtype is None else _as_dtype(dtype)
  kind, where = _locate(path)
  if kind == 'legacy':
    contents = _read_msgpack(where)
    flat, version = flatten_target(_target(contents, where)), int(contents.get('version', 0))
    ckpt_dir = (where.rsplit('/', 1)[0] if where.startswith('gs://')
                else os.path.dirname(where) or '.')
    if any(isinstance(v, str) and v.startswith('PLACEHOLDER://') for v in flat.values()):
      kind, where = 'orbax', ckpt_dir  # an early orbax msgpack: the arrays live outside it
  if kind == 'orbax':
    flat, version, ckpt_dir = flatten_target(_target(_load_orbax(where), where)), _VERSION, where
  specs = {p: v for p, v in flat.items() if _is_ts_spec(v)}
  out = {}
  for p, v in flat.items():
    if p not in specs:
      v = np.asarray(v)
      out[p] = v.astype(dtype) if dtype is not None and _is_float(v.dtype) else v
  shardings = None
  if shardings_for is not None:
    shapes = {p: tuple(np.shape(v)) for p, v in out.items()}
    for p, v in specs.items():
      shape = (v.get('metadata') or {}).get('shape')
      shapes[p] = tuple(shape if shape is not None else ts.open(
          _absolute_spec(v, ckpt_dir), open=True, read=True).result().shape)
    shardings = shardings_for(shapes)
    out = {p: partitioning.global_array(v, shardings[p]) for p, v in out.items()}
  if progress is not None and out:
    progress(len(out), len(flat))
  out.update(_read_zarr(specs, ckpt_dir, version, dtype, progress, len(out), len(flat),
                        shardings))
  return tree_util.unflatten({p: out[p] for p in flat})


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> list[int]:
  """Largest chunk dividing `shape` within 64 MiB, shrinking the longest dimension first."""
  chunk = list(shape)
  while chunk and int(np.prod(chunk)) * itemsize > _CHUNK_BYTES:
    i = int(np.argmax(chunk))
    chunk[i] = next(d for d in range(chunk[i] - 1, 0, -1) if shape[i] % d == 0)
  return chunk


def write_t5x_checkpoint(params: Mapping[str, Any], directory: str, *, step: int = 0,
                         inline_threshold: int | None = None) -> str:
  """Write `params` as a legacy t5x checkpoint directory (e.g. `<model_dir>/checkpoint_<step>`).

  As t5x does for model parameters, each leaf goes to its own gzip zarr array named by its dotted
  path, and the msgpack holds its spec with a path relative to `directory`; `state/step` is
  inline and `param_states` empty. Leaves with fewer than `inline_threshold` elements are put
  inline in the msgpack instead (as t5x does for leaves it does not partition). Local paths only;
  written to a temporary directory then renamed, like t5x. Returns the absolute `directory`.
  """
  if directory.startswith('gs://'):
    raise ValueError('write_t5x_checkpoint writes local directories only.')
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f'{directory} already exists and is not empty.')
  tmp = f'{directory}.tmp-{int(time.time())}-{os.getpid()}'
  os.makedirs(tmp)
  target, opening = {}, []
  for path, leaf in flatten_target(params).items():
    arr = np.asarray(leaf)
    if inline_threshold is not None and arr.size < inline_threshold:
      target[path] = arr
      continue
    name = 'target.' + path.replace('/', '.')
    spec = {'driver': 'zarr', 'dtype': arr.dtype.name,
            'kvstore': {'driver': 'file', 'path': name},
            'metadata': {'compressor': {'id': 'gzip'}, 'shape': list(arr.shape),
                         'chunks': _chunk_shape(arr.shape, arr.dtype.itemsize)}}
    full = copy.deepcopy(spec)
    full['kvstore']['path'] = os.path.join(tmp, name)
    opening.append((ts.open(full, create=True, open=True), arr))
    target[path] = ts.Spec(spec).to_json()  # the relative path keeps the directory portable
  for future in [f.result().write(arr) for f, arr in opening]:
    future.result()
  state = {'target': tree_util.unflatten(target),
           'state': {'step': np.asarray(step, np.int32), 'param_states': {}}}
  with open(os.path.join(tmp, CHECKPOINT_FILE), 'wb') as f:
    f.write(serialization.msgpack_serialize({'version': _VERSION, 'optimizer': state}))
  if os.path.exists(directory):
    os.rmdir(directory)
  os.rename(tmp, directory)
  return directory
