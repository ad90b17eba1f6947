"""`promot lm-eval ...`: lm-evaluation-harness's own CLI with the promot model registered.

  promot lm-eval run --model promot \
      --model_args checkpoint=MODEL_DIR/model_tuning,with_prompt=true,vocabulary=byte \
      --tasks my_task --include_path tasks_yaml/ --output_path out/

Everything after `lm-eval` is lm-eval's command line (run / ls / validate and their flags).
This module stays importable without lm-eval; the adapter is imported only when the command
runs (`pip install -e ".[lm_eval]"`).
"""

from __future__ import annotations

import sys


def command(args) -> int:
  try:
    from lm_eval._cli import HarnessCLI  # optional dependency: lm-eval 0.4.13's CLI object
    from lm_eval.utils import setup_logging  # optional dependency

    import promot_jax.eval.lm_eval_adapter  # noqa: F401  optional dependency (registers it)
  except ImportError as e:
    raise ValueError(f'lm-eval is not installed ({e}); pip install -e ".[lm_eval]".') from e
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
