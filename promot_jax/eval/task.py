"""One task's evaluation: read its examples, batch them, decode or rank, post-process, score.

Used by the suite (`promot eval`), by the trainer's keep-best validation and by the format
probes, so every number of the project comes from the same decoding and scoring code.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import seqio

from promot_jax import mesh as partitioning
from promot_jax.data import pipeline
from promot_jax.eval import metrics, postprocess, registry
from promot_jax.model import decoding, formats, prompt
from promot_jax.model.config import T5Config

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TaskPlan:
  """One task of the suite and how it is evaluated."""
  name: str
  role: str                         # 'finetuned' or 'in_context'
  with_prompt: bool
  shots: int
  split: str = ''
  metric: str = 'accuracy'
  labels: Optional[tuple[str, ...]] = None
  mode: str = 'decode'              # 'decode' or 'rank'
  error: Optional[str] = None       # set when the task cannot even be planned (unknown name)


def shots_of(task_name: str) -> int:
  """k of an `..._<k>shot` task name; 0 otherwise."""
  m = re.search(r'_(\d+)shot$', task_name)
  return int(m.group(1)) if m else 0


def default_split(task_name: str, preferred: Sequence[str] = ('eval', 'validation', 'test')) -> str:
  """The first of `preferred` that the task has, else its first split."""
  splits = list(seqio.get_mixture_or_task(task_name).splits)
  for choice in preferred:
    if choice in splits:
      return choice
  return splits[0]


def expand(name: str) -> list[str]:
  """A mixture's tasks (sorted by name), or [name] for a task."""
  if name in seqio.MixtureRegistry.names():
    return sorted(t.name for t in seqio.get_mixture_or_task(name).tasks)
  return [name]


def label_set(name: str) -> Optional[tuple[str, ...]]:
  """A task's registered label set; for a mixture, every label of its tasks (sorted), when
  each of them has a label set (else None)."""
  sets = [registry.task_info(task).labels for task in expand(name)]
  if len(sets) == 1:
    return sets[0]
  return tuple(sorted({x for labels in sets for x in labels})) if all(sets) else None


def plan_for(name: str, role: str, with_prompt: bool, split: str,
             metric: Optional[str] = None, labels: Optional[Sequence[str]] = None,
             mode: str = 'decode') -> TaskPlan:
  """A TaskPlan with the registered metric and labels of `name` (overridable)."""
  info = registry.task_info(name, metric, labels)
  return TaskPlan(name, role, with_prompt, shots_of(name), split, info.metric_or_default(),
                  info.labels, 'rank' if info.labels and mode == 'rank' else 'decode')


def read_examples(task_name: str, split: str, limit: Optional[int]) -> Iterator[dict]:
  """The task's preprocessed examples in order (no shuffling), at most `limit`."""
  task = seqio.get_mixture_or_task(task_name)
  if split not in task.splits:
    raise ValueError(f'Task {task_name} has no split {split!r}; its splits: {list(task.splits)}.')
  ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1, use_cached=False,
                        try_in_mem_cache=False)
  if limit is not None:
    ds = ds.take(limit)
  yield from ds.as_numpy_iterator()


def count_examples(task_name: str, split: str, limit: Optional[int]) -> Optional[int]:
  """How many examples a task's split yields (capped at `limit`), when seqio knows it cheaply;
  None otherwise (progress lines then show no ETA)."""
  try:
    n = seqio.get_mixture_or_task(task_name).num_input_examples(split)
  except Exception:  # noqa: BLE001 -- sources that cannot tell
    n = None
  if n is None:
    return limit
  return min(n, limit) if limit is not None else n


def bucket_length(longest: int, cap: int) -> int:
  """Pad inputs to a power of two (>= 64) no longer than `cap`: few distinct compiled shapes."""
  size = 64
  while size < longest:
    size *= 2
  return min(size, cap)


def pad_rows(rows: Sequence[np.ndarray], num_rows: int, length: int) -> tuple[np.ndarray, int]:
  """[num_rows, length] int32, zero-padded; too-long rows keep their END (the query). Returns
  the array and how many rows were cut."""
  out = np.zeros((num_rows, length), np.int32)
  cut = 0
  for i, row in enumerate(rows):
    if len(row) > length:
      row, cut = row[-length:], cut + 1
    out[i, :len(row)] = row
  return out, cut


def batched(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
  """Lists of `size` items; the last may be shorter."""
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def check_vocabulary(task_name: str, cfg: T5Config):
  """The task's targets vocabulary, checked readable and no larger than the model's."""
  vocab = pipeline.check_vocabulary_readable(
      seqio.get_mixture_or_task(task_name).output_features['targets'].vocabulary)
  if vocab.vocab_size > cfg.vocab_size:
    raise ValueError(f'Task {task_name}: its vocabulary has {vocab.vocab_size} ids but the '
                     f'model embeds only {cfg.vocab_size}; use the model\'s vocabulary '
                     '(PROMOT_VOCABULARY).')
  return vocab


def evaluate_task(cfg: T5Config, params: Any, plan: TaskPlan, *,
                  task_feature_lengths: Mapping[str, int], batch_size: int,
                  max_examples: Optional[int] = None, decoding_method: str = 'beam',
                  beam_size: int = 4, alpha: float = 0.6,
                  format_labels: Optional[Sequence[str]] = None, num_saved_examples: int = 5,
                  log: Optional[Log] = None, mesh=None) -> dict[str, Any]:
  """Run one task: read, batch, decode or rank, post-process, score. Returns its entry.

  With `mesh` the parameters are global arrays on it (checkpoints.loading.load_on_mesh) and
  every process runs this with the same examples: each batch is laid out over the mesh's
  'data' axis (padded to a multiple of it; the padding is dropped), the decoding program is
  partitioned like the parameters, and every process gets the whole batch's outputs back.
  """
  log = log or (lambda message: None)
  if mesh is not None:   # every data position gets whole rows
    data = mesh.shape['data']
    batch_size = -(-batch_size // data) * data
  place = (lambda x: x) if mesh is None else (  # noqa: E731
      lambda x: partitioning.batch_array(x, mesh))
  to_host = np.asarray if mesh is None else partitioning.to_host
  if plan.with_prompt:
    if not cfg.has_format_module or formats.missing_modules(params, cfg):
      raise ValueError(f'{plan.name} is evaluated with the prompt (the format module) but the '
                       'parameters hold none.')
    cfg, params = prompt.select_task_prompt(cfg, params, plan.name)   # per-task prompts
  vocab = check_vocabulary(plan.name, cfg)
  own_postprocess = registry.task_info(plan.name).postprocess   # a task's own, if it has one
  in_len, out_len = int(task_feature_lengths['inputs']), int(task_feature_lengths['targets'])
  candidates = None
  if plan.mode == 'rank':  # labels padded to the decode length: one program for all tasks
    encoded = [list(vocab.encode(label)) + [vocab.eos_id] for label in plan.labels]
    candidates = pad_rows([np.asarray(c) for c in encoded], len(encoded),
                          max([out_len] + [len(c) for c in encoded]))[0]
  total = count_examples(plan.name, plan.split, max_examples)
  records, truncated, start, last_log = [], 0, time.perf_counter(), time.perf_counter()
  for batch in batched(read_examples(plan.name, plan.split, max_examples), batch_size):
    longest = max(len(ex['inputs']) for ex in batch)
    enc, cut = pad_rows([ex['inputs'] for ex in batch], batch_size, bucket_length(longest, in_len))
    truncated += cut
    if plan.mode == 'rank':
      cands = np.ascontiguousarray(np.broadcast_to(candidates, (batch_size,) + candidates.shape))
      best = to_host(decoding.rank_classify(cfg, params, place(enc), place(cands),
                                            plan.with_prompt))
      outputs = [plan.labels[int(i)] for i in best[:len(batch)]]
    else:
      if decoding_method == 'greedy':
        tokens = decoding.greedy_decode(cfg, params, place(enc), out_len,
                                        with_prompt=plan.with_prompt, eos_id=vocab.eos_id)
      else:
        tokens = decoding.beam_search(cfg, params, place(enc), out_len, beam_size, alpha,
                                      with_prompt=plan.with_prompt, eos_id=vocab.eos_id)
      outputs = [vocab.decode(row.tolist()) for row in to_host(tokens)[:len(batch)]]
    for ex, output in zip(batch, outputs):
      target = postprocess.as_text(ex.get('targets_pretokenized', b''))
      records.append({'input': postprocess.as_text(ex.get('inputs_pretokenized', b'')),
                      'output': output,
                      'prediction': own_postprocess(output) if own_postprocess
                      else metrics.postprocess(output, plan.labels is not None),
                      'target': target, 'answers': metrics.answers_of(ex, target)})
      if records[-1]['answers'] == [target]:
        del records[-1]['answers']
    now = time.perf_counter()
    if now - last_log > 10:
      rate = len(records) / (now - start)
      eta = (f', ETA {time.strftime("%H:%M:%S", time.gmtime((total - len(records)) / rate))}'
             if total and rate > 0 else '')
      log(f'{plan.name}: {len(records)}{f"/{total}" if total else ""} examples, '
          f'{rate:.1f} examples/s{eta}')
      last_log = now
  if not records:
    raise ValueError(f'Task {plan.name} split {plan.split!r} gave no examples.')
  seconds = time.perf_counter() - start
  targets = [r.get('answers', [r['target']]) if plan.metric == 'exact_match' else r['target']
             for r in records]
  score = metrics.compute(plan.metric, targets, [r['prediction'] for r in records])
  entry = {'metric': plan.metric, plan.metric: score, 'num_examples': len(records),
           'with_prompt': plan.with_prompt, 'shots': plan.shots, 'role': plan.role,
           'split': plan.split, 'mode': plan.mode,
           'decoding': None if plan.mode == 'rank' else decoding_method,
           'format_rate': (metrics.format_rate([r['output'] for r in records], format_labels)
                           if format_labels and plan.mode == 'decode' else None),
           'num_truncated': truncated, 'seconds': round(seconds, 3),
           'examples_per_second': round(len(records) / max(seconds, 1e-9), 3),
           'examples': records[:num_saved_examples]}
  log(f'{plan.name}: {len(records)} examples, {entry["examples_per_second"]:.1f} examples/s, '
      f'{plan.metric} {score:.2f}' + (f', {truncated} inputs cut to {in_len} tokens'
                                      if truncated else ''))
  return entry


def validation_metrics(config: T5Config, params: Any, task_name: str, split: str = 'validation',
                       *, task_feature_lengths: Mapping[str, int], batch_size: int = 32,
                       max_examples: Optional[int] = None, with_prompt: bool = False,
                       decoding_method: str = 'greedy', beam_size: int = 4, alpha: float = 0.6,
                       metric: Optional[str] = None, labels: Optional[Sequence[str]] = None,
                       prefix: str = 'validation/', mesh=None) -> dict[str, float]:
  """Decode-based validation of a stage's task, for keep-best checkpoint selection.

  Returns {prefix + 'decode_<metric>': score (0-100), prefix + 'decode_num_examples': n,
  prefix + 'decode_score': the same score under a name that does not depend on the task};
  the metric and labels default to what the task registered (registry), else accuracy.
  A mixture validated on a model with one prompt per task is decoded task by task, each with
  its own prompt: every task's score is reported (prefix + 'decode_<metric>/<task>') and
  their plain mean as prefix + 'decode_score'.
  """
  if with_prompt and config.prompt_tasks and len(expand(task_name)) > 1:
    out, scores = {}, []
    for name in expand(task_name):
      one = validation_metrics(config, params, name, split, task_feature_lengths=task_feature_lengths,
                               batch_size=batch_size, max_examples=max_examples,
                               with_prompt=True, decoding_method=decoding_method,
                               beam_size=beam_size, alpha=alpha, prefix=prefix, mesh=mesh)
      key = next(k for k in one if not k.endswith(('num_examples', 'decode_score')))
      out[f'{key}/{name}'] = one[key]
      scores.append(one[key])
    out[f'{prefix}decode_score'] = float(np.mean(scores))
    return out
  info = registry.task_info(task_name, metric, labels)
  metric = info.metric or 'accuracy'
  plan = TaskPlan(task_name, 'finetuned', with_prompt, shots_of(task_name), split, metric,
                  info.labels, 'decode')
  entry = evaluate_task(config.replace(dropout_rate=0.0), params, plan,
                        task_feature_lengths=task_feature_lengths, batch_size=batch_size,
                        max_examples=max_examples, decoding_method=decoding_method,
                        beam_size=beam_size, alpha=alpha, num_saved_examples=0, mesh=mesh)
  return {f'{prefix}decode_{metric}': float(entry[metric]),
          f'{prefix}decode_num_examples': float(entry['num_examples']),
          f'{prefix}decode_score': float(entry[metric])}
