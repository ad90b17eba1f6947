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

from promot_jax.config import T5Config


def probe_labels(task_name: str, format_labels: Sequence[str]) -> Optional[tuple[str, ...]]:
  """FORMAT_LABELS, else the LABEL_SETS entry of the (fine-tuned) training task."""
  from promot_jax import evaluation
  if format_labels:
    return tuple(format_labels)
  found = evaluation._module_tables('LABEL_SETS', ()).get(task_name)  # noqa: SLF001
  return tuple(found) if found else None


def check_probes(tasks: Sequence[str], labels: Optional[Sequence[str]], trained_task: str) -> None:
  """Fail before training if a probe task is unknown or there is no label set to probe for."""
  from promot_jax import data
  for name in tasks:
    data.check_task_name(name)
  if tasks and not labels:
    raise ValueError(f'FORMAT_PROBE_TASKS is set but {trained_task} has no label set: set '
                     "FORMAT_LABELS, e.g. ['True', 'False'].")


def format_probe_metrics(cfg: T5Config, params: Any, tasks: Sequence[str],
                         labels: Sequence[str], *, task_feature_lengths: Mapping[str, int],
                         batch_size: int, max_examples: int) -> dict[str, float]:
  """{'format/<task>': rate, 'icl/<task>': score} for each probe task, decoded without the
  prompt (greedy), on the task's validation split (else its default evaluation split)."""
  from promot_jax import evaluation
  metric_table = evaluation._module_tables('PAPER_METRIC', ())  # noqa: SLF001
  label_table = evaluation._module_tables('LABEL_SETS', ())  # noqa: SLF001
  out: dict[str, float] = {}
  for name in tasks:
    own_labels = label_table.get(name)
    metric = metric_table.get(name) or ('accuracy' if own_labels else 'exact_match')
    plan = evaluation.TaskPlan(name, 'in_context', False, evaluation.shots_of(name),
                               _probe_split(name), metric,
                               tuple(own_labels) if own_labels else None, 'decode')
    entry = evaluation.evaluate_task(
        cfg.replace(dropout_rate=0.0), params, plan, task_feature_lengths=task_feature_lengths,
        batch_size=batch_size, max_examples=max_examples, decoding_method='greedy',
        format_labels=labels, num_saved_examples=0, log=lambda message: None)
    out[f'format/{name}'] = float(entry['format_rate'])
    out[f'icl/{name}'] = float(entry[metric])
  return out


def _probe_split(task_name: str) -> str:
  import seqio
  from promot_jax import evaluation
  if 'validation' in seqio.get_mixture_or_task(task_name).splits:
    return 'validation'
  return evaluation._default_split(task_name)  # noqa: SLF001
