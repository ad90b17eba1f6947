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

Keeping freed memory (`KEEP_FREED`; `promot bench` and `bench.alone` by default,
any command with `PROMOT_KEEP_FREED_MEMORY=1`, none with `=0`): glibc then serves every
allocation from one heap it never gives back (one arena, no mmap'd chunks, no trimming), so a
step reuses the pages of the step before. Under a hypervisor that takes back a guest's free
pages (virtio-balloon free page reporting, as on the bench's VM) every page returned to the
kernel costs a fault in the host when it is touched again: there a fine-tuning step after 6 s
idle took 8.4 s with the default allocator and 2.2 s with freed memory kept, and
transformers' fine-tuning step, back to back, 4.2 s vs 2.0 s (README, Performance). The
cost: the heap keeps its high-water mark (and may grow once by fragmentation), so it is a
measurement setting, not every command's default.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional, Sequence

TUNABLE = 'glibc.malloc.hugetlb=1'
KEEP_FREED = ('glibc.malloc.arena_max=1', 'glibc.malloc.mmap_max=0',
              'glibc.malloc.trim_threshold=68719476736')
KEEP_FREED_COMMANDS = ('bench',)
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
                         thp_mode: Optional[str], system: str,
                         keep_freed: bool = False) -> Optional[dict]:
  """The environment to re-run with, or None when nothing should change.

  `keep_freed`: add the KEEP_FREED tunables (unless the user set any of them)."""
  if system != 'Linux' or libc[0] != 'glibc' or not _glibc_at_least(libc[1]):
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  add = []
  if (environ.get('PROMOT_HUGEPAGES', '1') != '0' and thp_mode == 'madvise'
      and 'glibc.malloc.hugetlb' not in tunables):
    add.append(TUNABLE)
  if keep_freed and not any(t.split('=')[0] in tunables for t in KEEP_FREED):
    add.extend(KEEP_FREED)
  if not add:
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = ':'.join(([tunables] if tunables else []) + add)
  return env


def keeps_freed_memory(argv: Sequence[str], environ: Mapping[str, str],
                       default: Optional[bool] = None) -> bool:
  """Whether `promot ARGV` keeps freed memory: PROMOT_KEEP_FREED_MEMORY (1 or 0) decides for
  any command; otherwise `default`, or (None) the bench yes and other commands no."""
  if default is None:
    default = bool(argv) and argv[0] in KEEP_FREED_COMMANDS
  return environ.get('PROMOT_KEEP_FREED_MEMORY', '1' if default else '0') == '1'


def reexec_with_hugepages(argv: Sequence[str], module: str = 'promot_jax.cli',
                          keep_freed: Optional[bool] = None) -> None:
  """Replace this process by `python -m MODULE ARGV` with the tunables (or return).

  `keep_freed`: the default PROMOT_KEEP_FREED_MEMORY overrides (None: by the command)."""
  keep_freed = keeps_freed_memory(argv, os.environ, keep_freed)
  env = hugepage_environment(os.environ, platform.libc_ver(), thp_mode(), platform.system(),
                             keep_freed=keep_freed)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, '-m', module, *argv], env)
  except OSError:
    return          # could not re-execute: run on as started
