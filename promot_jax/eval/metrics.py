"""The paper's metrics on decoded text, and the format-specialization rate.

Scores follow the t5 / t5x conventions and the paper's tables: accuracy, exact match, BLEU
and Rouge-2 are percentages (0-100). `format_rate` is a share in [0, 1].

- accuracy       prediction == target (after post-processing)
- exact_match    SQuAD normalisation (lowercase, no punctuation, no a/an/the, single spaces),
                 best over a list of accepted answers
- bleu           sacrebleu.corpus_bleu with t5's settings (tokenize='intl', exp smoothing)
- rouge2         rouge-score's Rouge-2 F-measure (stemmed), mean over examples
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import sacrebleu
from rouge_score import rouge_scorer

from promot_jax.eval import postprocess as pp

Answers = Union[str, Sequence[str]]
METRICS = ('accuracy', 'exact_match', 'bleu', 'rouge2')

_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCTUATION = frozenset(string.punctuation)


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions.')


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> float:
  """Percentage of predictions equal to their target."""
  _check_lengths(targets, predictions)
  if not targets:
    return 0.0
  return 100.0 * sum(t == p for t, p in zip(targets, predictions)) / len(targets)


def normalize_answer(text: str) -> str:
  """SQuAD's answer normalisation: lowercase, drop punctuation and articles, squash spaces."""
  text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', text).split())


def _as_list(answers: Answers) -> list[str]:
  return [answers] if isinstance(answers, str) else list(answers)


def exact_match(targets: Sequence[Answers], predictions: Sequence[str]) -> float:
  """Percentage of predictions matching any accepted answer after normalisation."""
  _check_lengths(targets, predictions)
  if not targets:
    return 0.0
  hits = 0
  for answers, prediction in zip(targets, predictions):
    normalized = normalize_answer(prediction)
    hits += any(normalize_answer(a) == normalized for a in _as_list(answers))
  return 100.0 * hits / len(targets)


def bleu(targets: Sequence[Answers], predictions: Sequence[str],
         tokenize: str = 'intl') -> float:
  """Corpus BLEU (0-100). A target may be a list of references (all lists the same length)."""
  _check_lengths(targets, predictions)
  if targets and not isinstance(targets[0], str):
    references = [list(r) for r in zip(*[_as_list(t) for t in targets])]
  else:
    references = [list(targets)]
  return float(sacrebleu.corpus_bleu(
      list(predictions), references, smooth_method='exp', smooth_value=0.0, force=False,
      lowercase=False, tokenize=tokenize, use_effective_order=False).score)


def rouge2(targets: Sequence[Answers], predictions: Sequence[str],
           use_stemmer: bool = True) -> float:
  """Mean Rouge-2 F-measure over examples, times 100 (first reference when several)."""
  _check_lengths(targets, predictions)
  if not targets:
    return 0.0
  scorer = rouge_scorer.RougeScorer(['rouge2'], use_stemmer=use_stemmer)
  total = sum(scorer.score(_as_list(t)[0], p)['rouge2'].fmeasure
              for t, p in zip(targets, predictions))
  return 100.0 * total / len(targets)


_FUNCTIONS: dict[str, Callable[..., float]] = {
    'accuracy': accuracy, 'exact_match': exact_match, 'bleu': bleu, 'rouge2': rouge2}


def compute(metric: str, targets: Sequence[Answers], predictions: Sequence[str]) -> float:
  """One metric by name (see METRICS). Accuracy compares against the first answer."""
  if metric not in _FUNCTIONS:
    raise ValueError(f'Unknown metric {metric!r}; choose one of {list(METRICS)}.')
  if metric == 'accuracy':
    targets = [_as_list(t)[0] if _as_list(t) else '' for t in targets]
  return _FUNCTIONS[metric](targets, predictions)


# --------------------------------------------------------------------------- post-processing

def postprocess(output: Any, classification: bool = False) -> str:
  """Model output text -> prediction: cut where a new example would begin; first word for
  classification (promot_jax.eval.postprocess)."""
  if classification:
    return pp.postprocess_classification(output)
  return pp.truncate_at_new_example(output)


def first_word(text: Any) -> str:
  """The first word of an output (punctuation around it removed)."""
  return pp.first_word(text)


def format_rate(outputs: Iterable[Any], label_set: Iterable[str],
                postprocessed: bool = False) -> float:
  """Share in [0, 1] of outputs whose first word is one of `label_set` (format specialization).

  Raw outputs are first cut where a new example would begin; pass `postprocessed=True` when
  they already were. Matching is case-sensitive: the paper counts outputs that are exactly
  'True' or 'False'.
  """
  labels = set(label_set)
  outputs = list(outputs)
  if not outputs:
    return 0.0
  cut = pp.as_text if postprocessed else pp.truncate_at_new_example
  return sum(first_word(cut(o)) in labels for o in outputs) / len(outputs)


def answers_of(example: Mapping[str, Any], target: str) -> list[str]:
  """Accepted answers of an example: its tab-joined 'answers' feature, else the target."""
  answers = example.get('answers')
  if answers is not None:
    found = pp.split_answers(answers)
    if found:
      return found
  return [target]


def paper_average(scores: Mapping[str, Optional[float]]) -> Optional[float]:
  """The paper's "Norm. Avg.": the plain mean of the scores (None if any is missing)."""
  values = list(scores.values())
  if not values or any(v is None for v in values):
    return None
  return sum(values) / len(values)
