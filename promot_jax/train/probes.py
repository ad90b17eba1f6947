"""Format-specialization probes during training.

At every validation the trainer can decode a few in-context tasks WITHOUT the prompt and
record, per task, the share of outputs that fall in the fine-tuned task's label set
(`format/<task>`, in [0, 1]) and the task's score (`icl/<task>`, 0-100). Over the steps of
a fine-tuning stage this shows format specialization as it happens (the paper: on 1-shot
TriviaQA, 90% of mT5 XXL's outputs are True/False by step 300 of RTE fine-tuning).

Set in a run file:
  FORMAT_PROBE_TASKS = ['synth_reverse_1shot', 'synth_sort_1shot']
  FORMAT_LABELS = ['True', 'False']     # default: LABEL_SETS of the training task
  FORMAT_PROBE_EXAMPLES = 32
The values land in the checkpoint's state.json, in MODEL_DIR/<stage>/metrics.jsonl (the
history `promot report` charts) and in TensorBoard.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from promot_jax.data import pipeline
from promot_jax.eval import task as eval_task
from promot_jax.model.config import T5Config


def probe_labels(task_name: str, format_labels: Sequence[str]) -> Optional[tuple[str, ...]]:
  """FORMAT_LABELS, else the registered label set of the (fine-tuned) training task; for a
  mixture, every label of its tasks (when each of them has a label set)."""
  if format_labels:
    return tuple(format_labels)
  return eval_task.label_set(task_name)


def check_probes(tasks: Sequence[str], labels: Optional[Sequence[str]], trained_task: str) -> None:
  """Fail before training if a probe task is unknown or there is no label set to probe for."""
  for name in tasks:
    pipeline.check_task_name(name)
  if tasks and not labels:
    raise ValueError(f'FORMAT_PROBE_TASKS is set but {trained_task} has no label set: set '
                     "FORMAT_LABELS, e.g. ['True', 'False'].")


def format_probe_metrics(cfg: T5Config, params: Any, tasks: Sequence[str],
                         labels: Sequence[str], *, task_feature_lengths: Mapping[str, int],
                         batch_size: int, max_examples: int, mesh=None) -> dict[str, float]:
  """{'format/<task>': rate, 'icl/<task>': score} for each probe task, decoded without the
  prompt (greedy), on the task's validation split (else its default evaluation split)."""
  out: dict[str, float] = {}
  for name in tasks:
    split = eval_task.default_split(name, ('validation', 'eval', 'test'))
    plan = eval_task.plan_for(name, 'in_context', False, split)
    entry = eval_task.evaluate_task(
        cfg.replace(dropout_rate=0.0), params, plan, task_feature_lengths=task_feature_lengths,
        batch_size=batch_size, max_examples=max_examples, decoding_method='greedy',
        format_labels=labels, num_saved_examples=0, mesh=mesh)
    out[f'format/{name}'] = float(entry['format_rate'])
    out[f'icl/{name}'] = float(entry[plan.metric])
  return out
