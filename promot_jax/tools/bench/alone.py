"""One bench workload timed alone, call after call, in this process (for A/B checks).

  python -m promot_jax.tools.bench.alone finetune --sparse-embedding off --calls 5
  python -m promot_jax.tools.bench.alone model_tuning --dropout 0   # the stage without dropout
  python -m promot_jax.tools.bench.alone model_tuning --sleep 6     # a pause before each call
  python -m promot_jax.tools.bench.alone beam4                      # or greedy
  python -m promot_jax.tools.bench.alone head --rows 8               # one decoding step's head
  python -m promot_jax.tools.bench.alone head --rows 8 --stored      # ... with the stored kernel
  python -m promot_jax.tools.bench.alone hf/full_finetune            # transformers' side, too

`promot bench` times workloads round-robin so that a ratio comes from one run; this times one
workload back to back (what a training loop does), at the same shapes (mT5-small, batch 8,
inputs 128, targets 16, prompt 100; --quick: the tiny test model). Run it once per variant,
in separate processes, alternating. It prints the median and every call's seconds, and the
median of the CPU seconds (all threads) a call took: work saved shows there even when this
VM's wall times drift.
Like `promot bench` it re-executes itself once under the bench's allocator settings (huge
pages, freed memory kept: promot_jax.host_memory; PROMOT_HUGEPAGES=0 and
PROMOT_KEEP_FREED_MEMORY=0 opt out), so both time the same thing.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from typing import Optional, Sequence

import jax

from promot_jax import host_memory
from promot_jax.tools.bench import hf_bench, jax_bench
from promot_jax.tools.bench.common import PRESETS, synthetic_batch

_SPARSE = {'auto': None, 'on': True, 'off': False}
# transformers' workloads and the promot_jax stage each is matched with (stage settings).
_HF_TRAIN = {'hf/full_finetune': 'finetune', 'hf/peft_prompt_tuning': 'prompt_tuning'}
_HF_DECODE = ('hf/greedy', 'hf/beam4')


def _cpu_seconds() -> float:
  """User + system seconds this process has run on all its threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('workload', choices=list(jax_bench.STAGE_NAMES) + ['greedy', 'beam4', 'head']
                 + list(_HF_TRAIN) + list(_HF_DECODE))
  p.add_argument('--rows', type=int, default=8,
                 help='head: rows of the [rows, embed] x [embed, vocab] product (8 greedy, '
                      '32 beam 4)')
  p.add_argument('--stored', action='store_true',
                 help='head: multiply with the stored [embed, vocab] kernel instead of the '
                      '[vocab, embed] copy decoding uses on CPU (layers.Dense)')
  p.add_argument('--calls', type=int, default=5, help='timed calls after two untimed ones')
  p.add_argument('--sleep', type=float, default=0.0, help='seconds idle before each call')
  p.add_argument('--sparse-embedding', choices=list(_SPARSE), default='auto',
                 help="the stage's sparse_embedding (train workloads)")
  p.add_argument('--dropout', type=float, default=None,
                 help="the stage's dropout rate (train workloads; default: the preset's)")
  p.add_argument('--quick', action='store_true', help='the tiny test model')
  args = p.parse_args(argv)
  if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
    p.error(f'--dropout must be in [0, 1); got {args.dropout}.')
  bc = PRESETS['quick' if args.quick else 'mt5_small']
  params = jax_bench.random_params(bc)
  batch = synthetic_batch(bc, jax_bench.model_config(bc).vocab_size)
  compile_s = None
  if args.workload in jax_bench.STAGE_NAMES:
    stage = jax_bench.stage_for(args.workload).replace(
        sparse_embedding=_SPARSE[args.sparse_embedding])
    if args.dropout is not None:
      stage = stage.replace(dropout_rate=args.dropout)
    call = jax_bench.StageStep(bc, stage, params, batch)
    compile_s = call.compile_s
  elif args.workload == 'head':
    kernel = jax.device_put(params['decoder']['logits_dense']['kernel'])
    hidden = jax.numpy.ones((args.rows, kernel.shape[0]), kernel.dtype)
    if args.stored:
      product = jax.jit(lambda h, k: h @ k)
    else:
      kernel = jax.block_until_ready(kernel.T)     # a transposed copy, as decoding keeps
      product = jax.jit(lambda h, k: jax.numpy.einsum('be,ve->bv', h, k))
    call = lambda: jax.block_until_ready(product(hidden, kernel))  # noqa: E731
  elif args.workload in _HF_TRAIN:
    build = getattr(hf_bench, args.workload[3:])
    call = build(jax_bench.model_config(bc), bc, batch,
                 jax_bench.stage_for(_HF_TRAIN[args.workload]))
  elif args.workload in _HF_DECODE:
    timers = hf_bench.generate_timers(jax_bench.model_config(bc), bc, batch)
    name = 'hf/greedy' if args.workload == 'hf/greedy' else f'hf/beam{bc.beam_size}'
    call = next(t.call for t in timers if t.name == name)
  else:
    name = 'promot_jax/greedy' if args.workload == 'greedy' else f'promot_jax/beam{bc.beam_size}'
    call = next(t.call for t in jax_bench.decode_timers(bc, params, batch) if t.name == name)
  call()
  call()
  times, cpu = [], []
  for _ in range(args.calls):
    time.sleep(args.sleep)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    call()
    times.append(time.perf_counter() - start)
    cpu.append(_cpu_seconds() - cpu_start)
  out = {'workload': args.workload, 'sparse_embedding': args.sparse_embedding,
         'dropout': args.dropout,
         'sleep_s': args.sleep, 'compile_s': compile_s, 'median_s': statistics.median(times),
         'times_s': times, 'median_cpu_s': statistics.median(cpu)}
  print(f'{args.workload} (sparse_embedding {args.sparse_embedding}, sleep {args.sleep:g} s'
        + (f', dropout {args.dropout:g}' if args.dropout is not None else '') + '): '
        f'median {out["median_s"]:.3f} s (cpu {out["median_cpu_s"]:.3f} s), calls '
        + ' '.join(f'{t:.3f}' for t in times)
        + (f', compiled in {compile_s:.1f} s' if compile_s else ''), flush=True)
  jax.clear_caches()
  return out


if __name__ == '__main__':
  host_memory.reexec_with_hugepages(sys.argv[1:], module='promot_jax.tools.bench.alone',
                                    keep_freed=True)
  main(sys.argv[1:])
