"""`promot run` / `promot train` end to end on the tiny CPU run, and its clear failures."""

import json
import os

import jax
import numpy as np
import pytest

from promot_jax import cli, tree_util
from promot_jax.checkpoints import orbax_io, resolve
from promot_jax.eval import task as eval_task

RUN = 'runs/promot_tiny_cpu.gin'


def listing(root):
  """Every file under root with its size and mtime: to prove nothing was overwritten."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      out[p] = (os.path.getsize(p), os.path.getmtime(p))
  return out


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, pretrained):
  model_dir = str(tmp_path_factory.mktemp('run'))
  code = cli.main(['run', '--gin_file', RUN, f"--gin.MODEL_DIR='{model_dir}'",
                   f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained.path}'"])
  assert code == 0
  return model_dir


def _flags(model_dir, pretrained_path, *extra):
  return ['--gin_file', RUN, f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained_path}'", *extra]


def test_run_goes_stage1_then_stage2_and_keeps_the_best(finished_run, pretrained):
  src = tree_util.flatten(pretrained.params)
  for stage in ('prompt_tuning', 'model_tuning'):
    d = os.path.join(finished_run, stage)
    kept = json.load(open(os.path.join(d, 'kept.json')))
    assert os.path.isdir(kept['path']) and kept['value'] is not None
    assert os.path.exists(os.path.join(d, 'done.json'))
    assert os.path.exists(os.path.join(kept['path'], 'prompt.npy'))
    steps = sorted(int(n.split('_')[1]) for n in os.listdir(d) if n.startswith('checkpoint_'))
    assert 30 in steps and len(steps) <= 3       # keep-latest 2 + the best
  stage1 = jax.tree_util.tree_map(np.asarray, resolve.load_checkpoint(json.load(open(
      os.path.join(finished_run, 'prompt_tuning', 'kept.json')))['path'])[1])   # + its base
  stage2 = orbax_io.restore_params(json.load(open(os.path.join(
      finished_run, 'model_tuning', 'kept.json')))['path'], as_numpy=True)
  # Stage 1 changed only the prompt; stage 2 started from stage 1's prompt and kept it.
  for p, v in tree_util.flatten(stage1).items():
    if p != 'prompt/prompt':
      np.testing.assert_array_equal(v, src[p])
  np.testing.assert_array_equal(stage2['prompt']['prompt'], stage1['prompt']['prompt'])
  assert np.abs(stage2['encoder']['layers_0']['mlp']['wo']['kernel']
                - src['encoder/layers_0/mlp/wo/kernel']).max() > 0


def test_loss_falls_on_the_learnable_toy_task(finished_run):
  def losses(stage):
    d = os.path.join(finished_run, stage)
    return {int(n.split('_')[1]): json.load(open(os.path.join(d, n, 'state.json')))
            for n in os.listdir(d) if n.startswith('checkpoint_')}
  s2 = losses('model_tuning')
  first_val = json.load(open(os.path.join(finished_run, 'run.json')))
  assert first_val['architecture']['emb_dim'] == 32
  last = s2[max(s2)]
  assert last['train_metrics']['loss'] < 0.69  # below chance for a two-way label (log 2)


def test_logged_param_norm_is_the_norm_of_the_parameters_saved_at_that_step(finished_run):
  # Taken by the trainer on log steps only (not by every train step): the stage-2 weights'
  # norm after step 30, which is also the step that checkpoint 30 saved.
  d = os.path.join(finished_run, 'model_tuning', 'checkpoint_30')
  logged = json.load(open(os.path.join(d, 'state.json')))['train_metrics']['param_norm']
  saved = tree_util.flatten(orbax_io.restore_params(d, as_numpy=True))
  trained = [v for p, v in saved.items() if not p.startswith('prompt/')]
  assert len(trained) == len(saved) - 1
  expected = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in trained))
  np.testing.assert_allclose(logged, expected, rtol=1e-5)


def test_rerunning_a_finished_run_skips_and_changes_nothing(finished_run, pretrained, capsys):
  before = listing(finished_run)
  assert cli.main(['run', *_flags(finished_run, pretrained.path)[0:]]) == 0
  assert 'already finished' in capsys.readouterr().out
  after = listing(finished_run)
  assert {k: v for k, v in after.items() if '/tb/' not in k} == \
      {k: v for k, v in before.items() if '/tb/' not in k}


@pytest.mark.parametrize('extra, message', [
    ("--gin.MIXTURE_OR_TASK_NAME='toy_sortd'", 'toy_sorted'),          # unknown task: close names
    ('--gin.stages.prompt_tuning.learnin_rate=3', 'learnin_rate'),      # gin typo
    ('--gin.PROMPT_LENGTH=6', 'prompt_length'),                         # differs from MODEL_DIR's
    ('--gin.config.T5Config.mlp_dim=128', 'different model'),           # another architecture
    ('--gin.NUM_EMBEDDINGS=200', 'vocabulary has 259 ids'),             # tokenizer ids > embedding
    ("--gin.TASK_FEATURE_LENGTHS={'inputs': 0, 'targets': 8}", 'must be positive'),
])
def test_bad_input_is_a_clear_error_and_model_dir_untouched(finished_run, pretrained, capsys,
                                                             extra, message):
  before = listing(finished_run)
  assert cli.main(['run', *_flags(finished_run, pretrained.path, extra)]) == 2
  assert message in capsys.readouterr().err
  assert listing(finished_run) == before


def test_prompt_length_differing_from_the_stage1_checkpoint(finished_run, pretrained, tmp_path,
                                                            capsys):
  stage1 = json.load(open(os.path.join(finished_run, 'prompt_tuning', 'kept.json')))['path']
  before = listing(finished_run)
  assert cli.main(['train', *_flags(tmp_path / 'fresh', pretrained.path, '--gin.PROMPT_LENGTH=6',
                                    f"--gin.PREVIOUS_CHECKPOINT_PATH='{stage1}'"),
                   '--stage', 'model_tuning']) == 2
  err = capsys.readouterr().err
  assert 'prompt of length 4' in err and 'PROMPT_LENGTH=4' in err
  assert listing(finished_run) == before          # the stage-1 run it read from
  assert not os.path.exists(tmp_path / 'fresh')   # the command's own MODEL_DIR: never made


def test_stage2_without_a_stage1_checkpoint_is_a_clear_error(tmp_path, pretrained, capsys):
  assert cli.main(['train', *_flags(tmp_path / 'empty', pretrained.path),
                   '--stage', 'model_tuning']) == 2
  err = capsys.readouterr().err
  assert 'prompt_tuning' in err and 'has none' in err
  assert not os.path.exists(tmp_path / 'empty')   # nothing written, not even run.json


def test_resumed_stage_equals_an_uninterrupted_one(tmp_path, pretrained):
  """Stopping after 20 steps and continuing to 30 gives bit-identical parameters: the data
  iterator position and the step-keyed dropout rng are restored with the checkpoint."""
  def train(model_dir, steps):
    assert cli.main(['train', *_flags(model_dir, pretrained.path), '--stage', 'model_tuning',
                     f'--gin.PREVIOUS_CHECKPOINT_PATH=\'{pretrained.path}\'',
                     '--gin.PROMPT_INIT=\'uniform\'', '--gin.DROPOUT_RATE=0.1',
                     f'--gin.TRAIN_STEPS={steps}']) == 0
    return orbax_io.restore_params(os.path.join(model_dir, 'model_tuning', 'checkpoint_30'),
                                   as_numpy=True) if steps == 30 else None

  straight = train(tmp_path / 'straight', 30)
  train(tmp_path / 'resumed', 20)
  resumed = train(tmp_path / 'resumed', 30)
  state = json.load(open(tmp_path / 'resumed' / 'model_tuning' / 'checkpoint_30' / 'state.json'))
  assert state['data']['batches_consumed'] == 30
  for p, v in tree_util.flatten(straight).items():
    np.testing.assert_array_equal(v, tree_util.flatten(resumed)[p], err_msg=p)


def test_kept_checkpoint_is_chosen_by_the_decoding_metric(finished_run):
  """The run keeps the checkpoint with the best greedy-decoding accuracy (promot eval's code)."""
  for stage in ('prompt_tuning', 'model_tuning'):
    d = os.path.join(finished_run, stage)
    kept = json.load(open(os.path.join(d, 'kept.json')))
    assert kept['metric'] == 'validation/decode_accuracy'
    scores = {}
    for n in os.listdir(d):
      if n.startswith('checkpoint_'):
        metrics = json.load(open(os.path.join(d, n, 'state.json')))['metrics']
        assert 0 <= metrics['validation/decode_accuracy'] <= 100
        scores[int(n.split('_')[1])] = metrics['validation/decode_accuracy']
    assert kept['value'] == max(scores.values())


def test_keep_decode_beam_decodes_the_validation_split_with_beam_search(tmp_path, pretrained,
                                                                        monkeypatch):
  seen = []
  original = eval_task.validation_metrics

  def recording(*args, **kwargs):
    seen.append(kwargs['decoding_method'])
    return original(*args, **kwargs)

  monkeypatch.setattr(eval_task, 'validation_metrics', recording)
  assert cli.main(['train', *_flags(tmp_path / 'beam', pretrained.path), '--stage',
                   'prompt_tuning', '--gin.TRAIN_STEPS=2', '--gin.PROMPT_CHECKPOINT_PERIOD=2',
                   "--gin.KEEP_DECODE='beam'"]) == 0
  assert seen == ['beam']
  assert cli.main(['train', *_flags(tmp_path / 'bad', pretrained.path), '--stage',
                   'prompt_tuning', "--gin.KEEP_DECODE='sample'"]) == 2
