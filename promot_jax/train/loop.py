"""Runs one stage: starting parameters, sharded state, the jitted step loop, checkpoints.

A stage starts from the run's pretrained checkpoint (prompt from its initialiser) or from
the previous stage's kept checkpoint, or resumes from its own latest checkpoint in
MODEL_DIR/<stage>/ with the data iterator at the same position. Everything the step
touches is laid out by the logical axis rules on the (data, model) mesh.

With `T5Config.scan_layers` (gin macro SCAN_LAYERS) the step trains the stacked tree; what
it restores, saves, validates and decodes is the t5x tree (train.sharding.StageLayout), so
scanned and unrolled runs share their checkpoints.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from promot_jax import mesh as partitioning, paths, tree_util
from promot_jax.checkpoints import loading, orbax_io
from promot_jax.checkpoints.manager import CorruptCheckpointError, StageCheckpoints
from promot_jax.data import pipeline as data
from promot_jax.eval import task as eval_task
from promot_jax.model import formats, prompt, transformer as model
from promot_jax.train import methods, probes, sharding
from promot_jax.train.preemption import Preempted, StopRequest
from promot_jax.train.progress import Progress
from promot_jax.train.run_config import RunConfig
from promot_jax.train.stages import Stage, check_modules, merge_params, split_params, uses_modules
from promot_jax.train.step import TrainState, make_eval_step


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
  exit_code = 3   # what `promot` exits with


def _prepare_starting_params(run: RunConfig, stage: Stage, previous: Optional[Stage],
                             log: Callable[[str], None]) -> dict:
  """The parameters a fresh stage starts from (numpy), with the prompt it needs."""
  cfg = run.model_config
  if stage.start_from == 'previous':
    path = run.previous_checkpoint_path
    if not path:
      if previous is None:
        raise ValueError(f'Stage {stage.name} starts from the previous stage, but it is the first '
                         'stage of the run. Put a prompt_tuning stage before it or set '
                         'PREVIOUS_CHECKPOINT_PATH to a stage-1 checkpoint.')
      kept = StageCheckpoints(paths.join(run.model_dir, previous.name)).kept()
      if not kept or not paths.isdir(kept['path']):
        raise ValueError(
            f'Stage {stage.name} starts from the kept checkpoint of stage {previous.name}, but '
            f'{paths.join(run.model_dir, previous.name)} has none. Run stage {previous.name} '
            'first (promot run runs both), or set PREVIOUS_CHECKPOINT_PATH to a checkpoint.')
      path = kept['path']
    log(f'starting from {path}')
    found_cfg = orbax_io.read_config(path) if orbax_io.is_orbax_checkpoint(path) else None
    if found_cfg is not None:
      _check_prompt_length(found_cfg.prompt_length, cfg.prompt_length, path)
    _, params = loading.load_pretrained(path, cfg)
  elif run.initial_checkpoint_path:
    log(f'starting from pretrained {run.initial_checkpoint_path}')
    _, params = loading.load_pretrained(run.initial_checkpoint_path, cfg)
  else:
    log('starting from random weights (no INITIAL_CHECKPOINT_PATH)')
    params = jax.tree_util.tree_map(np.asarray, model.init_params(
        cfg.base(), jax.random.PRNGKey(run.seed)))
  for name in prompt.prompt_names(params):     # prompt/prompt, or one per task
    _check_prompt_length(params['prompt'][name].shape[0], cfg.prompt_length, 'the checkpoint')
  check_modules(stage, cfg)
  if not uses_modules(stage, model.abstract_params(cfg)):
    return params
  return formats.initialize_missing(
      params, cfg, rng=jax.random.PRNGKey(run.seed + 1), prompt_init=run.prompt_init,
      prompt_init_file=run.prompt_init_file, class_label_ids=run.class_label_ids(), log=log)


def _trains_only_the_module(trainable: Any, frozen: Any) -> bool:
  """Whether the stage trains every format-module parameter and nothing else."""
  return (all(formats.is_module_path(p) for p in tree_util.flatten(trainable))
          and not formats.module_paths(frozen))


def _check_prompt_length(found: int, expected: int, source: str) -> None:
  if found != expected and found > 0:
    raise ValueError(f'{source} holds a prompt of length {found} but PROMPT_LENGTH is {expected}; '
                     f'set --gin.PROMPT_LENGTH={found} (a prompt cannot change length between '
                     'stages).')


def validate(run: RunConfig, stage: Stage, eval_fn: Callable, params: Any, mesh) -> dict:
  """Teacher-forced validation metrics over the validation split (or EVAL_BATCHES of it)."""
  shard_index, num_shards = partitioning.host_data_shard(mesh)
  it = data.make_batch_iterator(
      run.validation_task_of(stage), run.task_feature_lengths,
      run.validation_split, run.batch_size, seed=run.seed, shuffle=False, repeat=False,
      drop_remainder=False, shard_index=shard_index, num_shards=num_shards,
      prompt_tasks=run.model_config.prompt_tasks)
  totals: dict[str, float] = {}
  for i, batch in enumerate(it):
    if run.eval_batches is not None and i >= run.eval_batches:
      break
    batch = data.pad_batch(batch, run.batch_size // num_shards)
    out = jax.device_get(eval_fn(params, partitioning.global_batch_from_host(batch, mesh)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  if not totals or totals['num_tokens'] == 0:
    raise ValueError(f'The validation split {run.validation_split!r} of '
                     f'{run.validation_task_of(stage)} gave no examples.')
  return {'validation/loss': totals['loss_sum'] / totals['num_tokens'],
          'validation/token_accuracy': totals['correct_tokens'] / totals['num_tokens'],
          'validation/sequence_accuracy': totals['correct_sequences'] / totals['num_sequences'],
          'validation/num_sequences': totals['num_sequences']}


def _stopped_before(stage: Stage, step: int, signal_name: str) -> Preempted:
  return Preempted(f'stage {stage.name} stopped before step {step + 1}/{stage.train_steps} on '
                   f'{signal_name}; run the same command again to resume.')


def train_stage(run: RunConfig, stage: Stage, mesh, previous: Optional[Stage] = None,
                stop: Optional[StopRequest] = None) -> dict:
  """Run (or resume, or skip if finished) one stage; returns its summary incl. the kept step.

  `stop`: the run's StopRequest (runner.run_stages holds one across all stages, so a signal
  between stages is seen too); by default the stage installs its own.
  """
  with contextlib.nullcontext(stop) if stop is not None else StopRequest() as stop:
    return _train_stage(run, stage, mesh, previous, stop)


def _train_stage(run: RunConfig, stage: Stage, mesh, previous: Optional[Stage],
                 stop: StopRequest) -> dict:
  stage.validate()
  cfg, rules = run.model_config, run.rules()
  stage_dir = paths.join(run.model_dir, stage.name)
  ckpts = StageCheckpoints(stage_dir, stage.keep_latest, stage.keep_metric, stage.keep_mode)
  progress = Progress(stage.name, stage.train_steps, 0, 0)
  if ckpts.is_done(stage.train_steps):
    progress.log(f'already finished; kept checkpoint: {ckpts.kept()}')
    return {'stage': stage.name, 'kept': ckpts.kept(), 'skipped': True}
  if stop.should_stop(0):  # signalled between stages (agreed by every host)
    raise _stopped_before(stage, 0, stop.signal_name)
  for name in ckpts.clean_partial():
    progress.log(f'removed an incomplete checkpoint left by a crash: {name}')
  partitioning.check_batch_divisible(run.batch_size, mesh)

  # Resume from the newest checkpoint that reads back; damaged newer ones are set aside
  # (renamed *.corrupt, never deleted) once an older one has restored. If none restores,
  # stop with an error rather than silently starting over (docs/RELIABILITY.md).
  latest, restored, failures = None, None, []
  for candidate in reversed(ckpts.steps()):
    try:
      stored = ckpts.param_shapes(candidate)  # shapes only; restored below
      base = ckpts.base_of(candidate)         # set when it holds only the stage's part
      params = stored if base is None else tree_util.merge(loading.base_shapes(cfg), stored)
      layout = sharding.build_stage_layout(cfg, stage, mesh, rules, params,
                                           run.loss_normalizing_factor)
      abstract_params, abstract_opt = sharding.abstract_on_mesh(layout.t5x, params, stage)
      flat_abstract = tree_util.flatten(abstract_params)
      restored = ckpts.restore(candidate, tree_util.unflatten(
          {p: flat_abstract[p] for p in tree_util.flatten(stored)}), abstract_opt)
      if base is not None:   # the frozen rest, from the base the checkpoint names
        frozen = sharding.place_frozen(layout.t5x, loading.load_base(base, cfg))
        restored = (tree_util.merge(frozen, restored[0]), *restored[1:])
      latest = candidate
      break
    except CorruptCheckpointError as e:
      failures.append((candidate, str(e)))
      progress.log(f'WARNING: cannot resume from {ckpts.path(candidate)}, trying an older '
                   f'checkpoint: {e}')
  if failures and restored is None:
    listing = '; '.join(f'{ckpts.path(s)}: {err}' for s, err in failures)
    raise CorruptCheckpointError(
        f'Stage {stage.name}: none of its {len(failures)} checkpoint(s) could be restored, so '
        f'it neither resumes nor starts over by itself ({listing}). If the model or optimizer '
        'settings changed since they were written, restore them or use a new MODEL_DIR; if the '
        'checkpoints are damaged, move them out of the stage directory to start the stage '
        'from scratch.')
  for step_, err in failures:
    moved = ckpts.set_aside(step_, err)
    progress.log(f'WARNING: set aside the unreadable checkpoint {ckpts.path(step_)} as {moved} '
                 f'(not deleted; inspect or remove it); resuming from step {latest} instead.')

  if restored is None:
    params = _prepare_starting_params(run, stage, previous, progress.log)
    layout = sharding.build_stage_layout(cfg, stage, mesh, rules, params,
                                         run.loss_normalizing_factor)
    trainable, frozen, _ = layout.to_step(*sharding.place_params(layout.t5x, params, stage))
    del params
    state = sharding.init_state_on_mesh(layout.step, trainable)
    data_state = {'batches_consumed': 0}
    progress.log(f'fresh start: {tree_util.count_params(trainable):,} trainable / '
                 f'{tree_util.count_params(frozen):,} frozen parameters')
  else:
    restored_params, opt_state, saved = restored
    trainable, frozen, opt_state = layout.to_step(*split_params(restored_params, stage), opt_state)
    del restored, restored_params
    state = TrainState(step=jax.device_put(np.int32(latest), partitioning.replicated(mesh)),
                       trainable=trainable, opt_state=opt_state)
    data_state = saved.get('data', {'batches_consumed': latest})
    progress.log(f'resuming from {ckpts.path(latest)} (step {latest})')

  start = int(jax.device_get(state.step))
  # A stage that trains only the format module on top of the run's base saves just the module
  # and a fingerprinted reference to the base (docs/RELIABILITY.md); other stages save all.
  base_ref = None
  if stage.start_from != 'previous' and _trains_only_the_module(state.trainable, frozen):
    base_ref = loading.base_reference(run.initial_checkpoint_path, cfg, run.seed)
  shard_index, num_shards = partitioning.host_data_shard(mesh)   # the rows this host feeds
  it = data.make_batch_iterator(run.train_task(stage), run.task_feature_lengths, 'train',
                                run.batch_size, seed=run.seed, shuffle=True, repeat=True,
                                start_batch=data_state['batches_consumed'],
                                shard_index=shard_index, num_shards=num_shards,
                                prompt_tasks=cfg.prompt_tasks)
  # Every check passed and the state is on the mesh: only now is anything written.
  run.record_model_dir()
  progress.open_tensorboard(paths.join(stage_dir, 'tb'))
  step_fn, param_norm_fn = layout.step.step_fn, layout.step.param_norm_fn
  if layout.scanned:
    progress.log(f'scanned layers (remat {cfg.remat_policy}); checkpoints keep the t5x layout')
  cfg = cfg.replace(scan_layers=False)     # what validation and decoding see: the t5x tree
  eval_fn = jax.jit(make_eval_step(cfg, stage))
  rng = jax.random.PRNGKey(run.seed + 1000 * (1 + run.stage_index(stage.name)))
  lengths = run.task_feature_lengths
  trained_task = run.validation_task_of(stage)
  probe_label_set = probes.probe_labels(trained_task, run.format_labels)
  probes.check_probes(run.format_probe_tasks, probe_label_set, trained_task)
  progress.tokens_per_step = run.batch_size * (lengths['inputs'] + lengths['targets'] + (
      cfg.prompt_length if stage.with_prompt else 0))
  progress._last_step, progress._last_time = start, time.perf_counter()
  last_metrics: dict = {}
  method = methods.method_label(run.stages, run.stage_index(stage.name), cfg,
                                run.mixture_or_task_name)

  def checkpoint(done: int, validate_too: bool = True) -> None:
    trainable, t5x_frozen, opt_state = layout.to_t5x(state.trainable, frozen, state.opt_state)
    full = merge_params(trainable, t5x_frozen)
    ckpts.save(done, trainable if base_ref else full, opt_state, cfg,
               {'data': it.state(), 'stage': stage.name, 'train_metrics': last_metrics,
                'method': method},
               base=base_ref)
    if validate_too:
      val = validate(run, stage, eval_fn, full, mesh)
      if stage.keep_metric.startswith('validation/decode_'):
        # The same decoding + post-processing + metric code as `promot eval`.
        val.update(eval_task.validation_metrics(
            cfg, full, trained_task, run.validation_split,
            task_feature_lengths=run.task_feature_lengths, batch_size=run.batch_size,
            max_examples=run.eval_batches * run.batch_size if run.eval_batches else None,
            with_prompt=stage.with_prompt, decoding_method=run.keep_decode, mesh=mesh))
      if run.format_probe_tasks:
        val.update(probes.format_probe_metrics(
            cfg, full, run.format_probe_tasks, probe_label_set,
            task_feature_lengths=run.task_feature_lengths, batch_size=run.batch_size,
            max_examples=run.format_probe_examples, mesh=mesh))
      ckpts.update_metrics(done, val)
      progress.scalars(done, val)
      progress.log('checkpoint ' + ckpts.path(done) + '  ' +
                   '  '.join(f'{k.removeprefix("validation/")} {v:.4f}' for k, v in val.items()))

  skipped = 0

  def check_finite(done: int, metrics: dict) -> None:
    """Stop the stage (or count a skipped batch) when step `done` was non-finite; the step
    itself left the state untouched (train/step.py)."""
    nonlocal skipped
    if bool(metrics['finite']):
      return
    if run.nonfinite_policy != 'skip':
      raise TrainingError(
          f'Stage {stage.name}: non-finite loss or gradient at step {done} (loss '
          f'{float(metrics["loss"])}). Nothing was updated by that step; the last good '
          f'checkpoint is {ckpts.path(ckpts.latest()) if ckpts.latest() else "(none yet)"}. '
          "Lower the learning rate, check the data, or set NONFINITE_POLICY = 'skip'.")
    skipped += 1
    progress.log(f'step {done}: non-finite loss or gradient, batch skipped ({skipped} so far)')

  if start < stage.train_steps and stop.should_stop(start):  # signalled during the set-up
    raise _stopped_before(stage, start, stop.signal_name)
  # The host never waits on the step it has just dispatched: it reads each step's `finite`
  # flag one step late (after dispatching the next) and puts the next batch on the devices
  # while the step runs. A non-finite step is still never applied (train/step.py), and it is
  # checked before anything after it is logged or saved.
  pending = None   # (step, metrics) dispatched last and not yet checked
  batch = partitioning.global_batch_from_host(next(it), mesh) if start < stage.train_steps \
      else None
  for step in range(start, stage.train_steps):
    state, metrics = step_fn(state, frozen, batch, rng)
    done = step + 1
    if pending:
      check_finite(*pending)
    pending = (done, metrics)
    log_now = done % run.log_every == 0 or done == stage.train_steps or \
        done % stage.checkpoint_period == 0
    # Every host asks at every step (a collective), so all stop after the same step.
    stopping = done < stage.train_steps and stop.should_stop(done)
    save_now = done % stage.checkpoint_period == 0 or done == stage.train_steps
    if log_now or stopping:   # (every save step is a log step)
      check_finite(*pending)
      pending = None
    if log_now:
      last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != 'finite'}
      # the norm of the parameters after this step, taken only when it is logged
      last_metrics['param_norm'] = float(param_norm_fn(state.trainable))
      progress.step(done, dict(last_metrics, skipped_batches=skipped), stage.learning_rate)
    if save_now or stopping:
      checkpoint(done, validate_too=save_now)
    if stopping:
      progress.log(f'{stop.signal_name} received: stopped after step {done} with a checkpoint '
                   'at ' + ckpts.path(done))
      progress.close()
      raise Preempted(f'stage {stage.name} stopped at step {done}/{stage.train_steps} on '
                      f'{stop.signal_name}; run the same command again to resume.')
    if done < stage.train_steps:   # after a checkpoint, whose data state counts `done` batches
      batch = partitioning.global_batch_from_host(next(it), mesh)
  kept = ckpts.kept()
  ckpts.mark_done({'train_steps': stage.train_steps, 'kept': kept})
  progress.log(f'done; kept checkpoint {kept}')
  progress.close()
  return {'stage': stage.name, 'kept': kept, 'final_train_metrics': last_metrics}
