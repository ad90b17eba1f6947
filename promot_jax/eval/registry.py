"""What evaluation needs to know about a task, registered by the module that defines it.

seqio registers a task's data; this registers how the paper scores it: the metric
(accuracy | exact_match | bleu | rouge2), the label set of a classification task (used for
first-word post-processing, rank classification and the format-specialization rate), and
optionally a post-processing function of its own. A task module calls

    registry.register_tables(PAPER_METRIC, LABEL_SETS)      # or register_task(name, ...)

at import time; the library never imports task modules itself (TASK_MODULES names them).
Eval gin files can still override both tables (METRICS, LABEL_SETS).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Mapping, Optional, Sequence

from promot_jax.eval.metrics import METRICS

PostprocessFn = Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  metric: Optional[str] = None                 # None: accuracy with labels, else exact_match
  labels: Optional[tuple[str, ...]] = None     # a classification task's label words
  postprocess: Optional[PostprocessFn] = None  # None: first word with labels, else cut text

  def metric_or_default(self) -> str:
    return self.metric or ('accuracy' if self.labels else 'exact_match')


_TASKS: dict[str, TaskInfo] = {}


def register_task(name: str, *, metric: Optional[str] = None,
                  labels: Optional[Sequence[str]] = None,
                  postprocess_fn: Optional[PostprocessFn] = None) -> None:
  """Record how task `name` is scored; fields not given keep what was registered before."""
  if metric is not None and metric not in METRICS:
    raise ValueError(f'Task {name}: unknown metric {metric!r}; choose one of {list(METRICS)}.')
  old = _TASKS.get(name, TaskInfo())
  _TASKS[name] = TaskInfo(metric if metric is not None else old.metric,
                          tuple(labels) if labels else old.labels,
                          postprocess_fn if postprocess_fn is not None else old.postprocess)


def register_tables(metrics: Mapping[str, str] = {},  # noqa: B006 -- read only
                    label_sets: Mapping[str, Sequence[str]] = {}) -> None:  # noqa: B006
  """register_task for every entry of a {task: metric} and a {task: labels} table."""
  for name in sorted(set(metrics) | set(label_sets)):
    register_task(name, metric=metrics.get(name), labels=label_sets.get(name))


def task_info(name: str, metric: Optional[str] = None,
              labels: Optional[Sequence[str]] = None) -> TaskInfo:
  """The registered TaskInfo of `name`, with `metric` / `labels` overriding when given."""
  found = _TASKS.get(name, TaskInfo())
  return TaskInfo(metric or found.metric, tuple(labels) if labels else found.labels,
                  found.postprocess)


def registered() -> dict[str, TaskInfo]:
  """Every registered task (a copy)."""
  return dict(_TASKS)


def import_task_modules(names: Sequence[str]) -> None:
  """Import each TASK_MODULES entry (its import registers seqio tasks and their scoring).

  `tasks.X` (the example package's name before it was installed as promot_tasks) is read
  as `promot_tasks.X` when no module `tasks.X` exists.
  """
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError as e:
      alias = 'promot_tasks.' + name[len('tasks.'):] if name.startswith('tasks.') else None
      if alias and getattr(e, 'name', None) in ('tasks', name):
        try:
          importlib.import_module(alias)
          continue
        except ImportError:
          pass
      raise ValueError(f'Cannot import task module {name!r} (TASK_MODULES): {e}') from e
