"""`promot lm-eval ...`: lm-evaluation-harness's own CLI with the promot model registered.

  promot lm-eval run --model promot \
      --model_args checkpoint=MODEL_DIR/model_tuning,with_prompt=true,vocabulary=byte \
      --tasks my_task --include_path tasks_yaml/ --output_path out/

Everything after `lm-eval` is lm-eval's command line (run / ls / validate and their flags).
This module stays importable without lm-eval; the adapter is imported only when the command
runs (`pip install -e ".[lm_eval]"`).
"""

from __future__ import annotations

import argparse
import sys


def _cmd_lm_eval(args) -> int:
  try:
    from lm_eval._cli import HarnessCLI  # lm-eval 0.4.13's CLI object
    from lm_eval.utils import setup_logging
  except ImportError as e:
    raise ValueError(f'lm-eval is not installed ({e}); pip install -e ".[lm_eval]".') from e
  import promot_jax.lm_eval_adapter  # noqa: F401  (registers --model promot)
  rest = [a for a in args.lm_eval_args if a != '--'] or ['--help']
  saved = sys.argv
  sys.argv = ['lm-eval', *rest]
  try:
    setup_logging()
    cli = HarnessCLI()
    cli.execute(cli.parse_args())
  finally:
    sys.argv = saved
  return 0


def add_subcommand(subparsers) -> None:
  """Register `promot lm-eval` (called by promot_jax.cli)."""
  text = 'run lm-evaluation-harness with a promot_jax checkpoint (--model promot)'
  p = subparsers.add_parser('lm-eval', help=text, description=text + '. Arguments after '
                            '`lm-eval` are lm-eval\'s own, e.g. run --model promot --model_args '
                            'checkpoint=DIR,with_prompt=true --tasks NAME.')
  p.add_argument('lm_eval_args', nargs=argparse.REMAINDER,
                 help="lm-eval's command line, starting with its subcommand (run, ls, validate)")
  p.set_defaults(fn=_cmd_lm_eval)
