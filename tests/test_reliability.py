"""Preemption and numerical faults: a stopped run resumes exactly; NaN never reaches a checkpoint."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from promot_jax import cli, tree_util
from promot_jax.checkpoints import orbax_io
from promot_jax.train.preemption import EXIT_PREEMPTED

RUN = 'runs/promot_tiny_cpu.gin'


def flags(model_dir, pretrained_path, *extra):
  return ['--gin_file', RUN, f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained_path}'", '--stage', 'prompt_tuning',
          '--gin.TRAIN_STEPS=24', '--gin.LOG_EVERY=1', *extra]


def final_params(model_dir, step=24):
  return tree_util.flatten(orbax_io.restore_params(
      os.path.join(model_dir, 'prompt_tuning', f'checkpoint_{step}'), as_numpy=True))


@pytest.mark.slow  # three tiny runs, one in a subprocess: ~1.5-4 min on 2 cores
def test_sigterm_mid_stage_checkpoints_and_the_rerun_resumes_exactly(tmp_path, pretrained):
  straight = tmp_path / 'straight'
  assert cli.main(['train', *flags(straight, pretrained.path)]) == 0

  stopped = tmp_path / 'stopped'
  proc = subprocess.Popen([sys.executable, '-m', 'promot_jax.cli', 'train',
                           *flags(stopped, pretrained.path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  for line in proc.stdout:                      # wait until training is under way
    if 'step 13/24' in line:
      proc.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == EXIT_PREEMPTED, err
  assert 'run the same command again to resume' in err
  saved = [n for n in os.listdir(stopped / 'prompt_tuning') if n.startswith('checkpoint_')]
  stop_step = max(int(n.split('_')[1]) for n in saved)
  assert 13 <= stop_step < 24                    # it finished the step it was in, then saved
  state = json.load(open(stopped / 'prompt_tuning' / f'checkpoint_{stop_step}' / 'state.json'))
  assert state['data']['batches_consumed'] == stop_step

  assert cli.main(['train', *flags(stopped, pretrained.path)]) == 0   # the same command resumes
  a, b = final_params(straight), final_params(stopped)
  for p in a:
    np.testing.assert_array_equal(a[p], b[p], err_msg=p)


def run_flags(model_dir, pretrained_path):
  """`promot run` of both stages, 6 steps each, checkpoints every 3, dropout on."""
  return ['--gin_file', RUN, f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained_path}'", '--gin.PROMPT_TUNING_STEPS=6',
          '--gin.PROMPT_CHECKPOINT_PERIOD=3', '--gin.MODEL_TUNING_STEPS=6',
          '--gin.MODEL_CHECKPOINT_PERIOD=3', '--gin.DROPOUT_RATE=0.1', '--gin.EVAL_BATCHES=1',
          '--gin.LOG_EVERY=1']


def logged_losses(stage_dir) -> dict[int, float]:
  """Step -> training loss as written to TensorBoard (float32, every event file of the stage)."""
  import tensorflow as tf
  out = {}
  for path in glob.glob(os.path.join(stage_dir, 'tb', 'events*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'train/loss':
          out[event.step] = float(tf.make_ndarray(value.tensor)) if value.HasField('tensor') \
              else value.simple_value
  return out


@pytest.mark.slow  # three two-stage runs, two of them subprocesses: ~2-3 min on 2 cores
def test_sigterm_right_after_stage1_then_the_rerun_equals_an_uninterrupted_run(tmp_path,
                                                                              pretrained):
  straight = tmp_path / 'straight'
  assert cli.main(['run', *run_flags(straight, pretrained.path)]) == 0

  stopped = tmp_path / 'stopped'
  command = [sys.executable, '-m', 'promot_jax.cli', 'run', *run_flags(stopped, pretrained.path)]
  with open(tmp_path / 'stderr.txt', 'w') as stderr:   # a file: a full pipe cannot block it
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    for line in proc.stdout:                  # stage 1 prints this after writing done.json
      if line.startswith('[prompt_tuning] done;'):
        proc.send_signal(signal.SIGTERM)
        break
    proc.communicate(timeout=300)
  err = (tmp_path / 'stderr.txt').read_text()
  assert proc.returncode == EXIT_PREEMPTED, err
  assert ('promot run: stage model_tuning stopped before step 1/6 on SIGTERM; run the same '
          'command again to resume.') in err
  assert (stopped / 'prompt_tuning' / 'done.json').exists()
  stage2 = stopped / 'model_tuning'
  assert not stage2.exists() or not any(n.startswith('checkpoint_') for n in os.listdir(stage2))

  rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert '[prompt_tuning] already finished' in rerun.stdout

  for stage in ('prompt_tuning', 'model_tuning'):
    want, got = logged_losses(straight / stage), logged_losses(stopped / stage)
    assert sorted(want) == list(range(1, 7)) and got == want, stage
    a, b = (tree_util.flatten(orbax_io.restore_params(str(d / stage / 'checkpoint_6'),
                                                      as_numpy=True)) for d in (straight, stopped))
    assert a.keys() == b.keys()
    for p in a:
      np.testing.assert_array_equal(a[p], b[p], err_msg=f'{stage}: {p}')
    kept = [json.load(open(d / stage / 'kept.json')) for d in (straight, stopped)]
    assert kept[0]['step'] == kept[1]['step'] and kept[0]['value'] == kept[1]['value']


def test_nonfinite_loss_stops_with_the_step_and_writes_nothing(tmp_path, pretrained, capsys):
  bad = tmp_path / 'nan_prompt.npy'
  np.save(bad, np.full((4, 32), np.nan, np.float32))
  code = cli.main(['train', *flags(tmp_path / 'nan', pretrained.path, "--gin.PROMPT_INIT='file'",
                                   f"--gin.PROMPT_INIT_FILE='{bad}'")])
  assert code == 3
  err = capsys.readouterr().err
  assert 'non-finite loss or gradient at step 1' in err and 'NONFINITE_POLICY' in err
  stage_dir = tmp_path / 'nan' / 'prompt_tuning'
  assert not stage_dir.exists() or not any(n.startswith('checkpoint_')
                                           for n in os.listdir(stage_dir))


def test_nonfinite_policy_skip_drops_the_batches_and_leaves_state_untouched(tmp_path, pretrained,
                                                                          capsys):
  bad = tmp_path / 'nan_prompt.npy'
  np.save(bad, np.full((4, 32), np.nan, np.float32))
  code = cli.main(['train', *flags(tmp_path / 'skip', pretrained.path, "--gin.PROMPT_INIT='file'",
                                   f"--gin.PROMPT_INIT_FILE='{bad}'",
                                   "--gin.NONFINITE_POLICY='skip'", '--gin.TRAIN_STEPS=3',
                                   '--gin.PROMPT_CHECKPOINT_PERIOD=3')])
  out = capsys.readouterr().out
  assert 'batch skipped (3 so far)' in out
  # every step was skipped: the optimizer never touched the (NaN) prompt
  assert code == 0
  assert np.isnan(final_params(tmp_path / 'skip', 3)['prompt/prompt']).all()


def poison_train_batch(monkeypatch, at):
  """The `at`-th training batch (step `at`) gets NaN loss weights: that step alone is non-finite."""
  from promot_jax.train import loop
  real = loop.data.make_batch_iterator

  class Poisoned:
    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      batch, self.count = next(self.inner), self.count + 1
      if self.count == at:
        batch = dict(batch, decoder_loss_weights=np.full(batch['decoder_loss_weights'].shape,
                                                         np.nan, np.float32))
      return batch

    def state(self):
      return self.inner.state()

  def make(*args, **kwargs):
    it = real(*args, **kwargs)
    return Poisoned(it) if args[2] == 'train' else it

  monkeypatch.setattr(loop.data, 'make_batch_iterator', make)


def test_a_nonfinite_step_mid_stage_is_found_though_read_one_step_late(tmp_path, pretrained,
                                                                       monkeypatch, capsys):
  """The trainer reads a step's finite flag after dispatching the next step: step 4's NaN (no
  log or checkpoint at step 4 or 5) still stops the stage naming step 4, checkpoint 3 the last."""
  poison_train_batch(monkeypatch, at=4)
  code = cli.main(['train', *flags(tmp_path / 'stop', pretrained.path, '--gin.TRAIN_STEPS=6',
                                   '--gin.PROMPT_CHECKPOINT_PERIOD=3', '--gin.LOG_EVERY=100')])
  assert code == 3
  assert 'non-finite loss or gradient at step 4' in capsys.readouterr().err
  saved = sorted(n for n in os.listdir(tmp_path / 'stop' / 'prompt_tuning')
                 if n.startswith('checkpoint_'))
  assert saved == ['checkpoint_3']


def test_a_skipped_nonfinite_step_is_never_applied(tmp_path, pretrained, monkeypatch, capsys):
  poison_train_batch(monkeypatch, at=2)
  code = cli.main(['train', *flags(tmp_path / 'skip', pretrained.path, '--gin.TRAIN_STEPS=3',
                                   "--gin.NONFINITE_POLICY='skip'",
                                   '--gin.PROMPT_CHECKPOINT_PERIOD=1')])
  assert code == 0
  assert 'step 2: non-finite loss or gradient, batch skipped (1 so far)' in capsys.readouterr().out
  after = [final_params(tmp_path / 'skip', step)['prompt/prompt'] for step in (1, 2, 3)]
  assert np.isfinite(after[2]).all()
  np.testing.assert_array_equal(after[1], after[0])      # step 2 left the prompt as it was
  assert not np.array_equal(after[2], after[1])          # step 3 trained it
