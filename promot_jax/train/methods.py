"""The paper's name for what a run has done by a given stage: the column a checkpoint fills.

The trainer writes it into every checkpoint's state.json ('method'), `promot eval` copies it
into results.json, and `promot report` heads its columns with it, so no label is written by
hand. It is read off the stages themselves (what each trains, whether the module is attached,
where it starts, which task), not off their names:

  stages so far                                   label
  module only (prompt | LoRA)                     Prompt tuning | LoRA tuning (r=R)
  model, no module                                Fine-tuning (+ 1-shot prompt on a _1shot task)
  model with a module it never trained            Fixed random prompt + fine-tuning
  module and model together                       Joint
  module, then model with it attached             ProMoT | LoRA-ProMoT (r=R) | ProMoT + 1-shot |
                                                  Multi-task ProMoT (per-task prompts)
  that again per task (stage.task)                Sequential ProMoT: task A -> task B
"""

from __future__ import annotations

from typing import Sequence

from promot_jax.model import formats
from promot_jax.train.stages import Stage

# The paper's columns, in its order; the report sorts by it (anything else after).
ORDER = ('Pretrained', 'Fine-tuning', 'Fine-tuning + 1-shot prompt',
         'Fixed random prompt + fine-tuning', 'Prompt tuning', 'Joint', 'ProMoT',
         'ProMoT + 1-shot', 'LoRA-ProMoT (r=2)', 'LoRA-ProMoT (r=4)', 'Multi-task ProMoT')

# A sample path of each kind: what a stage's regex is tested on.
_MODULE_PATHS = ('prompt/prompt', 'encoder/layers_0/attention/query/lora_a')
_MODEL_PATH = 'encoder/layers_0/attention/query/kernel'


def _kind(stage: Stage, cfg) -> str:
  module = any(stage.is_trainable(p) for p in _MODULE_PATHS) or (
      stage.trainable.startswith('^prompt/') and cfg.prompt_tasks)
  model = stage.is_trainable(_MODEL_PATH)
  if module and model:
    return 'joint'
  if module:
    return 'module'
  return 'model_with_module' if stage.with_prompt else 'model'


def _module_name(cfg, tuned: bool) -> str:
  if 'lora' in formats.kinds(cfg):
    return f'LoRA-ProMoT (r={cfg.lora_rank})' if tuned else f'LoRA tuning (r={cfg.lora_rank})'
  return 'ProMoT' if tuned else 'Prompt tuning'


def method_label(stages: Sequence[Stage], index: int, cfg, task: str) -> str:
  """The label of a checkpoint of stage `index` of a run of `stages` (config `cfg`, whose
  MIXTURE_OR_TASK_NAME is `task`)."""
  done = list(stages[:index + 1])
  tasks = [s.task for s in done if s.task]
  kinds = [_kind(s, cfg) for s in done]
  if len({s.task for s in stages if s.task}) > 1:
    trained = list(dict.fromkeys(s.task for s, k in zip(done, kinds) if k != 'module'))
    label = 'Sequential ProMoT: ' + ' -> '.join(trained or ['(none)'])
    return label + (f' (+ prompt of {done[-1].task})' if kinds[-1] == 'module' else '')
  one_shot = (tasks[-1] if tasks else task).endswith('_1shot')
  last = kinds[-1]
  if last == 'joint':
    return 'Joint'
  if last == 'module':
    return _module_name(cfg, tuned=False)
  if last == 'model':
    return 'Fine-tuning + 1-shot prompt' if one_shot else 'Fine-tuning'
  if 'module' not in kinds[:-1]:      # the module was attached but never trained
    return 'Fixed random prompt + fine-tuning'
  if cfg.prompt_tasks:
    return 'Multi-task ProMoT'
  label = _module_name(cfg, tuned=True)
  return label + ' + 1-shot' if one_shot else label
