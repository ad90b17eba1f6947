"""The evaluation suite and `promot eval` on a tiny checkpoint over the offline toy tasks.

Shapes (batch 4, inputs 40, 12 decode steps, mt5_tiny with a 4-vector prompt) are those of
tests/test_decoding.py, so compiled decoding programs are shared when both files run.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import seqio

import promot_tasks.toy  # noqa: F401  pylint: disable=unused-import  (registers the toy tasks)
from promot_jax import cli
from promot_jax.checkpoints import orbax_io, resolve
from promot_jax.eval import suite, task as eval_task
from promot_jax.ginconf import loaders
from promot_jax.model import config, decoding, transformer as model

CFG = config.get_config('mt5_tiny', prompt_length=4)
TOY = 'eval/toy.gin'
BYTES = seqio.ByteVocabulary()


def encoder_batch(examples):
  """The first 4 saved examples' inputs as the suite feeds them: [4, 40], EOS, 0-padded."""
  enc = np.zeros((4, 40), np.int32)
  for i, ex in enumerate(examples[:4]):
    row = BYTES.encode(ex['input']) + [BYTES.eos_id]
    enc[i, :len(row)] = row
  return enc

# A task whose TFDS data cannot be read (no such dataset is registered).
if 'toy_missing_tfds' not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      'toy_missing_tfds', source=seqio.TfdsDataSource('promot_no_such_dataset:1.0.0',
                                                      splits=['validation']),
      output_features={k: seqio.Feature(seqio.ByteVocabulary()) for k in ('inputs', 'targets')},
      preprocessors=[seqio.preprocessors.tokenize], metric_fns=[])


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """(with a prompt, without one): a prompt far from the embeddings changes the outputs."""
  root = tmp_path_factory.mktemp('ckpts')
  params = jax.tree_util.tree_map(np.asarray, model.init_params(CFG, jax.random.PRNGKey(0)))
  params['prompt']['prompt'] = 3 * np.random.default_rng(0).standard_normal(
      params['prompt']['prompt'].shape).astype(np.float32)
  with_prompt = orbax_io.save_params(str(root / 'promot_ckpt'), params, CFG)
  bare = {k: v for k, v in params.items() if k != 'prompt'}
  without = orbax_io.save_params(str(root / 'finetune_ckpt'), bare, CFG.replace(prompt_length=0))
  return with_prompt, without


@pytest.fixture(scope='module')
def toy_config(tmp_path_factory):
  ecfg = loaders.load_eval_config([TOY], [])
  return dataclasses.replace(ecfg, out_dir=str(tmp_path_factory.mktemp('eval')))


def test_prompt_only_for_the_finetuned_task(checkpoints, toy_config, monkeypatch):
  calls = []
  real = decoding.greedy_decode

  def recording(cfg, params, enc, *args, with_prompt=False, **kwargs):
    text = bytes(int(t) - 3 for t in np.asarray(enc)[0] if t > 2).decode()
    calls.append(('toy_reverse' if text.startswith('reverse:') else 'toy_sorted', with_prompt))
    return real(cfg, params, enc, *args, with_prompt=with_prompt, **kwargs)

  monkeypatch.setattr(decoding, 'greedy_decode', recording)
  results = suite.evaluate_suite(toy_config, [checkpoints[0]])['promot_ckpt']
  assert set(calls) == {('toy_sorted', True), ('toy_reverse', False)}
  entries = results['tasks']
  assert entries['toy_sorted']['with_prompt'] and not entries['toy_reverse']['with_prompt']
  # The saved outputs are those of the model WITH the prompt for toy_sorted: decode the first
  # batch both ways directly; the prompt makes a visible difference.
  examples = entries['toy_sorted']['examples']
  cfg, params = resolve.load_checkpoint(checkpoints[0])
  decoded = {p: [BYTES.decode(r.tolist()) for r in np.asarray(
      real(cfg, params, encoder_batch(examples), 12, with_prompt=p))] for p in (True, False)}
  assert decoded[True] != decoded[False]
  assert [ex['output'] for ex in examples[:4]] == decoded[True]


def test_checkpoint_without_prompt_is_a_clear_error(checkpoints, toy_config, capsys):
  with pytest.raises(ValueError, match='finetune_ckpt has no prompt'):
    suite.evaluate_suite(toy_config, [checkpoints[1]])
  code = cli.main(['eval', '--gin_file', TOY, '--checkpoint', checkpoints[1],
                   f"--gin.OUT_DIR='{toy_config.out_dir}'"])
  err = capsys.readouterr().err
  assert code == 2 and 'has no prompt' in err and 'FINETUNED_WITH_PROMPT=False' in err
  assert len(err.strip().splitlines()) == 1


def test_bad_tasks_are_error_entries_and_the_rest_is_written(checkpoints, tmp_path, capsys):
  out = tmp_path / 'out'
  code = cli.main(['eval', '--gin_file', TOY, '--checkpoint', checkpoints[0],
                   f"--gin.OUT_DIR='{out}'", '--gin.FINETUNED_WITH_PROMPT=False',
                   "--gin.ICL_TASKS=['toy_revers', 'toy_missing_tfds', 'toy_reverse']"])
  assert code == 1
  captured = capsys.readouterr()
  results = json.load(open(out / 'promot_ckpt' / 'results.json'))
  entries = results['tasks']
  unknown = entries['toy_revers']['error']
  assert 'Unknown task' in unknown and 'toy_reverse' in unknown          # close names offered
  assert 'promot_no_such_dataset' in entries['toy_missing_tfds']['error']
  assert entries['toy_sorted']['num_examples'] == 8
  assert entries['toy_sorted']['with_prompt'] is False                  # FINETUNED_WITH_PROMPT
  assert entries['toy_reverse']['num_examples'] == 8 and 'error' not in entries['toy_reverse']
  assert sorted(results['failed']) == ['toy_missing_tfds', 'toy_revers']
  assert 'task toy_revers failed' in captured.err and 'task toy_missing_tfds failed' in captured.err
  assert 'ERROR' in captured.out                        # the summary table shows the failures


def test_promot_eval_end_to_end(checkpoints, tmp_path, capsys):
  out = tmp_path / 'out'
  assert cli.main(['eval', '--gin_file', TOY, '--checkpoint', checkpoints[0],
                   f"--gin.OUT_DIR='{out}'", '--gin.MAX_EVAL_EXAMPLES=6']) == 0
  printed = capsys.readouterr().out
  assert 'toy_sorted: 6 examples' in printed and 'examples/s' in printed   # progress
  assert 'toy_reverse' in printed.split('-----')[-1]                          # summary table
  results = json.load(open(out / 'promot_ckpt' / 'results.json'))
  assert results['checkpoint']['has_prompt'] and not results['failed']
  sorted_, reverse = results['tasks']['toy_sorted'], results['tasks']['toy_reverse']
  assert sorted_['metric'] == 'accuracy' and 0 <= sorted_['accuracy'] <= 100
  assert reverse['metric'] == 'exact_match' and 0 <= reverse['exact_match'] <= 100
  assert (sorted_['shots'], reverse['shots']) == (0, 0)
  assert sorted_['num_examples'] == 6 and len(reverse['examples']) == 5
  assert set(reverse['examples'][0]) == {'input', 'output', 'prediction', 'target'}
  assert reverse['examples'][0]['input'].startswith('reverse: ')
  assert 0.0 <= reverse['format_rate'] <= 1.0
  assert results['averages'] == {'0shot': reverse['exact_match']}
  summary = json.load(open(out / 'summary.json'))
  assert summary['promot_ckpt']['tasks']['toy_reverse'] == reverse['exact_match']


def test_stage_dir_means_its_kept_checkpoint(checkpoints, tmp_path):
  stage = tmp_path / 'model_tuning'
  os.makedirs(stage)
  os.symlink(checkpoints[0], stage / 'checkpoint_30')
  (stage / 'kept.json').write_text(json.dumps({'step': 30, 'path': '/moved/away/checkpoint_30'}))
  resolved = resolve.resolve_checkpoint(str(stage))
  assert resolved == str(stage / 'checkpoint_30')
  assert resolve.checkpoint_name(resolved) == 'model_tuning_checkpoint_30'
  with pytest.raises(FileNotFoundError, match='does not exist'):
    resolve.resolve_checkpoint(str(tmp_path / 'nope'))


def test_rank_classification_and_validation_metrics(checkpoints, toy_config):
  ecfg = dataclasses.replace(toy_config, classification_mode='rank', icl_tasks=())
  plan, = suite.plan_tasks(ecfg)
  assert (plan.mode, plan.labels, plan.with_prompt) == ('rank', ('False', 'True'), True)
  cfg, params = resolve.load_checkpoint(checkpoints[0])
  entry = eval_task.evaluate_task(cfg, params, plan, batch_size=4, max_examples=4,
                                   task_feature_lengths={'inputs': 40, 'targets': 12},
                                   log=lambda m: None)
  assert entry['mode'] == 'rank' and entry['format_rate'] is None
  # The chosen label is the one score_candidates ranks first.
  cands = np.zeros((4, 2, 12), np.int32)
  for c, label in enumerate(('False', 'True')):
    ids = BYTES.encode(label) + [BYTES.eos_id]
    cands[:, c, :len(ids)] = ids
  best = np.asarray(decoding.score_candidates(cfg, params, encoder_batch(entry['examples']),
                                              cands, with_prompt=True)).argmax(-1)
  assert [ex['prediction'] for ex in entry['examples'][:4]] == [('False', 'True')[i] for i in best]
  # The trainer's hook: decode-based accuracy of a stage's task.
  val = eval_task.validation_metrics(cfg, params, 'toy_sorted', 'validation',
                                      task_feature_lengths={'inputs': 40, 'targets': 12},
                                      batch_size=4, max_examples=8, with_prompt=True,
                                      decoding_method='beam', metric='accuracy',
                                      labels=('False', 'True'))
  assert set(val) == {'validation/decode_accuracy', 'validation/decode_num_examples',
                      'validation/decode_score'}
  assert val['validation/decode_score'] == val['validation/decode_accuracy']
  assert val['validation/decode_num_examples'] == 8


def test_bad_eval_config_is_a_clear_error(checkpoints, capsys):
  assert cli.main(['eval', '--gin_file', TOY, '--checkpoint', checkpoints[0],
                   "--gin.DECODING='sample'"]) == 2
  assert "DECODING must be 'beam' or 'greedy'" in capsys.readouterr().err
