"""Tasks and templates on mocked TFDS data (offline, byte vocabulary).

Expected texts are written out by hand here from the raw mocked examples, not
with promot_tasks.templates, so that a template change shows up as a failure.
"""

import contextlib
import importlib
import zlib

import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from promot_jax.eval import registry
from promot_tasks import templates

NUM_EXAMPLES = 8
BYTES = seqio.ByteVocabulary()


@pytest.fixture(scope='module')
def modules():
  """promot_tasks.finetune / promot_tasks.icl, imported with the byte vocabulary."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('PROMOT_VOCABULARY', 'byte')
    finetune = importlib.import_module('promot_tasks.finetune')
    icl = importlib.import_module('promot_tasks.icl')
  return finetune, icl


def _split_tagged_dataset(builder, split, decoders=None, read_config=None,
                          **kwargs):
  """Mocked `_as_dataset` whose random examples differ from split to split."""
  del decoders, read_config, kwargs
  specs = builder.info.features.get_tensor_info()
  gen = mocking.RandomFakeGenerator(builder.info.features, NUM_EXAMPLES,
                                    seed=zlib.crc32(str(split).encode()))
  signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype),
                                    specs)
  return tf.data.Dataset.from_generator(lambda: iter(gen),
                                        output_signature=signature)


@contextlib.contextmanager
def mocked_tfds():
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES,
                              as_dataset_fn=_split_tagged_dataset):
    yield


def _raw(tfds_name, split):
  return list(tfds.load(tfds_name, split=split).as_numpy_iterator())


def _run(task, split):
  ds = task.get_dataset(None, split=split, shuffle=False,
                        try_in_mem_cache=False)
  return list(ds.as_numpy_iterator())


def _s(value):
  return value.decode() if isinstance(value, bytes) else str(value)


# Hand-written expectations: raw example -> (inputs, targets).
def _nli(ex, question, labels):
  return (f"{_s(ex['premise'])} question: {_s(ex['hypothesis'])} {question} "
          'answer:', labels[ex['label']])


def _obqa(ex):
  q = ex['question']
  return (f"Q: {_s(q['stem'])} A) {_s(q['choice_A'])} B) {_s(q['choice_B'])} "
          f"C) {_s(q['choice_C'])} D) {_s(q['choice_D'])} A:",
          'ABCD'[ex['answerKey']])


def _trans(lang, src, tgt):
  return lambda ex: (f'Translate English to {lang}: {_s(ex[src])}', _s(ex[tgt]))


def _summ(src, tgt):
  return lambda ex: (f'Article: {_s(ex[src])} One sentence summary:',
                     _s(ex[tgt]))


TF_TRUE_FALSE = 'Is it true or false?'
TF_NEITHER = 'Is it true, false or neither?'
FINETUNE = {  # task -> (tfds name, expected fn, eval split)
    'promot_rte': ('super_glue/rte', lambda ex: _nli(ex, TF_TRUE_FALSE, ['True', 'False']), 'validation'),
    'promot_snli': ('snli', lambda ex: _nli(ex, TF_NEITHER, ['True', 'Neither', 'False']), 'test'),
    'promot_openbookqa': ('openbookqa', _obqa, 'test'),
    'promot_wmt14_enfr': ('wmt14_translate/fr-en', _trans('French', 'en', 'fr'), 'test'),
}
ONE_SHOT = {'promot_rte_1shot': 'promot_rte', 'promot_wmt14_enfr_1shot': 'promot_wmt14_enfr'}
ICL = {  # suite task -> (tfds name, expected fn, eval split)
    'cb': ('super_glue/cb', lambda ex: _nli(ex, TF_NEITHER, ['True', 'False', 'Neither']), 'validation'),
    'wic': ('super_glue/wic', lambda ex: (
        f"{_s(ex['sentence1'])} {_s(ex['sentence2'])} question: Is the word "
        f"\"{_s(ex['word'])}\" used with the same meaning in both sentences? "
        'answer:', ['No', 'Yes'][ex['label']]), 'validation'),
    'triviaqa': ('trivia_qa/rc.nocontext', lambda ex: (
        f"Q: {_s(ex['question'])} A:", _s(ex['answer']['value'])), 'validation'),
    'webquestions': ('web_questions', lambda ex: (
        f"Q: {_s(ex['question'])} A:", _s(ex['answers'][0])), 'test'),
    'wmt16_ende': ('wmt16_translate/de-en', _trans('German', 'en', 'de'), 'test'),
    'wmt16_enro': ('wmt16_translate/ro-en', _trans('Romanian', 'en', 'ro'), 'test'),
    'xsum': ('xsum', _summ('document', 'summary'), 'test'),
    'wikilingua_en': ('gem/wiki_lingua_english_en', _summ('source', 'target'), 'test'),
}
EXPECTED_ANSWERS = {
    'triviaqa': lambda ex: '\t'.join(
        [_s(ex['answer']['value'])] + [_s(a) for a in ex['answer']['aliases']]),
    'webquestions': lambda ex: '\t'.join(_s(a) for a in ex['answers']),
}


def _demo_set(tfds_name, expected_fn):
  return {f'{i} {t}' for i, t in map(expected_fn, _raw(tfds_name, 'train'))}


def _check_tokens(ex):
  for key in ('inputs', 'targets'):
    assert list(ex[key]) == BYTES.encode(_s(ex[f'{key}_pretokenized'])) + [1]


# --------------------------------------------------------- registration

def test_registered_names_and_metrics(modules):
  finetune, icl = modules
  names = set(seqio.TaskRegistry.names())
  want = set(FINETUNE) | set(ONE_SHOT)
  want |= {f'icl_{t}_{k}shot' for t in ICL for k in (0, 1, 4)}
  assert want <= names
  assert set(finetune.task_names()) == set(FINETUNE) | set(ONE_SHOT)
  assert set(finetune.PAPER_METRIC) >= set(FINETUNE) | set(ONE_SHOT)
  assert finetune.PAPER_METRIC['promot_rte'] == 'accuracy'
  assert finetune.PAPER_METRIC['promot_wmt14_enfr'] == 'bleu'
  for k in (1, 4):
    mix = seqio.get_mixture_or_task(f'icl_suite_{k}shot')
    assert {t.name for t in mix.tasks} == {f'icl_{t}_{k}shot' for t in ICL}
  mix = seqio.get_mixture_or_task('promot_rte_enfr')
  assert {t.name for t in mix.tasks} == {'promot_rte', 'promot_wmt14_enfr'}
  assert icl.PAPER_METRIC['icl_xsum_4shot'] == 'rouge2'
  assert icl.PAPER_METRIC['icl_triviaqa_1shot'] == 'exact_match'
  assert icl.PAPER_METRIC['icl_wmt16_enro_1shot'] == 'bleu'
  assert icl.LABEL_SETS['icl_cb_1shot'] == ('True', 'False', 'Neither')
  # Importing again must not register twice (it would raise).
  finetune.register_all(BYTES)
  icl.register_all(BYTES)


# ------------------------------------------------------- fine-tuning tasks

@pytest.mark.parametrize('name', sorted(FINETUNE))
def test_finetune_task_text(modules, name):
  finetune, _ = modules
  tfds_name, expected_fn, split = FINETUNE[name]
  task = finetune.make_task(name, BYTES)
  with mocked_tfds():
    for sp in ('train', split):
      raw = _raw(tfds_name, sp)
      got = _run(task, sp)
      assert len(got) == len(raw) == NUM_EXAMPLES
      for ex, r in zip(got, raw):
        inputs, targets = expected_fn(r)
        assert _s(ex['inputs_pretokenized']) == inputs
        assert _s(ex['targets_pretokenized']) == targets
        _check_tokens(ex)


@pytest.mark.parametrize('name', sorted(ONE_SHOT))
def test_finetune_one_shot_fixed_demo(modules, name):
  finetune, _ = modules
  tfds_name, expected_fn, split = FINETUNE[ONE_SHOT[name]]
  task = finetune.make_task(name, BYTES)
  with mocked_tfds():
    train_demos = _demo_set(tfds_name, expected_fn)
    eval_demos = {f'{i} {t}' for i, t in map(expected_fn, _raw(tfds_name, split))}
    assert not train_demos & eval_demos  # the mock tells the splits apart
    raw = _raw(tfds_name, split)
    got = _run(task, split)
    demos = set()
    for ex, r in zip(got, raw):
      demo, query = _s(ex['inputs_pretokenized']).split('\n\n')
      assert query == expected_fn(r)[0]
      assert demo in train_demos
      demos.add(demo)
    assert len(demos) == 1  # one fixed demonstration for every example
    again = _run(finetune.make_task(name, BYTES), split)
    assert [e['inputs_pretokenized'] for e in again] == [
        e['inputs_pretokenized'] for e in got]


def test_unlabeled_examples_dropped(modules):
  finetune, icl = modules
  ds = tf.data.Dataset.from_tensor_slices(
      {'premise': ['p1', 'p2'], 'hypothesis': ['h1', 'h2'],
       'label': tf.constant([-1, 1], tf.int64), 'idx': [0, 1]})
  out = list(icl.format_examples(ds, finetune.spec('rte')).as_numpy_iterator())
  assert [(e['inputs'], e['targets']) for e in out] == [
      (b'p2 question: h2 Is it true or false? answer:', b'False')]


# ------------------------------------------------------ in-context tasks

def _check_icl(icl, suite, k):
  tfds_name, expected_fn, split = ICL[suite]
  task = icl.make_task(suite, k, BYTES)
  assert task.name == f'icl_{suite}_{k}shot'
  with mocked_tfds():
    train_demos = _demo_set(tfds_name, expected_fn)
    raw = _raw(tfds_name, split)
    got = _run(task, 'eval')
    assert len(got) == len(raw) == NUM_EXAMPLES
    demo_sets = set()
    for ex, r in zip(got, raw):
      inputs, targets = expected_fn(r)
      text = _s(ex['inputs_pretokenized'])
      assert text.count('\n\n') == k
      parts = text.split('\n\n')
      assert parts[-1] == inputs
      assert len(set(parts[:-1])) == k and set(parts[:-1]) <= train_demos
      assert inputs + ' ' + targets not in parts[:-1]
      demo_sets.add(tuple(parts[:-1]))
      assert _s(ex['targets_pretokenized']) == targets
      if suite in EXPECTED_ANSWERS:
        assert _s(ex['answers']) == EXPECTED_ANSWERS[suite](r)
      _check_tokens(ex)
    if k == 4:
      assert len(demo_sets) > 1  # examples get their own demonstrations
    again = _run(icl.make_task(suite, k, BYTES), split)  # real split name too
  assert [e['inputs_pretokenized'] for e in again] == [
      e['inputs_pretokenized'] for e in got]


@pytest.mark.parametrize('suite', sorted(ICL))
@pytest.mark.parametrize('k', [0, 4])
def test_icl_task(modules, suite, k):
  _check_icl(modules[1], suite, k)


@pytest.mark.slow
@pytest.mark.parametrize('suite', sorted(ICL))
def test_icl_task_one_shot(modules, suite):
  _check_icl(modules[1], suite, 1)


def test_summary_articles_are_cut(modules):
  _, icl = modules
  spec = icl.suite_spec('xsum', k=4)
  out = spec.format({'document': tf.constant('x' * 5000),
                     'summary': tf.constant('s')})
  cap = icl.SUMMARY_CHAR_BUDGET // 5
  assert _s(out['inputs'].numpy()) == (
      'Article: ' + 'x' * cap + ' One sentence summary:')


# ------------------------------------------------------------- templates

def test_templates_exact_strings():
  assert templates.rte('A man is asleep.', 'A person rests.') == (
      'A man is asleep. question: A person rests. Is it true or false? answer:')
  assert templates.nli3('P.', 'H.') == (
      'P. question: H. Is it true, false or neither? answer:')
  assert templates.translation('Hello.', 'French') == (
      'Translate English to French: Hello.')
  assert templates.qa('Who wrote Hamlet?') == 'Q: Who wrote Hamlet? A:'
  assert templates.summary('Text.') == 'Article: Text. One sentence summary:'
  assert templates.openbookqa('Sun is a', ['star', 'moon', 'rock', 'gas']) == (
      'Q: Sun is a A) star B) moon C) rock D) gas A:')
  assert templates.wic('I sat.', 'He sat.', 'sat') == (
      'I sat. He sat. question: Is the word "sat" used with the same meaning '
      'in both sentences? answer:')
  with pytest.raises(ValueError):
    templates.fill(templates.QA_INPUT, question='q', extra='x')


def test_join_few_shot():
  joined = templates.join_few_shot(
      [('Q: 1+1? A:', '2'), ('Q: 2+2? A:', '4')], 'Q: 3+3? A:')
  assert joined == 'Q: 1+1? A: 2\n\nQ: 2+2? A: 4\n\nQ: 3+3? A:'
  assert templates.join_few_shot([], 'Q: x A:') == 'Q: x A:'


def test_postprocessing():
  cut = templates.truncate_at_new_example
  assert cut(' Paris Q: What is the capital of Spain? A: Madrid') == 'Paris'
  assert cut('Bonjour. Translate English to French: Bye.') == 'Bonjour.'
  assert cut('A storm hit. Article: Another story') == 'A storm hit.'
  assert cut('Hallo\n\nTranslate English to German: x') == 'Hallo'
  assert cut(b'no marker here') == 'no marker here'
  assert templates.first_word('  True, because it says so') == 'True'
  assert templates.first_word('False.') == 'False'
  assert templates.first_word('') == ''
  assert templates.postprocess_classification(b'Neither.\n\nP question') == (
      'Neither')
  assert templates.postprocess_generation('x Q: y', is_target=True) == 'x Q: y'
  assert templates.split_answers('a\tb\t') == ['a', 'b']


def test_tf_fill_matches_python(modules):
  _, icl = modules
  fields = {'premise': 'p {x}', 'hypothesis': 'h'}
  got = icl.tf_fill(templates.RTE_INPUT,
                    {k: tf.constant(v) for k, v in fields.items()})
  assert _s(got.numpy()) == templates.rte(**fields)


def test_task_modules_register_how_their_tasks_are_scored(modules):
  """The library learns a task's metric and labels from the module (eval.registry), never by
  importing it."""
  finetune, icl = modules
  assert registry.task_info('promot_rte').metric == 'accuracy'
  assert registry.task_info('promot_rte').labels == finetune.LABEL_SETS['promot_rte']
  assert registry.task_info('icl_cb_1shot').labels == ('True', 'False', 'Neither')
  assert registry.task_info('icl_triviaqa_4shot').metric_or_default() == 'exact_match'
  # an eval file's METRICS / LABEL_SETS override what was registered
  assert registry.task_info('promot_rte', metric='bleu', labels=['x']).metric == 'bleu'
  with pytest.raises(ValueError, match='unknown metric'):
    registry.register_task('promot_rte', metric='f1')


def test_the_old_tasks_module_spelling_still_imports():
  registry.import_task_modules(['tasks.toy'])   # read as promot_tasks.toy
  assert 'toy_sorted' in seqio.TaskRegistry.names()
  with pytest.raises(ValueError, match='Cannot import task module'):
    registry.import_task_modules(['tasks.no_such_module'])
