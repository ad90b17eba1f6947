"""Metrics against sacrebleu / rouge-score called directly, and hand-worked cases."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from promot_jax.eval import metrics

REFS = ['the cat sat on the mat', 'il fait beau aujourd\'hui', 'a quick brown fox jumps']
HYPS = ['the cat sat on a mat', 'il fait beau', 'the quick brown fox jumped over']


def test_accuracy():
  assert metrics.accuracy(['True', 'False', 'True', 'False'],
                          ['True', 'True', 'True', 'False']) == 75.0
  assert metrics.accuracy([], []) == 0.0
  with pytest.raises(ValueError, match='2 targets but 1 predictions'):
    metrics.accuracy(['a', 'b'], ['a'])


@pytest.mark.parametrize('prediction, answers, expected', [
    ('The  Eiffel tower!', 'eiffel tower', 100.0),         # case, article, spaces, punctuation
    ('an apple', ['Apple'], 100.0),
    ('Paris, France', ['paris', 'Paris France'], 100.0),   # second accepted answer matches
    ('Lyon', ['Paris', 'paris, france'], 0.0),
    ('theatre', 'atre', 0.0),                               # articles only as whole words
])
def test_exact_match_hand_worked(prediction, answers, expected):
  assert metrics.exact_match([answers], [prediction]) == expected


def test_exact_match_is_the_mean_over_examples_of_the_best_answer():
  assert metrics.exact_match([['a', 'b'], 'c', ['d']], ['B', 'x', 'the d']) == pytest.approx(
      200 / 3)
  assert metrics.normalize_answer('  The Eiffel-Tower, an icon ') == 'eiffeltower icon'


def test_bleu_equals_sacrebleu():
  direct = sacrebleu.corpus_bleu(HYPS, [REFS], smooth_method='exp', tokenize='intl').score
  assert metrics.bleu(REFS, HYPS) == pytest.approx(direct)
  assert metrics.bleu(REFS, REFS) == pytest.approx(100.0)
  # Several references per example: one reference stream per position.
  two = [[r, h] for r, h in zip(REFS, HYPS)]
  assert metrics.bleu(two, HYPS) == pytest.approx(100.0)
  assert metrics.bleu(REFS, HYPS, tokenize='13a') == pytest.approx(
      sacrebleu.corpus_bleu(HYPS, [REFS], tokenize='13a').score)


def test_rouge2_equals_rouge_score_mean_times_100():
  scorer = rouge_scorer.RougeScorer(['rouge2'], use_stemmer=True)
  direct = 100 * sum(scorer.score(r, h)['rouge2'].fmeasure for r, h in zip(REFS, HYPS)) / 3
  assert metrics.rouge2(REFS, HYPS) == pytest.approx(direct)
  assert 0 < direct < 100


def test_compute_by_name():
  assert metrics.compute('accuracy', [['True', 'x']], ['True']) == 100.0
  assert metrics.compute('exact_match', [['x', 'Yes']], ['yes.']) == 100.0
  with pytest.raises(ValueError, match='Unknown metric'):
    metrics.compute('f1', ['a'], ['a'])


def test_postprocess_cuts_at_the_next_example_and_takes_the_first_word():
  assert metrics.postprocess('Paris\n\nQ: who? A: me') == 'Paris'
  assert metrics.postprocess(' Bonjour. Translate English to French: x') == 'Bonjour.'
  assert metrics.postprocess('True, because it says so', classification=True) == 'True'
  assert metrics.postprocess(b'False.\n\nmore', classification=True) == 'False'


def test_format_rate():
  outputs = ['True', 'False, since', 'Paris', 'true', 'Q: True', 'False\n\nQ: x', '']
  # 'true' is not the label (case matters); 'Q: True' is a new example, cut to ''.
  assert metrics.format_rate(outputs, {'True', 'False'}) == pytest.approx(3 / 7)
  assert metrics.format_rate(['Q: True'], {'True'}, postprocessed=True) == 0.0
  assert metrics.format_rate([], {'True'}) == 0.0


def test_answers_of_and_paper_average():
  assert metrics.answers_of({'answers': b'Paris\tparis france'}, 'x') == ['Paris', 'paris france']
  assert metrics.answers_of({}, 'x') == ['x']
  assert metrics.paper_average({'a': 10.0, 'b': 20.0}) == 15.0
  assert metrics.paper_average({'a': 10.0, 'b': None}) is None
