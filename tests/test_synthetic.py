"""The demo's offline synthetic tasks: exact texts, held-out queries, determinism, seqio."""

import numpy as np
import pytest
import seqio

import promot_tasks.synthetic as synth


def test_each_task_maps_a_word_to_its_own_format():
  out = {name: fn('hbe') for name, fn in synth.TASKS.items()}
  assert out == {'reverse': 'ebh', 'sort': 'beh', 'shift': 'icf', 'upper': 'HBE', 'ends': 'he',
                 'count': '3'}
  assert synth.TASKS['shift']('j') == 'a'   # the cipher wraps around the alphabet


def test_in_context_example_is_demonstrations_then_the_query():
  inputs, target = synth.icl_example('reverse', ['ab', 'cde'], 'fgh')
  assert inputs == 'ab -> ba\ncde -> edc\nfgh ->'
  assert target == 'hgf'
  for inputs, _ in synth.pretrain_rows('validation') + synth.icl_rows('sort', 4, 'test'):
    lines = inputs.split('\n')          # no demonstration repeats the query word
    assert lines[-1][:-3] not in {line.split(' -> ')[0] for line in lines[:-1]}


def test_classification_texts_and_balance():
  assert synth.sorted_example('beh') == ('beh Is it sorted? answer:', 'True')
  assert synth.sorted_example('hbe') == ('hbe Is it sorted? answer:', 'False')
  assert synth.classify_example('has_a', 'hbe') == ('hbe Does it contain a? answer:', 'False')
  assert synth.classify_example('has_a', 'bae') == ('bae Does it contain a? answer:', 'True')
  truth = {'sorted': lambda w: w == ''.join(sorted(w)), 'has_a': lambda w: 'a' in w}
  for task, predicate in truth.items():
    rows = synth.classify_rows(task, 'validation')
    labels = [t for _, t in rows]
    assert labels.count('True') == labels.count('False') == len(rows) // 2
    for inputs, label in rows:
      assert predicate(inputs.split()[0]) == (label == 'True')


def test_four_shot_inputs_fit_the_demo_lengths_with_eos():
  longest = max(len(i.encode()) for task in synth.TASKS for i, _ in synth.icl_rows(task, 4, 'test'))
  assert longest <= 71     # TASK_FEATURE_LENGTHS['inputs'] = 72 leaves room for EOS


def test_held_out_words_never_appear_in_the_training_splits():
  last = lambda inputs: inputs.rsplit('\n', 1)[-1].split()[0]  # noqa: E731 -- the query word
  n = synth.SIZES['train']   # the query words of the train splits (the demos vary per query)
  train_queries = set(synth.query_words('train', n, 'pretrain'))  # noqa: SLF001
  train_queries |= set(synth.query_words('train', n, 'queries'))  # noqa: SLF001
  for split in ('validation', 'test'):
    held_out = {last(i) for i, _ in synth.icl_rows('sort', 1, split)}
    assert held_out and not held_out & train_queries
  for task in synth.CLASSIFIERS:
    train = {i.split()[0] for i, _ in synth.classify_rows(task, 'train')}
    for split in ('validation', 'test'):
      held_out = {i.split()[0] for i, _ in synth.classify_rows(task, split)}
      assert held_out and not held_out & train


def test_rows_are_a_pure_function_of_the_seed():
  assert synth.icl_rows('ends', 4, 'validation') == synth.icl_rows('ends', 4, 'validation')
  assert synth.icl_rows('ends', 4, 'validation') != synth.icl_rows('ends', 4, 'test')
  # a query keeps its demonstrations whatever else is generated
  first = synth.icl_rows('upper', 1, 'test')[0]
  synth.icl_rows('count', 1, 'test')
  assert synth.icl_rows('upper', 1, 'test')[0] == first


def test_pretraining_mixture_covers_every_task_and_shot_count():
  rows = synth.pretrain_rows('validation')
  shots = [i.count('\n') for i, _ in rows]
  assert set(shots) == set(range(1, synth.MAX_PRETRAIN_SHOTS + 1))
  # every task shows up: recognise it from the first demonstration
  seen = set()
  for inputs, _ in rows:
    word, out = inputs.split('\n')[0].split(' -> ')
    seen |= {n for n, fn in synth.TASKS.items() if fn(word) == out}
  assert seen == set(synth.TASKS)


def test_seqio_tasks_tokenize_bytes_and_eval_is_the_test_split():
  task = seqio.get_mixture_or_task('synth_reverse_4shot')
  assert {'train', 'validation', 'test', 'eval'} <= set(task.splits)
  ex = next(task.get_dataset(None, split='eval', shuffle=False).as_numpy_iterator())
  text, target = synth.icl_rows('reverse', 4, 'test')[0]
  assert ex['inputs_pretokenized'].decode() == text
  assert ex['targets_pretokenized'].decode() == target
  np.testing.assert_array_equal(ex['inputs'][:-1], np.frombuffer(text.encode(), np.uint8) + 3)
  assert ex['inputs'][-1] == 1    # EOS
  mixture = seqio.get_mixture_or_task('synth_icl_1shot')
  assert sorted(t.name for t in mixture.tasks) == sorted(
      synth.icl_task_name(t, 1) for t in synth.TASKS)


@pytest.mark.parametrize('name', ['synth_sorted', 'synth_has_a', 'synth_count_1shot'])
def test_metrics_and_labels_are_declared_for_promot_eval(name):
  assert synth.PAPER_METRIC[name] == 'accuracy'
  assert synth.LABEL_SETS.get(name, ('False', 'True')) == ('False', 'True')
  assert (name in synth.LABEL_SETS) == (not name.endswith('shot'))
