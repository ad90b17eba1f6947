"""Gin files and `--gin.NAME=VALUE` overrides -> the plain dataclasses the library runs.

`load_run` builds a train.run_config.RunConfig (gin/promot.gin maps t5x's macro names onto
it) and `load_eval_config` an eval.suite.EvalConfig (gin/eval/base.gin). Nothing below this
layer reads gin.
"""

from __future__ import annotations

import os
from typing import Sequence

import gin
from promot_jax.eval.suite import EvalConfig
from promot_jax.ginconf import check, parse
from promot_jax.train.run_config import RunConfig

# Model and stage files: a run may bind what their macros feed directly (check_unread_macros).
BUILDING_BLOCKS = tuple(os.path.join(parse.GIN_DIR, d) for d in ('models', 'stages'))

def load_run(gin_files: Sequence[str], gin_flags: Sequence[str],
             search_paths: Sequence[str] = ()) -> RunConfig:
  """Parse gin (files, then --gin.NAME=VALUE overrides) and build the RunConfig.

  A macro that nothing reads (a typo such as TRAIN_STPES) is an error here, before any
  command touches MODEL_DIR.
  """
  bindings = parse.gin_flags_to_bindings(gin_flags)
  files = parse.parse_gin(gin_files, bindings, search_paths)
  check.check_unread_macros(files, bindings, building_blocks=BUILDING_BLOCKS)
  try:
    return gin.get_configurable(RunConfig)()
  except (ValueError, TypeError) as e:
    raise ValueError(f'Bad run configuration in {list(gin_files)}: {e}') from e


def load_eval_config(gin_files: Sequence[str], gin_flags: Sequence[str],
                     search_paths: Sequence[str] = ()) -> EvalConfig:
  """Parse eval gin files and --gin.X=... overrides into an EvalConfig.

  As for run files, a macro nothing reads (`--gin.ICL_TASKZ=[]`) is an error naming the
  closest one that is read.
  """
  bindings = parse.gin_flags_to_bindings(gin_flags)
  files = parse.parse_gin(gin_files, bindings, search_paths)
  check.check_unread_macros(files, bindings, building_blocks=BUILDING_BLOCKS)
  try:
    return gin.get_configurable(EvalConfig)()
  except (ValueError, TypeError) as e:
    raise ValueError(f'Bad eval configuration in {list(gin_files)}: {e}') from e
