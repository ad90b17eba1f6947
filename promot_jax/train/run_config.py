"""A run: the model, the data, and the ordered stages, as one plain dataclass.

Gin binds it at the entry point (gin/promot.gin maps t5x's macro names onto its fields:
MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, BATCH_SIZE, INITIAL_CHECKPOINT_PATH,
PROMPT_LENGTH, LOSS_NORMALIZING_FACTOR, ...); the trainer only ever sees this object.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import seqio

from promot_jax import mesh as partitioning, paths
from promot_jax.eval import registry
from promot_jax.model.config import T5Config
from promot_jax.train.stages import Stage


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model_dir: str
  model_config: T5Config
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  stages: Sequence[Stage]
  batch_size: int = 64
  initial_checkpoint_path: Optional[str] = None   # HF / t5x / promot checkpoint; None = random
  previous_checkpoint_path: Optional[str] = None  # where a 'previous' stage starts, if not MODEL_DIR
  validation_task: Optional[str] = None           # default: the training task
  validation_split: str = 'validation'
  eval_batches: Optional[int] = None              # cap on validation batches (None: whole split)
  seed: int = 0
  num_partitions: int = 1                         # size of the mesh's 'model' axis
  logical_axis_rules: Sequence[tuple[str, Optional[str]]] = ()  # overrides of the standard rules
  loss_normalizing_factor: Optional[float] = None
  prompt_init: str = 'uniform'                    # uniform | vocab | class_labels | file
  prompt_init_file: Optional[str] = None
  prompt_init_class_labels: Sequence[str] = ()
  log_every: int = 10
  format_probe_tasks: Sequence[str] = ()          # decoded without the prompt at each validation
  format_labels: Sequence[str] = ()               # default: the training task's LABEL_SETS entry
  format_probe_examples: int = 32
  nonfinite_policy: str = 'stop'                  # 'stop' or 'skip' the batch (NONFINITE_POLICY)
  # How keep-best decodes the validation split (KEEP_DECODE): 'greedy' (default: one decoder
  # pass per token, ~beam_size x cheaper, run at every checkpoint) or 'beam' (the paper's beam 4,
  # the metric `promot eval` reports).
  keep_decode: str = 'greedy'
  train_steps: Optional[int] = None               # TRAIN_STEPS: one stage's steps (promot train)
  learning_rate: Optional[float] = None           # LEARNING_RATE: one stage's rate (promot train)
  task_modules: Sequence[str] = ()                # modules whose import registers the tasks
  distributed: bool = False                       # call jax.distributed.initialize()
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  def rules(self) -> tuple:
    return partitioning.standard_logical_axis_rules(tuple(self.logical_axis_rules))

  def train_task(self, stage: Stage) -> str:
    """The task or mixture `stage` trains on: its own, else MIXTURE_OR_TASK_NAME."""
    return stage.task or self.mixture_or_task_name

  def validation_task_of(self, stage: Stage) -> str:
    """What keep-best validates `stage` on: its own task, else VALIDATION_TASK, else the run's."""
    return stage.task or self.validation_task or self.mixture_or_task_name

  def stage_index(self, name: str) -> int:
    return [s.name for s in self.stages].index(name)

  def get_stage(self, name: str) -> tuple[Stage, Optional[Stage]]:
    """(stage, the stage before it) by name; a clear error lists the run's stages."""
    names = [s.name for s in self.stages]
    if name not in names:
      raise ValueError(f'No stage {name!r} in this run; its stages are {names}.')
    i = names.index(name)
    return self.stages[i], (self.stages[i - 1] if i > 0 else None)

  def class_label_ids(self) -> Optional[list[list[int]]]:
    if not self.prompt_init_class_labels:
      return None
    vocab = seqio.get_mixture_or_task(self.mixture_or_task_name).output_features[
        'targets'].vocabulary
    return [list(vocab.encode(label)) for label in self.prompt_init_class_labels]

  def import_task_modules(self) -> None:
    registry.import_task_modules(self.task_modules)

  def validate(self) -> None:
    if not self.stages:
      raise ValueError('The run has no stages; set STAGES in the run file.')
    names = [s.name for s in self.stages]
    if len(set(names)) != len(names):
      raise ValueError(f'Stage names must be unique within a run: {names}')
    missing = {'inputs', 'targets'} - set(self.task_feature_lengths)
    if missing:
      raise ValueError(f'TASK_FEATURE_LENGTHS needs {sorted(missing)}, e.g. '
                       "{'inputs': 512, 'targets': 64}.")
    for s in self.stages:
      s.validate()
    if self.keep_decode not in ('greedy', 'beam'):
      raise ValueError(f"KEEP_DECODE must be 'greedy' or 'beam', got {self.keep_decode!r}.")
    if self.nonfinite_policy not in ('stop', 'skip'):
      raise ValueError(f"NONFINITE_POLICY must be 'stop' or 'skip', got {self.nonfinite_policy!r}")
    self.check_lengths()

  def check_lengths(self) -> None:
    cfg = self.model_config
    total = self.task_feature_lengths['inputs'] + cfg.prompt_length
    if min(self.task_feature_lengths.values()) <= 0:
      raise ValueError(f'TASK_FEATURE_LENGTHS must be positive: {dict(self.task_feature_lengths)}')
    if total > 16384:
      raise ValueError(f'inputs + prompt = {total} positions; that does not fit a T5 encoder '
                       'sensibly (attention is quadratic). Lower TASK_FEATURE_LENGTHS["inputs"].')

  def check_model_dir(self) -> None:
    """MODEL_DIR must not hold a run of a different architecture (reads only)."""
    path = paths.join(self.model_dir, 'run.json')
    arch = self.model_config.architecture()
    if paths.exists(path):
      previous = paths.read_json(path).get('architecture')
      if previous is not None and previous != arch:
        diff = {k: (previous.get(k), arch.get(k)) for k in arch if previous.get(k) != arch.get(k)}
        raise ValueError(f'MODEL_DIR {self.model_dir} holds a run of a different model '
                         f'(checkpoint vs config: {diff}). Use a new MODEL_DIR or the matching '
                         'model gin file.')

  def record_model_dir(self) -> None:
    """Write MODEL_DIR/run.json (process 0, once): called when a stage is about to train, after
    every check has passed, so a run that fails its checks leaves MODEL_DIR as it was."""
    path = paths.join(self.model_dir, 'run.json')
    if jax.process_index() != 0 or paths.exists(path):
      return
    paths.makedirs(self.model_dir)
    paths.write_json(path, {'architecture': self.model_config.architecture(),
                            'stages': [dataclasses.asdict(s) for s in self.stages],
                            'task': self.mixture_or_task_name,
                            'task_feature_lengths': dict(self.task_feature_lengths)})

  def describe(self) -> dict[str, Any]:
    return {'model_dir': self.model_dir, 'task': self.mixture_or_task_name,
            'stages': [s.name for s in self.stages], 'batch_size': self.batch_size,
            'architecture': self.model_config.architecture()}
