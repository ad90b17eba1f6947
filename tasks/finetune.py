"""Fine-tuning tasks for ProMoT (registered on import, once).

- promot_rte            SuperGLUE RTE (train, validation = the 277-example dev set)
- promot_wmt14_enfr     WMT14 English -> French (train, validation, test)
- promot_snli           SNLI, three labels (train, validation, test)
- promot_openbookqa     OpenbookQA, answer letter (train, validation, test)
- promot_rte_1shot, promot_wmt14_enfr_1shot
                        the "+1-shot" variants: one fixed, seeded training
                        example (from the first POOL_SIZE train examples) put
                        before every query, in training and evaluation
- promot_rte_enfr       multi-task mixture of RTE and En-Fr (equal rates)

RTE's TFDS test split has no labels and is left out. Metrics are attached in
a later step; PAPER_METRIC records which one the paper reports.
Importing this module also registers the in-context suite (promot_tasks.icl), which
every ProMoT run is evaluated on.
"""

from typing import Dict, Optional, Tuple

import seqio

from promot_jax.eval import registry
from promot_tasks import icl, templates

FEWSHOT_SEED = 20221102  # seed of the fixed "+1-shot" demonstration

_TRAIN_DEV_TEST = ('train', 'validation', 'test')
_SPLITS = {
    'rte': ('train', 'validation'),
    'wmt14_enfr': _TRAIN_DEV_TEST,
    'snli': _TRAIN_DEV_TEST,
    'openbookqa': _TRAIN_DEV_TEST,
}
_NAMES = {'rte': 'promot_rte', 'wmt14_enfr': 'promot_wmt14_enfr',
          'snli': 'promot_snli', 'openbookqa': 'promot_openbookqa'}
ONE_SHOT = {'promot_rte_1shot': 'rte', 'promot_wmt14_enfr_1shot': 'wmt14_enfr'}
MIXTURES = {'promot_rte_enfr': ('promot_rte', 'promot_wmt14_enfr')}

PAPER_METRIC = {
    'promot_rte': 'accuracy',
    'promot_wmt14_enfr': 'bleu',
    'promot_snli': 'accuracy',
    'promot_openbookqa': 'accuracy',
    'promot_rte_1shot': 'accuracy',
    'promot_wmt14_enfr_1shot': 'bleu',
}
LABEL_SETS: Dict[str, Tuple[str, ...]] = {
    'promot_rte': templates.RTE_LABELS,
    'promot_rte_1shot': templates.RTE_LABELS,
    'promot_snli': templates.SNLI_LABELS,
    'promot_openbookqa': templates.OPENBOOKQA_LABELS,
}
registry.register_tables(PAPER_METRIC, LABEL_SETS)  # how `promot eval` scores them


def _nli_fields(ex: icl.Features) -> icl.Features:
  return {'premise': ex['premise'], 'hypothesis': ex['hypothesis']}


def _openbookqa_fields(ex: icl.Features) -> icl.Features:
  q = ex['question']
  return {'stem': q['stem'], 'choice_A': q['choice_A'], 'choice_B': q['choice_B'],
          'choice_C': q['choice_C'], 'choice_D': q['choice_D']}


def spec(task: str) -> icl.TaskSpec:
  """The TaskSpec of a fine-tuning task ('rte', 'wmt14_enfr', ...)."""
  if task == 'rte':
    return icl.TaskSpec('super_glue/rte:1.0.2', templates.RTE_INPUT, _nli_fields,
                        labels=templates.RTE_LABELS)
  if task == 'wmt14_enfr':
    return icl.TaskSpec('wmt14_translate/fr-en:1.0.0',
                        templates.translation_template('French'),
                        fields=lambda ex: {'source': ex['en']},
                        target=lambda ex: ex['fr'])
  if task == 'snli':
    return icl.TaskSpec('snli:1.1.0', templates.NLI3_INPUT, _nli_fields,
                        labels=templates.SNLI_LABELS)
  if task == 'openbookqa':
    return icl.TaskSpec('openbookqa:0.1.0', templates.OPENBOOKQA_INPUT,
                        _openbookqa_fields, labels=templates.OPENBOOKQA_LABELS,
                        label_key='answerKey')
  raise KeyError(f'unknown fine-tuning task {task!r}')


def task_names() -> Tuple[str, ...]:
  """All fine-tuning task names (mixtures excluded)."""
  return tuple(_NAMES.values()) + tuple(ONE_SHOT)


def make_task(name: str,
              vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
  """Builds the named fine-tuning task (unregistered)."""
  vocabulary = vocabulary or icl.default_vocabulary()
  if name in ONE_SHOT:
    base = ONE_SHOT[name]
    return icl.build_task(name, spec(base), {s: s for s in _SPLITS[base]},
                          vocabulary, k=1, per_example=False,
                          seed=FEWSHOT_SEED)
  base = {v: k for k, v in _NAMES.items()}[name]
  return icl.build_task(name, spec(base), {s: s for s in _SPLITS[base]},
                        vocabulary)


def register_all(vocabulary: Optional[seqio.Vocabulary] = None) -> None:
  """Registers the tasks and mixtures that are not registered yet."""
  vocabulary = vocabulary or icl.default_vocabulary()
  for name in task_names():
    if name not in seqio.TaskRegistry.names():
      icl.register(make_task(name, vocabulary))
  for name, members in MIXTURES.items():
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, list(members), default_rate=1.0)


register_all()
