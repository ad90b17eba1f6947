"""launch/tpu.py: the gcloud commands a v4-64 run issues (--dry-run) and input checks."""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = importlib.util.spec_from_file_location('launch_tpu', os.path.join(ROOT, 'launch', 'tpu.py'))
tpu = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tpu)

BASE = ['--name', 'promot-pod', '--zone', 'us-central2-b', '--project', 'my-proj']
GIN = 'runs/promot_rte_mt5_xxl.gin'


@pytest.fixture
def no_gcloud(monkeypatch):
  """Any attempt to run a command fails the test."""
  def boom(*args, **kwargs):
    raise AssertionError(f'subprocess.run called: {args}')
  monkeypatch.setattr(tpu.subprocess, 'run', boom)


def dry(capsys, *argv):
  assert tpu.main([*argv, '--dry-run']) == 0
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines()
          if line.startswith(('gcloud', 'tar'))]


def remote(cmd):
  return next(c for c in cmd if c.startswith('--command='))[len('--command='):]


def test_create_v4_64_dry_run(capsys, no_gcloud):
  (cmd,) = dry(capsys, 'create', *BASE, '--accelerator-type', 'v4-64')
  assert cmd == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'promot-pod',
                 '--accelerator-type=v4-64', '--version=tpu-ubuntu2204-base',
                 '--zone=us-central2-b', '--project=my-proj']


def test_run_v4_64_dry_run_starts_the_same_command_on_every_worker(capsys, no_gcloud):
  (cmd,) = dry(capsys, 'run', *BASE, '--accelerator-type', 'v4-64', '--gin_file', GIN,
               "--gin.MODEL_DIR='gs://bucket/rte xxl'")
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'promot-pod']
  assert '--worker=all' in cmd and '--zone=us-central2-b' in cmd
  remote_cmd = remote(cmd)
  assert remote_cmd.startswith('mkdir -p ~/promot_logs && cd ~/promot_jax && { nohup '
                               '~/promot_venv/bin/promot run ')   # ~ unquoted: it expands
  assert '> ~/promot_logs/promot-pod.log 2>&1' in remote_cmd
  assert 'echo $! > ~/promot_logs/run.pid' in remote_cmd
  # the remote shell sees one promot command with the gin override quoted intact
  promot = shlex.split(remote_cmd.split('nohup ', 1)[1].split(' > ', 1)[0])
  assert promot == ['~/promot_venv/bin/promot', 'run', f'--gin_file={GIN}',
                    '--gin.DISTRIBUTED=True', "--gin.MODEL_DIR='gs://bucket/rte xxl'"]


def test_eval_dry_run_starts_promot_eval_on_every_worker(capsys, no_gcloud):
  (cmd,) = dry(capsys, 'eval', *BASE, '--gin_file', 'eval/promot_rte.gin', '--checkpoint',
               'gs://bucket/rte/model_tuning', '--out_dir', 'gs://bucket/rte/eval',
               '--gin.NUM_PARTITIONS=8')
  assert '--worker=all' in cmd
  remote_cmd = remote(cmd)
  promot = shlex.split(remote_cmd.split('nohup ', 1)[1].split(' > ', 1)[0])
  assert promot == ['~/promot_venv/bin/promot', 'eval', '--gin_file=eval/promot_rte.gin',
                    '--checkpoint', 'gs://bucket/rte/model_tuning', '--out_dir',
                    'gs://bucket/rte/eval', '--gin.DISTRIBUTED=True', '--gin.NUM_PARTITIONS=8']


def test_sync_install_tail_stop_clean_delete_dry_run(capsys, no_gcloud):
  tar, scp, unpack = dry(capsys, 'sync', *BASE, '--gin_file', GIN)
  assert tar[:3] == ['tar', 'czf', tpu.ARCHIVE] and tar[-3:] == ['-C', tpu.ROOT, '.']
  assert '--exclude=./.venv' in tar and '--exclude=./runs' in tar
  assert scp[4:7] == ['scp', tpu.ARCHIVE, 'promot-pod:~/promot_jax_sync.tgz'] and '--worker=all' in scp
  assert 'tar xzf ~/promot_jax_sync.tgz -C ~/promot_jax' in remote(unpack)
  (install,) = dry(capsys, 'install', *BASE)
  assert 'pip install -q -e ".[tpu]"' in remote(install)
  (tail,) = dry(capsys, 'tail', *BASE)
  assert '--worker=0' in tail and 'tail -n 200 -F ~/promot_logs/promot-pod.log' in remote(tail)
  (stop,) = dry(capsys, 'stop', *BASE)
  assert 'kill $(cat ~/promot_logs/run.pid)' in remote(stop)
  (clean,) = dry(capsys, 'clean', *BASE)
  assert 'sudo lsof -t -w /dev/accel*' in remote(clean) and 'libtpu_lockfile' in remote(clean)
  (delete,) = dry(capsys, 'delete', *BASE)
  assert delete[4:6] == ['delete', 'promot-pod'] and '--quiet' in delete


def test_gin_file_outside_the_project_is_copied_and_referenced(tmp_path, capsys, no_gcloud):
  gin = tmp_path / 'mine.gin'
  gin.write_text("include 'runs/promot_tiny_cpu.gin'\n")
  cmds = dry(capsys, 'sync', *BASE, '--gin_file', str(gin))
  assert cmds[-1][4:7] == ['scp', str(gin), 'promot-pod:~/promot_jax/launch_gin/']
  (run,) = dry(capsys, 'run', *BASE, '--gin_file', str(gin))
  assert '--gin_file=launch_gin/mine.gin' in remote(run)


@pytest.mark.parametrize('accel, spelled', [('v4-8', 'v4-8'), ('v4-4096', 'v4-4096'),
                                            ('v5e-256', 'v5litepod-256'),
                                            ('v5litepod-16', 'v5litepod-16'),
                                            ('v5p-128', 'v5p-128'), ('v6e-64', 'v6e-64')])
def test_known_accelerator_types(accel, spelled):
  assert tpu.accelerator_type(accel) == spelled


@pytest.mark.parametrize('argv, message', [
    (['create', *BASE, '--accelerator-type', 'v4-63'], "unknown accelerator type 'v4-63'"),
    (['create', *BASE, '--accelerator-type', 'v9-8'], "unknown accelerator type 'v9-8'"),
    (['create', *BASE], 'create needs --accelerator-type'),
    (['run', *BASE, '--gin_file', 'runs/no_such_run.gin'], "gin file 'runs/no_such_run.gin' not found"),
    (['sync', *BASE, '--gin_file', 'nope.gin'], "gin file 'nope.gin' not found"),
    (['run', *BASE], 'run needs --gin_file'),
    (['run', *BASE, '--gin_file', GIN, '--gin.MODEL_DIR'], 'must look like --gin.NAME=VALUE'),
])
def test_bad_input_fails_before_any_gcloud_call(argv, message, capsys, no_gcloud):
  assert tpu.main(argv) == 2          # also without --dry-run: nothing may run
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1


def test_accelerator_table_matches_the_planner():
  from promot_jax.tools import plan
  for gen, launch_gen in (('v4', 'v4'), ('v5e', 'v5litepod'), ('v5p', 'v5p'), ('v6e', 'v6e')):
    assert plan.known_sizes(gen) == list(tpu.ACCELERATOR_SIZES[launch_gen]), gen


def test_script_runs_standalone_without_jax():
  out = subprocess.run([sys.executable, '-S', os.path.join(ROOT, 'launch', 'tpu.py'), 'delete',
                        *BASE, '--dry-run'], capture_output=True, text=True, check=True).stdout
  assert out.startswith('gcloud compute tpus tpu-vm delete promot-pod')


def test_remote_run_command_works_in_a_shell(tmp_path, capsys):
  """Run the worker-side command of `run` in bash with a fake promot: argv arrives intact."""
  (cmd,) = dry(capsys, 'run', *BASE, '--gin_file', GIN, "--gin.MODEL_DIR='gs://b/rte xxl'")
  home = tmp_path / 'home'
  (home / 'promot_jax').mkdir(parents=True)
  fake = home / 'promot_venv' / 'bin' / 'promot'
  fake.parent.mkdir(parents=True)
  fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
  fake.chmod(0o755)
  subprocess.run(['bash', '-c', remote(cmd) + '; wait'], env={'HOME': str(home), 'PATH': '/usr/bin:/bin'},
                 check=True)
  assert (home / 'promot_logs' / 'promot-pod.log').read_text().splitlines() == [
      'run', f'--gin_file={GIN}', '--gin.DISTRIBUTED=True', "--gin.MODEL_DIR='gs://b/rte xxl'"]
  assert (home / 'promot_logs' / 'run.pid').read_text().strip().isdigit()
