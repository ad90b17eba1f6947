"""When `promot` re-executes itself with glibc's huge-page tunable, and when it must not."""

import os
import subprocess
import sys

import pytest

from promot_jax import host_memory

GLIBC, MADVISE, LINUX = ('glibc', '2.36'), 'madvise', 'Linux'


def test_sets_the_tunable_on_a_glibc_linux_with_thp_in_madvise_mode():
  env = host_memory.hugepage_environment({'PATH': '/bin'}, GLIBC, MADVISE, LINUX)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  # other tunables the user set are kept
  env = host_memory.hugepage_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
                                         GLIBC, MADVISE, LINUX)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


def test_keeping_freed_memory_adds_its_tunables_once():
  env = host_memory.hugepage_environment({}, GLIBC, MADVISE, LINUX, keep_freed=True)
  assert env['GLIBC_TUNABLES'] == ':'.join((host_memory.TUNABLE,) + host_memory.KEEP_FREED)
  # the re-executed process asks for nothing more (no loop)
  assert host_memory.hugepage_environment(env, GLIBC, MADVISE, LINUX, keep_freed=True) is None
  # without transparent huge pages only the allocator settings
  env = host_memory.hugepage_environment({}, GLIBC, 'never', LINUX, keep_freed=True)
  assert env['GLIBC_TUNABLES'] == ':'.join(host_memory.KEEP_FREED)
  # a user's own arena setting wins: nothing of KEEP_FREED is added
  env = host_memory.hugepage_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'},
                                         GLIBC, MADVISE, LINUX, keep_freed=True)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('argv,environ,keeps', [
    (['bench', '--quick'], {}, True),
    (['train', 'run.gin'], {}, False),
    ([], {}, False),
    (['bench'], {'PROMOT_KEEP_FREED_MEMORY': '0'}, False),
    (['train'], {'PROMOT_KEEP_FREED_MEMORY': '1'}, True),
])
def test_which_commands_keep_freed_memory(argv, environ, keeps):
  assert host_memory.keeps_freed_memory(argv, environ) is keeps


@pytest.mark.parametrize('environ,libc,thp,system', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, GLIBC, MADVISE, LINUX),  # user's choice
    ({'PROMOT_HUGEPAGES': '0'}, GLIBC, MADVISE, LINUX),                    # opted out
    ({}, ('glibc', '2.31'), MADVISE, LINUX),                               # tunable too new
    ({}, ('musl', '1.2'), MADVISE, LINUX),
    ({}, ('', ''), MADVISE, 'Darwin'),
    ({}, GLIBC, 'always', LINUX),                                          # already huge
    ({}, GLIBC, 'never', LINUX),
    ({}, GLIBC, None, LINUX),                                              # no THP at all
])
def test_leaves_the_process_alone(environ, libc, thp, system):
  assert host_memory.hugepage_environment(environ, libc, thp, system) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory.thp_mode(str(path)) == 'madvise'
  assert host_memory.thp_mode(str(tmp_path / 'missing')) is None


@pytest.mark.skipif(host_memory.hugepage_environment(
    os.environ, host_memory.platform.libc_ver(), host_memory.thp_mode(),
    host_memory.platform.system()) is None, reason='this host would not re-execute')
def test_the_promot_command_runs_under_the_tunable(tmp_path):
  """A real `promot` process re-executes itself; `promot bench` records what it ran under
  (huge pages and, for the bench, freed memory kept)."""
  out_json = tmp_path / 'bench.json'
  script = 'import sys; from promot_jax import cli; sys.exit(cli.main())'
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  done = subprocess.run([sys.executable, '-c', script, 'bench', '--quick', '--no-hf',
                         '--sections', 'data', '--json', str(out_json)],
                        capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  import json
  recorded = json.loads(out_json.read_text())['environment']['glibc_tunables']
  assert recorded == ':'.join((host_memory.TUNABLE,) + host_memory.KEEP_FREED)
