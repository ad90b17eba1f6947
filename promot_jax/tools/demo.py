"""`promot demo`: format specialization and ProMoT, reproduced offline on a tiny T5.

  promot demo [--out_dir out/demo] [--seeds N] [--redo] [--pretrain] [--quick]
              [--methods lora,multitask]

Every part is an ordinary gin run or eval file, so the demo doubles as documentation of how
a real run is composed:

  a) pretrain     runs/demo/pretrain.gin   a tiny T5 learns six string tasks in context
                  (only with --pretrain; otherwise the shipped demo/pretrained/ is used)
  b) finetune     runs/demo/finetune.gin   standard fine-tuning on 'Does it contain a?' (True/False)
     promot       runs/demo/promot.gin     stage 1 prompt tuning (also the prompt-tuning
                                           baseline), stage 2 model tuning with the prompt
     --methods    runs/demo/lora_promot.gin       optional: LoRA-ProMoT (rank-4 adapters)
                  runs/demo/multitask_promot.gin  optional: multi-task ProMoT on two tasks
  c) eval         eval/demo.gin            the classification task (with the prompt where one
                  exists) and every in-context task at 1 and 4 shots without a prompt
  d) report       OUT/report.md, report.png, results.json (promot report)

Each part resumes where it stopped (stages resume from their checkpoints, finished stages
and finished evaluations are skipped), so an interrupted demo continues when rerun.

What made each part is recorded in its directory (made_by.json: the gin file and bindings,
the pretrained model's fingerprint, a digest of the code and configs that decide the numbers,
the library versions). A rerun into a directory made otherwise refuses to reuse a trained
part (--redo remakes it) and remakes derived parts (evaluations, gradient curves) itself,
so a report never mixes parts made by different code or settings.

Layout: OUT/pretrain (with --pretrain), OUT/eval/pretrained, and per fine-tuning seed
OUT/seed_K/{finetune,promot,...,eval,report.md}; OUT/report.md is seed 0's report, or with
--seeds N the mean over the seeds with every seed's numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import time
from typing import Optional, Sequence

import numpy as np

from promot_jax import resources, tree_util
from promot_jax.checkpoints import loading, orbax_io, resolve
from promot_jax.eval import registry, suite, task as eval_task
from promot_jax.ginconf import check, loaders
from promot_jax.tools import diagnose, report
from promot_jax.train import runner

SHIPPED_PRETRAINED = resources.demo_pretrained_dir()
EVAL_GIN = 'eval/demo.gin'

# --quick: the whole pipeline in a few minutes (tests); the numbers mean little.
QUICK = {'runs/demo/pretrain.gin': ['PRETRAIN_STEPS=40', 'EVAL_BATCHES=1'],
         'runs/demo/finetune.gin': ['FINETUNE_STEPS=20', 'MODEL_CHECKPOINT_PERIOD=10',
                                    'EVAL_BATCHES=1', 'FORMAT_PROBE_EXAMPLES=8'],
         'runs/demo/promot.gin': ['PROMPT_TUNING_STEPS=20', 'PROMPT_CHECKPOINT_PERIOD=10',
                                  'MODEL_TUNING_STEPS=20', 'MODEL_CHECKPOINT_PERIOD=10',
                                  'EVAL_BATCHES=1', 'FORMAT_PROBE_EXAMPLES=8'],
         EVAL_GIN: ['MAX_EVAL_EXAMPLES=16', 'EVAL_BATCH_SIZE=16']}
QUICK['runs/demo/lora_promot.gin'] = QUICK['runs/demo/promot.gin'] + [
    'LORA_TUNING_STEPS=20', 'LORA_CHECKPOINT_PERIOD=10']
QUICK['runs/demo/multitask_promot.gin'] = QUICK['runs/demo/promot.gin']

# --methods: (part, run file, column, fine-tuned task evaluated with its module or None: the
# classification task of eval/demo.gin)
EXTRA_METHODS = {
    'lora': ('lora_promot', 'runs/demo/lora_promot.gin', 'LoRA-ProMoT (r=4)', None),
    'multitask': ('multitask_promot', 'runs/demo/multitask_promot.gin', 'Multi-task ProMoT',
                  'synth_classify'),
}


# What decides a part's numbers besides its settings: the package (less the commands that
# only read results) and the tasks and gin configs. A part made by other code is not reused.
CODE_ROOTS = ('promot_jax', 'promot_tasks')
NOT_NUMERIC = re.compile(r'^promot_jax/(cli/|tools/(bench/|demo|export|plan|report|smoke))')
LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'seqio', 'tensorflow', 'orbax-checkpoint')
MADE_BY = 'made_by.json'
# The gradient-cosine curve (promot diagnose) at every checkpoint a stage keeps for it.
COSINE_FILE = report.COSINE_FILE
COSINE_BATCHES = 2
COSINE_SEED = 0


class StalePartError(RuntimeError):
  """A part's directory was made by other code or settings and --redo was not given."""
  exit_code = 2


def package_dir(name: str) -> str:
  """Where package `name` lives, found without importing it (the library does not import the
  task modules; their source is only read here, for the fingerprint)."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError(f'Package {name!r} is not installed; `pip install -e .` installs it.')
  return os.path.abspath(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
  """A digest of every source and gin file that decides the demo's numbers."""
  roots = {name: package_dir(name) for name in CODE_ROOTS}
  roots['gin'] = resources.gin_dir()
  digest = hashlib.sha256()
  for name, root in roots.items():
    for dirpath, dirnames, files in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if d != '__pycache__')
      for f in sorted(files):
        rel = f'{name}/' + os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, '/')
        if f.endswith(('.py', '.gin')) and not NOT_NUMERIC.match(rel) and '/_data/' not in rel:
          with open(os.path.join(dirpath, f), 'rb') as fh:
            digest.update(rel.encode() + b'\0' + fh.read() + b'\0')
  return digest.hexdigest()


def library_versions() -> dict[str, str]:
  versions = {}
  for name in LIBRARIES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = 'absent'
  return versions


def differences(old: Optional[dict], new: dict) -> list[str]:
  """What differs between two made_by records ([] when they agree)."""
  if old is None:
    return ['no made_by.json (made by an older demo or by hand)']
  return [k if k not in ('bindings', 'libraries') else
          f'{k}: {sorted(set(map(str, _items(old.get(k)))) ^ set(map(str, _items(new.get(k)))))}'
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _items(value) -> list:
  if isinstance(value, dict):
    return sorted(value.items())
  return list(value or [])


class Demo:
  """The demo's parts, run in order under one output directory."""

  def __init__(self, out_dir: str, quick: bool = False, extra_flags: Sequence[str] = (),
               log=print, methods: Sequence[str] = (), seeds: int = 1, redo: bool = False):
    unknown = sorted(set(methods) - set(EXTRA_METHODS))
    if unknown:
      raise ValueError(f'Unknown demo methods {unknown}; choose from {sorted(EXTRA_METHODS)} '
                       '(fine-tuning, prompt tuning and ProMoT always run).')
    if seeds < 1:
      raise ValueError(f'--seeds must be at least 1, got {seeds}.')
    self.methods = list(methods)
    self.seeds = list(range(seeds))
    self.redo = redo
    self.out_dir = os.path.abspath(out_dir)
    self.quick = quick
    self.extra_flags = list(extra_flags)
    self.log = log
    self.start = time.perf_counter()
    self.timings: dict[str, float] = {}
    self.targets: list = []

  def _say(self, message: str) -> None:
    self.log(f'[demo {time.perf_counter() - self.start:7.1f}s] {message}')

  def _bindings(self, gin_file: str, model_dir: Optional[str], pretrained: Optional[str],
                seed: Optional[int] = None):
    flags = list(QUICK.get(gin_file, [])) if self.quick else []
    if seed is not None:
      flags.append(f'SEED={seed}')
    if model_dir:
      flags.append(f'MODEL_DIR={model_dir!r}')
    if pretrained:
      flags.append(f'PRETRAINED={pretrained!r}')
    return [f'--gin.{f}' for f in flags] + self._extra_flags_for(gin_file)

  def _extra_flags_for(self, gin_file: str) -> list[str]:
    """The user's --gin.X=... flags that concern `gin_file`: a macro flag goes to the files
    that mention the macro (FINETUNE_STEPS to the fine-tuning run only), any other binding to
    every file."""
    text = '\n'.join(open(f, encoding='utf-8').read()
                     for f in check.include_tree([gin_file], [resources.gin_dir()]))
    return [flag for flag in self.extra_flags
            if (_macro_of(flag) is None or re.search(rf'\b{_macro_of(flag)}\b', text))]

  def _check_extra_flags(self, gin_files: Sequence[str]) -> None:
    """A macro flag no part of the demo mentions is a typo: say so before anything runs."""
    text = '\n'.join(open(f, encoding='utf-8').read()
                     for f in check.include_tree(list(gin_files), [resources.gin_dir()]))
    unknown = [flag for flag in self.extra_flags
               if _macro_of(flag) and not re.search(rf'\b{_macro_of(flag)}\b', text)]
    if unknown:
      raise ValueError(f'No file of the demo uses {unknown} ({", ".join(gin_files)}).')

  def _made_by(self, kind: str, **fields) -> dict:
    """The record of what makes a part (paths are left out: the same part may move)."""
    return {'kind': kind, **fields, 'code': code_fingerprint(), 'libraries': library_versions()}

  def _claim(self, directory: str, made_by: dict, derived: bool) -> None:
    """Make `directory` this part's: reuse it if the same code and settings made it; else
    remake it (derived parts, or --redo) or refuse (StalePartError)."""
    record = os.path.join(directory, MADE_BY)
    if os.path.isdir(directory) and os.listdir(directory):
      try:
        with open(record) as f:
          old = json.load(f)
      except (OSError, json.JSONDecodeError):
        old = None
      changed = differences(old, made_by)
      if changed and not (derived or self.redo):
        raise StalePartError(
            f'{directory} was made by other code or settings (differs in: {"; ".join(changed)}). '
            'Rerun with --redo to remake it, or choose another --out_dir.')
      if changed:
        self._say(f'remaking {directory}: made by other code or settings '
                  f'(differs in: {"; ".join(changed)})')
        shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(record):
      tmp = record + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(made_by, f, indent=2, sort_keys=True)
      os.replace(tmp, record)

  def _seed_dir(self, seed: int) -> str:
    return os.path.join(self.out_dir, f'seed_{seed}')

  def train(self, part: str, gin_file: str, pretrained: Optional[str],
            seed: Optional[int] = None) -> str:
    """Run (or resume, or skip) one gin run file; returns its MODEL_DIR."""
    base = self.out_dir if seed is None else self._seed_dir(seed)
    model_dir = os.path.join(base, part)
    self._say(f'{part}: promot run --gin_file={gin_file} (MODEL_DIR {model_dir})')
    t0 = time.perf_counter()
    bindings = self._bindings(gin_file, None, None, seed)
    self._claim(model_dir, self._made_by(
        'train', gin_file=gin_file, bindings=bindings,
        pretrained=loading.fingerprint(pretrained) if pretrained else None), derived=False)
    run = loaders.load_run([gin_file], self._bindings(gin_file, model_dir, pretrained, seed))
    runner.run_stages(run)
    key = part if seed is None else f'seed_{seed}/{part}'
    self.timings[key] = round(time.perf_counter() - t0, 1)
    return model_dir

  def pretrain(self) -> str:
    """Part a): pretrain from random weights; returns the kept checkpoint's path."""
    model_dir = self.train('pretrain', 'runs/demo/pretrain.gin', None)
    return resolve.resolve_checkpoint(os.path.join(model_dir, 'pretrain'))

  def evaluate(self, checkpoints: dict[str, tuple], eval_dir: str) -> list[str]:
    """Part c): {method: (checkpoint, with_prompt[, fine-tuned task])} -> results.json paths
    (reused if complete and made by the same code, settings and checkpoint)."""
    paths = []
    t0 = time.perf_counter()
    for method, (path, with_prompt, *task) in checkpoints.items():
      out_dir = os.path.join(eval_dir, re.sub(r'[^a-z0-9]+', '_', method.lower()))
      bindings = self._bindings(EVAL_GIN, None, None)
      ecfg = loaders.load_eval_config([EVAL_GIN], bindings)
      ecfg = dataclasses.replace(ecfg, out_dir=out_dir, finetuned_with_prompt=with_prompt)
      if task and task[0]:
        ecfg = dataclasses.replace(ecfg, finetuned_task=task[0])
      resolved = resolve.resolve_checkpoint(path)
      name = resolve.checkpoint_name(resolved)
      self._claim(out_dir, self._made_by(
          'eval', bindings=bindings, checkpoint=name, fingerprint=loading.fingerprint(resolved),
          with_prompt=with_prompt, finetuned_task=ecfg.finetuned_task), derived=True)
      results_file = os.path.join(out_dir, name, 'results.json')
      if _complete(results_file, len(suite.plan_tasks(ecfg))):
        self._say(f'eval {method}: already done ({results_file})')
      else:
        self._say(f'eval {method}: {path} ({"with" if with_prompt else "without"} its prompt '
                  'on the classification task, none on the in-context tasks)')
        results = suite.evaluate_suite(ecfg, [path])
        if results[name]['failed']:
          raise RuntimeError(f'demo: evaluation of {method} failed on {results[name]["failed"]}')
      paths.append(f'{method}={results_file}')
    self.timings['eval'] = round(self.timings.get('eval', 0) + time.perf_counter() - t0, 1)
    return paths

  def gradient_curve(self, gin_file: str, stage_dir: str, start: str, seed: int) -> None:
    """The paper's format-gradient cosine (promot diagnose, last decoder layer) at the stage's
    starting point and at every checkpoint it kept, into STAGE_DIR/gradient_cosine.json."""
    t0 = time.perf_counter()
    steps = {0: start}
    for name in sorted(os.listdir(stage_dir)):
      if re.fullmatch(r'checkpoint_\d+', name):
        steps[int(name.split('_')[1])] = os.path.join(stage_dir, name)
    made_by = self._made_by('gradient_cosine', gin_file=gin_file, batches=COSINE_BATCHES,
                            seed=COSINE_SEED, bindings=self._bindings(gin_file, None, None, seed),
                            checkpoints={str(k): loading.fingerprint(resolve.resolve_checkpoint(v))
                                         for k, v in steps.items()})
    path = os.path.join(stage_dir, COSINE_FILE)
    try:
      with open(path) as f:
        if json.load(f).get('made_by') == made_by:
          return
    except (OSError, json.JSONDecodeError):
      pass
    self._say(f'gradient cosine: {stage_dir} (steps {sorted(steps)})')
    batches, described = diagnose.read_batches(
        [gin_file], self._bindings(gin_file, None, None, seed), 'validation', COSINE_BATCHES,
        COSINE_SEED)
    perms = [diagnose.shuffled_permutation(len(b['decoder_target_tokens']), COSINE_SEED + i)
             for i, b in enumerate(batches)]
    curve = {}
    for step, checkpoint in sorted(steps.items()):
      found = diagnose.diagnose_checkpoint(checkpoint, batches, perms)
      curve[str(step)] = found['cosine']['overall']
    with open(path + '.tmp', 'w') as f:
      json.dump({'made_by': made_by, 'data': described, 'layer': 'last decoder layer',
                 'cosine': curve}, f, indent=2)
    os.replace(path + '.tmp', path)
    self.timings['gradient_cosine'] = round(
        self.timings.get('gradient_cosine', 0) + time.perf_counter() - t0, 1)

  def run_seed(self, seed: int, pretrained: str, pretrained_results: str) -> dict:
    """Part b) to d) for one fine-tuning seed; returns its report."""
    finetune_dir = self.train('finetune', 'runs/demo/finetune.gin', pretrained, seed)
    promot_dir = self.train('promot', 'runs/demo/promot.gin', pretrained, seed)
    checkpoints = {
        'Fine-tuning': (os.path.join(finetune_dir, 'finetune'), False),
        'Prompt tuning': (os.path.join(promot_dir, 'prompt_tuning'), True),
        'ProMoT': (os.path.join(promot_dir, 'model_tuning'), True)}
    for key in self.methods:
      part, gin_file, column, task = EXTRA_METHODS[key]
      model_dir = self.train(part, gin_file, pretrained, seed)
      checkpoints[column] = (os.path.join(model_dir, 'model_tuning'), True, task)
    self.gradient_curve('runs/demo/finetune.gin', os.path.join(finetune_dir, 'finetune'),
                        pretrained, seed)
    self.gradient_curve('runs/demo/promot.gin', os.path.join(promot_dir, 'model_tuning'),
                        os.path.join(promot_dir, 'prompt_tuning'), seed)
    results = [pretrained_results] + self.evaluate(
        checkpoints, os.path.join(self._seed_dir(seed), 'eval'))
    self._say(f'report (seed {seed}): promot report ' + ' '.join(results))
    return report.write_report(results, self._seed_dir(seed))

  def run(self, pretrain: bool = False, pretrained: Optional[str] = None) -> dict:
    """Every part in order; returns the report (as `promot report` builds it)."""
    self._check_extra_flags(['runs/demo/finetune.gin', 'runs/demo/promot.gin', EVAL_GIN]
                            + (['runs/demo/pretrain.gin'] if pretrain else [])
                            + [EXTRA_METHODS[m][1] for m in self.methods])
    if pretrain:
      pretrained = self.pretrain()
      self._compare_with_shipped(pretrained)
    else:
      pretrained = os.path.abspath(pretrained or SHIPPED_PRETRAINED)
      if not os.path.isdir(pretrained):
        raise FileNotFoundError(f'The pretrained model {pretrained} is missing; run '
                                'promot demo --pretrain to make one.')
    [pretrained_results] = self.evaluate({'Pretrained': (pretrained, False)},
                                         os.path.join(self.out_dir, 'eval'))
    reports = [self.run_seed(seed, pretrained, pretrained_results) for seed in self.seeds]
    built = reports[0] if len(reports) == 1 else report.combine(reports, self.seeds)
    self.targets = check_targets(reports)
    built = dict(built, targets=[dict(zip(('target', 'value', 'comparison', 'threshold', 'met'),
                                          t)) for t in self.targets])
    report.write(built, self.out_dir)
    self.timings['total'] = round(time.perf_counter() - self.start, 1)
    with open(os.path.join(self.out_dir, 'timings.json'), 'w') as f:
      json.dump(self.timings, f, indent=2)
    return built

  def _compare_with_shipped(self, pretrained: str) -> None:
    """Say how the reproduced pretrained model compares with the shipped one."""
    if not os.path.isdir(SHIPPED_PRETRAINED) or self.quick:
      return
    diff = max_param_difference(pretrained, SHIPPED_PRETRAINED)
    self._say(f'reproduced pretrained model vs shipped demo/pretrained: max |difference| '
              f'{diff:.3g}' + (' (identical)' if diff == 0 else
                               f'; held-out 1-shot accuracy {validation_accuracy(pretrained):.1f}'))


# What the demo is meant to show (the paper's result in miniature), checked on its report:
# (description, method, quantity, comparison, threshold). Norm. Avg. is relative to the
# pretrained model's; the format rate is the largest over the in-context tasks (fine-tuning:
# the smallest must reach it).
TARGETS = (
    ('ProMoT keeps >= 80% of the pretrained in-context Norm. Avg. (1 and 4 shots)',
     'ProMoT', 'relative_norm_avg_min', '>=', 80.0),
    ('fine-tuning keeps <= 40% of it (1 and 4 shots)',
     'Fine-tuning', 'relative_norm_avg_max', '<=', 40.0),
    ("ProMoT's fine-tuned-task accuracy at most 2 points below fine-tuning's",
     'ProMoT', 'finetuned_gap', '<=', 2.0),
    ('fine-tuning answers in the label set >= 50% on the probe tasks (kept checkpoint)',
     'Fine-tuning', 'probe_format_rate', '>=', 50.0),
    ('ProMoT does <= 5%', 'ProMoT', 'probe_format_rate', '<=', 5.0),
)


def target_quantities(built: dict, method: str) -> dict[str, Optional[float]]:
  """The numbers TARGETS compares, for one method of one seed's report."""
  pre, own = built['norm_avg'].get('Pretrained', {}), built['norm_avg'].get(method, {})
  relative = [100.0 * own[k] / pre[k] for k in built['shots']
              if own.get(k) is not None and pre.get(k)]
  ft = built['finetuned'].get('Fine-tuning', {}).get('score')
  mine = built['finetuned'].get(method, {}).get('score')
  kept = re.fullmatch(r'checkpoint_(\d+)', os.path.basename(built['sources'].get(method) or ''))
  rate = None
  for row in built['histories'].get(method, {}).get('history', []):
    if kept and row['step'] == int(kept.group(1)):
      values = [v for k, v in row.items() if k.startswith('format/')]
      rate = 100.0 * sum(values) / len(values) if values else None
  return {'relative_norm_avg_min': min(relative) if relative else None,
          'relative_norm_avg_max': max(relative) if relative else None,
          'finetuned_gap': None if ft is None or mine is None else ft - mine,
          'probe_format_rate': rate}


def check_targets(reports: Sequence[dict]) -> list[tuple[str, Optional[float], str, float, bool]]:
  """[(description, value, comparison, threshold, met)] of TARGETS, each value the mean over
  the seeds' reports."""
  out = []
  for text, method, quantity, op, threshold in TARGETS:
    values = [target_quantities(r, method)[quantity] for r in reports]
    value = None if any(v is None for v in values) else sum(values) / len(values)
    met = value is not None and (value >= threshold if op == '>=' else value <= threshold)
    out.append((text, value, op, threshold, met))
  return out


def targets_text(checked) -> str:
  return '\n'.join(f'- [{"x" if met else " "}] {text}: '
                   f'{"-" if value is None else f"{value:.1f}"} (target {op} {threshold:g})'
                   for text, value, op, threshold, met in checked)


def _macro_of(flag: str) -> Optional[str]:
  """'--gin.FINETUNE_STEPS=4' -> 'FINETUNE_STEPS'; None for a binding of a configurable."""
  m = re.match(r'--gin\.([A-Z][A-Z0-9_]*)\s*=', flag)
  return m.group(1) if m else None


def max_param_difference(a: str, b: str) -> float:
  """Largest absolute difference between two checkpoints' parameters (same tree required)."""
  flat_a = tree_util.flatten(resolve.load_checkpoint(resolve.resolve_checkpoint(a))[1])
  flat_b = tree_util.flatten(resolve.load_checkpoint(resolve.resolve_checkpoint(b))[1])
  if flat_a.keys() != flat_b.keys():
    raise ValueError(f'{a} and {b} hold different parameter trees.')
  return max(float(np.max(np.abs(np.asarray(flat_a[k]) - np.asarray(flat_b[k])))) for k in flat_a)


def validation_accuracy(checkpoint: str, examples: int = 128) -> float:
  """Mean 1-shot accuracy over the in-context tasks on held-out validation queries (greedy)."""
  cfg, params = resolve.load_checkpoint(resolve.resolve_checkpoint(checkpoint))
  ecfg = loaders.load_eval_config([EVAL_GIN], [])   # the demo's in-context tasks, by name
  registry.import_task_modules(ecfg.task_modules)
  one_shot = [name for raw in ecfg.icl_tasks for name in eval_task.expand(raw)
              if eval_task.shots_of(name) == 1]
  scores = []
  for name in one_shot:
    plan = eval_task.TaskPlan(name, 'in_context', False, 1, 'validation', 'accuracy')
    entry = eval_task.evaluate_task(
        cfg, params, plan, task_feature_lengths={'inputs': 72, 'targets': 8}, batch_size=64,
        max_examples=examples, decoding_method='greedy', num_saved_examples=0,
        log=lambda message: None)
    scores.append(entry['accuracy'])
  return sum(scores) / len(scores)


def ship_pretrained(checkpoint: str, dst: str = SHIPPED_PRETRAINED) -> float:
  """Copy a pretrained checkpoint (params only, no optimizer state) to demo/pretrained,
  recording its held-out 1-shot accuracy; returns that accuracy."""
  resolved = resolve.resolve_checkpoint(checkpoint)
  cfg, params = resolve.load_checkpoint(resolved)
  accuracy = validation_accuracy(resolved)
  if os.path.exists(dst):
    shutil.rmtree(dst)
  orbax_io.save_params(dst, params, cfg, {'source': 'promot demo --pretrain',
                                          'gin_file': 'runs/demo/pretrain.gin',
                                          'validation': accuracy})
  return accuracy


def _complete(results_file: str, num_tasks: int) -> bool:
  try:
    with open(results_file) as f:
      results = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return len(results.get('tasks', {})) == num_tasks and not results.get('failed')


def command(args) -> int:
  methods = [m for m in (getattr(args, 'methods', None) or '').split(',') if m]
  demo = Demo(args.out_dir, quick=args.quick, extra_flags=getattr(args, 'gin_flags', []),
              methods=methods, seeds=args.seeds, redo=args.redo)
  built = demo.run(pretrain=args.pretrain, pretrained=args.pretrained)
  if args.ship:
    accuracy = ship_pretrained(os.path.join(demo.out_dir, 'pretrain', 'pretrain'))
    print(f'shipped the pretrained model to {SHIPPED_PRETRAINED} (held-out 1-shot accuracy '
          f'{accuracy:.1f})')
  print(report.markdown(built))
  print(f'What the demo is meant to show, mean over {len(demo.seeds)} seed(s):\n'
        + targets_text(demo.targets))
  print(f'demo finished in {demo.timings["total"]:.0f}s; report in {demo.out_dir}/report.md, '
        f'report.png, results.json; timings {demo.timings}')
  return 0
