"""The package as `pip install .` makes it: a wheel, installed outside the checkout.

The wheel is built from the repository, installed with --no-deps into a new virtual
environment in a temporary directory (its dependencies come from the test environment's
site-packages through a .pth line), and run from an empty directory: a two-stage run from a
shipped run file, `promot eval` on its result, and `promot demo --quick`, which starts from
the shipped pretrained model. Nothing of the checkout is on that environment's path.
"""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(cmd, cwd, env=None, timeout=900):
  proc = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, f'{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n' \
                               f'{proc.stderr[-3000:]}'
  return proc


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  out = tmp_path_factory.mktemp('wheel')
  run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
       '-w', out, ROOT], cwd=out)
  (found,) = [p for p in os.listdir(out) if p.endswith('.whl')]
  return os.path.join(out, found)


@pytest.fixture(scope='module')
def installed(wheel, tmp_path_factory):
  """(bin dir, environment) of a fresh venv with the wheel and the test env's packages."""
  venv = tmp_path_factory.mktemp('venv')
  run([sys.executable, '-m', 'venv', venv], cwd=venv)
  bin_dir = venv / 'bin'
  # Nothing of the caller's PYTHONPATH (a checkout on it would count as promot_jax installed).
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  env['PATH'] = f'{bin_dir}{os.pathsep}{env.get("PATH", "")}'
  purelib = run([bin_dir / 'python', '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                cwd=venv, env=env).stdout.strip()
  # The test environment's packages, after the venv's own (the editable promot_jax finder
  # there is a .pth file of that directory, which a path added this way does not run).
  with open(os.path.join(purelib, 'zz_test_env.pth'), 'w') as f:
    f.write(sysconfig.get_path('purelib') + '\n')
  run([bin_dir / 'python', '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', wheel],
      cwd=venv, env=env)
  env['PROMOT_HUGEPAGES'] = '0'
  return bin_dir, env


def test_the_wheel_ships_gin_files_demo_model_and_tasks_under_promot_names(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  assert 'promot_jax/_data/gin/runs/promot_tiny_cpu.gin' in names
  assert 'promot_jax/_data/gin/promot.gin' in names
  assert 'promot_jax/_data/demo_pretrained/promot.json' in names
  assert 'promot_tasks/toy.py' in names and 'promot_tasks/synthetic.py' in names
  assert not [n for n in names if n.startswith('tasks/')]   # no generic top-level `tasks`


def test_installed_wheel_runs_trains_evaluates_and_demos_from_an_empty_directory(
    installed, tmp_path):
  bin_dir, env = installed
  work = tmp_path / 'empty'
  work.mkdir()
  where = run([bin_dir / 'python', '-c', 'import promot_jax, promot_tasks; '
               'print(promot_jax.__file__); print(promot_tasks.__file__)'], cwd=work, env=env)
  for line in where.stdout.split():
    assert line.startswith(str(bin_dir.parent)) and not line.startswith(ROOT), line

  model_dir = tmp_path / 'run'
  run([bin_dir / 'promot', 'run', '--gin_file=runs/promot_tiny_cpu.gin',
       f"--gin.MODEL_DIR='{model_dir}'", '--gin.PROMPT_TUNING_STEPS=10',
       '--gin.MODEL_TUNING_STEPS=10'], cwd=work, env=env)
  assert json.load(open(model_dir / 'model_tuning' / 'done.json'))['train_steps'] == 10

  out = tmp_path / 'eval'
  run([bin_dir / 'promot', 'eval', '--gin_file=eval/toy.gin',
       f'--checkpoint={model_dir / "model_tuning"}', f'--out_dir={out}'], cwd=work, env=env)
  (results,) = [json.load(open(out / d / 'results.json')) for d in os.listdir(out)
                if os.path.isdir(out / d)]
  assert results['tasks']['toy_sorted']['num_examples'] == 8 and not results['failed']

  demo = run([bin_dir / 'promot', 'demo', '--quick', '--out_dir', tmp_path / 'demo'],
             cwd=work, env=env)
  assert 'demo finished' in demo.stdout
  assert os.path.exists(tmp_path / 'demo' / 'report.md')
  assert os.listdir(work) == []   # nothing written into the working directory
