"""Transparent huge pages for the big host buffers XLA:CPU and PyTorch allocate every step.

XLA:CPU allocates each step's temporaries afresh, and glibc serves allocations that large
with mmap, so every step faults in (and the kernel zeroes) each 4 KiB page again: on the
mT5-small benchmark that is 0.28M page faults per prompt-tuning step and 0.67M per
fine-tuning step, a third of a core in the kernel. glibc >= 2.35 can ask for transparent
huge pages for those mappings (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), which cuts the
faults about 500-fold (README, Performance). The tunable is read when the process starts,
so `promot` re-executes itself once with it set, before anything is imported or run.

It is skipped when it cannot help or is not wanted: not Linux, not glibc >= 2.35,
transparent huge pages not in `madvise` mode (`always` already gives them, `never` forbids
them), the tunable already set, or `PROMOT_HUGEPAGES=0`.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional, Sequence

TUNABLE = 'glibc.malloc.hugetlb=1'
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_at_least(version: str, wanted=(2, 35)) -> bool:
  try:
    return tuple(int(x) for x in version.split('.')[:2]) >= wanted
  except ValueError:
    return False


def thp_mode(path: str = THP_ENABLED) -> Optional[str]:
  """The selected transparent-huge-page mode ('always', 'madvise', 'never'), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def hugepage_environment(environ: Mapping[str, str], libc: tuple[str, str],
                         thp_mode: Optional[str], system: str) -> Optional[dict]:
  """The environment to re-run `promot` with, or None when nothing should change."""
  if environ.get('PROMOT_HUGEPAGES', '1') == '0' or system != 'Linux':
    return None
  if libc[0] != 'glibc' or not _glibc_at_least(libc[1]) or thp_mode != 'madvise':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables:
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}' if tunables else TUNABLE
  return env


def reexec_with_hugepages(argv: Sequence[str]) -> None:
  """Replace this process by `python -m promot_jax.cli ARGV` with the tunable (or return)."""
  env = hugepage_environment(os.environ, platform.libc_ver(), thp_mode(), platform.system())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, '-m', 'promot_jax.cli', *argv], env)
  except OSError:
    return          # could not re-execute: run on without huge pages
