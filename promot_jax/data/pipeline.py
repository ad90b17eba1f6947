"""seqio tasks and mixtures -> per-host numpy batches, in a deterministic, resumable order.

Batches are a pure function of (task, split, seed, host shard, position): the same seed gives
the same batches on every run, and an iterator rebuilt from `state()` continues exactly where
the saved one stopped (the consumed batches are recomputed and skipped, which is exact and
simple; it costs one pass over the skipped data). No packing by default: with a soft prompt
every example must start at encoder position 0 after the prompt.
"""

from __future__ import annotations

import difflib
import functools
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

MT5_VOCABULARY = 'gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model'
VOCABULARY_ENV = 'PROMOT_VOCABULARY'
# Keys a saved state must hold to rebuild its iterator (see BatchIterator.from_state).
_STATE_KEYS = ('task', 'task_feature_lengths', 'split', 'global_batch_size', 'seed', 'shuffle',
               'repeat', 'drop_remainder', 'pack', 'shard_index', 'num_shards', 'use_cached',
               'batches_consumed')


@functools.lru_cache(maxsize=None)
def _build_vocabulary(choice: str):
  if choice == 'byte':
    return seqio.ByteVocabulary()
  # The mT5 model file already holds its 100 sentinel ids, so no extra ids are added (as in
  # the multilingual_t5 / t5x mT5 task definitions).
  return seqio.SentencePieceVocabulary(choice, extra_ids=0)


def get_vocabulary(name_or_path: Optional[str] = None):
  """The seqio vocabulary tasks use: mT5's sentencepiece model unless overridden.

  `name_or_path`, else env PROMOT_VOCABULARY, else the mT5 model on GCS: 'byte' gives
  seqio.ByteVocabulary; anything else is a sentencepiece .model path (local or gs://). One
  instance per choice, so tasks sharing a vocabulary compare equal cheaply. seqio reads the
  file lazily; check_vocabulary_readable forces the read with a clear error.
  """
  return _build_vocabulary(name_or_path or os.environ.get(VOCABULARY_ENV) or MT5_VOCABULARY)


def check_vocabulary_readable(vocab):
  """Load `vocab` now (returns it), naming PROMOT_VOCABULARY and the path if it cannot be read."""
  try:
    vocab.encode('check')
  except Exception as e:  # tf / sentencepiece raise many kinds of errors for unreadable files
    path = getattr(vocab, 'sentencepiece_model_file', repr(vocab))
    raise ValueError(
        f'Cannot read the vocabulary {path}: {type(e).__name__}: {e}. Offline, or without GCS '
        f'access, set {VOCABULARY_ENV} to a local sentencepiece .model file (or to "byte" for '
        'the byte vocabulary) before the task modules are imported.') from e
  return vocab


check_vocabulary = check_vocabulary_readable  # older name, kept for callers


def check_task_name(name: str) -> None:
  """A clear error, with close registered names, for an unknown task or mixture."""
  known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  if name in known:
    return
  close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
  raise ValueError(
      f'Unknown task or mixture {name!r}. Close registered names: {close or "none"}. Tasks '
      'register when their module is imported: in Python `import promot_tasks.toy`; in a run file '
      "TASK_MODULES = ['promot_tasks.toy'] (or a gin `import promot_tasks.toy` line).")


def _check_vocabularies(name: str) -> None:
  provider = seqio.get_mixture_or_task(name)
  seen = []
  for feature in provider.output_features.values():
    if not any(feature.vocabulary is v for v in seen):
      seen.append(feature.vocabulary)
      check_vocabulary_readable(feature.vocabulary)


PROMPT_IDS = 'prompt_ids'


def _dataset(task: str, task_feature_lengths: Mapping[str, int], split: str, seed: int,
             shuffle: bool, repeat: bool, pack: bool, use_cached: bool,
             prompt_tasks: Sequence[str] = ()):
  """seqio's whole example stream after the encoder-decoder feature converter.

  With `prompt_tasks` (a model with one prompt per task) every example also carries
  'prompt_ids', the index of its own task in `prompt_tasks`; a mixture is then sampled here,
  task by task at the mixture's rates, so each example's task stays known.
  """
  if prompt_tasks:
    return _routed_dataset(task, task_feature_lengths, split, seed, shuffle, repeat, pack,
                           use_cached, tuple(prompt_tasks))
  converter = seqio.EncDecFeatureConverter(pack=pack)
  ds = seqio.get_dataset(
      task, task_feature_lengths=dict(task_feature_lengths), dataset_split=split,
      shuffle=shuffle, num_epochs=None if repeat else 1, feature_converter=converter,
      shard_info=None, use_cached=use_cached, seed=seed, verbose=False)
  options = tf.data.Options()
  options.deterministic = True  # parallel maps keep their order whatever the global setting
  return ds.with_options(options)


def _routed_dataset(task, task_feature_lengths, split, seed, shuffle, repeat, pack, use_cached,
                    prompt_tasks: tuple[str, ...]):
  provider = seqio.get_mixture_or_task(task)
  leaves = list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]
  unknown = [t.name for t in leaves if t.name not in prompt_tasks]
  if unknown:
    raise ValueError(f'{task} holds tasks without a prompt of their own: {unknown}; the '
                     f'model has prompts for PROMPT_TASKS = {list(prompt_tasks)}.')
  datasets = [_dataset(t.name, task_feature_lengths, split, seed, shuffle, repeat, pack,
                       use_cached).map(functools.partial(_with_prompt_id,
                                                         prompt_tasks.index(t.name)))
              for t in leaves]
  if len(datasets) == 1:
    return datasets[0]
  rates = np.asarray([provider.get_rate(t) for t in leaves], np.float64)
  ds = tf.data.Dataset.sample_from_datasets(datasets, weights=list(rates / rates.sum()),
                                            seed=seed, stop_on_empty_dataset=False)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _with_prompt_id(index: int, example):
  return dict(example, **{PROMPT_IDS: tf.constant(index, tf.int32)})


class BatchIterator:
  """Iterates this host's batches (dict of int32 [host_batch, length] arrays); resumable.

  Every host reads the same global stream and keeps the rows of its shard (rows
  shard_index * host_batch onwards of each global batch). So the global batches do not
  depend on how many hosts read them: a run on 1 host and on 8 sees the same data, a run
  resumes exactly on another slice size, and hosts in one model-parallel group (same shard)
  feed identical rows. Fine-tuning batches are small (64 examples); reading a whole one per
  host costs next to nothing beside a step.
  """

  def __init__(self, task: str, task_feature_lengths: Mapping[str, int], split: str,
               global_batch_size: int, *, seed: int, shuffle: bool = True, repeat: bool = True,
               drop_remainder: bool = True, pack: bool = False, shard_index: int = 0,
               num_shards: int = 1, use_cached: bool = False, batches_consumed: int = 0,
               prompt_tasks: Sequence[str] = ()):
    if num_shards < 1 or not 0 <= shard_index < num_shards:
      raise ValueError(f'shard_index={shard_index} must lie in [0, num_shards={num_shards}).')
    if global_batch_size < 1 or global_batch_size % num_shards:
      raise ValueError(f'BATCH_SIZE={global_batch_size} is not divisible by the {num_shards} '
                       'hosts (data shards) reading data; use a multiple of the host count.')
    if batches_consumed < 0:
      raise ValueError(f'batches_consumed must be >= 0, got {batches_consumed}.')
    check_task_name(task)
    _check_vocabularies(task)
    self.spec = dict(task=task, task_feature_lengths=dict(task_feature_lengths), split=split,
                     global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                     repeat=repeat, drop_remainder=drop_remainder, pack=pack,
                     shard_index=shard_index, num_shards=num_shards, use_cached=use_cached,
                     prompt_tasks=list(prompt_tasks))
    self.host_batch = global_batch_size // num_shards
    self._rows = slice(shard_index * self.host_batch, (shard_index + 1) * self.host_batch)
    ds = _dataset(task, task_feature_lengths, split, seed, shuffle, repeat, pack, use_cached,
                  prompt_tasks)
    ds = ds.batch(global_batch_size, drop_remainder=drop_remainder)
    if batches_consumed:
      ds = ds.skip(batches_consumed)
    self._element_spec = ds.element_spec
    self._it: Iterator[Mapping[str, Any]] = iter(
        ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator())
    self.batches_consumed = batches_consumed

  @classmethod
  def from_state(cls, state: Mapping[str, Any], *,
                 shard_index: Optional[int] = None) -> 'BatchIterator':
    """The iterator that yields next what the one that wrote `state` would have yielded.

    `shard_index` overrides the saved one, for hosts resuming from host 0's saved state (the
    position is the same on every host; only the shard differs).
    """
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
      raise ValueError(f'Data-iterator state lacks {missing}; it was not written by '
                       'BatchIterator.state().')
    kwargs = {k: state[k] for k in _STATE_KEYS}
    kwargs['prompt_tasks'] = state.get('prompt_tasks', ())   # absent before per-task prompts
    if shard_index is not None:
      kwargs['shard_index'] = shard_index
    return cls(kwargs.pop('task'), kwargs.pop('task_feature_lengths'), kwargs.pop('split'),
               kwargs.pop('global_batch_size'), **kwargs)

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)   # the global batch; this host keeps its rows
    self.batches_consumed += 1
    return {k: np.asarray(v[self._rows], np.int32) for k, v in batch.items()}

  def state(self) -> dict[str, Any]:
    """JSON-serialisable position; BatchIterator.from_state rebuilds the iterator from it."""
    return dict(self.spec, batches_consumed=self.batches_consumed)

  def peek_shapes(self) -> dict[str, tuple[int, ...]]:
    """Each feature's batch shape, without reading data ([host_batch, length])."""
    return {k: (self.host_batch,) + tuple(s.shape[1:]) for k, s in self._element_spec.items()}


def make_batch_iterator(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                        split: str, global_batch_size: int, *, seed: int, shuffle: bool = True,
                        repeat: bool = True, drop_remainder: bool = True, pack: bool = False,
                        shard_index: Optional[int] = None, num_shards: Optional[int] = None,
                        start_batch: int = 0, use_cached: bool = False,
                        prompt_tasks: Sequence[str] = ()) -> BatchIterator:
  """This host's slice of every global batch, from batch `start_batch` on.

  `shard_index` / `num_shards` default to jax.process_index() / jax.process_count(), read at
  call time (after jax.distributed is initialised). `drop_remainder=False` keeps a short last
  batch when `repeat=False` (pad it with pad_batch).
  """
  return BatchIterator(
      mixture_or_task_name, task_feature_lengths, split, global_batch_size, seed=seed,
      shuffle=shuffle, repeat=repeat, drop_remainder=drop_remainder, pack=pack,
      shard_index=jax.process_index() if shard_index is None else shard_index,
      num_shards=jax.process_count() if num_shards is None else num_shards,
      use_cached=use_cached, batches_consumed=start_batch, prompt_tasks=prompt_tasks)


def pad_batch(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pad a short (last) batch with all-zero rows, which carry no loss weight."""
  n = next(iter(batch.values())).shape[0]
  if n == rows:
    return dict(batch)
  return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) for k, v in
          batch.items()}
