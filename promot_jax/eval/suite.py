"""The ProMoT evaluation suite: every checkpoint on the fine-tuned task and the in-context tasks.

For each checkpoint: the fine-tuned task WITH the soft prompt (0-shot), then every in-context
task WITHOUT it, each evaluated by eval.task (decode or rank, post-process, the paper's
metric). Each in-context task also reports its format-specialization rate: the share of
outputs whose first word lies in the fine-tuned task's label set.

Results: OUT_DIR/<checkpoint name>/results.json (rewritten after every task) and
OUT_DIR/summary.json. A task that cannot run (unknown name, unreadable data) becomes an
error entry and the others still run. The command is `promot eval` (cli/eval_cmd.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax

from promot_jax import mesh as partitioning, paths
from promot_jax.checkpoints import resolve
from promot_jax.data import pipeline
from promot_jax.eval import metrics, registry
from promot_jax.eval.task import (TaskPlan, default_split, evaluate_task, expand, label_set,
                                  plan_for, shots_of)
from promot_jax.model import formats

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `promot eval` runs; gin/eval/base.gin maps the macros onto these fields."""
  out_dir: str
  checkpoints: Sequence[str] = ()
  finetuned_task: Optional[str] = None
  finetuned_with_prompt: bool = True      # False for baselines that have no prompt
  icl_tasks: Sequence[str] = ()           # task or mixture names, evaluated without the prompt
  task_modules: Sequence[str] = ()
  task_feature_lengths: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {'inputs': 1024, 'targets': 128})
  batch_size: int = 32
  max_eval_examples: Optional[int] = None
  decoding: str = 'beam'                  # 'beam' | 'greedy'
  beam_size: int = 4
  beam_alpha: float = 0.6
  classification_mode: str = 'decode'     # 'decode' | 'rank' (tasks with a label set)
  metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)   # task -> metric
  label_sets: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  splits: Mapping[str, str] = dataclasses.field(default_factory=dict)    # task -> split
  format_labels: Optional[Sequence[str]] = None   # default: the fine-tuned task's label set
  num_saved_examples: int = 5
  # The mesh and the restore, as in the run file: NUM_PARTITIONS, LOGICAL_AXIS_RULES.
  num_partitions: int = 1
  logical_axis_rules: Sequence[tuple[str, Optional[str]]] = ()
  restore_dtype: Optional[str] = None     # 'bfloat16': the weights cast while they are read
  distributed: bool = False
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  def rules(self) -> tuple:
    return partitioning.standard_logical_axis_rules(
        tuple(tuple(r) for r in self.logical_axis_rules))

  def validate(self) -> None:
    if self.decoding not in ('beam', 'greedy'):
      raise ValueError(f"DECODING must be 'beam' or 'greedy', got {self.decoding!r}.")
    if self.classification_mode not in ('decode', 'rank'):
      raise ValueError("CLASSIFICATION_MODE must be 'decode' or 'rank', got "
                       f'{self.classification_mode!r}.')
    if self.batch_size < 1 or self.beam_size < 1:
      raise ValueError('EVAL_BATCH_SIZE and BEAM_SIZE must be positive.')
    if {'inputs', 'targets'} - set(self.task_feature_lengths):
      raise ValueError("TASK_FEATURE_LENGTHS needs 'inputs' and 'targets', e.g. "
                       "{'inputs': 1024, 'targets': 128}.")
    if self.max_eval_examples is not None and self.max_eval_examples < 1:
      raise ValueError(f'MAX_EVAL_EXAMPLES must be positive or None, got {self.max_eval_examples}.')
    for name, metric in self.metrics.items():
      if metric not in metrics.METRICS:
        raise ValueError(f'METRICS[{name!r}] = {metric!r}; choose one of {list(metrics.METRICS)}.')
    if self.restore_dtype not in (None, 'float32', 'bfloat16'):
      raise ValueError(f"RESTORE_DTYPE must be None, 'float32' or 'bfloat16', got "
                       f'{self.restore_dtype!r}.')
    if self.num_partitions < 1:
      raise ValueError(f'NUM_PARTITIONS must be positive, got {self.num_partitions}.')
    if not self.finetuned_task and not self.icl_tasks:
      raise ValueError('Nothing to evaluate: set FINETUNED_TASK and/or ICL_TASKS.')


def plan_tasks(ecfg: EvalConfig) -> list[TaskPlan]:
  """The suite's tasks in order; an unknown name becomes a plan carrying its error."""
  wanted = [(ecfg.finetuned_task, 'finetuned')] if ecfg.finetuned_task else []
  wanted += [(n, 'in_context') for n in ecfg.icl_tasks]
  plans = []
  for raw, role in wanted:
    with_prompt = role == 'finetuned' and ecfg.finetuned_with_prompt
    try:
      pipeline.check_task_name(raw)
      names = expand(raw)
    except ValueError as e:
      plans.append(TaskPlan(raw, role, with_prompt, shots_of(raw), error=str(e)))
      continue
    for name in names:
      plans.append(plan_for(name, role, with_prompt, ecfg.splits.get(name) or default_split(name),
                            ecfg.metrics.get(name), ecfg.label_sets.get(name),
                            ecfg.classification_mode))
  return plans


def format_label_set(ecfg: EvalConfig) -> Optional[tuple[str, ...]]:
  """FORMAT_LABELS, else the fine-tuned task's label set (LABEL_SETS, else registered)."""
  if ecfg.format_labels:
    return tuple(ecfg.format_labels)
  if ecfg.label_sets.get(ecfg.finetuned_task):
    return tuple(ecfg.label_sets[ecfg.finetuned_task])
  if ecfg.finetuned_task:
    return label_set(ecfg.finetuned_task)     # a mixture: every label of its tasks
  return None


# ------------------------------------------------------------------------------- the suite

def is_writer() -> bool:
  return jax.process_index() == 0


def log_line(message: str) -> None:
  if is_writer():
    print(message, flush=True)


def _write_json(path: str, value: Any) -> None:
  if not is_writer():
    return
  paths.makedirs(paths.dirname(path))
  paths.write_json(path, value)


def _averages(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Optional[float]]:
  """The paper's Norm. Avg.: the mean in-context score per shot count (None if one failed)."""
  groups: dict[str, dict[str, Optional[float]]] = {}
  for name, entry in tasks.items():
    if entry.get('role') == 'in_context':
      groups.setdefault(f'{entry["shots"]}shot', {})[name] = entry.get(entry.get('metric', ''))
  return {k: metrics.paper_average(v) for k, v in sorted(groups.items())}


def _short(message: str, lines: int = 4, chars: int = 600) -> str:
  """Error text for JSON and stderr: some libraries put pages into their messages."""
  kept = '\n'.join(message.splitlines()[:lines])
  kept = kept if len(kept) <= chars else kept[:chars]
  return kept + (' ...' if kept != message else '')


def device_bytes(params: Any) -> dict[str, int]:
  """Bytes of the parameters on this process's first device, and the largest single buffer
  any local device holds (what tells whether the model was ever whole on one device)."""
  first = jax.local_devices()[0]
  on_first, largest = 0, 0
  for leaf in jax.tree_util.tree_leaves(params):
    for shard in leaf.addressable_shards:
      largest = max(largest, shard.data.nbytes)
      if shard.device == first:
        on_first += shard.data.nbytes
  return {'param_bytes_per_device': on_first, 'largest_device_buffer_bytes': largest}


def _settings(ecfg: EvalConfig, labels, mesh) -> dict[str, Any]:
  return {'decoding': ecfg.decoding, 'beam_size': ecfg.beam_size, 'beam_alpha': ecfg.beam_alpha,
          'classification_mode': ecfg.classification_mode,
          'task_feature_lengths': dict(ecfg.task_feature_lengths),
          'max_eval_examples': ecfg.max_eval_examples, 'batch_size': ecfg.batch_size,
          'finetuned_task': ecfg.finetuned_task,
          'format_labels': list(labels) if labels else None,
          'restore_dtype': ecfg.restore_dtype,
          'mesh_shape': {k: int(v) for k, v in mesh.shape.items()},
          'process_count': jax.process_count()}


# What may differ between an interrupted evaluation and its rerun without redoing tasks.
_LAYOUT_SETTINGS = ('mesh_shape', 'process_count', 'batch_size', 'param_bytes_per_device',
                    'largest_device_buffer_bytes')


def _finished_tasks(out: str, resolved: str, settings: Mapping[str, Any], log: Log) -> dict:
  """Entries of an earlier, interrupted evaluation of the same checkpoint with the same
  settings (OUT_DIR/<name>/results.json); tasks that failed there are run again."""
  if not paths.exists(out):
    return {}
  try:
    earlier = paths.read_json(out)
  except (ValueError, OSError):
    return {}
  same = lambda a: {k: v for k, v in a.items() if k not in _LAYOUT_SETTINGS}  # noqa: E731
  if earlier.get('checkpoint', {}).get('resolved') != resolved or \
      same(earlier.get('settings', {})) != same(json_round_trip(settings)):
    log(f'{out} holds results of another checkpoint or other settings: evaluating again')
    return {}
  return {t: e for t, e in earlier.get('tasks', {}).items() if 'error' not in e}


def json_round_trip(value: Any) -> Any:
  return json.loads(json.dumps(value))


def evaluate_checkpoint(ecfg: EvalConfig, path: str, name: str, plans: Sequence[TaskPlan],
                        log: Optional[Log] = None, mesh=None) -> dict[str, Any]:
  """Every planned task on one checkpoint; OUT_DIR/<name>/results.json after each task.

  The checkpoint is read onto `mesh` (default: all devices, NUM_PARTITIONS model axis) shard
  by shard. Tasks an interrupted run of the same command finished are not redone.
  """
  log = log or log_line
  mesh = mesh if mesh is not None else partitioning.make_mesh(ecfg.num_partitions)
  resolved = resolve.resolve_checkpoint(path)
  start = time.perf_counter()
  cfg, params = resolve.load_checkpoint(resolved, mesh, ecfg.rules(), ecfg.restore_dtype)
  labels = format_label_set(ecfg)
  memory = device_bytes(params)
  log(f'[eval {name}] restored {resolved} onto mesh {dict(mesh.shape)} in '
      f'{time.perf_counter() - start:.1f}s: {memory["param_bytes_per_device"] / 2**20:,.1f} MiB '
      'of parameters per device')
  settings = {**_settings(ecfg, labels, mesh), **memory}
  out = paths.join(ecfg.out_dir, name, 'results.json')
  tag = lambda message: log(f'[eval {name}] {message}')  # noqa: E731
  done = _finished_tasks(out, resolved, settings, tag)
  results = {'checkpoint': {'name': name, 'path': path, 'resolved': resolved,
                            'has_prompt': 'prompt' in params,
                            'format_modules': list(formats.kinds(cfg)),
                            'method': resolve.checkpoint_method(resolved)},
             'settings': settings, 'tasks': {}, 'failed': []}
  for plan in plans:
    where = 'with prompt' if plan.with_prompt else 'without prompt'
    if plan.name in done:
      tag(f'{plan.name}: already evaluated ({out}), kept')
      results['tasks'][plan.name] = done[plan.name]
      continue
    tag(f'{plan.name}: {plan.role}, {plan.shots}-shot, {where}, split {plan.split or "?"}')
    try:
      if plan.error:
        raise ValueError(plan.error)
      entry = evaluate_task(cfg, params, plan, task_feature_lengths=ecfg.task_feature_lengths,
                            batch_size=ecfg.batch_size, max_examples=ecfg.max_eval_examples,
                            decoding_method=ecfg.decoding, beam_size=ecfg.beam_size,
                            alpha=ecfg.beam_alpha, format_labels=labels,
                            num_saved_examples=ecfg.num_saved_examples, log=tag, mesh=mesh)
    except Exception as e:  # noqa: BLE001 -- one broken task must not stop the suite
      message = _short(f'{type(e).__name__}: {e}')
      print(f'promot eval: {name}: task {plan.name} failed: {message}', file=sys.stderr,
            flush=True)
      entry = {'error': message, 'with_prompt': plan.with_prompt, 'shots': plan.shots,
               'role': plan.role}
      results['failed'].append(plan.name)
    results['tasks'][plan.name] = entry
    results['averages'] = _averages(results['tasks'])
    _write_json(out, results)
  return results


def evaluate_suite(ecfg: EvalConfig, checkpoints: Optional[Sequence[str]] = None,
                   log: Optional[Log] = None,
                   all_checkpoints: bool = False) -> dict[str, dict[str, Any]]:
  """Evaluate every checkpoint on the suite; {checkpoint name: results}. Writes the JSON files.

  A path may be a checkpoint, a stage directory (its kept checkpoint, or every checkpoint with
  `all_checkpoints`) or a run's MODEL_DIR (the same for each of its stages). Checked before
  anything runs: every checkpoint exists, and holds a prompt if the suite uses it (a
  ValueError names the checkpoint otherwise). With DISTRIBUTED every host runs this; process 0
  writes the files.
  """
  log = log or log_line
  ecfg.validate()
  registry.import_task_modules(ecfg.task_modules)
  given = list(checkpoints if checkpoints is not None else ecfg.checkpoints)
  if not given:
    raise ValueError('No checkpoint to evaluate: pass --checkpoint PATH or set CHECKPOINTS.')
  plans = plan_tasks(ecfg)
  if ecfg.distributed:
    partitioning.initialize_distributed(ecfg.coordinator_address, ecfg.num_processes,
                                        ecfg.process_id)
  mesh = partitioning.make_mesh(ecfg.num_partitions)
  log(f'promot eval: {jax.process_count()} process(es), {jax.device_count()} devices, mesh '
      f'{dict(mesh.shape)}')
  checkpoint_paths = [c for path in given for c in resolve.expand_checkpoints(path, all_checkpoints)]
  named, seen = [], {}
  for path in checkpoint_paths:
    resolved = resolve.resolve_checkpoint(path)
    if any(p.with_prompt for p in plans) and not resolve.checkpoint_has_prompt(resolved):
      raise ValueError(
          f'Checkpoint {resolved} has no prompt, but {ecfg.finetuned_task} is evaluated with '
          'it. Evaluate a ProMoT / prompt-tuning checkpoint, or set '
          '--gin.FINETUNED_WITH_PROMPT=False for a baseline without a prompt.')
    name = resolve.checkpoint_name(resolved)
    seen[name] = seen.get(name, 0) + 1
    named.append((path, name if seen[name] == 1 else f'{name}_{seen[name]}'))
  all_results = {}
  for path, name in named:
    all_results[name] = evaluate_checkpoint(ecfg, path, name, plans, log, mesh)
  summary = {name: {'tasks': {t: e.get(e.get('metric', ''), None) if 'error' not in e else 'error'
                              for t, e in r['tasks'].items()},
                    'format_rate': {t: e.get('format_rate') for t, e in r['tasks'].items()},
                    'averages': r.get('averages', {}), 'failed': r['failed']}
             for name, r in all_results.items()}
  _write_json(paths.join(ecfg.out_dir, 'summary.json'), summary)
  return all_results


def summary_table(all_results: Mapping[str, Mapping[str, Any]]) -> str:
  """Tasks down, checkpoints across: score (format rate) or ERROR."""
  names = list(all_results)
  rows = {}
  for name in names:
    for task, entry in all_results[name]['tasks'].items():
      rows.setdefault(task, {})[name] = entry
  width = max([len(t) for t in rows] + [16])
  cell = max([len(n) + 2 for n in names] + [24])
  head = f'{"task":<{width}}  prompt shots metric       ' + ''.join(f'{n:>{cell}}' for n in names)
  lines = [head, '-' * len(head)]
  for task, by_ckpt in rows.items():
    first = next(iter(by_ckpt.values()))
    metric = next((e['metric'] for e in by_ckpt.values() if 'metric' in e), '-')
    cells = []
    for n in names:
      e = by_ckpt.get(n)
      if e is None or 'error' in e:
        cells.append(f'{"ERROR" if e else "-":>{cell}}')
      else:
        fmt = f' (fmt {e["format_rate"]:.2f})' if e.get('format_rate') is not None else ''
        cells.append(f'{e[e["metric"]]:.2f}{fmt}'.rjust(cell))
    lines.append(f'{task:<{width}}  {"yes" if first["with_prompt"] else "no":<6} '
                 f'{first["shots"]:<5} {metric:<12} ' + ''.join(cells))
  shot_keys = sorted({k for r in all_results.values() for k in r.get('averages', {})})
  for key in shot_keys:
    values = [all_results[n].get('averages', {}).get(key) for n in names]
    lines.append(f'{"ICL average " + key:<{width + 27}} ' + ''.join(
        (f'{v:.2f}' if v is not None else '-').rjust(cell) for v in values))
  return '\n'.join(lines)
