"""Runs one stage: starting parameters, sharded state, the jitted step loop, checkpoints.

A stage starts from the run's pretrained checkpoint (prompt from its initialiser) or from
the previous stage's kept checkpoint, or resumes from its own latest checkpoint in
MODEL_DIR/<stage>/ with the data iterator at the same position. Everything the step
touches is laid out by the logical axis rules on the (data, model) mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from promot_jax import data, loading, model, partitioning, probes, prompt, tree_util
from promot_jax.checkpoints import orbax_io
from promot_jax.checkpoints.manager import CorruptCheckpointError, StageCheckpoints
from promot_jax.optim import make_optimizer
from promot_jax.preemption import Preempted, StopRequest
from promot_jax.progress import Progress
from promot_jax.run_config import RunConfig
from promot_jax.stages import Stage, merge_params, split_params
from promot_jax.train_step import FEATURES, TrainState, make_eval_step, make_train_step


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def _opt_state_shardings(abstract_opt_state: Any, abstract_trainable: Any, trainable_specs: Any,
                         mesh, rules) -> Any:
  """Shard each optimizer-state leaf like the parameter it belongs to.

  Optimizer states mirror the parameter tree under their own containers, so a leaf's dict
  keys name its parameter. Adafactor's factored moments drop one dimension of it (v_row:
  the last, v_col: the second to last) and their specs drop the same axis. Anything else
  (counts, placeholders) is replicated.
  """
  flat_specs = tree_util.flatten(trainable_specs)
  shapes = {p: tuple(v.shape) for p, v in tree_util.flatten(abstract_trainable).items()}

  def sharding_for(path, leaf):
    name = '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    fields = {k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)}
    if name not in flat_specs or not leaf.shape:
      return partitioning.replicated(mesh)
    spec, shape = tuple(flat_specs[name]), shapes[name]
    # Adafactor (optax) factors a matrix along its two largest axes: v_row drops the largest
    # (argsort's last), v_col the second largest; each keeps the other axes' layout.
    if fields & {'v_row', 'v_col'} and len(shape) >= 2:
      second, largest = np.argsort(shape)[-2:]
      drop = largest if 'v_row' in fields else second
      if leaf.shape != tuple(np.delete(shape, drop)):
        return partitioning.replicated(mesh)
      logical = tuple(a for i, a in enumerate(spec) if i != drop)
    elif leaf.shape == shape:
      logical = spec
    else:
      return partitioning.replicated(mesh)
    return partitioning.logical_to_sharding(jax.sharding.PartitionSpec(*logical), mesh, rules)

  return jax.tree_util.tree_map_with_path(sharding_for, abstract_opt_state)


@dataclasses.dataclass
class ShardedStep:
  """Everything the jitted step needs laid out on the mesh (also used by planning and tests)."""
  optimizer: optax.GradientTransformation
  trainable_sharding: Any
  frozen_sharding: Any
  state_sharding: TrainState
  abstract_opt_state: Any
  step_fn: Callable   # jitted: (state, frozen, batch, rng) -> (state, metrics); state donated


def build_sharded_step(cfg, stage: Stage, mesh, rules, params: Any,
                       loss_normalizing_factor: Optional[float] = None) -> ShardedStep:
  """Split `params` (arrays or ShapeDtypeStructs) for `stage` and jit its step with shardings."""
  specs = tree_util.flatten(model.logical_axes(cfg))
  specs = tree_util.unflatten({p: specs[p] for p in tree_util.flatten(params)})
  trainable, _ = split_params(params, stage)
  t_specs, f_specs = split_params(specs, stage)
  t_shard = partitioning.logical_to_sharding(t_specs, mesh, rules)
  f_shard = partitioning.logical_to_sharding(f_specs, mesh, rules)
  optimizer = make_optimizer(stage, trainable)
  abstract_trainable = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                              trainable)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
  opt_shard = _opt_state_shardings(abstract_opt, abstract_trainable, t_specs, mesh, rules)
  state_shard = TrainState(step=partitioning.replicated(mesh), trainable=t_shard,
                           opt_state=opt_shard)
  batch_shard = {k: partitioning.data_sharding(mesh) for k in FEATURES}
  step_fn = jax.jit(make_train_step(cfg, stage, optimizer, loss_normalizing_factor),
                    in_shardings=(state_shard, f_shard, batch_shard, partitioning.replicated(mesh)),
                    out_shardings=(state_shard, partitioning.replicated(mesh)),
                    donate_argnums=(0,))
  return ShardedStep(optimizer, t_shard, f_shard, state_shard, abstract_opt, step_fn)


def init_state_on_mesh(sharded: ShardedStep, trainable: Any) -> TrainState:
  """A fresh TrainState (step 0, new optimizer state) laid out by `sharded`'s shardings."""
  optimizer = sharded.optimizer
  return jax.jit(lambda t: TrainState(jnp.zeros((), jnp.int32), t, optimizer.init(t)),
                 out_shardings=sharded.state_sharding)(trainable)


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
      kept = StageCheckpoints(os.path.join(run.model_dir, previous.name)).kept()
      if not kept or not os.path.isdir(kept['path']):
        raise ValueError(
            f'Stage {stage.name} starts from the kept checkpoint of stage {previous.name}, but '
            f'{os.path.join(run.model_dir, previous.name)} has none. Run stage {previous.name} '
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
        cfg.replace(prompt_length=0), jax.random.PRNGKey(run.seed)))
  if prompt.has_prompt(params):
    _check_prompt_length(prompt.get_prompt(params).shape[0], cfg.prompt_length, 'the checkpoint')
  needs_prompt = stage.with_prompt or stage.is_trainable('prompt/prompt')
  if needs_prompt and cfg.prompt_length <= 0:
    raise ValueError(f'Stage {stage.name} uses the prompt but PROMPT_LENGTH is 0; set '
                     '--gin.PROMPT_LENGTH=100 (the paper uses 100).')
  if needs_prompt and not prompt.has_prompt(params):
    log(f'initialising a [{cfg.prompt_length}, {cfg.emb_dim}] prompt ({run.prompt_init})')
    params = prompt.initialize_prompt(
        params, cfg.prompt_length, run.prompt_init, rng=jax.random.PRNGKey(run.seed + 1),
        path=run.prompt_init_file, class_label_ids=run.class_label_ids())
  return params


def _check_prompt_length(found: int, expected: int, source: str) -> None:
  if found != expected and found > 0:
    raise ValueError(f'{source} holds a prompt of length {found} but PROMPT_LENGTH is {expected}; '
                     f'set --gin.PROMPT_LENGTH={found} (a prompt cannot change length between '
                     'stages).')


def validate(run: RunConfig, stage: Stage, eval_fn: Callable, params: Any, mesh) -> dict:
  """Teacher-forced validation metrics over the validation split (or EVAL_BATCHES of it)."""
  it = data.make_batch_iterator(
      run.validation_task or run.mixture_or_task_name, run.task_feature_lengths,
      run.validation_split, run.batch_size, seed=run.seed, shuffle=False, repeat=False,
      drop_remainder=False)
  totals: dict[str, float] = {}
  for i, batch in enumerate(it):
    if run.eval_batches is not None and i >= run.eval_batches:
      break
    batch = data.pad_batch(batch, run.batch_size // jax.process_count())
    out = jax.device_get(eval_fn(params, partitioning.global_batch_from_host(batch, mesh)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  if not totals or totals['num_tokens'] == 0:
    raise ValueError(f'The validation split {run.validation_split!r} of '
                     f'{run.validation_task or run.mixture_or_task_name} gave no examples.')
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
  stage_dir = os.path.join(run.model_dir, stage.name)
  ckpts = StageCheckpoints(stage_dir, stage.keep_latest, stage.keep_metric, stage.keep_mode)
  progress = Progress(stage.name, stage.train_steps, 0, 0)
  if ckpts.is_done(stage.train_steps):
    progress.log(f'already finished; kept checkpoint: {ckpts.kept()}')
    return {'stage': stage.name, 'kept': ckpts.kept(), 'skipped': True}
  if jax.process_count() == 1 and stop.signal_name is not None:  # signalled between stages
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
      params = ckpts.param_shapes(candidate)  # shapes only; restored below
      sharded = build_sharded_step(cfg, stage, mesh, rules, params, run.loss_normalizing_factor)
      t_shard, f_shard = sharded.trainable_sharding, sharded.frozen_sharding
      trainable, frozen = split_params(params, stage)
      with_sharding = lambda tree, sh: jax.tree_util.tree_map(  # noqa: E731
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
      abstract_all = merge_params(with_sharding(trainable, t_shard),
                                  with_sharding(frozen, f_shard))
      restored = ckpts.restore(candidate, abstract_all, with_sharding(
          sharded.abstract_opt_state, sharded.state_sharding.opt_state))
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
    sharded = build_sharded_step(cfg, stage, mesh, rules, params, run.loss_normalizing_factor)
    t_shard, f_shard = sharded.trainable_sharding, sharded.frozen_sharding
    trainable, frozen = split_params(params, stage)
    frozen = jax.device_put(frozen, f_shard)
    state = init_state_on_mesh(sharded, jax.device_put(trainable, t_shard))
    data_state = {'batches_consumed': 0}
    progress.log(f'fresh start: {tree_util.count_params(trainable):,} trainable / '
                 f'{tree_util.count_params(frozen):,} frozen parameters')
  else:
    restored_params, opt_state, saved = restored
    trainable, frozen = split_params(restored_params, stage)
    state = TrainState(step=jax.device_put(np.int32(latest), partitioning.replicated(mesh)),
                       trainable=trainable, opt_state=opt_state)
    data_state = saved.get('data', {'batches_consumed': latest})
    progress.log(f'resuming from {ckpts.path(latest)} (step {latest})')

  start = int(jax.device_get(state.step))
  progress.open_tensorboard(os.path.join(stage_dir, 'tb'))
  it = data.make_batch_iterator(run.mixture_or_task_name, run.task_feature_lengths, 'train',
                                run.batch_size, seed=run.seed, shuffle=True, repeat=True,
                                start_batch=data_state['batches_consumed'])
  step_fn = sharded.step_fn
  eval_fn = jax.jit(make_eval_step(cfg, stage))
  rng = jax.random.PRNGKey(run.seed + 1000 * (1 + run.stage_index(stage.name)))
  lengths = run.task_feature_lengths
  trained_task = run.validation_task or run.mixture_or_task_name
  probe_label_set = probes.probe_labels(trained_task, run.format_labels)
  probes.check_probes(run.format_probe_tasks, probe_label_set, trained_task)
  progress.tokens_per_step = run.batch_size * (lengths['inputs'] + lengths['targets'] + (
      cfg.prompt_length if stage.with_prompt else 0))
  progress._last_step, progress._last_time = start, time.perf_counter()
  last_metrics: dict = {}

  def checkpoint(done: int, validate_too: bool = True) -> None:
    full = merge_params(state.trainable, frozen)
    ckpts.save(done, full, state.opt_state, cfg,
               {'data': it.state(), 'stage': stage.name, 'train_metrics': last_metrics})
    if validate_too:
      val = validate(run, stage, eval_fn, full, mesh)
      if stage.keep_metric.startswith('validation/decode_'):
        # The same decoding + post-processing + metric code as `promot eval`.
        from promot_jax import evaluation
        val.update(evaluation.validation_metrics(
            cfg, full, run.validation_task or run.mixture_or_task_name, run.validation_split,
            task_feature_lengths=run.task_feature_lengths, batch_size=run.batch_size,
            max_examples=run.eval_batches * run.batch_size if run.eval_batches else None,
            with_prompt=stage.with_prompt, decoding_method='greedy'))
      if run.format_probe_tasks:
        val.update(probes.format_probe_metrics(
            cfg, full, run.format_probe_tasks, probe_label_set,
            task_feature_lengths=run.task_feature_lengths, batch_size=run.batch_size,
            max_examples=run.format_probe_examples))
      ckpts.update_metrics(done, val)
      progress.scalars(done, val)
      progress.log('checkpoint ' + ckpts.path(done) + '  ' +
                   '  '.join(f'{k.removeprefix("validation/")} {v:.4f}' for k, v in val.items()))

  skipped = 0
  if start < stage.train_steps and stop.should_stop(start):  # signalled during the set-up
    raise _stopped_before(stage, start, stop.signal_name)
  for step in range(start, stage.train_steps):
    batch = partitioning.global_batch_from_host(next(it), mesh)
    state, metrics = step_fn(state, frozen, batch, rng)
    done = step + 1
    if not bool(metrics['finite']):  # the step left the state untouched (train_step.py)
      if run.nonfinite_policy != 'skip':
        raise TrainingError(
            f'Stage {stage.name}: non-finite loss or gradient at step {done} (loss '
            f'{float(metrics["loss"])}). Nothing was updated by that step; the last good '
            f'checkpoint is {ckpts.path(ckpts.latest()) if ckpts.latest() else "(none yet)"}. '
            "Lower the learning rate, check the data, or set NONFINITE_POLICY = 'skip'.")
      skipped += 1
      progress.log(f'step {done}: non-finite loss or gradient, batch skipped ({skipped} so far)')
    if done % run.log_every == 0 or done == stage.train_steps or \
        done % stage.checkpoint_period == 0:
      last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != 'finite'}
      progress.step(done, dict(last_metrics, skipped_batches=skipped), stage.learning_rate)
    if done % stage.checkpoint_period == 0 or done == stage.train_steps:
      checkpoint(done)
    elif stop.should_stop(done):
      checkpoint(done, validate_too=False)
    if stop.signal_name is not None and done < stage.train_steps:
      progress.log(f'{stop.signal_name} received: stopped after step {done} with a checkpoint '
                   'at ' + ckpts.path(done))
      raise Preempted(f'stage {stage.name} stopped at step {done}/{stage.train_steps} on '
                      f'{stop.signal_name}; run the same command again to resume.')
  kept = ckpts.kept()
  ckpts.mark_done({'train_steps': stage.train_steps, 'kept': kept})
  progress.log(f'done; kept checkpoint {kept}')
  progress.close()
  return {'stage': stage.name, 'kept': kept, 'final_train_metrics': last_metrics}
