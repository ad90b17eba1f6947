"""Multi-host: two processes that share a mesh train exactly like one process with the same devices.

Two processes on localhost, each with 2 fake CPU devices, join through jax.distributed (gloo
CPU collectives) into one 4-device mesh. Each feeds only its own half of every global batch
(partitioning.global_batch_from_host). A single process with 4 fake devices runs the same steps
on the same mesh shapes as the reference. This file is also the script every process runs:
`python test_multiprocess.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR`.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from toy_inputs import host_params, toy_batch

from promot_jax import mesh as partitioning, tree_util
from promot_jax.model import config
from promot_jax.train import stages
from promot_jax.train.sharding import build_sharded_step, init_state_on_mesh

CFG = config.get_config('mt5_tiny', prompt_length=4, emb_dim=128, num_encoder_layers=1,
                        num_decoder_layers=1, dropout_rate=0.0)
STAGES = {
    'prompt_tuning': stages.prompt_tuning(learning_rate=0.3),
    'model_tuning': stages.model_tuning(dropout_rate=0.0, learning_rate=1e-2),
}
MESHES = {'4x1': 1, '2x2': 2}              # name: num_partitions, over all 4 devices
GLOBAL_BATCH, STEPS, DEVICES = 8, 2, 4
TIMEOUT_S = 240
# Halves XLA:CPU compile time; every run compiles with the same flags.
FAST_COMPILE = '--xla_backend_optimization_level=0'






def train(process_id, num_processes, port, out_dir):
  """The script's body: join the other processes (if any), train each stage on each mesh."""
  if num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=num_processes,
                               process_id=process_id, initialization_timeout=60)
  open(os.path.join(out_dir, f'initialized_{process_id}'), 'w').close()
  from jax.experimental import multihost_utils

  per_host = GLOBAL_BATCH // jax.process_count()
  rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
  params, rules = host_params(CFG), partitioning.standard_logical_axis_rules()
  seen = {'process_count': jax.process_count(), 'device_count': jax.device_count(),
          'local_device_count': jax.local_device_count(), 'losses': {}, 'batch_rows': {}}
  for mesh_name, num_partitions in MESHES.items():
    mesh = partitioning.make_mesh(num_partitions)
    for stage_name, stage in STAGES.items():
      sharded = build_sharded_step(CFG, stage, mesh, rules, params)
      trainable, frozen = stages.split_params(params, stage)
      # every process passes the same full host arrays; each keeps the shards it holds
      frozen = jax.device_put(frozen, sharded.frozen_sharding)
      state = init_state_on_mesh(sharded, jax.device_put(trainable, sharded.trainable_sharding))
      losses = []
      for i in range(STEPS):
        host_slice = {k: v[rows] for k, v in toy_batch(i, batch=GLOBAL_BATCH).items()}
        batch = partitioning.global_batch_from_host(host_slice, mesh)
        tokens = batch['encoder_input_tokens']
        seen['batch_rows'][mesh_name] = {
            'global_shape': list(tokens.shape),
            'local_rows': sorted({(s.index[0].start or 0, s.index[0].stop or tokens.shape[0])
                                  for s in tokens.addressable_shards})}
        state, metrics = sharded.step_fn(state, frozen, batch, jax.random.PRNGKey(0))
        losses.append(float(metrics['loss']))
      key = f'{stage_name}/{mesh_name}'
      seen['losses'][key] = losses
      final = multihost_utils.process_allgather(state.trainable, tiled=True)
      if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, key.replace('/', '_') + '.npz'),
                 **tree_util.flatten(final))
  with open(os.path.join(out_dir, f'seen_{process_id}.json'), 'w') as f:
    json.dump(seen, f)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(process_id, num_processes, port, out_dir, local_devices):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={local_devices} {FAST_COMPILE}')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  log = open(out_dir / f'log_{process_id}.txt', 'w')
  proc = subprocess.Popen(
      [sys.executable, __file__, str(process_id), str(num_processes), str(port), str(out_dir)],
      env=env, stdout=log, stderr=subprocess.STDOUT)
  log.close()
  return proc


def wait_all(procs, timeout_s):
  """Wait for every process; past the deadline kill them all: a hung collective never hangs CI."""
  deadline = time.monotonic() + timeout_s
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    pytest.fail(f'the training processes did not finish within {timeout_s} s')


def log_tail(out_dir, process_id):
  text = (out_dir / f'log_{process_id}.txt').read_text()
  return '\n'.join(line for line in text.splitlines() if '[Gloo]' not in line)[-4000:]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(two processes' records, one process's records, their output dirs)."""
  two, one = tmp_path_factory.mktemp('two_processes'), tmp_path_factory.mktemp('one_process')
  port = free_port()
  distributed = [launch(i, 2, port, two, local_devices=DEVICES // 2) for i in range(2)]
  reference = launch(0, 1, 0, one, local_devices=DEVICES)
  wait_all(distributed + [reference], TIMEOUT_S)
  for i, p in enumerate(distributed):
    if p.returncode != 0 and not (two / f'initialized_{i}').exists():
      last = [line for line in log_tail(two, i).splitlines() if line.strip()] or [p.returncode]
      pytest.skip(f'jax.distributed on CPU is unavailable here: {last[-1]}')
    assert p.returncode == 0, f'process {i} of 2 failed:\n{log_tail(two, i)}'
  assert reference.returncode == 0, f'the one-process reference failed:\n{log_tail(one, 0)}'
  load = lambda d, i: json.loads((d / f'seen_{i}.json').read_text())  # noqa: E731
  return [load(two, 0), load(two, 1)], load(one, 0), two, one


def trained(out_dir, key):
  with np.load(out_dir / f'{key.replace("/", "_")}.npz') as f:
    return dict(f)


@pytest.mark.slow
def test_two_processes_hold_two_of_the_four_devices_each(runs):
  processes, reference, _, _ = runs
  for seen in processes:
    assert (seen['process_count'], seen['device_count'], seen['local_device_count']) == (2, 4, 2)
  assert (reference['process_count'], reference['device_count']) == (1, 4)


@pytest.mark.slow
def test_each_process_feeds_only_its_own_rows_of_the_global_batch(runs):
  processes, _, _, _ = runs
  for i, seen in enumerate(processes):
    for mesh_name, batch in seen['batch_rows'].items():
      assert batch['global_shape'] == [GLOBAL_BATCH, 12], mesh_name
      # process i's devices hold rows 4i..4i+3 (split over its 2 devices on the 4x1 mesh)
      covered = sorted(r for lo, hi in batch['local_rows'] for r in range(lo, hi))
      assert covered == list(range(4 * i, 4 * i + 4)), (mesh_name, batch['local_rows'])


@pytest.mark.slow
def test_every_process_sees_the_same_loss(runs):
  processes, _, _, _ = runs
  assert processes[0]['losses'] == processes[1]['losses']
  assert len(processes[0]['losses']) == len(STAGES) * len(MESHES)


@pytest.mark.slow
@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('stage_name', list(STAGES))
def test_two_processes_compute_the_one_process_losses(runs, stage_name, mesh_name):
  processes, reference, _, _ = runs
  key = f'{stage_name}/{mesh_name}'
  assert len(reference['losses'][key]) == STEPS and np.all(np.isfinite(reference['losses'][key]))
  np.testing.assert_allclose(processes[0]['losses'][key], reference['losses'][key], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('stage_name', list(STAGES))
def test_two_processes_make_the_one_process_updates(runs, stage_name, mesh_name):
  _, _, two, one = runs
  key = f'{stage_name}/{mesh_name}'
  got, want = trained(two, key), trained(one, key)
  assert sorted(got) == sorted(want)
  # Cross-process all-reduces sum in another order: Adafactor turns the last-bit differences of a
  # near-cancelling gradient element into ~1e-4 of a step (see test_partitioning), so the
  # parameters must agree to 1e-3 of the learning rate.
  atol = 1e-3 * STAGES[stage_name].learning_rate
  for path, value in want.items():
    np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=atol, err_msg=path)


if __name__ == '__main__':
  train(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
