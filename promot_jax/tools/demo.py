"""`promot demo`: format specialization and ProMoT, reproduced offline on a tiny T5.

  promot demo [--out_dir out/demo] [--pretrain] [--quick] [--methods lora,multitask]

Every part is an ordinary gin run or eval file, so the demo doubles as documentation of how
a real run is composed:

  a) pretrain     runs/demo/pretrain.gin   a tiny T5 learns six string tasks in context
                  (only with --pretrain; otherwise the shipped demo/pretrained/ is used)
  b) finetune     runs/demo/finetune.gin   standard fine-tuning on 'Is it sorted?' (True/False)
     promot       runs/demo/promot.gin     stage 1 prompt tuning (also the prompt-tuning
                                           baseline), stage 2 model tuning with the prompt
     --methods    runs/demo/lora_promot.gin       optional: LoRA-ProMoT (rank-4 adapters)
                  runs/demo/multitask_promot.gin  optional: multi-task ProMoT on two tasks
  c) eval         eval/demo.gin            the classification task (with the prompt where one
                  exists) and every in-context task at 1 and 4 shots without a prompt
  d) report       OUT/report.md, report.png, results.json (promot report)

Each part resumes where it stopped (stages resume from their checkpoints, finished stages
and finished evaluations are skipped), so an interrupted demo continues when rerun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Optional, Sequence

import numpy as np

from promot_jax import resources, tree_util
from promot_jax.checkpoints import orbax_io, resolve
from promot_jax.eval import registry, suite, task as eval_task
from promot_jax.ginconf import loaders
from promot_jax.tools import report
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


class Demo:
  """The demo's parts, run in order under one output directory."""

  def __init__(self, out_dir: str, quick: bool = False, extra_flags: Sequence[str] = (),
               log=print, methods: Sequence[str] = ()):
    unknown = sorted(set(methods) - set(EXTRA_METHODS))
    if unknown:
      raise ValueError(f'Unknown demo methods {unknown}; choose from {sorted(EXTRA_METHODS)} '
                       '(fine-tuning, prompt tuning and ProMoT always run).')
    self.methods = list(methods)
    self.out_dir = os.path.abspath(out_dir)
    self.quick = quick
    self.extra_flags = list(extra_flags)
    self.log = log
    self.start = time.perf_counter()
    self.timings: dict[str, float] = {}

  def _say(self, message: str) -> None:
    self.log(f'[demo {time.perf_counter() - self.start:7.1f}s] {message}')

  def _bindings(self, gin_file: str, model_dir: Optional[str], pretrained: Optional[str]):
    flags = list(QUICK.get(gin_file, [])) if self.quick else []
    if model_dir:
      flags.append(f'MODEL_DIR={model_dir!r}')
    if pretrained:
      flags.append(f'PRETRAINED={pretrained!r}')
    return [f'--gin.{f}' for f in flags] + self.extra_flags

  def train(self, part: str, gin_file: str, pretrained: Optional[str]) -> str:
    """Run (or resume, or skip) one gin run file; returns its MODEL_DIR."""
    model_dir = os.path.join(self.out_dir, part)
    self._say(f'{part}: promot run --gin_file={gin_file} (MODEL_DIR {model_dir})')
    t0 = time.perf_counter()
    run = loaders.load_run([gin_file], self._bindings(gin_file, model_dir, pretrained))
    runner.run_stages(run)
    self.timings[part] = round(time.perf_counter() - t0, 1)
    return model_dir

  def pretrain(self) -> str:
    """Part a): pretrain from random weights; returns the kept checkpoint's path."""
    model_dir = self.train('pretrain', 'runs/demo/pretrain.gin', None)
    return resolve.resolve_checkpoint(os.path.join(model_dir, 'pretrain'))

  def evaluate(self, checkpoints: dict[str, tuple]) -> list[str]:
    """Part c): {method: (checkpoint, with_prompt[, fine-tuned task])} -> results.json paths
    (reused if complete)."""
    paths = []
    t0 = time.perf_counter()
    for method, (path, with_prompt, *task) in checkpoints.items():
      out_dir = os.path.join(self.out_dir, 'eval', re.sub(r'[^a-z0-9]+', '_', method.lower()))
      ecfg = loaders.load_eval_config([EVAL_GIN], self._bindings(EVAL_GIN, None, None))
      ecfg = dataclasses.replace(ecfg, out_dir=out_dir, finetuned_with_prompt=with_prompt)
      if task and task[0]:
        ecfg = dataclasses.replace(ecfg, finetuned_task=task[0])
      name = resolve.checkpoint_name(resolve.resolve_checkpoint(path))
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
    self.timings['eval'] = round(time.perf_counter() - t0, 1)
    return paths

  def run(self, pretrain: bool = False, pretrained: Optional[str] = None) -> dict:
    """Every part in order; returns the report (as `promot report` builds it)."""
    if pretrain:
      pretrained = self.pretrain()
      self._compare_with_shipped(pretrained)
    else:
      pretrained = os.path.abspath(pretrained or SHIPPED_PRETRAINED)
      if not os.path.isdir(pretrained):
        raise FileNotFoundError(f'The pretrained model {pretrained} is missing; run '
                                'promot demo --pretrain to make one.')
    finetune_dir = self.train('finetune', 'runs/demo/finetune.gin', pretrained)
    promot_dir = self.train('promot', 'runs/demo/promot.gin', pretrained)
    checkpoints = {
        'Pretrained': (pretrained, False),
        'Fine-tuning': (os.path.join(finetune_dir, 'finetune'), False),
        'Prompt tuning': (os.path.join(promot_dir, 'prompt_tuning'), True),
        'ProMoT': (os.path.join(promot_dir, 'model_tuning'), True)}
    for key in self.methods:
      part, gin_file, column, task = EXTRA_METHODS[key]
      model_dir = self.train(part, gin_file, pretrained)
      checkpoints[column] = (os.path.join(model_dir, 'model_tuning'), True, task)
    results = self.evaluate(checkpoints)
    self._say('report: promot report ' + ' '.join(results))
    built = report.write_report(results, self.out_dir)
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
              methods=methods)
  built = demo.run(pretrain=args.pretrain, pretrained=args.pretrained)
  if args.ship:
    accuracy = ship_pretrained(os.path.join(demo.out_dir, 'pretrain', 'pretrain'))
    print(f'shipped the pretrained model to {SHIPPED_PRETRAINED} (held-out 1-shot accuracy '
          f'{accuracy:.1f})')
  print(report.markdown(built))
  print(f'demo finished in {demo.timings["total"]:.0f}s; report in {demo.out_dir}/report.md, '
        f'report.png, results.json; timings {demo.timings}')
  return 0
