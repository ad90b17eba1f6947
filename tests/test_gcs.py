"""gs:// run directories against a local GCS server (tests/gcs_emulator.py).

Every Google Cloud client of a run reads the one variable STORAGE_EMULATOR_HOST
(promot_jax.paths derives tensorstore's TENSORSTORE_GCS_HTTP_URL from it): run metadata goes
through etils.epath's gcsfs backend, the arrays of orbax checkpoints through tensorstore, t5x
checkpoints through tensorstore's gcs kvstore. Each command runs in its own process, as a
user runs it, with the variable set.
"""

import json
import os
import signal
import subprocess
import sys

import gcs_emulator
import jax
import numpy as np
import pytest

from promot_jax import tree_util
from promot_jax.checkpoints import orbax_io, t5x
from promot_jax.model import config, transformer as model

RUN = 'runs/promot_tiny_cpu.gin'
FLAGS = ['--gin.PROMPT_TUNING_STEPS=4', '--gin.PROMPT_CHECKPOINT_PERIOD=2',
         '--gin.MODEL_TUNING_STEPS=30', '--gin.MODEL_CHECKPOINT_PERIOD=15', '--gin.EVAL_BATCHES=1',
         '--gin.LOG_EVERY=1', "--gin.KEEP_METRIC='validation/sequence_accuracy'",
         '--gin.DROPOUT_RATE=0.1']
TIMEOUT_S = 600


@pytest.fixture(scope='module')
def emulator():
  proc, url = gcs_emulator.start('bucket')
  yield url
  gcs_emulator.stop(proc)


def env_for(url):
  return dict(os.environ, STORAGE_EMULATOR_HOST=url, PROMOT_HUGEPAGES='0',
              TF_CPP_MIN_LOG_LEVEL='3')


def promot(url, *args, check=True):
  proc = subprocess.run([sys.executable, '-m', 'promot_jax.cli', *map(str, args)],
                        env=env_for(url), capture_output=True, text=True, timeout=TIMEOUT_S)
  if check:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def python(url, code):
  """Run `code` in a fresh process pointed at the emulator; returns its stdout."""
  proc = subprocess.run([sys.executable, '-c', code], env=env_for(url), capture_output=True,
                        text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def read_remote_params(url, path):
  """Flat parameters of an orbax checkpoint on gs://, as {path: list} via a subprocess."""
  out = python(url, 'import json, numpy as np\n'
               'from promot_jax import tree_util\n'
               'from promot_jax.checkpoints import orbax_io\n'
               f'p = orbax_io.restore_params({path!r}, as_numpy=True)\n'
               'print(json.dumps({k: np.asarray(v).tolist() for k, v in '
               'tree_util.flatten(p).items()}))')
  return {k: np.asarray(v, np.float32) for k, v in json.loads(out.splitlines()[-1]).items()}


def test_a_run_on_gs_stopped_and_resumed_equals_the_same_run_on_local_disk(emulator, tmp_path):
  local = str(tmp_path / 'local')
  promot(emulator, 'run', f'--gin_file={RUN}', f"--gin.MODEL_DIR='{local}'", *FLAGS)

  remote = 'gs://bucket/runs/tiny'
  cmd = [sys.executable, '-m', 'promot_jax.cli', 'run', f'--gin_file={RUN}',
         f"--gin.MODEL_DIR='{remote}'", *FLAGS]
  proc = subprocess.Popen(cmd, env=env_for(emulator), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, signalled = [], False
  for line in proc.stdout:
    lines.append(line)
    if not signalled and '[model_tuning] step 3/' in line:
      proc.send_signal(signal.SIGTERM)
      signalled = True
  assert proc.wait(timeout=60) == 75 and signalled, ''.join(lines[-30:])
  promot(emulator, 'run', f'--gin_file={RUN}', f"--gin.MODEL_DIR='{remote}'", *FLAGS)

  listing = json.loads(python(emulator, 'import json\nfrom promot_jax import paths\n'
                              f'print(json.dumps(paths.listdir({remote + "/model_tuning"!r})))'
                              ).splitlines()[-1])
  assert {'kept.json', 'done.json', 'metrics.jsonl', 'checkpoint_30', 'tb'} <= set(listing)
  assert not os.path.exists('gs:') and not os.path.exists(os.path.join(str(tmp_path), 'gs:'))
  for stage, step in (('prompt_tuning', 4), ('model_tuning', 30)):
    want = tree_util.flatten(orbax_io.restore_params(
        os.path.join(local, stage, f'checkpoint_{step}'), as_numpy=True))
    got = read_remote_params(emulator, f'{remote}/{stage}/checkpoint_{step}')
    assert want.keys() == got.keys()
    for path in want:
      np.testing.assert_array_equal(got[path], want[path], err_msg=f'{stage} {path}')
  kept = json.loads(python(emulator, 'import json\nfrom promot_jax import paths\nprint(json.dumps('
                           f'paths.read_json({remote + "/model_tuning/kept.json"!r})))'
                           ).splitlines()[-1])
  assert kept['path'] == f'{remote}/model_tuning/checkpoint_{kept["step"]}'


def _upload_tree(url, local_dir, remote_prefix):
  python(url, 'import os\nfrom promot_jax import paths\n'
         f'root = {local_dir!r}\n'
         'for d, _, files in os.walk(root):\n'
         '  for name in files:\n'
         '    rel = os.path.relpath(os.path.join(d, name), root)\n'
         f'    paths.write_bytes(paths.join({remote_prefix!r}, rel), '
         'open(os.path.join(d, name), "rb").read())\n')


def test_convert_info_and_t5x_checkpoints_on_gs(emulator, tmp_path):
  cfg = config.get_config('mt5_tiny')
  params = jax.tree_util.tree_map(np.asarray, model.init_params(cfg, jax.random.PRNGKey(3)))
  local_t5x = t5x.write_t5x_checkpoint(params, str(tmp_path / 't5x' / 'checkpoint_100'), step=100)
  _upload_tree(emulator, local_t5x, 'gs://bucket/t5x/checkpoint_100')

  info = json.loads(promot(emulator, 'info', 'gs://bucket/t5x/checkpoint_100', '--json').stdout)
  assert info['format'] == 't5x' and info['num_params'] == tree_util.count_params(params)

  promot(emulator, 'convert', '--from', 't5x', '--src', 'gs://bucket/t5x/checkpoint_100',
         '--dst', 'gs://bucket/converted', '--model', 'mt5_tiny')
  info = json.loads(promot(emulator, 'info', 'gs://bucket/converted', '--json').stdout)
  assert info['format'] == 'orbax' and not info['has_prompt']
  got = read_remote_params(emulator, 'gs://bucket/converted')
  for path, value in tree_util.flatten(params).items():
    np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_relative_checkpoint_paths_work(tmp_path, monkeypatch):
  """`promot info demo/pretrained` from the repository root (a relative path)."""
  cfg = config.get_config('mt5_tiny')
  params = jax.tree_util.tree_map(np.asarray, model.init_params(cfg, jax.random.PRNGKey(3)))
  orbax_io.save_params(str(tmp_path / 'ckpt'), params, cfg)
  monkeypatch.chdir(tmp_path)
  from promot_jax import cli
  assert cli.main(['info', 'ckpt']) == 0
  assert tree_util.count_params(orbax_io.restore_params('ckpt')) == tree_util.count_params(params)


def test_eval_reads_a_checkpoint_from_gs_and_writes_results_to_gs(emulator, tmp_path):
  """`promot eval --checkpoint gs://... --out_dir gs://...` (README pod step 5) gives the same
  results as the same evaluation on local paths."""
  cfg = config.get_config('mt5_tiny', prompt_length=4)
  params = jax.tree_util.tree_map(np.asarray, model.init_params(cfg, jax.random.PRNGKey(5)))
  local = orbax_io.save_params(str(tmp_path / 'ckpt'), params, cfg)
  _upload_tree(emulator, local, 'gs://bucket/evalme/ckpt')
  flags = ['--gin_file', 'eval/toy.gin', '--gin.NUM_SAVED_EXAMPLES=8']
  promot(emulator, 'eval', *flags, '--checkpoint', local, '--out_dir', tmp_path / 'out')
  promot(emulator, 'eval', *flags, '--checkpoint', 'gs://bucket/evalme/ckpt', '--out_dir',
         'gs://bucket/evalme/out')
  remote = json.loads(python(emulator, 'import json\nfrom promot_jax import paths\nprint(json.dumps('
                             'paths.read_json("gs://bucket/evalme/out/ckpt/results.json")))'
                             ).splitlines()[-1])
  with open(tmp_path / 'out' / 'ckpt' / 'results.json') as f:
    want = json.load(f)
  assert remote['checkpoint']['resolved'] == 'gs://bucket/evalme/ckpt'
  for task, entry in want['tasks'].items():
    assert remote['tasks'][task]['examples'] == entry['examples'], task
    assert remote['tasks'][task][entry['metric']] == entry[entry['metric']]
