"""The `promot` entry point: parse the command line, run the command's handler, map errors
to exit codes (2: a mistake the user can fix, 3: training stopped, 75: stopped on a signal,
rerun to resume).

  promot run      run every stage of a gin run file in order (stage 1 -> stage 2)
  promot train    run one stage of a gin run file
  promot eval     the suite: fine-tuned task with its prompt, in-context tasks without
  promot smoke / convert / info / plan / bench / diagnose / demo / report / export / lm-eval

This module stays light (argparse, the command table in cli/commands.py): the handler's
module, and with it jax, TensorFlow and the rest, is imported once the command is known, and
after `promot` has re-executed itself with huge pages (host_memory).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from promot_jax import host_memory
from promot_jax.cli.commands import build_parser


def handler_of(name: str):
  """'module:function' -> the function (imports the module)."""
  module, function = name.split(':')
  return getattr(importlib.import_module(module), function)


def main(argv: Optional[Sequence[str]] = None) -> int:
  if argv is None:   # a real `promot` process (not a call from Python): huge pages first
    host_memory.reexec_with_hugepages(sys.argv[1:])
  argv = list(sys.argv[1:] if argv is None else argv)
  gin_flags = [a for a in argv if a.startswith('--gin.')]
  args = build_parser().parse_args([a for a in argv if not a.startswith('--gin.')])
  args.gin_flags = gin_flags
  args.argv = argv
  # t5x's spelling: --gin_search_paths=a,b (repeatable); where --gin_file and `include` look
  args.gin_search_paths = [p for group in (getattr(args, 'gin_search_paths', None) or [])
                           for p in group.split(',') if p]
  try:
    return handler_of(args.handler)(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    # Errors a user can cause: one clear message, no traceback.
    print(f'promot {args.command}: error: {e}', file=sys.stderr)
    return 2
  except RuntimeError as e:
    # train.preemption.Preempted (75) and train.loop.TrainingError (3) carry their exit code.
    code = getattr(e, 'exit_code', None)
    if code is None:
      raise
    prefix = 'training stopped: ' if code == 3 else ''
    print(f'promot {args.command}: {prefix}{e}', file=sys.stderr)
    return code


if __name__ == '__main__':
  sys.exit(main())
