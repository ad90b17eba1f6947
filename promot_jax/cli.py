"""The `promot` command: one entry point, one subcommand per job.

  promot run      run every stage of a gin run file in order (stage 1 -> stage 2)
  promot train    run one stage of a gin run file
  promot smoke    build a model, attach a prompt, run a forward pass (CPU smoke test)
  promot convert  HF / t5x weights -> a promot_jax (orbax) checkpoint
  promot info     what a checkpoint holds: tree, shapes, parameter count, prompt
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from typing import Optional, Sequence


# Modules that define `add_subcommand(subparsers)` for their own command (eval, plan, ...).
PLUGGED_SUBCOMMANDS = ('promot_jax.evaluation', 'promot_jax.plan', 'promot_jax.demo',
                       'promot_jax.report', 'promot_jax.bench', 'promot_jax.export',
                       'promot_jax.diagnose', 'promot_jax.lm_eval_cmd')


def load_run(gin_files, gin_flags):
  """Parse gin (files, then --gin.NAME=VALUE overrides) and build the RunConfig.

  A macro that nothing reads (a typo such as TRAIN_STPES) is an error here, before any
  command touches MODEL_DIR.
  """
  import gin
  from promot_jax import gin_check, gin_utils
  from promot_jax.run_config import RunConfig
  bindings = gin_utils.gin_flags_to_bindings(gin_flags)
  files = gin_utils.parse_gin(gin_files, bindings)
  gin_check.check_unread_macros(files, bindings)
  try:
    return gin.get_configurable(RunConfig)()
  except (ValueError, TypeError) as e:
    raise ValueError(f'Bad run configuration in {list(gin_files)}: {e}') from e


def _cmd_run(args: argparse.Namespace) -> int:
  from promot_jax import runner
  run = load_run(args.gin_file, args.gin_flags)
  runner.run_stages(run, getattr(args, 'stage', None))
  return 0


def _cmd_smoke(args: argparse.Namespace) -> int:
  from promot_jax.smoke import run_smoke
  summary = run_smoke(args.model, args.prompt_length, args.batch, args.input_length,
                      args.target_length, args.decode_length, args.checkpoint, args.seed)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(summary, f, indent=2)
  return 0


def _cmd_convert(args: argparse.Namespace) -> int:
  from promot_jax import loading, tree_util
  from promot_jax.checkpoints import orbax_io
  from promot_jax.gin_utils import resolve_model
  cfg = resolve_model(args.model) if args.model else None
  fmt = getattr(args, 'from')
  print(f'reading {args.src} (format: {fmt})', flush=True)
  cfg, params = loading.load_pretrained(args.src, cfg, fmt)
  fmt = loading.detect_format(args.src) if fmt == 'auto' else fmt
  orbax_io.save_params(args.dst, params, cfg, {'source': args.src, 'source_format': fmt},
                       overwrite=args.overwrite)
  print(f'wrote {args.dst}: {tree_util.count_params(params) / 1e6:.2f}M parameters, '
        f'config {json.dumps(cfg.architecture())}')
  return 0


def _cmd_info(args: argparse.Namespace) -> int:
  from promot_jax import loading, tree_util
  from promot_jax.checkpoints import orbax_io
  fmt = loading.detect_format(args.path)
  if fmt == 'orbax':  # metadata only: no array is read
    cfg, shapes = orbax_io.read_config(args.path), orbax_io.param_shapes(args.path)
  else:
    cfg, shapes = loading.load_pretrained(args.path, fmt=fmt)
  flat = tree_util.flatten(shapes)
  info = {'path': args.path, 'format': fmt, 'num_params': tree_util.count_params(shapes),
          'has_prompt': 'prompt/prompt' in flat,
          'prompt_shape': list(flat['prompt/prompt'].shape) if 'prompt/prompt' in flat else None,
          'config': cfg.to_dict(),
          'tree': {p: [list(v.shape), str(v.dtype)] for p, v in sorted(flat.items())}}
  if args.json:
    print(json.dumps(info, indent=2))
    return 0
  print(f'{args.path}  [{fmt}]')
  for p, (shape, dtype) in info['tree'].items():
    if args.full or not any(f'layers_{i}/' in p for i in range(1, 1000)):
      print(f'  {p:<60} {str(tuple(shape)):<18} {dtype}')
  if not args.full:
    print('  (layers_1.. elided: same names as layers_0; --full lists all)')
  print(f'parameters: {info["num_params"]:,} ({info["num_params"] / 1e6:.1f}M)')
  print(f'prompt:     {"yes " + str(tuple(info["prompt_shape"])) if info["has_prompt"] else "no"}')
  print(f'config:     {json.dumps(cfg.architecture())}')
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='promot', description='ProMoT two-stage fine-tuning in JAX.')
  sub = parser.add_subparsers(dest='command', required=True)

  for name, text in (('run', 'run every stage of a gin run file in order'),
                     ('train', 'run one stage of a gin run file')):
    p = sub.add_parser(name, help=text, description=text + '. Gin overrides: --gin.NAME=VALUE.')
    p.add_argument('--gin_file', action='append', required=True, help='gin run file (repeatable)')
    if name == 'train':
      p.add_argument('--stage', default='__first__', help='stage name (default: the first one)')
    p.set_defaults(fn=_cmd_run)

  p = sub.add_parser('smoke', help='build a model, attach a prompt, run a forward pass')
  p.add_argument('--model', default='mt5_small', help='named config (default mt5_small)')
  p.add_argument('--checkpoint', default=None, help='load weights from a checkpoint instead')
  p.add_argument('--prompt_length', type=int, default=100)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--input_length', type=int, default=64)
  p.add_argument('--target_length', type=int, default=16)
  p.add_argument('--decode_length', type=int, default=8)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default=None, help='also write the summary to this JSON file')
  p.set_defaults(fn=_cmd_smoke)

  p = sub.add_parser('convert', help='HF / t5x weights -> promot_jax checkpoint')
  p.add_argument('--from', default='auto', choices=['auto', 'hf', 't5x', 'orbax'])
  p.add_argument('--src', required=True, help='HF model dir, t5x checkpoint dir (local or gs://)')
  p.add_argument('--dst', required=True, help='output directory')
  p.add_argument('--model', default=None, help='named config or gin model file the weights must match (optional)')
  p.add_argument('--overwrite', action='store_true')
  p.set_defaults(fn=_cmd_convert)

  for module in PLUGGED_SUBCOMMANDS:  # subcommands that live beside their code
    if importlib.util.find_spec(module) is not None:
      importlib.import_module(module).add_subcommand(sub)

  p = sub.add_parser('info', help='print a checkpoint\'s tree, shapes and parameter count')
  p.add_argument('path')
  p.add_argument('--full', action='store_true', help='list every layer')
  p.add_argument('--json', action='store_true', help='machine-readable output')
  p.set_defaults(fn=_cmd_info)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  if argv is None:   # a real `promot` process (not a call from Python): huge pages first
    from promot_jax import host_memory
    host_memory.reexec_with_hugepages(sys.argv[1:])
  argv = list(sys.argv[1:] if argv is None else argv)
  gin_flags = [a for a in argv if a.startswith('--gin.')]
  args = build_parser().parse_args([a for a in argv if not a.startswith('--gin.')])
  args.gin_flags = gin_flags

  try:
    return args.fn(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    # Errors a user can cause: one clear message, no traceback.
    print(f'promot {args.command}: error: {e}', file=sys.stderr)
    return 2
  except RuntimeError as e:
    from promot_jax.preemption import EXIT_PREEMPTED, Preempted
    from promot_jax.trainer import TrainingError
    if isinstance(e, Preempted):
      print(f'promot {args.command}: {e}', file=sys.stderr)
      return EXIT_PREEMPTED
    if not isinstance(e, TrainingError):
      raise
    print(f'promot {args.command}: training stopped: {e}', file=sys.stderr)
    return 3


if __name__ == '__main__':
  sys.exit(main())
