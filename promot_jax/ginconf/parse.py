"""Gin at the entry points only: parse run files and `--gin.NAME=value` overrides.

Search paths: the current directory, then the project's gin/ folder, so a run file can say
`include 'models/mt5_small.gin'` from anywhere.
"""

from __future__ import annotations

import logging
import tokenize
from typing import Any, Sequence

import gin
from promot_jax import resources
from promot_jax.ginconf import check as gin_check
from promot_jax.model import config as config_lib

GIN_DIR = resources.gin_dir()   # the shipped configs: in the wheel, or gin/ in a checkout


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str] = (),
              search_paths: Sequence[str] = ()) -> list[str]:
  """Parse gin files then bindings; returns every file read (includes too).

  A missing file or include and an unbalanced bracket are found before gin runs (with file
  and line, gin_check.check_syntax); any other parse error becomes one line as well.
  """
  gin.clear_config()
  paths = ('.', GIN_DIR, *search_paths)
  for path in paths:
    gin.add_config_file_search_path(path)
  for f in gin_files:
    if gin_check.resolve_include(f, paths) is None:
      raise FileNotFoundError(f'Gin file {f!r} not found (looked in {", ".join(paths)}).')
  files = gin_check.check_syntax(gin_files, bindings, paths)
  quiet = _DropMissingPathNoise()
  logging.getLogger().addFilter(quiet)  # gin logs every search-path miss as an error
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  except (ValueError, SyntaxError, ImportError, KeyError, NameError, OSError,
          tokenize.TokenError) as e:
    raise ValueError(gin_check.format_gin_error(e, files or gin_files)) from e
  finally:
    logging.getLogger().removeFilter(quiet)
  return files


class _DropMissingPathNoise(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Path not found')


def macro(name: str, default: Any = gin.REQUIRED) -> Any:
  """The value of gin macro NAME (a `@fn()` reference is called), or `default` if unset."""
  try:
    value = gin.query_parameter(f'{name}/macro.value')
  except ValueError:
    if default is gin.REQUIRED:
      raise ValueError(f'The gin macro {name} is not set; set it in the run file or with '
                       f'--gin.{name}=...') from None
    return default
  if isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value


def gin_flags_to_bindings(flags: Sequence[str]) -> list[str]:
  """['--gin.TRAIN_STEPS=10', ...] -> ['TRAIN_STEPS=10', ...] (t5x's flag spelling)."""
  out = []
  for flag in flags:
    body = flag[len('--gin.'):] if flag.startswith('--gin.') else flag
    if '=' not in body:
      raise ValueError(f'Gin override {flag!r} must look like --gin.NAME=VALUE')
    out.append(body)
  return out


def resolve_model(name_or_gin: str):
  """A T5Config from a named config ('mt5_small') or a gin file that sets MODEL_CONFIG."""
  if name_or_gin.endswith('.gin'):
    parse_gin([name_or_gin])
    return macro('MODEL_CONFIG')
  return config_lib.get_config(name_or_gin)
