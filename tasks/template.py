"""Template: copy this file to add a task. Nothing here is registered until you rename it.

A task is a data source, preprocessors that produce 'inputs' / 'targets' text, tokenisation
and EOS. Register it at import time (guarding against a second import), then name the module
in the run file so the trainer imports it before reading data:

  TASK_MODULES = ['tasks.my_task']          # in gin/runs/<your run>.gin or --gin.TASK_MODULES
  MIXTURE_OR_TASK_NAME = 'my_task'

For evaluation, add PAPER_METRIC / LABEL_SETS entries (see tasks/finetune.py) or set METRICS
and LABEL_SETS in the eval gin file. Vocabulary: promot_jax.data.pipeline.get_vocabulary() is mT5's
sentencepiece model (PROMOT_VOCABULARY overrides it); 'byte' needs no file.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from promot_jax.data.pipeline import get_vocabulary
from promot_jax.eval import registry

TASK_NAME = 'my_task'                    # rename
PAPER_METRIC = {TASK_NAME: 'accuracy'}   # accuracy | exact_match | bleu | rouge2
LABEL_SETS = {TASK_NAME: ('True', 'False')}
registry.register_tables(PAPER_METRIC, LABEL_SETS)  # how `promot eval` scores them


def load_split(split: str) -> tf.data.Dataset:
  """Raw examples of one split; replace with seqio.TfdsDataSource(...) for a TFDS dataset."""
  rows = {'train': [('the sky is blue', 'True')] * 8, 'validation': [('fire is cold', 'False')] * 4}
  text, label = zip(*rows[split])
  return tf.data.Dataset.from_tensor_slices({'sentence': list(text), 'label': list(label)})


@seqio.map_over_dataset
def to_text(ex):
  """The prompt template: raw fields -> 'inputs' / 'targets' strings."""
  return {'inputs': tf.strings.join([ex['sentence'], ' Is it true or false? answer:']),
          'targets': ex['label']}


def register(name: str = TASK_NAME, vocabulary=None) -> None:
  if name in seqio.TaskRegistry.names():
    return
  vocab = vocabulary or get_vocabulary()
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(lambda split, shuffle_files=False, seed=None:
                                      load_split(split), splits=['train', 'validation']),
      preprocessors=[to_text, seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features={'inputs': seqio.Feature(vocab, add_eos=True),
                       'targets': seqio.Feature(vocab, add_eos=True)},
      metric_fns=[])


if __name__ != 'promot_tasks.template':  # the template itself registers nothing
  register()
