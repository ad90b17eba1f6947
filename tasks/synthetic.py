"""Offline synthetic tasks for the ProMoT demo: in-context string tasks and a True/False task.

Nothing is downloaded: every example is generated from a seed, so a run on a laptop sees
the same data as a run anywhere else. The family mirrors the paper's setting in miniature:

* In-context tasks. A word is 2-5 letters from ALPHABET. Each task maps a word to an output
  of its own format, and the model must infer the task from k solved demonstrations:

      hbe -> ebh
      cadj ->                             =>  jdac          (synth_reverse_1shot)

  reverse   word backwards                hbe  -> ebh
  sort      letters in order              hbe  -> beh
  shift     each letter +1 (cipher)       hbe  -> icf
  upper     capitals                      hbe  -> HBE
  ends      first and last letter         hbe  -> he
  count     number of letters             hbe  -> 3

* The fine-tuned task (the RTE analogue), 0-shot with a format of its own and a two-word
  label set:  'hbe Is it sorted? answer:' -> 'False',  'beh Is it sorted? answer:' -> 'True'.

Registered on import (twice is harmless):
  synth_pretrain          the pretraining mixture: every in-context task, k = 1..4 shots
  synth_<task>_<k>shot    one in-context task at k in SHOTS (validation/test query words
                          never occur as query words of the train split; split 'eval' is
                          'test', which `promot eval` picks; training probes use 'validation')
  synth_sorted            the classification task (balanced True/False)
  synth_has_a             another one: 'hbe Does it contain a? answer:' -> 'False'
  synth_icl_<k>shot       mixtures of the in-context tasks at k shots
  synth_classify          synth_has_a + synth_sorted at equal rates (multi-task ProMoT)
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from promot_jax.eval import registry
from promot_tasks import templates

SEED = 20240601
ALPHABET = 'abcdefghij'
MIN_LEN, MAX_LEN = 2, 5
SHOTS = (1, 4)
MAX_PRETRAIN_SHOTS = 4
QUERY_TEMPLATE = '{word} ->'
DEMO_SEPARATOR = '\n'   # one newline: 4-shot inputs stay under 64 bytes
SORTED_QUESTION = 'Is it sorted? answer:'
LABELS = ('False', 'True')
SIZES = {'train': 50000, 'validation': 256, 'test': 512}
EVAL_ALIAS = {'eval': 'test'}   # `promot eval` prefers a split named 'eval'


def _shift(word: str) -> str:
  return ''.join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in word)


TASKS: dict[str, Callable[[str], str]] = {
    'reverse': lambda w: w[::-1],
    'sort': lambda w: ''.join(sorted(w)),
    'shift': _shift,
    'upper': str.upper,
    'ends': lambda w: w[0] + w[-1],
    'count': lambda w: str(len(w)),
}


def icl_task_name(task: str, shots: int) -> str:
  return f'synth_{task}_{shots}shot'


ICL_TASK_NAMES = [icl_task_name(t, k) for k in SHOTS for t in TASKS]
CLASSIFY_TASK_NAMES = ['synth_sorted', 'synth_has_a', 'synth_starts_a', 'synth_long']
PAPER_METRIC = {name: 'accuracy' for name in ICL_TASK_NAMES + CLASSIFY_TASK_NAMES}
LABEL_SETS = {name: LABELS for name in CLASSIFY_TASK_NAMES}
registry.register_tables(PAPER_METRIC, LABEL_SETS)  # how `promot eval` scores them


# ------------------------------------------------------------------------- text, in Python

def random_word(rng: np.random.Generator) -> str:
  length = int(rng.integers(MIN_LEN, MAX_LEN + 1))
  return ''.join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), length))


def query(word: str) -> str:
  return QUERY_TEMPLATE.format(word=word)


def icl_example(task: str, demo_words: Sequence[str], word: str) -> tuple[str, str]:
  """(inputs, targets) of one in-context example: k solved demonstrations, then the query."""
  fn = TASKS[task]
  demos = [templates.demonstration(query(w), fn(w)) for w in demo_words]
  return DEMO_SEPARATOR.join(demos + [query(word)]), fn(word)


# --------------------------------------------------------------------------------- the data

def _rng(*keys) -> np.random.Generator:
  digest = hashlib.sha256(repr((SEED,) + keys).encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], 'little'))


@functools.lru_cache(maxsize=None)
def _held_out(kind: str) -> frozenset[str]:
  """Words of the validation and test splits of `kind` ('queries': the in-context tasks'
  query words; 'classify/<task>': a classification task's words), kept out of its train split."""
  words = set()
  for split in ('validation', 'test'):
    if kind == 'queries':
      words.update(query_words(split, SIZES[split], 'queries'))
    else:
      task = kind.split('/', 1)[1]
      rng = _rng('classify', task, split)
      words.update(_class_word(task, rng, i) for i in range(SIZES[split]))
  return frozenset(words)


def query_words(split: str, n: int, salt: str) -> list[str]:
  rng = _rng(salt, split)
  held_out = _held_out('queries') if split == 'train' else frozenset()
  out = []
  while len(out) < n:
    w = random_word(rng)
    if w not in held_out:
      out.append(w)
  return out


def pretrain_rows(split: str) -> list[tuple[str, str]]:
  """The pretraining mixture: a random task and k = 1..MAX_PRETRAIN_SHOTS per example."""
  rng = _rng('pretrain-demos', split)
  names = list(TASKS)
  rows = []
  for word in query_words(split, SIZES[split], 'pretrain'):
    task = names[int(rng.integers(len(names)))]
    k = int(rng.integers(1, MAX_PRETRAIN_SHOTS + 1))
    rows.append(icl_example(task, _demo_words(rng, k, word), word))
  return rows


# Pretraining-only in-context families (synth_pretrain_rich): binary questions answered from
# the demonstrations, one per letter: 'has_c' = does the word contain c? -> yes / no.
BINARY_LABELS = ('no', 'yes')


def _word_with(rng: np.random.Generator, letter: str, positive: bool) -> str:
  word = random_word(rng)
  if positive:
    i = int(rng.integers(len(word)))
    return word[:i] + letter + word[i + 1:]
  while letter in word:
    word = random_word(rng)
  return word


def binary_example(rng: np.random.Generator, k: int, query_word: str) -> tuple[str, str]:
  letter = ALPHABET[int(rng.integers(len(ALPHABET)))]
  positive = bool(rng.integers(2))
  word = _word_with(rng, letter, positive) if (letter in query_word) != positive else query_word
  demos = [_word_with(rng, letter, bool(rng.integers(2))) for _ in range(k)]
  label = lambda w: BINARY_LABELS[int(letter in w)]
  text = [templates.demonstration(query(w), label(w)) for w in demos]
  return DEMO_SEPARATOR.join(text + [query(word)]), label(word)


def pretrain_rich_rows(split: str) -> list[tuple[str, str]]:
  """synth_pretrain plus the binary 'has_c' family (1 in 7 examples)."""
  rng = _rng('pretrain-rich', split)
  names = list(TASKS) + ['has']
  rows = []
  for word in query_words(split, SIZES[split], 'pretrain'):
    task = names[int(rng.integers(len(names)))]
    k = int(rng.integers(1, MAX_PRETRAIN_SHOTS + 1))
    if task == 'has':
      rows.append(binary_example(rng, k, word))
    else:
      rows.append(icl_example(task, _demo_words(rng, k, word), word))
  return rows


def _demo_words(rng: np.random.Generator, k: int, query_word: str) -> list[str]:
  demos: list[str] = []
  while len(demos) < k:
    w = random_word(rng)
    if w != query_word:
      demos.append(w)
  return demos


def icl_rows(task: str, shots: int, split: str) -> list[tuple[str, str]]:
  """One in-context task at k shots; the demonstrations of a query are seeded by it."""
  rows = []
  for word in query_words(split, SIZES[split], 'queries'):
    rows.append(icl_example(task, _demo_words(_rng('demos', task, shots, word), shots, word), word))
  return rows


def _is_sorted(word: str) -> bool:
  return word == ''.join(sorted(word))


def _with_a(rng: np.random.Generator) -> str:
  word = random_word(rng)
  i = int(rng.integers(len(word)))
  return word[:i] + 'a' + word[i + 1:]


# name -> (question, predicate, a maker of positive words); negatives are drawn until false
CLASSIFIERS: dict[str, tuple[str, Callable[[str], bool], Callable]] = {
    'sorted': (SORTED_QUESTION, _is_sorted, lambda rng: ''.join(sorted(random_word(rng)))),
    'has_a': ('Does it contain a? answer:', lambda w: 'a' in w, _with_a),
}


def _with_first_a(rng: np.random.Generator) -> str:
  return 'a' + random_word(rng)[1:]


# Candidate fine-tuned tasks (issue 18's sweep; not in synth_classify).
EXTRA_CLASSIFIERS: dict[str, tuple[str, Callable[[str], bool], Callable]] = {
    'starts_a': ('Does it start with a? answer:', lambda w: w[0] == 'a', _with_first_a),
    'long': ('Is it long? answer:', lambda w: len(w) >= 4,
             lambda rng: ''.join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET),
                                                                      int(rng.integers(4, 6))))),
}
def classify_example(task: str, word: str) -> tuple[str, str]:
  """(inputs, targets) of a classification task: '<word> <question>' -> True / False."""
  question, predicate, _ = {**CLASSIFIERS, **EXTRA_CLASSIFIERS}[task]
  return f'{word} {question}', LABELS[int(predicate(word))]


def _class_word(task: str, rng: np.random.Generator, i: int) -> str:
  """Even i: a word for which the task's answer is True; odd i: False."""
  _, predicate, positive = {**CLASSIFIERS, **EXTRA_CLASSIFIERS}[task]
  if i % 2 == 0:
    return positive(rng)
  word = random_word(rng)
  while predicate(word):
    word = random_word(rng)
  return word


def classify_rows(task: str, split: str) -> list[tuple[str, str]]:
  """A classification task, balanced: even rows True, odd rows False."""
  rng = _rng('classify', task, split)
  held_out = _held_out(f'classify/{task}') if split == 'train' else frozenset()
  rows: list[tuple[str, str]] = []
  while len(rows) < SIZES[split]:
    word = _class_word(task, rng, len(rows))
    if word not in held_out:
      rows.append(classify_example(task, word))
  return rows


def sorted_example(word: str) -> tuple[str, str]:
  return classify_example('sorted', word)


def sorted_rows(split: str) -> list[tuple[str, str]]:
  return classify_rows('sorted', split)


# ----------------------------------------------------------------------------- registration

def _source(make: Callable[[str], list[tuple[str, str]]]) -> seqio.FunctionDataSource:
  cache: dict[str, list[tuple[str, str]]] = {}

  def dataset_fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; seqio shuffles the examples itself
    split = EVAL_ALIAS.get(split, split)
    if split not in cache:
      cache[split] = make(split)
    rows = cache[split]
    return tf.data.Dataset.from_tensor_slices({'inputs': [r[0] for r in rows],
                                               'targets': [r[1] for r in rows]})
  sizes = {**SIZES, **{alias: SIZES[split] for alias, split in EVAL_ALIAS.items()}}
  return seqio.FunctionDataSource(dataset_fn, splits=list(sizes), num_input_examples=sizes)


def _features() -> dict[str, seqio.Feature]:
  vocab = seqio.ByteVocabulary()
  return {'inputs': seqio.Feature(vocab, add_eos=True),
          'targets': seqio.Feature(vocab, add_eos=True)}


def _add(name: str, make: Callable[[str], list[tuple[str, str]]]) -> None:
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name, source=_source(make), output_features=_features(),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        metric_fns=[], shuffle_buffer_size=10000)


def _register() -> None:
  _add('synth_pretrain', pretrain_rows)
  _add('synth_pretrain_rich', pretrain_rich_rows)
  for task in list(CLASSIFIERS) + list(EXTRA_CLASSIFIERS):
    _add(f'synth_{task}', lambda split, task=task: classify_rows(task, split))
  for k in SHOTS:
    for task in TASKS:
      _add(icl_task_name(task, k), lambda split, task=task, k=k: icl_rows(task, k, split))
    mixture = f'synth_icl_{k}shot'
    if mixture not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(mixture, [icl_task_name(t, k) for t in TASKS], default_rate=1.0)
  if 'synth_classify' not in seqio.MixtureRegistry.names():   # multi-task ProMoT's pair
    seqio.MixtureRegistry.add('synth_classify', [f'synth_{t}' for t in CLASSIFIERS],
                              default_rate=1.0)


_register()
