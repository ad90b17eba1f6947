"""Stages as data: what trains, how, for how long, and which checkpoint is kept.

A ProMoT run is an ordered list of stages. Each stage names the parameters it trains by a
regex over the '/'-joined parameter path; everything else is frozen. Gradients and optimizer
state exist only for the trainable subtree, so stage 1 (prompt_tuning) costs no weight
gradients and no optimizer memory for the frozen model.

The presets carry the paper's defaults (ProMoT, arXiv 2211.00635): Adafactor, constant
learning rate, batch 64; prompt tuning lr 0.3 for 5,000 steps, checkpoint every 1,000;
model tuning lr 1e-3, dropout 0.1, label smoothing 0.1, 1,000 steps, checkpoint every 100.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

from promot_jax import tree_util
from promot_jax.model import formats, lora

PROMPT_REGEX = r'^prompt/'
LORA_REGEX = lora.LORA_PATH_REGEX
# Every weight of the network, no format module (prompt or LoRA): what stage 2 trains.
ALL_BUT_MODULE_REGEX = formats.NOT_MODULE_REGEX
ALL_BUT_PROMPT_REGEX = ALL_BUT_MODULE_REGEX   # its first name
EVERYTHING_REGEX = r'.*'


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage. `trainable` is a regex matched (re.search) against parameter paths."""
  name: str
  trainable: str
  with_prompt: bool
  learning_rate: float
  train_steps: int
  dropout_rate: float = 0.0
  label_smoothing: float = 0.0
  z_loss: float = 1e-4
  optimizer: str = 'adafactor'
  # Adafactor's update scaling by parameter RMS: on for weights, off for the prompt (the
  # prompt-tuning convention; a prompt initialised at +-0.5 should move at the raw lr).
  multiply_by_parameter_scale: bool = True
  decay_rate: float = 0.8
  checkpoint_period: int = 1000
  eval_period: Optional[int] = None   # None: evaluate at every checkpoint
  keep_metric: str = 'validation/sequence_accuracy'
  keep_mode: str = 'max'              # 'max' or 'min'
  keep_latest: int = 2                # plus the best checkpoint, which is always kept
  # Where the stage's starting parameters come from: 'pretrained' (the run's initial
  # checkpoint, prompt from its initialiser) or 'previous' (the previous stage's kept one).
  start_from: str = 'pretrained'
  # The seqio task or mixture this stage trains and validates on; None: the run's
  # MIXTURE_OR_TASK_NAME (sequential runs give each stage its own).
  task: Optional[str] = None
  # The input embedding's gradient and Adafactor update over only the rows a batch uses
  # (exact; train/sparse.py). None: whenever it applies and the batch has at most vocab / 2
  # token positions; False: always dense; True: sparse, or an error saying why it can't be.
  sparse_embedding: Optional[bool] = None

  def replace(self, **changes: Any) -> 'Stage':
    return dataclasses.replace(self, **changes)

  def is_trainable(self, path: str) -> bool:
    return re.search(self.trainable, path) is not None

  def validate(self) -> None:
    if self.optimizer not in ('adafactor', 'adam', 'sgd'):
      raise ValueError(f'Stage {self.name}: unknown optimizer {self.optimizer!r}; use adafactor, '
                       'adam or sgd.')
    if self.keep_mode not in ('max', 'min'):
      raise ValueError(f'Stage {self.name}: keep_mode must be max or min, got {self.keep_mode!r}.')
    if self.start_from not in ('pretrained', 'previous'):
      raise ValueError(f'Stage {self.name}: start_from must be pretrained or previous.')
    if self.train_steps <= 0 or self.checkpoint_period <= 0:
      raise ValueError(f'Stage {self.name}: train_steps and checkpoint_period must be positive.')
    try:
      re.compile(self.trainable)
    except re.error as e:
      raise ValueError(f'Stage {self.name}: bad trainable regex {self.trainable!r}: {e}') from e


def split_params(params: Mapping[str, Any], stage: Stage) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts; their union is `params`."""
  flat = tree_util.flatten(params)
  trainable = {p: v for p, v in flat.items() if stage.is_trainable(p)}
  frozen = {p: v for p, v in flat.items() if not stage.is_trainable(p)}
  if not trainable:
    raise ValueError(f'Stage {stage.name}: the regex {stage.trainable!r} matches no parameter. '
                     f'Parameter paths look like {sorted(flat)[:3]}.')
  return tree_util.unflatten(trainable), tree_util.unflatten(frozen)


def uses_modules(stage: Stage, params: Mapping[str, Any]) -> bool:
  """Whether `stage` attaches or trains any format module of `params` (a tree with them)."""
  return stage.with_prompt or any(stage.is_trainable(p) for p in formats.module_paths(params))


def check_modules(stage: Stage, cfg) -> None:
  """A clear error when a stage uses a format module the model config does not have."""
  if stage.with_prompt and not cfg.has_format_module:
    raise ValueError(f'Stage {stage.name} attaches the format module but the model has none; '
                     'set --gin.PROMPT_LENGTH=100 (the paper uses 100) or LORA_RANK for LoRA.')
  if stage.trainable == LORA_REGEX and cfg.lora_rank <= 0:
    raise ValueError(f'Stage {stage.name} trains LoRA adapters but LORA_RANK is 0; set '
                     '--gin.LORA_RANK=4 (the paper tries 2 and 4).')
  if stage.trainable == PROMPT_REGEX and cfg.prompt_length <= 0:
    raise ValueError(f'Stage {stage.name} trains the prompt but PROMPT_LENGTH is 0; set '
                     '--gin.PROMPT_LENGTH=100 (the paper uses 100).')


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  return tree_util.unflatten({**tree_util.flatten(frozen), **tree_util.flatten(trainable)})


def prompt_tuning(**overrides: Any) -> Stage:
  """Stage 1: train only the prompt; the model is frozen."""
  return Stage(name='prompt_tuning', trainable=PROMPT_REGEX, with_prompt=True,
               learning_rate=0.3, train_steps=5000, checkpoint_period=1000,
               multiply_by_parameter_scale=False, start_from='pretrained').replace(**overrides)


def lora_tuning(**overrides: Any) -> Stage:
  """Stage 1 with LoRA as the format module: train only the adapters; the model is frozen.

  The paper gives no LoRA hyper-parameters; these are this project's: Adafactor at lr 1e-3
  without parameter scaling (lora_b starts at zero), the prompt stage's length and period.
  """
  return Stage(name='lora_tuning', trainable=LORA_REGEX, with_prompt=True,
               learning_rate=1e-3, train_steps=5000, checkpoint_period=1000,
               multiply_by_parameter_scale=False, start_from='pretrained').replace(**overrides)


def model_tuning(**overrides: Any) -> Stage:
  """Stage 2: train every weight with the stage-1 module (prompt or LoRA) attached and frozen."""
  return Stage(name='model_tuning', trainable=ALL_BUT_MODULE_REGEX, with_prompt=True,
               learning_rate=1e-3, train_steps=1000, dropout_rate=0.1, label_smoothing=0.1,
               checkpoint_period=100, start_from='previous').replace(**overrides)


def finetune(**overrides: Any) -> Stage:
  """Baseline: standard fine-tuning, no prompt at all."""
  return Stage(name='finetune', trainable=ALL_BUT_MODULE_REGEX, with_prompt=False,
               learning_rate=1e-3, train_steps=1000, dropout_rate=0.1, label_smoothing=0.1,
               checkpoint_period=100, start_from='pretrained').replace(**overrides)


def joint(**overrides: Any) -> Stage:
  """Ablation: prompt and model trained together from the start."""
  return Stage(name='joint', trainable=EVERYTHING_REGEX, with_prompt=True, learning_rate=1e-3,
               train_steps=1000, dropout_rate=0.1, label_smoothing=0.1, checkpoint_period=100,
               start_from='pretrained').replace(**overrides)


def sequential(tasks: Sequence[str], stage1: Stage, stage2: Stage) -> list[Stage]:
  """Sequential ProMoT: for each task in turn, stage 1 on its own prompt then stage 2.

  The model needs one prompt per task (PROMPT_TASKS = tasks). Task k's stage 1 trains only
  prompt/<task k> and starts from task k-1's stage-2 model (the first from the pretrained
  one); its stage 2 trains the model with that prompt attached. Earlier prompts are kept
  unchanged, so after the last task every task's prompt is in the checkpoint.
  """
  if not tasks:
    raise ValueError('sequential() needs at least one task.')
  out = []
  for i, task in enumerate(tasks):
    short = task.split(':')[-1]
    out.append(stage1.replace(name=f'{stage1.name}_{short}', task=task,
                              trainable=f'^prompt/{re.escape(task)}$',
                              start_from='pretrained' if i == 0 else 'previous'))
    out.append(stage2.replace(name=f'{stage2.name}_{short}', task=task, start_from='previous'))
  return out


PRESETS = {'prompt_tuning': prompt_tuning, 'lora_tuning': lora_tuning,
           'model_tuning': model_tuning, 'finetune': finetune, 'joint': joint}
