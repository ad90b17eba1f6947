"""A multi-host run rehearsed on this machine (`promot run --local_processes N --local_devices D`)
trains exactly like one process holding all the devices, with the model axis inside a host and
across hosts; a signal to one host stops every host at the same step, and the rerun finishes
as if nothing happened.

Each run is the tiny two-stage run file (8 heads, so an 8-way model axis divides them), 4 + 4
steps. Every process reads the same global batches and keeps the rows of its mesh 'data'
positions (mesh.host_data_shard), so the reference is the same command as 1 process x 8 devices.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from promot_jax import tree_util
from promot_jax.checkpoints import orbax_io

RUN = 'runs/promot_tiny_cpu.gin'
FLAGS = ['--gin.config.T5Config.num_heads=8', '--gin.PROMPT_TUNING_STEPS=4',
         '--gin.PROMPT_CHECKPOINT_PERIOD=2', '--gin.MODEL_TUNING_STEPS=4',
         '--gin.MODEL_CHECKPOINT_PERIOD=2', '--gin.EVAL_BATCHES=1', '--gin.LOG_EVERY=1']
# KEEP_METRIC stays the run file's decode accuracy: keep-best decodes on the mesh of every host.
STAGES = ('prompt_tuning', 'model_tuning')
TIMEOUT_S = 600


def command(model_dir, processes, devices, partitions, *extra):
  return [sys.executable, '-m', 'promot_jax.cli', 'run', f'--gin_file={RUN}',
          f"--gin.MODEL_DIR='{model_dir}'", f'--gin.NUM_PARTITIONS={partitions}', *FLAGS,
          '--local_processes', str(processes), '--local_devices', str(devices), *extra]


def environment():
  return dict(os.environ, PROMOT_HUGEPAGES='0', TF_CPP_MIN_LOG_LEVEL='3')


def run(model_dir, processes, devices, partitions, *extra):
  proc = subprocess.run(command(model_dir, processes, devices, partitions, *extra),
                        env=environment(),
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def final_state(model_dir, stage):
  """(parameters of the last checkpoint, {step: training loss at that checkpoint})."""
  stage_dir = os.path.join(model_dir, stage)
  steps = sorted(int(n.split('_')[1]) for n in os.listdir(stage_dir)
                 if n.startswith('checkpoint_') and n.split('_')[1].isdigit())
  losses = {s: json.load(open(os.path.join(stage_dir, f'checkpoint_{s}', 'state.json')))[
      'train_metrics']['loss'] for s in steps}
  params = orbax_io.restore_params(os.path.join(stage_dir, f'checkpoint_{steps[-1]}'),
                                   as_numpy=True)
  return tree_util.flatten(params), losses


def assert_same_training(a_dir, b_dir, exact=False):
  for stage in STAGES:
    (a, a_losses), (b, b_losses) = final_state(a_dir, stage), final_state(b_dir, stage)
    assert a_losses.keys() == b_losses.keys() and len(a_losses) >= 2
    np.testing.assert_allclose([b_losses[s] for s in sorted(b_losses)],
                               [a_losses[s] for s in sorted(a_losses)], rtol=0 if exact else 1e-5)
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(b[p] - a[p]))) for p in a)
    print(f'{stage}: largest parameter difference {worst:.3g}, losses '
          f'{[b_losses[s] - a_losses[s] for s in sorted(a_losses)]}')
    for path in a:
      if exact:
        np.testing.assert_array_equal(b[path], a[path], err_msg=f'{stage} {path}')
      else:
        np.testing.assert_allclose(b[path], a[path], rtol=1e-5, atol=1e-5, err_msg=f'{stage} {path}')


@pytest.fixture(scope='module')
def references(tmp_path_factory):
  """{partitions: MODEL_DIR} of 1 process x 8 devices."""
  root = tmp_path_factory.mktemp('one_process')
  out = {}
  for partitions in (2, 8):
    out[partitions] = str(root / f'np{partitions}')
    run(out[partitions], 1, 8, partitions)
  return out


@pytest.mark.parametrize('partitions', [2, 8])
def test_two_processes_train_like_one_with_all_devices(references, tmp_path, partitions):
  """NUM_PARTITIONS 2: each process its own data rows; 8: the model axis spans both
  processes, which then feed the same rows."""
  model_dir = str(tmp_path / 'pod')
  proc = run(model_dir, 2, 4, partitions)
  assert "2 process(es), 8 devices, mesh {'data': %d, 'model': %d}" % (8 // partitions,
                                                                        partitions) in proc.stdout
  assert os.path.exists(os.path.join(model_dir, 'logs', 'process_1.log'))
  assert_same_training(references[partitions], model_dir)


def test_scanned_layers_on_two_processes_train_like_unrolled_on_one(references, tmp_path):
  """The scanned step (SCAN_LAYERS, full remat) with the model axis across both processes
  trains like the unrolled step on one process; its checkpoints hold the t5x tree."""
  model_dir = str(tmp_path / 'scanned_pod')
  proc = run(model_dir, 2, 4, 8, '--gin.SCAN_LAYERS=True', "--gin.REMAT_POLICY='full'")
  assert 'scanned layers (remat full)' in proc.stdout
  assert_same_training(references[8], model_dir)


def _child_pid(model_dir, process_id):
  """The pid of the local process running PROCESS_ID for this MODEL_DIR (from /proc)."""
  for pid in os.listdir('/proc'):
    if not pid.isdigit():
      continue
    try:
      cmdline = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\0')
    except OSError:
      continue
    args = [a.decode(errors='replace') for a in cmdline]
    if f'--gin.PROCESS_ID={process_id}' in args and f"--gin.MODEL_DIR='{model_dir}'" in args:
      return int(pid)
  return None


def test_a_signal_to_one_host_stops_all_at_one_step_and_the_rerun_matches(tmp_path):
  longer = ['--gin.MODEL_TUNING_STEPS=30', '--gin.MODEL_CHECKPOINT_PERIOD=15']
  reference = str(tmp_path / 'uninterrupted')
  proc = subprocess.run(command(reference, 2, 4, 2, *longer), env=environment(),
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  model_dir = str(tmp_path / 'stopped')
  parent = subprocess.Popen(command(model_dir, 2, 4, 2, *longer), env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines, signalled = [], False
  deadline = time.monotonic() + TIMEOUT_S
  for line in parent.stdout:
    lines.append(line)
    if not signalled and '[model_tuning] step 2/' in line:
      pid = _child_pid(model_dir, 1)   # SIGTERM to host 1 only, as a maintenance event would
      assert pid is not None
      os.kill(pid, signal.SIGTERM)
      signalled = True
    assert time.monotonic() < deadline
  text = ''.join(lines)
  assert parent.wait(timeout=60) == 75, text[-3000:]
  assert signalled
  assert 'on a signal on another host' in text   # host 0 stopped because host 1 was told
  log1 = open(os.path.join(model_dir, 'logs', 'process_1.log')).read()
  assert 'on SIGTERM' in log1
  # both hosts stopped after the same step, with one checkpoint there, before the end
  step = text.split('stopped at step ')[1].split('/')[0]
  assert f'stopped at step {step}/30 on SIGTERM' in log1
  stage_dir = os.path.join(model_dir, 'model_tuning')
  assert os.path.exists(os.path.join(stage_dir, f'checkpoint_{step}', 'state.json'))
  assert 2 <= int(step) < 30 and not os.path.exists(os.path.join(stage_dir, 'done.json'))
  # the same command resumes and ends exactly where the uninterrupted run did
  proc = subprocess.run(command(model_dir, 2, 4, 2, *longer), env=environment(),
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for stage in STAGES:
    a, _ = final_state(reference, stage)
    b, _ = final_state(model_dir, stage)
    for path in a:
      np.testing.assert_array_equal(b[path], a[path], err_msg=f'{stage} {path}')
