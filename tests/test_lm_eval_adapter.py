"""lm-evaluation-harness runs a promot_jax checkpoint offline (`--model promot`).

Two local tasks (YAML + a jsonl file read by lm-eval's `dataset_path: json`) run through
lm_eval.simple_evaluate on a tiny byte-vocabulary checkpoint, with the prompt on and off:
a multiple_choice task (loglikelihood) and a generate_until task. Nothing touches the network.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import seqio

pytest.importorskip('lm_eval')

from toy_inputs import host_params  # noqa: E402

from promot_jax.checkpoints import orbax_io  # noqa: E402
from promot_jax.cli import app as cli  # noqa: E402
from promot_jax.model import config, transformer as model

CFG = config.get_config('mt5_tiny', prompt_length=4, dropout_rate=0.0)
BYTES = seqio.ByteVocabulary()
DOCS = [{'digits': '1 2 3', 'label': 1}, {'digits': '3 1 2', 'label': 0},
        {'digits': '4 5', 'label': 1}, {'digits': '9 2 7 1', 'label': 0}]
QUESTION = '{{digits}} Is it sorted? answer:'
MC_TASK = f"""task: promot_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: multiple_choice
doc_to_text: "{QUESTION}"
doc_to_choice: ["False", "True"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = f"""task: promot_toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: generate_until
doc_to_text: "{QUESTION}"
doc_to_target: "{{{{['False', 'True'][label]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(checkpoint dir, task dir, params): a prompt far from the embeddings, so it matters."""
  root = tmp_path_factory.mktemp('lm_eval')
  params = host_params(CFG, seed=11)
  params['prompt']['prompt'] = 3 * np.random.default_rng(0).standard_normal(
      params['prompt']['prompt'].shape).astype(np.float32)
  ckpt = orbax_io.save_params(str(root / 'ckpt'), params, CFG)
  data = root / 'toy.jsonl'
  data.write_text(''.join(json.dumps(d) + '\n' for d in DOCS))
  tasks = root / 'tasks'
  tasks.mkdir()
  (tasks / 'promot_toy_mc.yaml').write_text(MC_TASK.format(data=data))
  (tasks / 'promot_toy_gen.yaml').write_text(GEN_TASK.format(data=data))
  return ckpt, str(tasks), params


@pytest.fixture(scope='module')
def offline():
  saved = {k: os.environ.get(k) for k in ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE')}
  os.environ.update(HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1')
  yield
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture(scope='module')
def results(setup, offline):
  """simple_evaluate with the prompt on (both tasks) and off (the loglikelihood task)."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  import promot_jax.eval.lm_eval_adapter  # noqa: F401  (registers 'promot')
  ckpt, tasks, _ = setup
  manager = TaskManager(include_path=tasks, include_defaults=False)  # skip indexing lm-eval's own
  return {on: lm_eval.simple_evaluate(
      model='promot', model_args=f'checkpoint={ckpt},with_prompt={str(on).lower()},'
                                 'vocabulary=byte,batch_size=4',
      tasks=['promot_toy_mc', 'promot_toy_gen'] if on else ['promot_toy_mc'],
      task_manager=manager, log_samples=True)
      for on in (True, False)}


def direct_loglikelihood(params, context: str, continuation: str, with_prompt: bool) -> float:
  """log P(continuation | context) computed here from the logits, for comparison.

  Zero-padded to one shape (encoder 64, decoder 8): padding is masked in the encoder and lies
  after the target in the causal decoder, so it changes nothing and compiles once.
  """
  enc_ids = BYTES.encode(context) + [BYTES.eos_id]
  target_ids = BYTES.encode(continuation)
  enc = np.zeros((1, 64), np.int32)
  enc[0, :len(enc_ids)] = enc_ids
  target = np.zeros((1, 8), np.int32)
  target[0, :len(target_ids)] = target_ids
  dec = np.concatenate([np.zeros((1, 1), np.int32), target[:, :-1]], axis=1)
  logits = np.asarray(model.compute_logits(CFG, params, enc, dec, with_prompt=with_prompt),
                      np.float64)[0, :len(target_ids)]                 # [T, vocab]
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(log_probs[np.arange(len(target_ids)), target_ids].sum())


def test_results_have_lm_eval_structure(results):
  for on in (True, False):
    found = results[on]['results']['promot_toy_mc']
    assert found['sample_len'] == len(DOCS) and 0.0 <= found['acc,none'] <= 1.0
    assert results[on]['config']['model'] == 'promot'
  found = results[True]['results']['promot_toy_gen']
  assert found['sample_len'] == len(DOCS) and 0.0 <= found['exact_match,none'] <= 1.0
  samples = results[True]['samples']['promot_toy_gen']
  assert len(samples) == len(DOCS) and all(isinstance(s['resps'][0][0], str) for s in samples)
  assert all('\n' not in s['resps'][0][0] for s in samples)  # cut at the stop string


def test_loglikelihoods_are_the_models_and_the_prompt_changes_them(results, setup):
  params = setup[2]
  scores = {}
  for on in (True, False):
    for sample in results[on]['samples']['promot_toy_mc']:
      context = sample['arguments'][0][0]
      assert context.endswith('Is it sorted? answer:')
      for (ctx, cont), (logprob, _) in zip(sample['arguments'], sample['filtered_resps']):
        want = direct_loglikelihood(params, ctx, cont.lstrip(), on)
        assert logprob == pytest.approx(want, abs=1e-3)
        scores[(on, sample['doc_id'], cont)] = logprob
  changed = [abs(scores[(True, d, c)] - scores[(False, d, c)])
             for (on, d, c) in scores if on]
  assert len(changed) == 2 * len(DOCS) and min(changed) > 0.1


def test_rolling_loglikelihood_is_refused_clearly(setup):
  from promot_jax.eval.lm_eval_adapter import PromotLM
  lm = PromotLM(checkpoint=setup[0], vocabulary='byte')
  with pytest.raises(NotImplementedError, match='encoder-decoder'):
    lm.loglikelihood_rolling([])
  with pytest.raises(ValueError, match='Unknown promot model_args'):
    PromotLM(checkpoint=setup[0], vocabulary='byte', prompt=True)


def test_prompt_requested_on_a_checkpoint_without_one(setup, tmp_path):
  from promot_jax.eval.lm_eval_adapter import PromotLM
  bare = {k: v for k, v in setup[2].items() if k != 'prompt'}
  ckpt = orbax_io.save_params(str(tmp_path / 'bare'), bare, CFG.replace(prompt_length=0))
  with pytest.raises(ValueError, match='holds no prompt'):
    PromotLM(checkpoint=ckpt, with_prompt='true', vocabulary='byte')


@pytest.mark.slow  # lm-eval's CLI indexes all of its built-in tasks first (~25 s)
def test_promot_lm_eval_command(setup, offline, tmp_path):
  ckpt, tasks, _ = setup
  out = tmp_path / 'out'
  code = cli.main(['lm-eval', 'run', '--model', 'promot', '--model_args',
                   f'checkpoint={ckpt},with_prompt=true,vocabulary=byte', '--batch_size', '4',
                   '--tasks', 'promot_toy_mc', '--include_path', tasks, '--limit', '2',
                   '--output_path', str(out)])
  assert code == 0
  written = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files
             if f.startswith('results') and f.endswith('.json')]
  assert len(written) == 1
  with open(written[0]) as f:
    found = json.load(f)
  assert found['results']['promot_toy_mc']['sample_len'] == 2
