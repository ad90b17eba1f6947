"""In-context evaluation tasks (no soft prompt) and the few-shot machinery.

For every suite task and k in SHOTS a seqio task `icl_<task>_<k>shot` is
registered on import. Its examples come from the eval split the paper uses;
each query gets k demonstrations drawn from the first POOL_SIZE usable
examples of the TRAIN split. The draw is seeded by ICL_SEED and a hash of the
query text, so an example always gets the same demonstrations (whatever the
order, sharding or number of runs) while different examples get different
ones. Inputs are `templates.join_few_shot(demos, query)`.

The eval split of each task is registered under its TFDS name and under the
alias 'eval', which the mixtures `icl_suite_<k>shot` use.
"""

import dataclasses
import functools
import string
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import seqio
import tensorflow as tf

from promot_jax.data import pipeline
from promot_jax.eval import registry
from promot_tasks import templates

Features = Dict[str, tf.Tensor]

POOL_SIZE = 1000    # demonstrations are drawn from the first N train examples
ICL_SEED = 20221101
SHOTS = (0, 1, 4)
# (chosen) Articles are cut to this many characters in total over the k + 1
# articles of a summarization prompt, so the query still fits ~1024 tokens.
SUMMARY_CHAR_BUDGET = 3600


# ---------------------------------------------------------------- TF helpers

def tf_fill(template: str, fields: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """`templates.fill` on string tensors (same pattern, same text)."""
  pieces = []
  for literal, name, _, _ in string.Formatter().parse(template):
    if literal:
      pieces.append(tf.constant(literal))
    if name is not None:
      pieces.append(tf.convert_to_tensor(fields[name]))
  return tf.strings.join(pieces)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """How one TFDS dataset becomes `inputs`/`targets` text.

  fields: raw example -> the template's fields. target: raw example -> answer
  text (classification tasks give `labels` instead: the verbalizer indexed by
  the integer `label_key`, and unlabeled examples (-1) are dropped).
  extras: raw example -> additional string features kept for metrics.
  """
  tfds_name: str
  template: str
  fields: Callable[[Features], Features]
  target: Optional[Callable[[Features], tf.Tensor]] = None
  labels: Optional[Tuple[str, ...]] = None
  label_key: str = 'label'
  extras: Optional[Callable[[Features], Features]] = None

  def is_labeled(self, ex: Features) -> tf.Tensor:
    if self.labels is None:
      return tf.constant(True)
    return tf.greater_equal(ex[self.label_key], 0)

  def format(self, ex: Features) -> Features:
    """Raw TFDS example -> {'inputs', 'targets', *extras} strings."""
    if self.labels is not None:
      targets = tf.gather(tf.constant(self.labels), ex[self.label_key])
    else:
      targets = self.target(ex)
    out = {'inputs': tf_fill(self.template, self.fields(ex)),
           'targets': targets}
    if self.extras is not None:
      out.update(self.extras(ex))
    return out


def format_examples(dataset: tf.data.Dataset, spec: TaskSpec) -> tf.data.Dataset:
  """seqio preprocessor: drops unlabeled examples and fills the template."""
  dataset = dataset.filter(spec.is_labeled)
  return dataset.map(spec.format, num_parallel_calls=tf.data.AUTOTUNE)


def load_demonstration_pool(spec: TaskSpec, size: int = POOL_SIZE,
                            split: str = 'train') -> tf.Tensor:
  """The first `size` usable examples of `split`, each as `inputs targets`."""
  loader = seqio.utils.LazyTfdsLoader(spec.tfds_name)
  ds = format_examples(loader.load(split, shuffle_files=False), spec)
  ds = ds.take(size).map(
      lambda ex: tf.strings.join([ex['inputs'], ex['targets']],
                                 separator=templates.DEMO_JOINER))
  batches = list(ds.batch(size).take(1).as_numpy_iterator())
  if not batches:
    raise ValueError(f'no demonstrations found in {spec.tfds_name}:{split}')
  return tf.constant(batches[0], dtype=tf.string)


def _draw(pool_size: int, k: int, seed: tf.Tensor) -> tf.Tensor:
  """k distinct pool indices from a stateless seed."""
  scores = tf.random.stateless_uniform([pool_size], seed=seed)
  return tf.math.top_k(scores, k=k).indices


def add_demonstrations(dataset: tf.data.Dataset, spec: TaskSpec, k: int,
                       seed: int = ICL_SEED, per_example: bool = True,
                       pool_size: int = POOL_SIZE) -> tf.data.Dataset:
  """seqio preprocessor: prepends k train demonstrations to each `inputs`.

  per_example=True draws them from a hash of the query text (ICL suite);
  per_example=False uses one fixed draw for every example (the "+1-shot"
  fine-tuning variants).
  """
  if k == 0:
    return dataset
  pool = load_demonstration_pool(spec, pool_size)
  n = int(pool.shape[0])
  if n < k:
    raise ValueError(f'{spec.tfds_name}: {n} train examples for {k} shots')
  fixed = tf.gather(pool, _draw(n, k, tf.constant([seed, 0], tf.int64)))

  def attach(ex: Features) -> Features:
    if per_example:
      key = tf.strings.to_hash_bucket_fast(ex['inputs'], 2**62)
      demos = tf.gather(pool, _draw(n, k, tf.stack([tf.constant(seed, tf.int64),
                                                    key])))
    else:
      demos = fixed
    parts = tf.concat([demos, tf.reshape(ex['inputs'], [1])], axis=0)
    ex = dict(ex)
    ex['inputs'] = tf.strings.reduce_join(
        parts, separator=templates.EXAMPLE_SEPARATOR)
    return ex

  return dataset.map(attach, num_parallel_calls=tf.data.AUTOTUNE)


def output_features(vocabulary: seqio.Vocabulary) -> Dict[str, seqio.Feature]:
  return {'inputs': seqio.Feature(vocabulary, add_eos=True),
          'targets': seqio.Feature(vocabulary, add_eos=True)}


def build_task(name: str, spec: TaskSpec, splits: Mapping[str, str],
               vocabulary: seqio.Vocabulary, k: int = 0,
               per_example: bool = True, seed: int = ICL_SEED,
               postprocess_fn: Optional[Callable] = None) -> seqio.Task:
  """An (unregistered) seqio task: format, k demos, tokenize, EOS."""
  preprocessors = [
      functools.partial(format_examples, spec=spec),
      functools.partial(add_demonstrations, spec=spec, k=k, seed=seed,
                        per_example=per_example),
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
      seqio.preprocessors.append_eos_after_trim,
  ]
  if postprocess_fn is None:
    postprocess_fn = (templates.postprocess_classification if spec.labels
                      else templates.postprocess_generation)
  return seqio.Task(
      name, seqio.TfdsDataSource(spec.tfds_name, splits=dict(splits)),
      output_features(vocabulary), preprocessors=preprocessors,
      postprocess_fn=postprocess_fn, metric_fns=[])


def register(task: seqio.Task) -> None:
  """Adds a task unless one of that name is already registered."""
  if task.name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add_provider(task.name, task)


def default_vocabulary() -> seqio.Vocabulary:
  return pipeline.get_vocabulary()


# -------------------------------------------------------------- suite specs

def _join_answers(answers: tf.Tensor) -> tf.Tensor:
  return tf.strings.reduce_join(answers, separator=templates.ANSWER_SEPARATOR)


def _cut(text: tf.Tensor, chars: Optional[int]) -> tf.Tensor:
  if chars is None:
    return text
  return tf.strings.substr(text, 0, chars, unit='UTF8_CHAR')


def _translation(tfds_name: str, src: str, tgt: str, language: str) -> TaskSpec:
  return TaskSpec(tfds_name, templates.translation_template(language),
                  fields=lambda ex: {'source': ex[src]},
                  target=lambda ex: ex[tgt])


def _summary(tfds_name: str, article: str, summary: str,
             chars: Optional[int] = None) -> TaskSpec:
  return TaskSpec(tfds_name, templates.SUMMARY_INPUT,
                  fields=lambda ex: {'article': _cut(ex[article], chars)},
                  target=lambda ex: ex[summary])


def _trivia_answers(ex: Features) -> Features:
  value = tf.reshape(ex['answer']['value'], [1])
  return {'answers': _join_answers(tf.concat([value, ex['answer']['aliases']], 0))}


def suite_spec(task: str, k: int = 0) -> TaskSpec:
  """The TaskSpec of an in-context suite task (k only matters for summaries)."""
  chars = SUMMARY_CHAR_BUDGET // (k + 1)
  nli = lambda ex: {'premise': ex['premise'], 'hypothesis': ex['hypothesis']}
  if task == 'cb':
    return TaskSpec('super_glue/cb:1.0.2', templates.NLI3_INPUT, nli,
                    labels=templates.CB_LABELS)
  if task == 'wic':
    return TaskSpec('super_glue/wic:1.0.2', templates.WIC_INPUT,
                    lambda ex: {n: ex[n] for n in ('sentence1', 'sentence2', 'word')},
                    labels=templates.WIC_LABELS)
  if task == 'triviaqa':
    return TaskSpec('trivia_qa/rc.nocontext:1.1.0', templates.QA_INPUT,
                    lambda ex: {'question': ex['question']},
                    target=lambda ex: ex['answer']['value'],
                    extras=_trivia_answers)
  if task == 'webquestions':
    return TaskSpec('web_questions:1.0.0', templates.QA_INPUT,
                    lambda ex: {'question': ex['question']},
                    target=lambda ex: tf.concat([ex['answers'], ['']], 0)[0],
                    extras=lambda ex: {'answers': _join_answers(ex['answers'])})
  if task == 'wmt16_ende':
    return _translation('wmt16_translate/de-en:1.0.0', 'en', 'de', 'German')
  if task == 'wmt16_enro':
    return _translation('wmt16_translate/ro-en:1.0.0', 'en', 'ro', 'Romanian')
  if task == 'xsum':
    return _summary('xsum:1.1.0', 'document', 'summary', chars)
  if task == 'wikilingua_en':
    return _summary('gem/wiki_lingua_english_en:1.1.0', 'source', 'target', chars)
  raise KeyError(f'unknown in-context task {task!r}')


SUITE = ('cb', 'wic', 'triviaqa', 'webquestions', 'wmt16_ende', 'wmt16_enro',
         'xsum', 'wikilingua_en')
# The paper's split for each task. TriviaQA: TFDS's test split has no answers,
# so the (unfiltered-style) validation split is used instead.
EVAL_SPLIT = {'cb': 'validation', 'wic': 'validation',
              'triviaqa': 'validation', 'webquestions': 'test',
              'wmt16_ende': 'test', 'wmt16_enro': 'test', 'xsum': 'test',
              'wikilingua_en': 'test'}
_METRIC = {'cb': 'accuracy', 'wic': 'accuracy', 'triviaqa': 'exact_match',
           'webquestions': 'exact_match', 'wmt16_ende': 'bleu',
           'wmt16_enro': 'bleu', 'xsum': 'rouge2', 'wikilingua_en': 'rouge2'}


def task_name(task: str, k: int) -> str:
  return f'icl_{task}_{k}shot'


def mixture_name(k: int) -> str:
  return f'icl_suite_{k}shot'


PAPER_METRIC = {task_name(t, k): _METRIC[t] for t in SUITE for k in SHOTS}
LABEL_SETS = {task_name(t, k): suite_spec(t).labels
              for t in ('cb', 'wic') for k in SHOTS}
registry.register_tables(PAPER_METRIC, LABEL_SETS)  # how `promot eval` scores them


def make_task(task: str, k: int,
              vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
  """Builds `icl_<task>_<k>shot` (unregistered) with the given vocabulary."""
  split = EVAL_SPLIT[task]
  return build_task(task_name(task, k), suite_spec(task, k),
                    {split: split, 'eval': split},
                    vocabulary or default_vocabulary(), k=k, per_example=True)


def register_all(vocabulary: Optional[seqio.Vocabulary] = None,
                 shots: Sequence[int] = SHOTS) -> None:
  """Registers every suite task and one mixture per shot count (idempotent)."""
  vocabulary = vocabulary or default_vocabulary()
  for k in shots:
    for task in SUITE:
      if task_name(task, k) not in seqio.TaskRegistry.names():
        register(make_task(task, k, vocabulary))
    if mixture_name(k) not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(mixture_name(k),
                                [task_name(t, k) for t in SUITE],
                                default_rate=1.0)


register_all()
