"""`promot eval`: an eval gin file -> EvalConfig -> the suite over each checkpoint -> a table.

  promot eval --gin_file=eval/toy.gin --checkpoint MODEL_DIR/model_tuning [--gin.X=...]
  promot eval ... --gin.NUM_PARTITIONS=8 --gin.RESTORE_DTYPE="'bfloat16'"   # on a pod's mesh
  promot eval ... --local_processes 2 --local_devices 4                   # a pod rehearsal

Exit code 1 when any task failed (the others still ran and were written).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from promot_jax import paths
from promot_jax.cli import commands, local_pod
from promot_jax.eval import suite
from promot_jax.ginconf import loaders


def command(args: argparse.Namespace) -> int:
  ecfg = loaders.load_eval_config(args.gin_file, args.gin_flags, args.gin_search_paths)
  if args.out_dir:
    ecfg = dataclasses.replace(ecfg, out_dir=args.out_dir)
  if getattr(args, 'local_processes', None):   # a multi-host rehearsal on this machine
    return local_pod.launch(commands.without_local_pod_arguments(args.argv),
                            args.local_processes, args.local_devices, ecfg.out_dir)
  results = suite.evaluate_suite(ecfg, args.checkpoint or None,
                                 all_checkpoints=args.all_checkpoints)
  if suite.is_writer():
    print(suite.summary_table(results), flush=True)
    print(f'results in {paths.absolute(ecfg.out_dir)}', flush=True)
  failed = sorted({t for r in results.values() for t in r['failed']})
  if failed:
    print(f'promot eval: {len(failed)} task(s) failed: {failed}', file=sys.stderr)
    return 1
  return 0
