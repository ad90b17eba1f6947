#!/usr/bin/env python3
"""Cloud TPU pod launcher for promot_jax: one command per step of a pod's life.

  python launch/tpu.py create  --name N --zone Z --accelerator-type v4-64
  python launch/tpu.py sync    --name N --zone Z [--gin_file RUN.gin]   # project (+ gin) to every worker
  python launch/tpu.py install --name N --zone Z                        # venv + pip install -e .[tpu]
  python launch/tpu.py run     --name N --zone Z --gin_file RUN.gin [--gin.NAME=VALUE ...]
  python launch/tpu.py tail    --name N --zone Z                        # worker 0's log
  python launch/tpu.py stop | clean | delete --name N --zone Z

Every remote step is `gcloud compute tpus tpu-vm ...`; `--dry-run` prints the commands and
runs nothing. Inputs are checked before any gcloud call. Needs only Python 3 and gcloud.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = '~/promot_jax'        # the project on every worker
REMOTE_VENV = '~/promot_venv'
REMOTE_LOGS = '~/promot_logs'
ARCHIVE = '/tmp/promot_jax_sync.tgz'
# Top-level entries ('./x') only, so gin/runs/ travels; the rest anywhere in the tree.
EXCLUDES = ('./.git', './.venv', './.venv-tpu', './runs', './out', '__pycache__', '*.egg-info',
            '.pytest_cache', '.hypothesis')

# Accelerator types gcloud accepts, by generation: N counts TensorCores for v4 and v5p (two
# per chip), chips for v5e (gcloud spells it v5litepod-N) and v6e.
ACCELERATOR_SIZES = {
    'v4': (8, 16, 32, 64, 128, 256, 384, 512, 1024, 1536, 2048, 4096),
    'v5litepod': (1, 4, 8, 16, 32, 64, 128, 256),
    'v5p': (8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, 12288),
    'v6e': (1, 4, 8, 16, 32, 64, 128, 256),
}
# TPU software ("runtime") versions Google recommends for JAX, by generation.
RUNTIME_VERSIONS = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
                    'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
ACTIONS = ('create', 'install', 'sync', 'run', 'eval', 'tail', 'stop', 'clean', 'delete')


def accelerator_type(text: str) -> str:
  """Validate an accelerator type; returns gcloud's spelling (v5e-N -> v5litepod-N)."""
  gen, _, size = text.strip().lower().rpartition('-')
  gen = 'v5litepod' if gen in ('v5e', 'v5lite') else gen
  if gen not in ACCELERATOR_SIZES or not size.isdigit() or int(size) not in ACCELERATOR_SIZES[gen]:
    known = '; '.join(f'{g}-{{{",".join(map(str, s))}}}' for g, s in ACCELERATOR_SIZES.items())
    raise ValueError(f'unknown accelerator type {text!r}. Known types: {known} '
                     '(v4/v5p count TensorCores, v5litepod (= v5e) and v6e count chips).')
  return f'{gen}-{size}'


def default_version(accel: str) -> str:
  return RUNTIME_VERSIONS[accel.rpartition('-')[0]]


def resolve_gin_file(path: str) -> str:
  """The local gin file (as given, or under the project's gin/, as `promot` resolves it)."""
  for candidate in (path, os.path.join(ROOT, 'gin', path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f'gin file {path!r} not found (looked in . and {os.path.join(ROOT, "gin")})')


def remote_gin_path(local: str, given: str) -> str:
  """How `promot` on a worker (cwd REMOTE_DIR) names the file after `sync`."""
  gin_dir = os.path.join(ROOT, 'gin') + os.sep
  if local.startswith(gin_dir):
    return os.path.relpath(local, os.path.join(ROOT, 'gin'))
  if local.startswith(ROOT + os.sep):
    return os.path.relpath(local, ROOT)
  return os.path.join('launch_gin', os.path.basename(local))   # copied there by sync


class Launcher:
  """Builds (and unless dry_run, runs) the gcloud commands of each action."""

  def __init__(self, args: argparse.Namespace, gin_flags: Sequence[str] = ()):
    self.args, self.gin_flags = args, list(gin_flags)
    self.commands: list[list[str]] = []

  def _gcloud(self, *words: str) -> list[str]:
    cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', *words, f'--zone={self.args.zone}']
    return cmd + ([f'--project={self.args.project}'] if self.args.project else [])

  def ssh(self, remote: str, worker: str = 'all') -> list[str]:
    return self._gcloud('ssh', self.args.name, f'--worker={worker}', f'--command={remote}')

  def scp(self, local: str, remote: str) -> list[str]:
    return self._gcloud('scp', local, f'{self.args.name}:{remote}', '--worker=all')

  def execute(self, cmd: list[str]) -> None:
    self.commands.append(cmd)
    print(shlex.join(cmd), flush=True)
    remote = next((c[len('--command='):] for c in cmd if c.startswith('--command=')), None)
    if remote and self.args.dry_run:
      print(f'#   runs on the worker(s): {remote}', flush=True)
    if self.args.dry_run:
      return
    result = subprocess.run(cmd)
    if result.returncode:
      raise SystemExit(f'launch/tpu.py: command failed with exit {result.returncode}: '
                       f'{shlex.join(cmd)}')

  # -- actions ---------------------------------------------------------------------------

  def create(self) -> None:
    a = self.args
    self.execute(self._gcloud('create', a.name, f'--accelerator-type={a.accelerator_type}',
                              f'--version={a.version or default_version(a.accelerator_type)}'))

  def sync(self) -> None:
    excludes = [f'--exclude={e}' for e in EXCLUDES]
    self.execute(['tar', 'czf', ARCHIVE, *excludes, '-C', ROOT, '.'])
    self.execute(self.scp(ARCHIVE, '~/promot_jax_sync.tgz'))
    self.execute(self.ssh(f'mkdir -p {REMOTE_DIR} {REMOTE_LOGS} && '
                          f'tar xzf ~/promot_jax_sync.tgz -C {REMOTE_DIR}'))
    for given, local in self._gin_files():
      if remote_gin_path(local, given).startswith('launch_gin/'):
        self.execute(self.ssh(f'mkdir -p {REMOTE_DIR}/launch_gin'))
        self.execute(self.scp(local, f'{REMOTE_DIR}/launch_gin/'))

  def install(self) -> None:
    self.execute(self.ssh(
        f'python3 -m venv {REMOTE_VENV} && {REMOTE_VENV}/bin/pip install -q -U pip && '
        f'cd {REMOTE_DIR} && {REMOTE_VENV}/bin/pip install -q -e ".[tpu]" && '
        f'{REMOTE_VENV}/bin/python -c "import jax; print(jax.__version__, jax.device_count())"'))

  def run(self) -> None:
    self._start('run', [])

  def eval(self) -> None:
    """`promot eval` on every worker: the checkpoint read into the pod's mesh, each host
    decoding its share; worker 0 writes the results."""
    if not self.args.checkpoint:
      raise ValueError('eval needs --checkpoint PATH (e.g. gs://bucket/run/model_tuning)')
    extra = [w for c in self.args.checkpoint for w in ('--checkpoint', c)]
    if self.args.out_dir:
      extra += ['--out_dir', self.args.out_dir]
    self._start('eval', extra)

  def _start(self, command: str, extra: list[str]) -> None:
    gins = [f'--gin_file={remote_gin_path(local, given)}' for given, local in self._gin_files()]
    if not gins:
      raise ValueError(f'{command} needs --gin_file FILE.gin')
    args = shlex.join([command, *gins, *extra, '--gin.DISTRIBUTED=True', *self.gin_flags])
    log = f'{REMOTE_LOGS}/{self.args.name}.log'
    self.execute(self.ssh(   # the venv path stays unquoted so that ~ expands on the worker
        f'mkdir -p {REMOTE_LOGS} && cd {REMOTE_DIR} && {{ nohup {REMOTE_VENV}/bin/promot {args} '
        f'> {log} 2>&1 < /dev/null & echo $! > {REMOTE_LOGS}/run.pid; }}'))
    if not self.args.dry_run:
      print(f'started on every worker; follow it with: python launch/tpu.py tail --name '
            f'{self.args.name} --zone {self.args.zone}', flush=True)

  def tail(self) -> None:
    self.execute(self.ssh(f'tail -n 200 -F {REMOTE_LOGS}/{self.args.name}.log', worker='0'))

  def stop(self) -> None:
    self.execute(self.ssh(f'test -f {REMOTE_LOGS}/run.pid && kill $(cat {REMOTE_LOGS}/run.pid) '
                          f'; rm -f {REMOTE_LOGS}/run.pid; true'))

  def clean(self) -> None:
    # Whatever still holds the TPU devices (a crashed run, a stray notebook) blocks the next
    # run with "TPU in use": kill those processes and drop libtpu's lock file.
    self.execute(self.ssh('sudo lsof -t -w /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u | '
                          'xargs -r sudo kill -9; sudo rm -f /tmp/libtpu_lockfile; true'))

  def delete(self) -> None:
    self.execute(self._gcloud('delete', self.args.name, '--quiet'))

  def _gin_files(self) -> list[tuple[str, str]]:
    return [(g, resolve_gin_file(g)) for g in (self.args.gin_file or [])]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='launch/tpu.py', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('action', choices=ACTIONS)
  p.add_argument('--name', required=True, help='TPU VM name')
  p.add_argument('--zone', required=True, help='e.g. us-central2-b (v4), us-west4-a (v5e)')
  p.add_argument('--project', default=None, help='GCP project (default: gcloud\'s)')
  p.add_argument('--accelerator-type', default=None, help='e.g. v4-64, v5litepod-256, v5p-128, v6e-64')
  p.add_argument('--version', default=None, help='TPU software version (default: Google\'s JAX '
                 'recommendation for the generation, e.g. tpu-ubuntu2204-base on v4)')
  p.add_argument('--gin_file', action='append', default=None,
                 help='gin run file, or eval file for `eval` (repeatable)')
  p.add_argument('--checkpoint', action='append', default=None,
                 help='eval: checkpoint, MODEL_DIR/<stage> or MODEL_DIR (repeatable)')
  p.add_argument('--out_dir', default=None, help='eval: where results.json go (e.g. gs://...)')
  p.add_argument('--dry-run', action='store_true', help='print every command, run nothing')
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  gin_flags = [a for a in argv if a.startswith('--gin.')]
  args = build_parser().parse_args([a for a in argv if not a.startswith('--gin.')])
  try:
    for flag in gin_flags:
      if '=' not in flag:
        raise ValueError(f'gin override {flag!r} must look like --gin.NAME=VALUE')
    if args.accelerator_type:
      args.accelerator_type = accelerator_type(args.accelerator_type)
    elif args.action == 'create':
      raise ValueError('create needs --accelerator-type (e.g. v4-64)')
    launcher = Launcher(args, gin_flags)
    launcher._gin_files()  # every gin file must exist before anything runs
    getattr(launcher, args.action)()
  except (ValueError, FileNotFoundError) as e:
    print(f'launch/tpu.py {args.action}: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
