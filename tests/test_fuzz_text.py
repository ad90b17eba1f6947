"""Fuzzing task text through tokenisation, truncation and batching (promot_jax.data.pipeline's path).

Arbitrary unicode (emoji, NUL, combining marks, 20k-character strings, empty strings) goes
through a tiny seqio task (FunctionDataSource -> tokenize -> append_eos_after_trim) and
data.BatchIterator (EncDecFeatureConverter, pack=False). Whatever the text, every batch has
the configured lengths, every id is below the vocabulary size and each row ends in EOS (or is
cut at its length). An empty field still becomes [EOS]. Raw bytes that are not UTF-8 are
tokenised byte by byte by the byte vocabulary; with sentencepiece each bad byte becomes
U+FFFD (its unknown id without byte fallback), so neither vocabulary crashes on them.
"""

import string

import numpy as np
import pytest
import seqio
import tensorflow as tf
from hypothesis import HealthCheck, given, settings, strategies as st

from promot_jax.data import pipeline as data

LENGTHS = {'inputs': 24, 'targets': 8}
BATCH = 2
_current: list = []   # the examples the fuzz tasks yield next (set by each hypothesis example)


def _dataset_fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
  del split, shuffle_files, seed
  return tf.data.Dataset.from_tensor_slices({
      'inputs': tf.constant([i for i, _ in _current], tf.string),
      'targets': tf.constant([t for _, t in _current], tf.string)})


def _register(name: str, vocab) -> str:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  features = {k: seqio.Feature(vocab, add_eos=True) for k in LENGTHS}
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(_dataset_fn, splits=['train']),
      output_features=features,
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      metric_fns=[])
  return name


@pytest.fixture(scope='module')
def byte_task():
  vocab = seqio.ByteVocabulary()
  yield _register('fuzz_text_byte', vocab), vocab
  seqio.TaskRegistry.remove('fuzz_text_byte')


@pytest.fixture(scope='module')
def sp_task(tmp_path_factory):
  spm = pytest.importorskip('sentencepiece')
  prefix = str(tmp_path_factory.mktemp('spm') / 'fuzz')
  sentences = ['the quick brown fox jumps over the lazy dog', 'Is it sorted? answer: True',
               'reverse: 3 9 1 4', 'Les élèves étudient à Zürich.', '東京は日本の首都です。',
               'Привет, мир', string.ascii_letters + string.digits + string.punctuation] * 20
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=120,
      model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
      character_coverage=1.0, minloglevel=2)
  vocab = seqio.SentencePieceVocabulary(prefix + '.model', extra_ids=0)
  yield _register('fuzz_text_sp', vocab), vocab
  seqio.TaskRegistry.remove('fuzz_text_sp')


def _batches(task: str, examples: list) -> list[dict]:
  """Every batch of `examples` as BatchIterator yields them (in order, last one short)."""
  _current[:] = examples
  it = data.BatchIterator(task, LENGTHS, 'train', BATCH, seed=0, shuffle=False, repeat=False,
                          drop_remainder=False)
  return list(it)


def _check(batches: list[dict], examples: list, vocab) -> None:
  rows = sum(b['encoder_input_tokens'].shape[0] for b in batches)
  assert rows == len(examples)                           # nothing dropped, nothing added
  eos = vocab.eos_id
  for b in batches:
    for k, v in b.items():
      assert v.dtype == np.int32
      length = LENGTHS['inputs'] if k.startswith('encoder') else LENGTHS['targets']
      assert v.shape[1:] == (length,), (k, v.shape)
      assert v.shape[0] in (1, BATCH)
      assert (v >= 0).all()
    for k in ('encoder_input_tokens', 'decoder_target_tokens', 'decoder_input_tokens'):
      assert (b[k] < vocab.vocab_size).all(), k
    for feature, key in (('inputs', 'encoder_input_tokens'), ('targets', 'decoder_target_tokens')):
      for row in b[key]:
        n = int((row != 0).sum())
        assert n >= 1 and (row[:n] != 0).all()           # one contiguous non-padding run ...
        assert row[n - 1] == eos                         # ... that ends in EOS, even if cut
    # decoder inputs are the targets shifted right; loss only on real target tokens
    np.testing.assert_array_equal(b['decoder_input_tokens'][:, 1:],
                                  b['decoder_target_tokens'][:, :-1])
    np.testing.assert_array_equal(b['decoder_loss_weights'], b['decoder_target_tokens'] != 0)


_ALPHABET = st.characters(codec='utf-8')               # any code point but surrogates, incl. NUL
_TEXT = st.one_of(
    st.text(_ALPHABET, max_size=60),
    st.lists(st.sampled_from(['\x00', '😀', '👩\u200d👩\u200d👧', 'é', '\u0301', '\u200b', '\ufeff',
                              '\U0010ffff', 'a', ' ', '\n']), max_size=40).map(''.join),
    st.builds(lambda c, n: (c * n)[:20_000], st.sampled_from(['x', '😀', '\x00', 'ab ', '東']),
              st.integers(1, 20_000)),
    st.just(''))
_EXAMPLES = st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=8)
# Each example builds a seqio pipeline (~0.7 s on 2 cores): few examples, several rows each.
_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_SETTINGS
@given(examples=_EXAMPLES)
def test_any_unicode_gives_well_formed_batches_byte_vocab(byte_task, examples):
  task, vocab = byte_task
  _check(_batches(task, examples), examples, vocab)


@settings(_SETTINGS, max_examples=15)
@given(examples=_EXAMPLES)
def test_any_unicode_gives_well_formed_batches_sentencepiece(sp_task, examples):
  task, vocab = sp_task
  _check(_batches(task, examples), examples, vocab)


def test_empty_fields_become_a_lone_eos(byte_task):
  task, vocab = byte_task
  (b,) = _batches(task, [('', ''), ('abc', '')])
  eos = vocab.eos_id
  np.testing.assert_array_equal(b['encoder_input_tokens'][0], [eos] + [0] * 23)
  np.testing.assert_array_equal(b['decoder_target_tokens'], [[eos] + [0] * 7] * 2)
  np.testing.assert_array_equal(b['decoder_loss_weights'].sum(1), [1, 1])   # EOS is learnt


def test_long_text_is_cut_to_length_and_still_ends_in_eos(byte_task):
  task, vocab = byte_task
  (b,) = _batches(task, [('😀' * 5000, 'y' * 20_000)])
  enc, dec = b['encoder_input_tokens'][0], b['decoder_target_tokens'][0]
  assert (enc != 0).all() and enc[-1] == vocab.eos_id
  emoji_bytes = np.frombuffer('😀'.encode(), np.uint8).astype(np.int32)
  np.testing.assert_array_equal(enc[:4], emoji_bytes + 3)
  np.testing.assert_array_equal(dec, [ord('y') + 3] * 7 + [vocab.eos_id])


_NOT_UTF8 = [b'\xff\xfe\x00abc', b'caf\xe9', b'\xc3', b'\xed\xa0\x80 lone surrogate', b'\x80' * 50]


def test_non_utf8_bytes_are_tokenised_bytewise_by_the_byte_vocabulary(byte_task):
  task, vocab = byte_task
  examples = [(raw, raw) for raw in _NOT_UTF8]
  batches = _batches(task, examples)
  _check(batches, examples, vocab)
  first = batches[0]['encoder_input_tokens'][0]
  raw = np.frombuffer(_NOT_UTF8[0], np.uint8).astype(np.int32)
  np.testing.assert_array_equal(first[:6], raw + 3)


def test_non_utf8_bytes_become_unknown_pieces_with_sentencepiece(sp_task):
  task, vocab = sp_task
  examples = [(raw, raw) for raw in _NOT_UTF8]
  batches = _batches(task, examples)
  _check(batches, examples, vocab)
  ids = np.concatenate([b['encoder_input_tokens'].ravel() for b in batches])
  assert vocab.unk_id in ids                             # U+FFFD is not in this tiny model
