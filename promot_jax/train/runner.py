"""`promot run` / `promot train`: set up devices and run the stages of a RunConfig in order."""

from __future__ import annotations

import time
from typing import Optional

import jax
import seqio

from promot_jax import mesh as partitioning
from promot_jax.data import pipeline as data
from promot_jax.train import probes
from promot_jax.train.loop import train_stage
from promot_jax.train.preemption import StopRequest
from promot_jax.train.run_config import RunConfig


def setup_devices(run: RunConfig):
  """jax.distributed on multi-host (when asked), then the (data, model) mesh over all devices."""
  if run.distributed:
    partitioning.initialize_distributed(run.coordinator_address, run.num_processes,
                                        run.process_id)
  mesh = partitioning.make_mesh(run.num_partitions)
  partitioning.check_batch_divisible(run.batch_size, mesh)
  return mesh


def check_task(run: RunConfig) -> None:
  """The task exists, its vocabulary can be read, and its ids fit the model's embedding."""
  trained = run.validation_task or run.mixture_or_task_name
  probes.check_probes(run.format_probe_tasks, probes.probe_labels(trained, run.format_labels),
                      trained)
  for name in {run.mixture_or_task_name, run.validation_task or run.mixture_or_task_name}:
    data.check_task_name(name)
    for feature_name, feature in seqio.get_mixture_or_task(name).output_features.items():
      vocab = data.check_vocabulary_readable(feature.vocabulary)
      if vocab.vocab_size > run.model_config.vocab_size:
        raise ValueError(
            f'Task {name}: the {feature_name!r} vocabulary has {vocab.vocab_size} ids but the '
            f'model embeds only {run.model_config.vocab_size} (vocab_size). Use the model\'s own '
            'vocabulary (PROMOT_VOCABULARY) or a model config with a larger vocab_size.')


def run_stages(run: RunConfig, only_stage: Optional[str] = None) -> list[dict]:
  """Run every stage (or one, by name) in order; each starts where its definition says.

  TRAIN_STEPS / LEARNING_RATE (t5x's macros) override the stage's own values when one stage
  runs (`promot train`); in a multi-stage run each stage file has its own macros instead.
  """
  run.import_task_modules()
  run.validate()
  check_task(run)
  mesh = setup_devices(run)
  run.check_model_dir()
  if jax.process_index() == 0:
    print(f'promot: {jax.process_count()} process(es), {jax.device_count()} devices, mesh '
          f'{dict(mesh.shape)}; run {run.describe()}', flush=True)
  if only_stage == '__first__':
    only_stage = run.stages[0].name
  overrides = {k: v for k, v in (('train_steps', run.train_steps),
                                 ('learning_rate', run.learning_rate)) if v is not None}
  if overrides and not only_stage and len(run.stages) > 1:
    raise ValueError('TRAIN_STEPS / LEARNING_RATE set one stage\'s values; with promot run use '
                     'the stage macros (PROMPT_TUNING_STEPS, MODEL_TUNING_STEPS, '
                     'PROMPT_LEARNING_RATE, MODEL_LEARNING_RATE) or promot train --stage NAME.')
  selected = [run.get_stage(only_stage)] if only_stage else [
      (s, run.stages[i - 1] if i else None) for i, s in enumerate(run.stages)]
  summaries = []
  t0 = time.perf_counter()
  with StopRequest() as stop:  # one for the whole run: a signal between stages stops it too
    for stage, previous in selected:
      summaries.append(train_stage(run, stage.replace(**overrides), mesh, previous, stop))
  if jax.process_index() == 0:
    print(f'promot: finished {[s["stage"] for s in summaries]} in {time.perf_counter() - t0:.1f}s',
          flush=True)
  return summaries
