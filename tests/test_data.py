"""promot_jax.data.pipeline on the offline toy tasks: shapes, determinism, exact resume, sharding."""

import json
import re

import numpy as np
import pytest
import seqio

import promot_tasks.toy as toy
from promot_jax.data import pipeline as data

LENGTHS = {'inputs': 32, 'targets': 8}
KEYS = {'encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
        'decoder_loss_weights'}
BYTES = seqio.ByteVocabulary()


def _iterator(task='toy_sorted', seed=0, **kwargs):
  kwargs = {'shard_index': 0, 'num_shards': 1, **kwargs}
  return data.make_batch_iterator(task, LENGTHS, 'train', 8, seed=seed, **kwargs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _decode(row):
  return BYTES.decode([int(t) for t in row if t > 1])  # drop padding (0) and EOS (1)


@pytest.fixture(scope='module')
def reference():
  """Batches 0..6 of an uninterrupted toy_sorted iterator (seed 7)."""
  return _take(_iterator(seed=7), 7)


def test_batch_keys_shapes_shift_and_mixture_resume():
  it = _iterator('toy_mix', num_shards=2)
  batch = next(it)
  assert set(batch) == KEYS  # no packing: no segment ids or positions
  for k, v in batch.items():
    assert v.dtype == np.int32
    assert v.shape == (4, LENGTHS['inputs'] if k.startswith('encoder') else LENGTHS['targets'])
  assert it.peek_shapes() == {k: v.shape for k, v in batch.items()}
  targets, shifted = batch['decoder_target_tokens'], batch['decoder_input_tokens']
  np.testing.assert_array_equal(shifted[:, 0], 0)
  np.testing.assert_array_equal(shifted[:, 1:], targets[:, :-1])
  np.testing.assert_array_equal(batch['decoder_loss_weights'], targets > 0)
  assert (targets == 1).sum(axis=1).tolist() == [1] * 4  # one EOS per target
  # The mixture's sampling is seeded too: a rebuilt iterator continues exactly.
  _take(it, 2)
  resumed = data.BatchIterator.from_state(json.loads(json.dumps(it.state())))
  assert all(_same(a, b) for a, b in zip(_take(resumed, 2), _take(it, 2)))


def test_same_seed_same_batches_other_seed_differs(reference):
  again = _take(_iterator(seed=7), 5)
  other = _take(_iterator(seed=8), 5)
  assert all(_same(a, b) for a, b in zip(reference[:5], again))
  assert not all(_same(a, b) for a, b in zip(reference[:5], other))


def test_resume_from_state_is_exact(reference):
  it = _iterator(seed=7)
  _take(it, 3)
  state = json.loads(json.dumps(it.state()))
  assert state == it.state()
  assert state['batches_consumed'] == 3
  assert {'seed', 'task', 'split', 'shard_index', 'num_shards'} <= set(state)
  resumed = data.BatchIterator.from_state(state)
  assert all(_same(a, b) for a, b in zip(_take(resumed, 4), reference[3:7]))
  assert resumed.state()['batches_consumed'] == 7


def test_start_batch_skips_exactly(reference):
  assert _same(next(_iterator(seed=7, start_batch=5)), reference[5])


def test_shards_split_the_examples():
  shard0 = _take(_iterator(shard_index=0, num_shards=2), 3)
  shard1 = _take(_iterator(shard_index=1, num_shards=2), 3)
  rows0 = {_decode(r) for b in shard0 for r in b['encoder_input_tokens']}
  rows1 = {_decode(r) for b in shard1 for r in b['encoder_input_tokens']}
  assert all(b['encoder_input_tokens'].shape[0] == 4 for b in shard0 + shard1)
  assert not all(_same(a, b) for a, b in zip(shard0, shard1))
  assert len(rows0 & rows1) <= 2  # short digit strings may repeat; whole batches must not


def test_shards_are_row_blocks_of_the_same_global_batches():
  """The global batches do not depend on how many hosts read them (the data layout)."""
  whole = _take(_iterator(), 3)
  for num_shards in (2, 4):
    parts = [_take(_iterator(shard_index=i, num_shards=num_shards), 3) for i in range(num_shards)]
    for step, batch in enumerate(whole):
      for key in batch:
        joined = np.concatenate([p[step][key] for p in parts])
        np.testing.assert_array_equal(joined, batch[key])


def test_unknown_task_names_close_matches():
  with pytest.raises(ValueError, match=r"toy_sortd.*toy_sorted.*import promot_tasks\.toy"):
    _iterator('toy_sortd')


def test_batch_not_divisible_by_shards():
  with pytest.raises(ValueError, match='not divisible by the 3 hosts'):
    _iterator(num_shards=3)
  with pytest.raises(ValueError, match='shard_index'):
    _iterator(shard_index=2, num_shards=2)


def test_state_missing_keys_is_a_clear_error():
  with pytest.raises(ValueError, match='lacks'):
    data.BatchIterator.from_state({'batches_consumed': 3})


def test_toy_sorted_texts():
  raw = toy.sorted_raw('validation')
  assert sum(r['label'] for r in raw) == len(raw) // 2  # balanced
  ds = seqio.get_mixture_or_task('toy_sorted').get_dataset(
      None, split='validation', shuffle=False)
  pattern = re.compile(r'^[0-9]( [0-9]){1,5} Is it sorted\? answer:$')
  for r, ex in zip(raw[:20], ds.as_numpy_iterator()):
    inputs, targets = toy.format_sorted(r['digits'], r['label'])
    assert _decode(ex['inputs']) == inputs and _decode(ex['targets']) == targets
    assert pattern.match(inputs) and targets in {'True', 'False'}
    digits = [int(x) for x in r['digits'].split()]
    assert targets == str(digits == sorted(digits))
  assert toy.format_sorted('3 9 1 4', 0) == ('3 9 1 4 Is it sorted? answer:', 'False')


def test_toy_reverse_texts():
  raw = toy.reverse_raw('validation')
  ds = seqio.get_mixture_or_task('toy_reverse').get_dataset(
      None, split='validation', shuffle=False)
  for r, ex in zip(raw[:10], ds.as_numpy_iterator()):
    inputs, targets = _decode(ex['inputs']), _decode(ex['targets'])
    assert inputs == 'reverse: ' + r['digits']
    assert targets.split() == r['digits'].split()[::-1]
  assert toy.format_reverse('3 9 1 4') == ('reverse: 3 9 1 4', '4 1 9 3')


def test_targets_decode_to_labels_in_batches():
  batch = next(_iterator('toy_sorted'))
  labels = {_decode(r) for r in batch['decoder_target_tokens']}
  assert labels <= {'True', 'False'}
  assert all('Is it sorted?' in _decode(r) for r in batch['encoder_input_tokens'])  # 32 may trim


def test_vocabulary_choices(monkeypatch, tmp_path):
  monkeypatch.setenv('PROMOT_VOCABULARY', 'byte')
  assert isinstance(data.get_vocabulary(), seqio.ByteVocabulary)
  assert data.check_vocabulary_readable(data.get_vocabulary()) is data.get_vocabulary()
  missing = str(tmp_path / 'missing.model')
  vocab = data.get_vocabulary(missing)
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  with pytest.raises(ValueError, match=r'missing\.model.*PROMOT_VOCABULARY'):
    data.check_vocabulary_readable(vocab)
  monkeypatch.delenv('PROMOT_VOCABULARY')
  assert data.get_vocabulary().sentencepiece_model_file == data.MT5_VOCABULARY
