"""One path layer for everything a run reads or writes: local paths and gs:// alike.

Run metadata (run.json, kept.json, done.json, state.json, metrics.jsonl, results.json) goes
through these functions; orbax and tensorstore write the arrays themselves (tensorstore's
gcs driver for gs://). Remote paths use etils.epath with its fsspec/gcsfs backend: TensorFlow's
GCS filesystem can only talk to storage.googleapis.com, while gcsfs, google-cloud-storage and
tensorstore all honour an emulator, so one environment variable points a whole run at a local
GCS emulator:

  STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT   (TENSORSTORE_GCS_HTTP_URL is derived from it)

A GCS "directory" is a name prefix: makedirs does nothing there, and an object write replaces
the object whole (so writes are atomic without a temporary name).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from etils import epath

# epath reads this on its first remote call: gs:// through fsspec/gcsfs, not tf.io.gfile.
os.environ.setdefault('EPATH_USE_TF', 'false')


def configure_emulator() -> Optional[str]:
  """When STORAGE_EMULATOR_HOST names a GCS emulator, point every client the run uses at it.

  Returns the emulator's URL (None when there is none). Real GCS needs none of this.
  """
  host = os.environ.get('STORAGE_EMULATOR_HOST')
  if not host:
    return None
  url = host if '://' in host else f'http://{host}'
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', url)       # tensorstore (orbax arrays)
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')  # no gRPC bucket probe
  for name in ('FSSPEC_GCS_TOKEN', 'FSSPEC_GS_TOKEN'):         # gcsfs: anonymous
    os.environ.setdefault(name, 'anon')
  os.environ.setdefault('NO_GCE_CHECK', 'true')                # google-auth: no metadata probe
  for name in ('GCE_METADATA_HOST', 'GCE_METADATA_ROOT', 'GCE_METADATA_IP'):
    os.environ.setdefault(name, '127.0.0.1:1')                 # nor tensorstore's
  return url


configure_emulator()


def is_remote(path: Any) -> bool:
  """gs://... (or another URI scheme)."""
  return '://' in os.fspath(path)


def absolute(path: Any) -> str:
  """An absolute local path, or the URI unchanged."""
  path = os.fspath(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def join(base: Any, *parts: str) -> str:
  base = os.fspath(base)
  if is_remote(base):
    return '/'.join([base.rstrip('/')] + [p.strip('/') for p in parts if p])
  return os.path.join(base, *parts)


def basename(path: Any) -> str:
  path = os.fspath(path).rstrip('/')
  return path.rsplit('/', 1)[-1] if is_remote(path) else os.path.basename(path)


def dirname(path: Any) -> str:
  path = os.fspath(path).rstrip('/')
  return path.rsplit('/', 1)[0] if is_remote(path) else os.path.dirname(path)


def _remote(path: Any) -> epath.Path:
  return epath.Path(os.fspath(path))


def exists(path: Any) -> bool:
  return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: Any) -> bool:
  return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: Any) -> list[str]:
  """Names directly under `path` ([] when it does not exist)."""
  if is_remote(path):
    p = _remote(path)
    return sorted(c.name for c in p.iterdir()) if p.exists() else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def makedirs(path: Any) -> None:
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_text(path: Any) -> str:
  if is_remote(path):
    return _remote(path).read_text()
  with open(path) as f:
    return f.read()


def write_text(path: Any, text: str) -> None:
  """Write a file whole: locally through a temporary name and a rename, so a reader never
  sees half of it; on GCS an object write is already all-or-nothing."""
  if is_remote(path):
    _remote(path).write_text(text)
    return
  tmp = f'{path}.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_bytes(path: Any, offset: int = 0) -> bytes:
  """The file's bytes from `offset` on."""
  if is_remote(path):
    with _remote(path).open('rb') as f:
      f.seek(offset)
      return f.read()
  with open(path, 'rb') as f:
    f.seek(offset)
    return f.read()


def walk_files(path: Any) -> list[tuple[str, int]]:
  """Every file under `path` as (path relative to it, size), sorted."""
  if is_remote(path):
    root = _remote(path)
    found = [(os.fspath(p.relative_to(root)), p.stat().length) for p in root.rglob('*')
             if p.is_file()]
  else:
    found = []
    for directory, _, files in os.walk(path):
      for name in files:
        full = os.path.join(directory, name)
        found.append((os.path.relpath(full, path), os.path.getsize(full)))
  return sorted(found)


def write_bytes(path: Any, data: bytes) -> None:
  if is_remote(path):
    _remote(path).write_bytes(data)
  else:
    with open(path, 'wb') as f:
      f.write(data)


def append_text(path: Any, text: str) -> None:
  """Append (on GCS: read, extend, rewrite; only process 0 writes run metadata)."""
  if is_remote(path):
    p = _remote(path)
    p.write_text((p.read_text() if p.exists() else '') + text)
    return
  with open(path, 'a') as f:
    f.write(text)


def read_json(path: Any) -> Any:
  return json.loads(read_text(path))


def write_json(path: Any, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2, sort_keys=True))


def remove(path: Any) -> None:
  if is_remote(path):
    _remote(path).unlink()
  else:
    os.remove(path)


def rmtree(path: Any) -> None:
  """Remove a directory (a prefix on GCS) and everything in it; nothing if it is absent."""
  if is_remote(path):
    p = _remote(path)
    if p.exists():
      p.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def rename(src: Any, dst: Any) -> None:
  """Move a file or directory. Local: one atomic rename. GCS: copy then delete, object by
  object (callers that need atomicity there write a completion marker last instead)."""
  if is_remote(src):
    _remote(src).rename(os.fspath(dst))
  else:
    os.rename(src, dst)
