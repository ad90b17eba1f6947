"""Offline toy tasks: learnable in seconds on a CPU, used by tests and the tiny CPU run.

They double as the shortest template for composing a seqio task:

  1. a data source giving raw examples per split (here seqio.FunctionDataSource over a seeded
     generator, so nothing is downloaded and every run sees the same examples);
  2. a formatting preprocessor that turns raw fields into 'inputs' / 'targets' text;
  3. seqio.preprocessors.tokenize, then seqio.preprocessors.append_eos_after_trim (EOS is
     added after seqio trims to the feature lengths, so a truncated sequence still ends in it);
  4. output features naming the vocabulary (the byte vocabulary here; real tasks use
     promot_jax.data.pipeline.get_vocabulary()) with add_eos=True.

Tasks register when the module is imported (twice is harmless): a run file lists it in
TASK_MODULES, Python code does `import promot_tasks.toy`.

  toy_sorted   '3 9 1 4 Is it sorted? answer:' -> 'True' / 'False'  (the RTE analogue)
  toy_reverse  'reverse: 3 9 1 4' -> '4 1 9 3'
  toy_mix      both, equal rates
"""

from __future__ import annotations

import numpy as np
import seqio
import tensorflow as tf

SPLITS = {'train': 2000, 'validation': 200}
_SPLIT_SEEDS = {'train': 0, 'validation': 1}
LABELS = ('False', 'True')
SORTED_QUESTION = 'Is it sorted? answer:'


def _digits(rng: np.random.Generator) -> list[int]:
  """2 to 6 random digits."""
  return [int(x) for x in rng.integers(0, 10, int(rng.integers(2, 7)))]


def _unsorted(d: list[int]) -> list[int]:
  """`d` itself if unsorted, else a same-length unsorted variant of it."""
  if d != sorted(d):
    return d
  if d != d[::-1]:
    return d[::-1]  # sorted and not constant: reversed is strictly out of order somewhere
  d = list(d)  # all digits equal: nudge one end
  if d[0] > 0:
    d[-1] -= 1
  else:
    d[0] = 1
  return d


def sorted_raw(split: str) -> list[dict]:
  """Raw toy_sorted examples: digit strings and a 0/1 label; classes alternate (balanced)."""
  rng = np.random.default_rng(100 + _SPLIT_SEEDS[split])
  out = []
  for i in range(SPLITS[split]):
    d = sorted(_digits(rng)) if i % 2 == 0 else _unsorted(_digits(rng))
    out.append({'digits': ' '.join(map(str, d)), 'label': int(d == sorted(d))})
  return out


def reverse_raw(split: str) -> list[dict]:
  """Raw toy_reverse examples: digit strings."""
  rng = np.random.default_rng(200 + _SPLIT_SEEDS[split])
  return [{'digits': ' '.join(map(str, _digits(rng)))} for _ in range(SPLITS[split])]


def format_sorted(digits: str, label: int) -> tuple[str, str]:
  """The toy_sorted text pair, in Python (for tests and docs)."""
  return f'{digits} {SORTED_QUESTION}', LABELS[label]


def format_reverse(digits: str) -> tuple[str, str]:
  """The toy_reverse text pair, in Python (for tests and docs)."""
  return f'reverse: {digits}', ' '.join(reversed(digits.split()))


def _source(make) -> seqio.FunctionDataSource:
  def dataset_fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; seqio shuffles the examples itself
    rows = make(split)
    return tf.data.Dataset.from_tensor_slices({k: [r[k] for r in rows] for k in rows[0]})
  return seqio.FunctionDataSource(dataset_fn, splits=list(SPLITS),
                                  num_input_examples=dict(SPLITS))


@seqio.map_over_dataset
def _sorted_text(ex: dict) -> dict:
  return {'inputs': tf.strings.join([ex['digits'], SORTED_QUESTION], separator=' '),
          'targets': tf.gather(tf.constant(LABELS), ex['label'])}


@seqio.map_over_dataset
def _reverse_text(ex: dict) -> dict:
  words = tf.strings.split(ex['digits'])
  return {'inputs': tf.strings.join(['reverse:', ex['digits']], separator=' '),
          'targets': tf.strings.reduce_join(tf.reverse(words, [0]), separator=' ')}


def _features() -> dict[str, seqio.Feature]:
  vocab = seqio.ByteVocabulary()
  return {'inputs': seqio.Feature(vocab, add_eos=True),
          'targets': seqio.Feature(vocab, add_eos=True)}


def _register() -> None:
  for name, make, fmt in (('toy_sorted', sorted_raw, _sorted_text),
                          ('toy_reverse', reverse_raw, _reverse_text)):
    if name not in seqio.TaskRegistry.names():
      seqio.TaskRegistry.add(
          name, source=_source(make), output_features=_features(),
          preprocessors=[fmt, seqio.preprocessors.tokenize,
                         seqio.preprocessors.append_eos_after_trim],
          metric_fns=[], shuffle_buffer_size=SPLITS['train'])
  if 'toy_mix' not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add('toy_mix', ['toy_sorted', 'toy_reverse'], default_rate=1.0)


_register()
