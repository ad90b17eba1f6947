"""A pod rehearsal on one machine: the same command as N CPU processes with D devices each.

  promot run --gin_file=runs/promot_tiny_cpu.gin --local_processes 2 --local_devices 4

starts N copies of the command, each with D host-platform devices, joined through
jax.distributed (gloo collectives on CPU) into one mesh of N x D devices, exactly as the
hosts of a pod run it (launch/tpu.py run). Process 0's output is shown here; the others
write to MODEL_DIR/logs/process_<i>.log (a temporary directory when MODEL_DIR is not
local). SIGTERM / Ctrl-C is passed to every process, which then stop together at the same
step with one checkpoint (exit 75). When any process fails, the others are stopped and its
last lines are shown; the exit code is the first failure's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

POLL_S = 0.2
GRACE_S = 15.0     # how long the others get to exit by themselves after one failed


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def log_dir_for(model_dir: Optional[str]) -> str:
  """MODEL_DIR/logs for a local MODEL_DIR, else a new temporary directory."""
  if model_dir and '://' not in model_dir:
    return os.path.join(os.path.abspath(model_dir), 'logs')
  return tempfile.mkdtemp(prefix='promot_local_pod_')


def child_environment(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors='replace') as f:
      return ''.join(f.readlines()[-lines:])
  except OSError:
    return ''


def launch(argv: Sequence[str], processes: int, devices: int, model_dir: Optional[str],
           log=print) -> int:
  """Run `promot ARGV` as `processes` joined CPU processes; returns the exit code."""
  if processes < 1 or devices < 1:
    raise ValueError('--local_processes and --local_devices must be positive.')
  logs = log_dir_for(model_dir)
  os.makedirs(logs, exist_ok=True)
  port = free_port()
  env = child_environment(devices)
  base = [sys.executable, '-m', 'promot_jax.cli', *argv]
  if processes > 1:
    base += ['--gin.DISTRIBUTED=True', f"--gin.COORDINATOR_ADDRESS='127.0.0.1:{port}'",
             f'--gin.NUM_PROCESSES={processes}']
  log(f'promot: {processes} local process(es) x {devices} CPU device(s); processes 1.. log to '
      f'{logs}/process_<i>.log')
  children, files = [], []
  for i in range(processes):
    cmd = base + ([f'--gin.PROCESS_ID={i}'] if processes > 1 else [])
    if i == 0:
      out = None
    else:
      out = open(os.path.join(logs, f'process_{i}.log'), 'w')
      files.append(out)
    children.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out
                                     else None))

  def forward(signum, frame):
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    return _wait(children, logs, log)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for f in files:
      f.close()


def _wait(children: list, logs: str, log) -> int:
  failed: Optional[int] = None
  deadline = None
  while any(c.poll() is None for c in children):
    if failed is None:
      failed = next((i for i, c in enumerate(children)
                     if c.returncode not in (None, 0, 75)), None)
      if failed is not None:
        deadline = time.monotonic() + GRACE_S
    if deadline is not None and time.monotonic() > deadline:
      for c in children:
        if c.poll() is None:
          c.kill()
    time.sleep(POLL_S)
  codes = [c.returncode for c in children]
  if failed is None:
    failed = next((i for i, code in enumerate(codes) if code not in (0, 75)), None)
  if failed is None:
    return max(codes)   # 0, or 75 when they stopped on a signal
  if failed > 0:
    log(f'promot: process {failed} failed (exit {codes[failed]}); its last lines '
        f'({logs}/process_{failed}.log):\n{_tail(os.path.join(logs, f"process_{failed}.log"))}')
  else:
    log(f'promot: process 0 failed (exit {codes[0]}); the others were stopped.')
  return codes[failed] if codes[failed] > 0 else 1
