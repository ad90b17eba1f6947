"""A stage's checkpoints: periodic, atomic, keep-latest-N plus keep-best, resumable.

Layout under MODEL_DIR/<stage name>/:
  checkpoint_<step>/params/      all parameters (orbax), readable by `promot info`/`convert`
  checkpoint_<step>/promot.json  model config + metadata (see orbax_io)
  checkpoint_<step>/opt_state/   optimizer state of the trainable subtree (orbax)
  checkpoint_<step>/state.json   step, data-iterator position, validation metrics
  checkpoint_<step>/prompt.npy   the prompt, when the model has one (prompt_<task>.npy per task)
  kept.json                      the step the next stage starts from (best by the metric)
  metrics.jsonl                  every validation, one line per checkpoint step (history;
                                 it outlives pruned checkpoints; a resumed step's later line wins)
  done.json                      written when the stage has run all its steps
A checkpoint is written to checkpoint_<step>.tmp/ and renamed only once complete, so a
process that dies mid-save never leaves something that looks like the latest checkpoint.
A save that fails (e.g. a full disk) removes its .tmp dir and raises CheckpointSaveError;
the checkpoints already written are untouched. A checkpoint found damaged on resume is
renamed to checkpoint_<step>.corrupt (never deleted) by `set_aside`; see docs/RELIABILITY.md.
"""

from __future__ import annotations

import errno
import json
import logging
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from promot_jax import paths
from promot_jax.checkpoints import orbax_io
from promot_jax.model import prompt as prompt_lib
from promot_jax.model.config import T5Config

_STEP_DIR = re.compile(r'^checkpoint_(\d+)$')
_log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint cannot be written or read; the message says which and what to do.

  A ValueError so the CLI prints it as one line (exit 2) rather than a traceback.
  """


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (disk full, permissions ...); earlier ones are intact."""


class CorruptCheckpointError(CheckpointError):
  """A complete-looking checkpoint directory cannot be read back."""


HISTORY_FILE = 'metrics.jsonl'


def read_history(stage_dir: str) -> list[dict]:
  """The validation history of a stage (metrics.jsonl): one dict per step, in step order.

  A step validated twice (a resumed run) keeps its last line; a torn last line is skipped.
  """
  by_step: dict[int, dict] = {}
  path = paths.join(stage_dir, HISTORY_FILE)
  if not paths.exists(path):
    return []
  for line in paths.read_text(path).splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and isinstance(row.get('step'), int):
      by_step[row['step']] = row
  return [by_step[s] for s in sorted(by_step)]


def write_json(path: str, value: Any) -> None:
  """Write a JSON file whole (paths.write_json: a reader never sees half of it)."""
  paths.write_json(path, value)


def _read_json(path: str) -> Optional[dict]:
  """The JSON object in `path`, None if there is no such file; CheckpointError if unreadable."""
  if not paths.exists(path):
    return None
  try:
    return paths.read_json(path)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise CheckpointError(f'Cannot read {path}: {type(e).__name__}: {e}. Fix or move the file '
                          'aside and rerun.') from e


def _is_out_of_space(e: BaseException) -> bool:
  if isinstance(e, OSError):
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
  text = str(e)   # tensorstore reports I/O errors as ValueError/RuntimeError with the text
  return 'No space left' in text or 'Disk quota exceeded' in text


def _one_line(e: BaseException, limit: int = 500) -> str:
  """`Type: message` on one line (orbax/tensorstore messages span several), cut to `limit`."""
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:limit]}{"..." if len(text) > limit else ""}'


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class StageCheckpoints:
  """Saves, lists, restores and prunes the checkpoints of one stage."""

  def __init__(self, stage_dir: str, keep_latest: int = 2, keep_metric: Optional[str] = None,
               keep_mode: str = 'max'):
    self.dir = paths.absolute(stage_dir)
    self.keep_latest = keep_latest
    self.keep_metric = keep_metric
    self.keep_mode = keep_mode

  # ---- listing -------------------------------------------------------------------------------
  def path(self, step: int) -> str:
    return paths.join(self.dir, f'checkpoint_{step}')

  def steps(self) -> list[int]:
    """Complete checkpoints only (leftover .tmp dirs from a crash are ignored)."""
    found = []
    for name in paths.listdir(self.dir):
      m = _STEP_DIR.match(name)
      if m and paths.exists(paths.join(self.dir, name, 'state.json')):
        found.append(int(m.group(1)))
    return sorted(found)

  def latest(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def state(self, step: int) -> dict:
    """state.json of `step`, or {} (with a warning) when it is missing or unreadable."""
    try:
      return self.load_state(step)
    except CorruptCheckpointError as e:
      _log.warning('%s', e)
      return {}

  def load_state(self, step: int) -> dict:
    """state.json of `step`; CorruptCheckpointError if it cannot be read as a JSON object."""
    path = paths.join(self.path(step), 'state.json')
    try:
      state = paths.read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
      raise CorruptCheckpointError(f'Cannot read {path}: {_one_line(e)}') from e
    if not isinstance(state, dict):
      raise CorruptCheckpointError(f'{path} does not hold a JSON object.')
    return state

  def best_step(self) -> Optional[int]:
    """The step with the best keep_metric among saved checkpoints (latest if none has it)."""
    scored = [(s, self.state(s).get('metrics', {}).get(self.keep_metric)) for s in self.steps()]
    scored = [(s, v) for s, v in scored if v is not None and np.isfinite(v)]
    if not scored:
      return self.latest()
    sign = 1 if self.keep_mode == 'max' else -1
    # ties go to the earlier step: fewer updates for the same score
    return max(scored, key=lambda sv: (sign * sv[1], -sv[0]))[0]

  def kept(self) -> Optional[dict]:
    return _read_json(paths.join(self.dir, 'kept.json'))

  def is_done(self, train_steps: Optional[int] = None) -> bool:
    """True once the stage ran all its steps (a larger `train_steps` re-opens it)."""
    done = _read_json(paths.join(self.dir, 'done.json'))
    if done is None:
      return False
    return train_steps is None or done.get('train_steps', 0) >= train_steps

  # ---- writing -------------------------------------------------------------------------------
  def save(self, step: int, params: Mapping[str, Any], opt_state: Any, cfg: T5Config,
           state: Mapping[str, Any], base: Optional[Mapping[str, Any]] = None) -> str:
    """Write checkpoint_<step> atomically, then prune and update kept.json.

    With `base` (loading.base_reference) `params` is only what the stage trained; restoring
    rebuilds the rest from that base (loading.load_pretrained does).

    On failure (e.g. ENOSPC) the partial checkpoint_<step>.tmp is removed and
    CheckpointSaveError is raised; the checkpoints written before are left as they were.
    """
    final, tmp = self.path(step), self.path(step) + '.tmp'
    if paths.is_remote(final):
      tmp = final   # GCS has no atomic rename: state.json, written last, marks it complete
    try:
      self._write(step, final, tmp, params, opt_state, cfg, state, base)
    except Exception as e:
      if jax.process_index() == 0:
        paths.rmtree(tmp)
      if not isinstance(e, OSError) and not _is_out_of_space(e):
        raise
      hint = (' The disk is full: free space (or lower keep_latest), then rerun the same '
              'command to resume from the last checkpoint.' if _is_out_of_space(e) else '')
      raise CheckpointSaveError(
          f'Could not write checkpoint {final}: {_one_line(e)}.{hint} The partial '
          f'{paths.basename(tmp)} was removed; the checkpoints on disk are intact: '
          f'{[self.path(s) for s in self.steps()] or "none"}.') from e
    return final

  def _write(self, step: int, final: str, tmp: str, params: Mapping[str, Any], opt_state: Any,
             cfg: T5Config, state: Mapping[str, Any],
             base: Optional[Mapping[str, Any]] = None) -> None:
    if jax.process_index() == 0:
      paths.rmtree(tmp)
      paths.makedirs(tmp)
    _sync(f'ckpt_mkdir_{step}')
    meta = {'step': step, 'stage_dir': self.dir, **({'base': dict(base)} if base else {})}
    orbax_io.save_params(tmp, params, cfg, meta)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(paths.join(tmp, 'opt_state'), opt_state)
    checkpointer.wait_until_finished()
    _sync(f'ckpt_written_{step}')
    if jax.process_index() == 0:
      for name, data in prompt_lib.npy_files(params).items():
        paths.write_bytes(paths.join(tmp, name), data)
      write_json(paths.join(tmp, 'state.json'), dict(state, step=step))
      if tmp == final:
        pass   # written in place (GCS); state.json came last
      elif paths.exists(final):
        # Re-saving a step (e.g. after a resume): move the old one aside first, so a crash
        # here leaves it recoverable (clean_partial puts it back) rather than gone.
        old = final + '.old'
        paths.rmtree(old)
        paths.rename(final, old)
        paths.rename(tmp, final)
        paths.rmtree(old)
      else:
        paths.rename(tmp, final)
      self._prune_and_keep()
    _sync(f'ckpt_done_{step}')

  def update_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
    """Attach validation metrics to a saved checkpoint, then re-decide what is kept."""
    if jax.process_index() == 0:
      path = paths.join(self.path(step), 'state.json')
      state = self.state(step)
      state['metrics'] = {**state.get('metrics', {}), **dict(metrics)}
      write_json(path, state)
      paths.append_text(paths.join(self.dir, HISTORY_FILE),
                        json.dumps({'step': step, **dict(metrics)}, sort_keys=True) + '\n')
      self._prune_and_keep()
    _sync(f'ckpt_metrics_{step}')

  def _prune_and_keep(self) -> None:
    steps = self.steps()
    best = self.best_step()
    keep = set(steps[-self.keep_latest:]) | ({best} if best is not None else set())
    for s in steps:
      if s not in keep:
        paths.rmtree(self.path(s))
    if best is not None:
      value = self.state(best).get('metrics', {}).get(self.keep_metric)
      write_json(paths.join(self.dir, 'kept.json'),
                  {'step': best, 'path': self.path(best), 'metric': self.keep_metric,
                   'value': value})

  def mark_done(self, summary: Mapping[str, Any]) -> None:
    if jax.process_index() == 0:
      write_json(paths.join(self.dir, 'done.json'), dict(summary))
    _sync('stage_done')

  def clean_partial(self) -> list[str]:
    """Remove checkpoint_<step>.tmp dirs left by a crash; returns what was removed.

    A checkpoint_<step>.old left by a crash while re-saving that step is put back when
    checkpoint_<step> itself is missing, and removed otherwise.
    """
    removed = []
    if jax.process_index() == 0:
      for name in paths.listdir(self.dir):
        path = paths.join(self.dir, name)
        if name.startswith('checkpoint_') and name.endswith('.tmp'):
          paths.rmtree(path)
          removed.append(name)
        elif name.startswith('checkpoint_') and name.endswith('.old'):
          if paths.exists(path[:-len('.old')]):
            paths.rmtree(path)
            removed.append(name)
          else:
            paths.rename(path, path[:-len('.old')])
    return removed

  def set_aside(self, step: int, reason: str) -> str:
    """Rename an unreadable checkpoint_<step> to checkpoint_<step>.corrupt (kept for a human).

    It is then no longer listed, restored or pruned; kept.json is re-decided without it.
    Returns the new path.
    """
    src = self.path(step)
    dst = src + '.corrupt'
    if jax.process_index() == 0:
      n = 1
      while paths.exists(dst):
        n += 1
        dst = f'{src}.corrupt{n}'
      paths.rename(src, dst)
      _log.warning('set aside unreadable checkpoint %s as %s: %s', src, dst, reason)
      try:
        paths.write_text(paths.join(dst, 'CORRUPT.txt'),
                         f'Set aside on resume because it could not be read back:\n{reason}\n')
        if self.steps():
          self._prune_and_keep()
      except OSError as e:  # a note and kept.json are nice to have; the rename is what matters
        _log.warning('could not annotate %s: %s', dst, e)
    _sync(f'ckpt_set_aside_{step}')
    return dst

  # ---- reading -------------------------------------------------------------------------------
  def param_shapes(self, step: int) -> Any:
    """The stored parameter shapes of `step`; CorruptCheckpointError if they cannot be read."""
    self.load_state(step)   # the cheapest check first
    try:
      return orbax_io.param_shapes(self.path(step))
    except Exception as e:  # orbax/tensorstore raise many kinds of errors for damaged files
      raise CorruptCheckpointError(f'Cannot read the parameter metadata of {self.path(step)}: '
                                   f'{_one_line(e)}') from e

  def base_of(self, step: int) -> Optional[dict]:
    """The base reference of a checkpoint that stores only its stage's part (else None)."""
    try:
      return orbax_io.read_meta(self.path(step)).get('base')
    except (OSError, ValueError) as e:
      raise CorruptCheckpointError(f'Cannot read the metadata of {self.path(step)}: '
                                   f'{_one_line(e)}') from e

  def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any,
              ) -> tuple[Any, Any, dict]:
    """(params, opt_state, state.json) laid out as the abstract trees' shardings say.

    Raises CorruptCheckpointError, naming the directory and the underlying error, when any
    part cannot be read.
    """
    path = self.path(step)
    state = self.load_state(step)
    try:
      params = orbax_io.restore_params(path, abstract_params)
      opt_state = ocp.StandardCheckpointer().restore(paths.join(path, 'opt_state'),
                                                     abstract_opt_state)
    except Exception as e:  # orbax/tensorstore raise many kinds of errors for damaged files
      raise CorruptCheckpointError(f'Cannot restore {path}: {_one_line(e)}') from e
    return params, opt_state, state
