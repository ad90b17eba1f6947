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
  synth_icl_<k>shot       mixtures of the in-context tasks at k shots
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from tasks import templates

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
PAPER_METRIC = {**{name: 'accuracy' for name in ICL_TASK_NAMES}, 'synth_sorted': 'accuracy'}
LABEL_SETS = {'synth_sorted': LABELS}


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


def sorted_example(word: str) -> tuple[str, str]:
  """(inputs, targets) of the classification task."""
  return f'{word} {SORTED_QUESTION}', LABELS[int(word == ''.join(sorted(word)))]


# --------------------------------------------------------------------------------- the data

def _rng(*keys) -> np.random.Generator:
  digest = hashlib.sha256(repr((SEED,) + keys).encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], 'little'))


@functools.lru_cache(maxsize=None)
def _held_out_words() -> frozenset[str]:
  """Query words of the validation and test splits (kept out of train queries)."""
  words = set()
  for split in ('validation', 'test'):
    rng = _rng('queries', split)
    words.update(random_word(rng) for _ in range(SIZES[split]))
    rng = _rng('sorted', split)
    words.update(_sorted_word(rng, i) for i in range(SIZES[split]))
  return frozenset(words)


def _query_words(split: str, n: int, salt: str) -> list[str]:
  rng = _rng(salt, split)
  held_out = _held_out_words() if split == 'train' else frozenset()
  out = []
  while len(out) < n:
    w = random_word(rng)
    if w not in held_out:
      out.append(w)
  return out


def pretrain_rows(split: str) -> list[tuple[str, str]]:
  """The pretraining mixture: a random task and k = 1..MAX_PRETRAIN_SHOTS per example."""
  rng = _rng('pretrain', split)
  names = list(TASKS)
  words = _query_words(split, SIZES[split], 'pretrain')
  rows = []
  for word in words:
    task = names[int(rng.integers(len(names)))]
    k = int(rng.integers(1, MAX_PRETRAIN_SHOTS + 1))
    rows.append(icl_example(task, [random_word(rng) for _ in range(k)], word))
  return rows


def icl_rows(task: str, shots: int, split: str) -> list[tuple[str, str]]:
  """One in-context task at k shots; the demonstrations of a query are seeded by it."""
  rows = []
  for word in _query_words(split, SIZES[split], 'queries'):
    rng = _rng('demos', task, shots, word)
    demos = []
    while len(demos) < shots:
      w = random_word(rng)
      if w != word:
        demos.append(w)
    rows.append(icl_example(task, demos, word))
  return rows


def _sorted_word(rng: np.random.Generator, i: int) -> str:
  word = random_word(rng)
  if i % 2 == 0:
    return ''.join(sorted(word))
  while word == ''.join(sorted(word)):
    word = random_word(rng)
  return word


def sorted_rows(split: str) -> list[tuple[str, str]]:
  """The classification task, balanced: even rows sorted (True), odd rows not (False)."""
  rng = _rng('sorted', split)
  held_out = _held_out_words() if split == 'train' else frozenset()
  rows = []
  i = 0
  while len(rows) < SIZES[split]:
    word = _sorted_word(rng, i)
    if word not in held_out:
      rows.append(sorted_example(word))
      i += 1
  return rows


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
  _add('synth_sorted', sorted_rows)
  for k in SHOTS:
    for task in TASKS:
      _add(icl_task_name(task, k), lambda split, task=task, k=k: icl_rows(task, k, split))
    mixture = f'synth_icl_{k}shot'
    if mixture not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(mixture, [icl_task_name(t, k) for t in TASKS], default_rate=1.0)


_register()
