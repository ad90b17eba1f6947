"""Fault injection on checkpoints: crashes mid-save, damaged checkpoints, a full disk.

Fast tests drive StageCheckpoints directly with a small parameter tree; the slower ones run
the tiny CPU stage through the CLI (module-scoped, one 10-step run reused by all resumes).
"""

import contextlib
import errno
import glob
import io
import json
import logging
import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from promot_jax import cli, tree_util
from promot_jax.checkpoints import manager as manager_lib, orbax_io
from promot_jax.checkpoints.manager import (CheckpointError, CheckpointSaveError,
                                            CorruptCheckpointError, StageCheckpoints)
from promot_jax.model.config import get_config

RUN = 'runs/promot_tiny_cpu.gin'
# orbax's background event loop complains on shutdown after a failed save/restore; harmless.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---- StageCheckpoints level (no training) -------------------------------------------------------
def _tree(scale: float) -> dict:
  return {'encoder': {'w': np.full((4, 8), scale, np.float32)},
          'prompt': {'prompt': np.arange(6, dtype=np.float32).reshape(2, 3) * scale}}


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                tree)


@pytest.fixture
def two_saved(tmp_path):
  """A stage dir holding checkpoints 1 and 2 (values 1.0 and 2.0)."""
  cfg = get_config('mt5_tiny')
  ckpts = StageCheckpoints(str(tmp_path / 'stage'), keep_latest=3)
  for step in (1, 2):
    params = _tree(float(step))
    ckpts.save(step, params, optax.adam(1e-3).init(params), cfg, {'data': {'batches_consumed':
                                                                             step}})
  return ckpts, cfg


def _assert_restores(ckpts: StageCheckpoints, step: int) -> None:
  params = _tree(float(step))
  opt = optax.adam(1e-3).init(params)
  got, _, state = ckpts.restore(step, _abstract(params), _abstract(opt))
  for p, v in tree_util.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(tree_util.flatten(got)[p]), v, err_msg=p)
  assert state['step'] == step and state['data']['batches_consumed'] == step


def _fail_orbax_save(monkeypatch, on_call: int, error: Exception) -> None:
  """StandardCheckpointer.save raises `error` on its `on_call`-th call (1: params, 2: opt)."""
  real, calls = ocp.StandardCheckpointer.save, []

  def save(self, directory, *args, **kwargs):
    calls.append(directory)
    if len(calls) == on_call:
      os.makedirs(directory, exist_ok=True)     # leave some partial output behind
      with open(os.path.join(directory, 'half_written'), 'wb') as f:
        f.write(b'\0' * 100)
      raise error
    return real(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', save)


def _fail_state_json(monkeypatch) -> None:
  real = manager_lib.write_json

  def write(path, value):
    if path.endswith(os.path.join('.tmp', 'state.json')):
      with open(path + '.tmp', 'w') as f:    # a half-written file, as a full disk leaves it
        f.write('{"step": ')
      raise ENOSPC
    return real(path, value)
  monkeypatch.setattr(manager_lib, 'write_json', write)


def _fail_rename(monkeypatch) -> None:
  real = os.rename

  def rename(src, dst):
    if str(src).endswith('.tmp'):
      raise ENOSPC
    return real(src, dst)
  monkeypatch.setattr(os, 'rename', rename)


@pytest.mark.parametrize('where', ['params', 'opt_state', 'tensorstore_text', 'state_json',
                                   'rename'])
def test_disk_full_during_save_is_a_clear_error_and_loses_nothing(two_saved, monkeypatch, where):
  ckpts, cfg = two_saved
  kept_before = ckpts.kept()
  if where == 'params':
    _fail_orbax_save(monkeypatch, 1, ENOSPC)
  elif where == 'opt_state':
    _fail_orbax_save(monkeypatch, 2, ENOSPC)
  elif where == 'tensorstore_text':   # tensorstore reports the errno as text in a ValueError
    _fail_orbax_save(monkeypatch, 1, ValueError('UNKNOWN: Error writing local file: '
                                                '[OS error 28: No space left on device]'))
  elif where == 'state_json':
    _fail_state_json(monkeypatch)
  else:
    _fail_rename(monkeypatch)
  params = _tree(3.0)
  with pytest.raises(CheckpointSaveError) as info:
    ckpts.save(3, params, optax.adam(1e-3).init(params), cfg, {'data': {}})
  message = str(info.value)
  assert isinstance(info.value, ValueError)          # the CLI prints it as one line, exit 2
  assert 'checkpoint_3' in message and 'disk is full' in message
  assert '\n' not in message
  monkeypatch.undo()
  assert sorted(os.listdir(ckpts.dir)) == ['checkpoint_1', 'checkpoint_2', 'kept.json']
  assert ckpts.steps() == [1, 2] and ckpts.kept() == kept_before
  _assert_restores(ckpts, 1)
  _assert_restores(ckpts, 2)
  # and the stage can go on writing once there is space again
  ckpts.save(3, params, optax.adam(1e-3).init(params), cfg, {'data': {'batches_consumed': 3}})
  _assert_restores(ckpts, 3)


def test_a_bug_during_save_is_not_disguised_but_the_tmp_dir_is_removed(two_saved, monkeypatch):
  ckpts, cfg = two_saved
  _fail_orbax_save(monkeypatch, 2, TypeError('not a disk problem'))
  params = _tree(3.0)
  with pytest.raises(TypeError, match='not a disk problem'):
    ckpts.save(3, params, optax.adam(1e-3).init(params), cfg, {'data': {}})
  assert not os.path.exists(ckpts.path(3) + '.tmp') and ckpts.steps() == [1, 2]


def test_unreadable_state_json_is_listed_but_never_breaks_listing(two_saved, caplog):
  ckpts, _ = two_saved
  ckpts.update_metrics(1, {'validation/sequence_accuracy': 0.5})
  with open(os.path.join(ckpts.path(2), 'state.json'), 'w') as f:
    f.write('{"step": 2, "da')                          # truncated mid-write by hand
  assert ckpts.steps() == [1, 2] and ckpts.latest() == 2
  with caplog.at_level(logging.WARNING, logger=manager_lib.__name__):
    assert ckpts.state(2) == {}
    assert ckpts.best_step() in (1, 2)
  assert 'checkpoint_2' in caplog.text and 'state.json' in caplog.text
  with pytest.raises(CorruptCheckpointError, match='checkpoint_2'):
    ckpts.load_state(2)
  with pytest.raises(CorruptCheckpointError, match='checkpoint_2'):
    ckpts.param_shapes(2)
  with open(os.path.join(ckpts.path(2), 'state.json'), 'w') as f:
    f.write('[1, 2]')                                   # valid JSON, wrong kind
  with pytest.raises(CorruptCheckpointError, match='JSON object'):
    ckpts.load_state(2)


def _truncate_params(path: str) -> int:
  files = [f for f in glob.glob(os.path.join(path, 'params', '**', 'd', '*'), recursive=True)
           if os.path.isfile(f)]
  for f in files:
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)
  return len(files)


@pytest.mark.parametrize('damage', ['truncate_params', 'delete_params', 'delete_opt_state'])
def test_damaged_checkpoint_restore_names_the_directory(two_saved, damage):
  ckpts, _ = two_saved
  path = ckpts.path(2)
  if damage == 'truncate_params':
    assert _truncate_params(path) > 0
  elif damage == 'delete_params':
    shutil.rmtree(os.path.join(path, 'params'))
  else:
    for f in glob.glob(os.path.join(path, 'opt_state', '**', 'd', '*'), recursive=True):
      os.remove(f)
  params = _tree(2.0)
  with pytest.raises(CorruptCheckpointError, match='checkpoint_2') as info:
    ckpts.restore(2, _abstract(params), _abstract(optax.adam(1e-3).init(params)))
  assert isinstance(info.value, CheckpointError)
  _assert_restores(ckpts, 1)                            # the neighbour is unaffected


def test_set_aside_renames_and_keeps_the_files(two_saved):
  ckpts, _ = two_saved
  moved = ckpts.set_aside(2, 'broken on purpose')
  assert moved == ckpts.path(2) + '.corrupt'
  assert os.path.exists(os.path.join(moved, 'params')) and ckpts.steps() == [1]
  assert 'broken on purpose' in open(os.path.join(moved, 'CORRUPT.txt')).read()
  assert ckpts.kept()['step'] == 1
  assert ckpts.clean_partial() == [] and os.path.isdir(moved)   # never cleaned automatically


def test_clean_partial_puts_back_a_step_moved_aside_by_a_crashed_resave(two_saved):
  ckpts, _ = two_saved
  os.rename(ckpts.path(2), ckpts.path(2) + '.old')      # crash between the two renames
  os.makedirs(ckpts.path(2) + '.tmp')
  assert ckpts.clean_partial() == ['checkpoint_2.tmp']
  assert ckpts.steps() == [1, 2]
  _assert_restores(ckpts, 2)


# ---- through the trainer (tiny CPU runs) ---------------------------------------------------------
def _train(model_dir, pretrained_path, steps: int) -> tuple[int, str, str]:
  """`promot train` of stage 1 for `steps` (checkpoint every 5): (code, out, err). Stage 1 has no
  dropout (DROPOUT_RATE feeds the model-tuning stage only)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(['train', '--gin_file', RUN, f"--gin.MODEL_DIR='{model_dir}'",
                     f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained_path}'",
                     '--stage', 'prompt_tuning',
                     f'--gin.TRAIN_STEPS={steps}', '--gin.PROMPT_CHECKPOINT_PERIOD=5',
                     '--gin.DROPOUT_RATE=0.1', '--gin.EVAL_BATCHES=1'])
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def trained(tmp_path_factory, pretrained):
  """A stage-1 dir stopped after 10 steps: checkpoint_5 and checkpoint_10."""
  model_dir = tmp_path_factory.mktemp('trained')
  code, _, err = _train(model_dir, pretrained.path, 10)
  assert code == 0, err
  assert StageCheckpoints(str(model_dir / 'prompt_tuning')).steps() == [5, 10]
  return model_dir


def _copy(trained, tmp_path_factory, name):
  dst = tmp_path_factory.mktemp(name) / 'run'
  shutil.copytree(trained, dst)
  return dst, dst / 'prompt_tuning'


def _garble_state(stage_dir, step):
  with open(stage_dir / f'checkpoint_{step}' / 'state.json', 'w') as f:
    f.write('\x00\x00garbage{')


@pytest.fixture(scope='module')
def resumed(trained, pretrained, tmp_path_factory):
  """Each fault applied to a copy of `trained`, then the stage continued to step 15."""
  results = {}
  # 1. a crash mid-save left checkpoint_15.tmp with part of a checkpoint in it
  model_dir, stage = _copy(trained, tmp_path_factory, 'tmp_left')
  partial = stage / 'checkpoint_15.tmp'
  shutil.copytree(stage / 'checkpoint_10' / 'params', partial / 'params')
  with open(partial / 'state.json', 'w') as f:
    f.write('{"step": 15')
  results['tmp_left'] = (*_train(model_dir, pretrained.path, 15), stage)
  # 2. the newest checkpoint's parameter files truncated
  model_dir, stage = _copy(trained, tmp_path_factory, 'truncated')
  assert _truncate_params(str(stage / 'checkpoint_10')) > 0
  results['truncated'] = (*_train(model_dir, pretrained.path, 15), stage)
  # 3. the newest checkpoint's state.json is garbage
  model_dir, stage = _copy(trained, tmp_path_factory, 'bad_state')
  _garble_state(stage, 10)
  results['bad_state'] = (*_train(model_dir, pretrained.path, 15), stage)
  return results


def _final(stage) -> dict:
  return tree_util.flatten(orbax_io.restore_params(str(stage / 'checkpoint_15'), as_numpy=True))


def test_leftover_tmp_is_removed_and_never_taken_as_latest(resumed):
  code, out, err, stage = resumed['tmp_left']
  assert code == 0, err
  assert 'removed an incomplete checkpoint left by a crash: checkpoint_15.tmp' in out
  assert f'resuming from {stage / "checkpoint_10"} (step 10)' in out
  assert not os.path.exists(stage / 'checkpoint_15.tmp')
  assert json.load(open(stage / 'checkpoint_15' / 'state.json'))['data']['batches_consumed'] == 15


@pytest.mark.parametrize('fault', ['truncated', 'bad_state'])
def test_damaged_latest_is_set_aside_and_the_previous_one_resumes(resumed, fault):
  code, out, err, stage = resumed[fault]
  assert code == 0, err
  assert f'WARNING: cannot resume from {stage / "checkpoint_10"}' in out
  assert f'resuming from {stage / "checkpoint_5"} (step 5)' in out
  corrupt = stage / 'checkpoint_10.corrupt'
  assert corrupt.is_dir() and (corrupt / 'params').is_dir()       # kept for a human, not deleted
  assert 'could not be read back' in (corrupt / 'CORRUPT.txt').read_text()
  assert StageCheckpoints(str(stage)).steps()[-1] == 15
  state = json.load(open(stage / 'checkpoint_15' / 'state.json'))
  assert state['data']['batches_consumed'] == 15       # the data position came from step 5


def test_resuming_from_an_older_checkpoint_is_still_exact(resumed):
  """10 steps redone from checkpoint_5 equal 5 steps done from checkpoint_10."""
  reference = _final(resumed['tmp_left'][3])
  for fault in ('truncated', 'bad_state'):
    got = _final(resumed[fault][3])
    for p, v in reference.items():
      np.testing.assert_array_equal(got[p], v, err_msg=f'{fault}: {p}')


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(trained, pretrained,
                                                                  tmp_path_factory):
  model_dir, stage = _copy(trained, tmp_path_factory, 'all_bad')
  _truncate_params(str(stage / 'checkpoint_10'))
  _garble_state(stage, 5)
  code, out, err = _train(model_dir, pretrained.path, 15)
  assert code == 2
  assert 'none of its 2 checkpoint(s) could be restored' in err
  assert str(stage / 'checkpoint_5') in err and str(stage / 'checkpoint_10') in err
  assert len(err.strip().splitlines()) == 1
  assert sorted(n for n in os.listdir(stage) if n.startswith('checkpoint')) == [
      'checkpoint_10', 'checkpoint_5']                   # nothing renamed, nothing written
  assert 'fresh start' not in out


def test_disk_full_mid_run_stops_with_one_line_and_keeps_earlier_checkpoints(
    pretrained, tmp_path, monkeypatch):
  # calls 1-2 write checkpoint_5 (params, opt_state); call 3, checkpoint_10's params, fails
  _fail_orbax_save(monkeypatch, 3, ENOSPC)
  code, _, err = _train(tmp_path / 'full', pretrained.path, 10)
  monkeypatch.undo()
  assert code == 2
  assert 'No space left on device' in err and 'disk is full' in err
  assert len(err.strip().splitlines()) == 1
  stage = tmp_path / 'full' / 'prompt_tuning'
  assert sorted(n for n in os.listdir(stage) if n.startswith('checkpoint')) == ['checkpoint_5']
  assert not (stage / 'done.json').exists()
  ckpts = StageCheckpoints(str(stage))
  ckpts.param_shapes(5)                                  # readable
  assert ckpts.load_state(5)['data']['batches_consumed'] == 5
