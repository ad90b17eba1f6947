"""`promot report`: the paper-shaped table and charts from `promot eval` results.

  promot report OUT_DIR/*/results.json [--out_dir DIR] [--method 'ProMoT=path/results.json']

Each results.json is one checkpoint; its method (a column) comes from `--method LABEL=PATH`,
else from the label the trainer wrote with the checkpoint (train/methods.py: ProMoT,
LoRA-ProMoT (r=4), Multi-task ProMoT, ...), else from the stage that wrote it (pretrain ->
Pretrained, finetune -> Fine-tuning, prompt_tuning -> Prompt tuning, model_tuning -> ProMoT,
joint -> Joint). Written to DIR:

  report.md     the fine-tuned task's own score per method, then the in-context tasks
                (rows, plus Norm. Avg., the plain mean) x methods (1-shot / 4-shot cells, as in
                the paper's tables), then the format-specialization rates in the same layout
  report.png    in-context score per task per method (1-shot, 4-shot), and the format-
                specialization rate over training steps (from MODEL_DIR/<stage>/metrics.jsonl
                of the checkpoints' stages, when their runs had FORMAT_PROBE_TASKS) with the
                format-gradient cosine at the same steps (MODEL_DIR/<stage>/
                gradient_cosine.json, where `promot demo` measured it)
  results.json  everything above as data
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from promot_jax.checkpoints.manager import read_history
from promot_jax.train import methods

METHOD_OF_STAGE = {'pretrain': 'Pretrained', 'pretrained': 'Pretrained', 'finetune': 'Fine-tuning',
                   'prompt_tuning': 'Prompt tuning', 'model_tuning': 'ProMoT', 'joint': 'Joint'}
METHOD_ORDER = methods.ORDER
COSINE_FILE = 'gradient_cosine.json'   # written by promot demo (tools/demo.py)


def base_task(name: str) -> str:
  """'synth_sort_4shot' -> 'synth_sort' (the row of a task whatever its shot count)."""
  return re.sub(r'_\d+shot$', '', name)


def _stage_dir(results: Mapping[str, Any]) -> Optional[str]:
  """The stage directory a checkpoint came from (MODEL_DIR/<stage>/checkpoint_N), if any."""
  resolved = os.path.normpath(results.get('checkpoint', {}).get('resolved', ''))
  if re.fullmatch(r'checkpoint_\d+', os.path.basename(resolved)):
    return os.path.dirname(resolved)
  return None


def method_of(results: Mapping[str, Any]) -> str:
  """A results file's column: the method the trainer recorded with its checkpoint
  (train/methods.py); for older checkpoints, its stage mapped to the paper's method names."""
  if results['checkpoint'].get('method'):
    return results['checkpoint']['method']
  stage_dir = _stage_dir(results)
  stage = os.path.basename(stage_dir) if stage_dir else results['checkpoint'].get('name', '?')
  return METHOD_OF_STAGE.get(stage, stage)


def load_results(paths: Sequence[str]) -> list[tuple[str, dict]]:
  """[(method, results)] from 'PATH' or 'LABEL=PATH' arguments (a dir means PATH/results.json)."""
  loaded = []
  for arg in paths:
    label, _, path = arg.rpartition('=') if '=' in arg else ('', '', arg)
    if os.path.isdir(path):
      path = os.path.join(path, 'results.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'No results file {path} (write one with promot eval).')
    try:
      with open(path) as f:
        results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{path} is not a JSON results file: {e}') from e
    if not isinstance(results, dict) or 'tasks' not in results or 'checkpoint' not in results:
      raise ValueError(f'{path} is not a promot eval results.json (no "tasks"/"checkpoint").')
    loaded.append((label or method_of(results), results))
  labels = [m for m, _ in loaded]
  dupes = sorted({m for m in labels if labels.count(m) > 1})
  if dupes:
    raise ValueError(f'Two results files map to the same method {dupes}; name them with '
                     "--method 'LABEL=PATH'.")
  order = {m: i for i, m in enumerate(METHOD_ORDER)}
  return sorted(loaded, key=lambda mr: order.get(mr[0], len(order)))


def _score(entry: Optional[Mapping[str, Any]]) -> Optional[float]:
  if not entry or 'error' in entry:
    return None
  return entry.get(entry.get('metric', ''))


def build(loaded: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
  """The report as data: methods, the fine-tuned task's scores, the in-context grid, the
  format-specialization grid, Norm. Avg. per method and shot count, and training histories."""
  methods = [m for m, _ in loaded]
  finetuned = next((r['settings'].get('finetuned_task') for _, r in loaded
                    if r.get('settings', {}).get('finetuned_task')), None)
  shots = sorted({e.get('shots', 0) for _, r in loaded for e in r['tasks'].values()
                  if e.get('role') == 'in_context'})
  rows = sorted({base_task(t) for _, r in loaded for t, e in r['tasks'].items()
                 if e.get('role') == 'in_context'})
  icl: dict[str, dict[str, dict[str, Optional[float]]]] = {t: {} for t in rows}
  fmt: dict[str, dict[str, dict[str, Optional[float]]]] = {t: {} for t in rows}
  metric_of: dict[str, str] = {}
  finetuned_scores: dict[str, Any] = {}
  by_task: dict[str, dict[str, Any]] = {}   # several for multi-task and sequential runs
  for method, results in loaded:
    for name, entry in results['tasks'].items():
      if entry.get('role') == 'finetuned':
        score = {'score': _score(entry), 'metric': entry.get('metric'),
                 'with_prompt': entry.get('with_prompt')}
        finetuned_scores.setdefault(method, score)
        by_task.setdefault(name, {})[method] = score
        continue
      row, k = base_task(name), f'{entry.get("shots", 0)}shot'
      icl[row].setdefault(method, {})[k] = _score(entry)
      rate = entry.get('format_rate')
      fmt[row].setdefault(method, {})[k] = None if rate is None else 100.0 * rate
      if 'metric' in entry:
        metric_of[row] = entry['metric']
  averages = {}
  for method in methods:
    averages[method] = {}
    for k in (f'{s}shot' for s in shots):
      values = [icl[t].get(method, {}).get(k) for t in rows]
      averages[method][k] = (sum(values) / len(values)
                             if values and all(v is not None for v in values) else None)
  histories = {}
  for method, results in loaded:
    stage_dir = _stage_dir(results)
    if stage_dir:
      history = [h for h in read_history(stage_dir) if any(k.startswith('format/') for k in h)]
      cosine = read_cosine(stage_dir)
      if history or cosine:
        histories[method] = {'stage_dir': stage_dir, 'history': history, 'cosine': cosine}
  return {'methods': methods, 'finetuned_task': finetuned, 'finetuned': finetuned_scores,
          'finetuned_by_task': by_task,
          'shots': [f'{s}shot' for s in shots], 'tasks': rows, 'metrics': metric_of,
          'in_context': icl, 'format_rate': fmt, 'norm_avg': averages, 'histories': histories,
          'sources': {m: r['checkpoint'].get('resolved') for m, r in loaded}}


def read_cosine(stage_dir: str) -> dict[str, float]:
  """{step: format-gradient cosine} of a stage, if it was measured (`promot demo`)."""
  try:
    with open(os.path.join(stage_dir, COSINE_FILE)) as f:
      return {str(k): v for k, v in json.load(f).get('cosine', {}).items()}
  except (OSError, json.JSONDecodeError):
    return {}


def combine(reports: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
  """One report from several seeds' reports of the same methods: every score is the mean over
  the seeds; 'seeds' keeps each seed's fine-tuned scores, Norm. Avg. and format-rate range,
  'spread' the min and max of Norm. Avg. over the seeds; the training curves are seed 0's."""
  first = reports[0]

  def mean(values):
    values = [v for v in values]
    return None if not values or any(v is None for v in values) else sum(values) / len(values)

  def grid(key):
    return {t: {m: {k: mean([r[key][t].get(m, {}).get(k) for r in reports])
                    for k in first['shots']} for m in first['methods']} for t in first['tasks']}

  by_task = {task: {m: dict(score, score=mean([r['finetuned_by_task'].get(task, {}).get(m, {})
                                                .get('score') for r in reports]))
                    for m, score in scores.items()}
             for task, scores in first['finetuned_by_task'].items()}
  finetuned = {m: dict(score, score=mean([r['finetuned'].get(m, {}).get('score')
                                          for r in reports]))
               for m, score in first['finetuned'].items()}
  norm = {m: {k: mean([r['norm_avg'][m][k] for r in reports]) for k in first['shots']}
          for m in first['methods']}
  spread = {m: {k: [min(r['norm_avg'][m][k] for r in reports),
                    max(r['norm_avg'][m][k] for r in reports)]
                for k in first['shots'] if all(r['norm_avg'][m][k] is not None for r in reports)}
            for m in first['methods']}
  per_seed = [{'seed': seed, 'norm_avg': r['norm_avg'],
               'finetuned': {m: f.get('score') for m, f in r['finetuned'].items()},
               'format_range': format_ranges(r), 'sources': r['sources']}
              for seed, r in zip(seeds, reports)]
  return dict(first, finetuned=finetuned, finetuned_by_task=by_task, in_context=grid('in_context'),
              format_rate=grid('format_rate'), norm_avg=norm, spread=spread, seeds=per_seed)


def format_ranges(report: Mapping[str, Any]) -> dict[str, dict[str, list]]:
  """{method: {shots: [min, max]}} of the format rates over the in-context tasks."""
  out = {}
  for m in report['methods']:
    out[m] = {}
    for k in report['shots']:
      rates = [report['format_rate'][t].get(m, {}).get(k) for t in report['tasks']]
      rates = [r for r in rates if r is not None]
      if rates:
        out[m][k] = [min(rates), max(rates)]
  return out


def ordering(norm_avg: Mapping[str, Mapping[str, Optional[float]]], shots: str) -> str:
  """'Pretrained = Prompt tuning > ProMoT > ...' by Norm. Avg. at one shot count (= where the
  two agree to the report's two decimals)."""
  scored = sorted(((round(v[shots], 2), m) for m, v in norm_avg.items()
                   if v.get(shots) is not None), key=lambda vm: -vm[0])
  out = scored[0][1] if scored else ''
  for (before, _), (value, m) in zip(scored, scored[1:]):
    out += f' {"=" if value == before else ">"} {m}'
  return out


def _cell(values: Mapping[str, Optional[float]], shots: Sequence[str]) -> str:
  return ' / '.join('-' if values.get(k) is None else f'{values[k]:.2f}' for k in shots)


def markdown(report: Mapping[str, Any]) -> str:
  """report.md: three tables in the paper's layout."""
  methods, shots = report['methods'], report['shots']
  lines = ['# ProMoT report', '']
  by_task = report.get('finetuned_by_task') or {}
  if by_task:
    title = report['finetuned_task'] or ', '.join(by_task)
    lines += [f'## Fine-tuned task: {title} (0-shot; with the prompt where the method has one)',
              '', '| | ' + ' | '.join(methods) + ' |', '|---|' + '---|' * len(methods)]
    for task, scores in by_task.items():
      cells = []
      for m in methods:
        f = scores.get(m)
        cells.append('-' if not f or f['score'] is None else
                     f'{f["score"]:.2f}' + ('' if f['with_prompt'] else ' (no prompt)'))
      metric = next((f['metric'] for f in scores.values() if f.get('metric')), '')
      name = f'{task} ({metric})' if len(by_task) > 1 else metric
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  head = '| task | ' + ' | '.join(methods) + ' |'
  rule = '|---|' + '---|' * len(methods)
  shot_text = ' / '.join(s.replace('shot', '-shot') for s in shots)
  lines += [f'## In-context tasks without the prompt ({shot_text})', '', head, rule]
  lines.append('| **Norm. Avg.** | ' + ' | '.join(
      f'**{_cell(report["norm_avg"][m], shots)}**' for m in methods) + ' |')
  for t in report['tasks']:
    metric = report['metrics'].get(t, '')
    lines.append(f'| {t} ({metric}) | ' + ' | '.join(
        _cell(report['in_context'][t].get(m, {}), shots) for m in methods) + ' |')
  lines += ['', f'## Format specialization: % of outputs in the fine-tuned task\'s label set '
            f'({shot_text})', '', head, rule]
  for t in report['tasks']:
    lines.append(f'| {t} | ' + ' | '.join(
        _cell(report['format_rate'][t].get(m, {}), shots) for m in methods) + ' |')
  for method, h in report['histories'].items():
    lines += ['', f'Format-specialization rate during training, {method} '
              f'({h["stage_dir"]}, without the prompt; mean over probe tasks, %):', '']
    lines.append('| step | ' + ' | '.join(str(row['step']) for row in h['history']) + ' |')
    lines.append('|---|' + '---|' * len(h['history']))
    lines.append('| format rate | ' + ' | '.join(
        f'{100 * _mean_format(row):.1f}' for row in h['history']) + ' |')
    cosine = h.get('cosine') or {}
    if cosine:
      lines.append('| gradient cosine | ' + ' | '.join(
          '-' if cosine.get(str(row['step'])) is None else f'{cosine[str(row["step"])]:.3f}'
          for row in h['history']) + ' |')
      if '0' in cosine:
        lines.append(f'\nFormat-gradient cosine (real vs label-shuffled gradient, last decoder '
                     f'layer) at the stage\'s start: {cosine["0"]:.3f}.')
  if report.get('seeds'):
    lines += seed_lines(report)
  if report.get('targets'):   # promot demo: what the demo is meant to show
    lines += ['', '## Targets (promot demo; mean over the seeds)', ''] + [
        f'- [{"x" if t["met"] else " "}] {t["target"]}: '
        f'{"-" if t["value"] is None else format(t["value"], ".1f")} '
        f'(target {t["comparison"]} {t["threshold"]:g})' for t in report['targets']]
  lines += ['', 'Norm. Avg. is the plain mean of the in-context scores. Sources: '] + [
      f'- {m}: `{src}`' for m, src in report['sources'].items()]
  return '\n'.join(lines) + '\n'


def seed_lines(report: Mapping[str, Any]) -> list[str]:
  """The per-seed section of a combined report (`combine`)."""
  methods, shots = report['methods'], report['shots']
  seeds = report['seeds']
  lines = ['', f'## Every seed ({len(seeds)} fine-tuning seeds; the tables above are their mean)',
           '', '| seed | quantity | ' + ' | '.join(methods) + ' |', '|---|---|' + '---|' * len(methods)]
  for s in seeds:
    lines.append(f'| {s["seed"]} | fine-tuned task | ' + ' | '.join(
        '-' if s['finetuned'].get(m) is None else f'{s["finetuned"][m]:.2f}' for m in methods) + ' |')
    lines.append(f'| {s["seed"]} | Norm. Avg. | ' + ' | '.join(
        _cell(s['norm_avg'][m], shots) for m in methods) + ' |')
    lines.append(f'| {s["seed"]} | format rate range | ' + ' | '.join(
        ' / '.join('-' if k not in s['format_range'].get(m, {}) else
                   '{:.0f}–{:.0f}'.format(*s['format_range'][m][k]) for k in shots)
        for m in methods) + ' |')
  lines += ['', 'Ordering by Norm. Avg. per seed:', '']
  for s in seeds:
    lines.append(f'- seed {s["seed"]}: ' + '; '.join(
        f'{k.replace("shot", "-shot")} {ordering(s["norm_avg"], k)}' for k in shots))
  lines += ['', '| Norm. Avg. over seeds (min–max) | ' + ' | '.join(methods) + ' |',
            '|---|' + '---|' * len(methods)]
  for k in shots:
    lines.append(f'| {k.replace("shot", "-shot")} | ' + ' | '.join(
        '-' if k not in report['spread'].get(m, {}) else
        '{:.2f}–{:.2f}'.format(*report['spread'][m][k]) for m in methods) + ' |')
  return lines


def _mean_format(row: Mapping[str, Any]) -> float:
  values = [v for k, v in row.items() if k.startswith('format/')]
  return sum(values) / len(values) if values else 0.0


def chart(report: Mapping[str, Any], path: str) -> None:
  """report.png: grouped bars per shot count, and the format rate over steps."""
  matplotlib.use('Agg')
  methods, shots, tasks = report['methods'], report['shots'], report['tasks']
  if not tasks:
    shots = []          # no in-context task was evaluated: no score panels
  panels = max(1, len(shots) + (1 if report['histories'] else 0))
  fig, axes = plt.subplots(panels, 1, figsize=(max(8, 1.3 * (len(tasks) + 1)), 3.6 * panels),
                           squeeze=False)
  labels = [t for t in tasks] + ['Norm. Avg.']
  colors = {m: f'C{i}' for i, m in enumerate(methods)}   # one colour per method in every panel
  x = np.arange(len(labels))
  width = 0.8 / max(1, len(methods))
  for ax, k in zip(axes[:, 0], shots):
    for i, m in enumerate(methods):
      values = [report['in_context'][t].get(m, {}).get(k) for t in tasks]
      values.append(report['norm_avg'][m].get(k))
      ax.bar(x + (i - (len(methods) - 1) / 2) * width,
             [np.nan if v is None else v for v in values], width, label=m, color=colors[m])
    ax.set_xticks(x, [s.replace('synth_', '') for s in labels], rotation=20)
    ax.set_ylabel('score (0-100)')
    ax.set_ylim(0, 100)
    ax.set_title(f'In-context tasks, {k.replace("shot", "-shot")}, without the prompt')
    ax.legend(fontsize=8, ncol=len(methods), loc='upper center', bbox_to_anchor=(0.5, -0.2),
              frameon=False)   # below the task names: no bar is hidden
  if not shots and not report['histories']:
    axes[0, 0].text(0.5, 0.5, 'No in-context task was evaluated.', ha='center', va='center')
    axes[0, 0].set_axis_off()
  if report['histories']:
    ax = axes[-1, 0]
    twin, lowest = None, 0.0
    for method, h in report['histories'].items():
      steps = [row['step'] for row in h['history']]
      ax.plot(steps, [100 * _mean_format(row) for row in h['history']], marker='o',
              label=f'{method}: format rate', color=colors.get(method))
      if h.get('cosine'):
        twin = twin or ax.twinx()
        points = sorted((int(k), v) for k, v in h['cosine'].items() if v is not None)
        lowest = min([lowest] + [p[1] for p in points])
        twin.plot([p[0] for p in points], [p[1] for p in points], marker='s', linestyle='--',
                  label=f'{method}: gradient cosine', color=colors.get(method))
    ax.set_xlabel('training step')
    ax.set_ylabel('% outputs in label set (solid)')
    ax.set_ylim(-2, 102)
    ax.set_title('Format specialization during training: in-context probes without the prompt '
                 '(solid), format-gradient cosine (dashed)' if twin else
                 'Format specialization during training (in-context probes, no prompt)',
                 fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    if twin:
      twin.set_ylabel('gradient cosine (dashed)')
      twin.set_ylim(lowest - 0.05, 1.05)
      more = twin.get_legend_handles_labels()
      handles, names = handles + more[0], names + more[1]
    ax.legend(handles, names, fontsize=7, ncol=2, loc='upper center', bbox_to_anchor=(0.5, -0.16),
              frameon=False)   # below the axis: no curve is hidden
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(paths: Sequence[str], out_dir: str) -> dict[str, Any]:
  """Read results files, write report.md / report.png / results.json to `out_dir`."""
  if not paths:
    raise ValueError('promot report needs at least one results.json (from promot eval).')
  return write(build(load_results(paths)), out_dir)


def write(report: Mapping[str, Any], out_dir: str) -> Mapping[str, Any]:
  """report.md / report.png / results.json of a built (or combined) report in `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(markdown(report))
  chart(report, os.path.join(out_dir, 'report.png'))
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(report, f, indent=2, sort_keys=True)
  return report


def command(args) -> int:
  report = write_report(args.results, args.out_dir)
  print(markdown(report))
  print(f'wrote {os.path.join(args.out_dir, "report.md")}, report.png and results.json')
  return 0
