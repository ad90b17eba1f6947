"""A local Google Cloud Storage server for the gs:// tests (gcp-storage-emulator, in memory).

`python gcs_emulator.py PORT` serves GCS's JSON API on 127.0.0.1:PORT. The emulator from PyPI
lacks four things real clients rely on, added here:
- media downloads carry x-goog-generation / x-goog-metageneration headers (tensorstore, and so
  orbax, refuses re-reads without them: "Malformed StorageGeneration");
- object listings honour startOffset / endOffset (tensorstore lists a key range that way);
- objects.move (POST .../o/SRC/moveTo/o/DST), which gcsfs uses to rename (without it every
  rename waits out retries of a 501 before falling back to copy and delete);
- an upload with an empty body (a zero-byte object) does not crash the handler.

`start()` runs it in a subprocess and returns (process, url); the tests set
STORAGE_EMULATOR_HOST=url for every process of a run (promot_jax.paths derives the rest).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from http import HTTPStatus

START_TIMEOUT_S = 30


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(bucket: str = 'bucket'):
  """(process, url) of a fresh in-memory server with `bucket` created."""
  port = free_port()
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f'http://127.0.0.1:{port}'
  deadline = time.monotonic() + START_TIMEOUT_S
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b/{bucket}', timeout=1).read()
      return proc, url
    except Exception:  # noqa: BLE001 -- not up yet
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f'the GCS emulator did not start on {url}')
      time.sleep(0.05)


def stop(proc) -> None:
  proc.terminate()
  try:
    proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    proc.kill()


def _patch_and_serve(port: int, bucket: str) -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  plain_download, plain_list, plain_upload = objects.download, objects.ls, objects._media_upload

  def download(request, response, storage, *args, **kwargs):
    plain_download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj.get('generation', '1'))
      response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))

  def listing(request, response, storage, *args, **kwargs):
    plain_list(request, response, storage, *args, **kwargs)
    low = (request.query.get('startOffset') or [None])[0]
    high = (request.query.get('endOffset') or [None])[0]
    if response.status == HTTPStatus.OK and (low or high) and response._content:
      body = json.loads(response._content)
      inside = lambda name: (not low or name >= low) and (not high or name < high)  # noqa: E731
      body['items'] = [o for o in body.get('items') or [] if inside(o['name'])]
      body['prefixes'] = [p for p in body.get('prefixes') or [] if inside(p)]
      response.json(body)

  def move(request, response, storage, *args, **kwargs):
    request.params['dest_bucket_name'] = request.params['bucket_name']
    objects.copy(request, response, storage)
    if response.status == HTTPStatus.OK:
      try:
        storage.delete_file(request.params['bucket_name'], request.params['object_id'])
      except NotFound:
        pass

  def upload(request, response, storage):
    if request.data is None:
      request._data = b''
    return plain_upload(request, response, storage)

  objects.download, objects._media_upload = download, upload
  for _, handlers in server.HANDLERS:   # the routes captured the originals at import
    for method, fn in list(handlers.items()):
      if fn is plain_download:
        handlers[method] = download
      elif fn is plain_list:
        handlers[method] = listing
  route = (r'/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/'
           r'(?P<dest_object_id>.*[^/]+)$')
  server.HANDLERS = ((r'^/storage/v1' + route, {'POST': move}),
                     (r'^' + route, {'POST': move})) + tuple(server.HANDLERS)
  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).run()


if __name__ == '__main__':
  _patch_and_serve(int(sys.argv[1]), sys.argv[2])
