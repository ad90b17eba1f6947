"""Laying a stage's step out on the mesh: one builder for the trainer, the plan and the bench.

`build_sharded_step` splits the parameters into the stage's trainable and frozen parts,
derives every sharding from the logical axis rules (parameters, Adafactor's factored
moments, batches) and jits the train step with them; `place_params` and
`init_state_on_mesh` put a stage's starting parameters and fresh optimizer state there.

`StageLayout` is what the trainer holds: the step it runs (over the stacked tree when
`T5Config.scan_layers`) and the t5x layout that checkpoints, validation and evaluation see,
with jitted moves between the two on the mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from promot_jax import mesh as partitioning, tree_util
from promot_jax.model import stacking, transformer
from promot_jax.train.optimizer import make_optimizer
from promot_jax.train.stages import Stage, merge_params, split_params
from promot_jax.train.step import TrainState, batch_features, global_norm, make_train_step


def opt_state_shardings(abstract_opt_state: Any, abstract_trainable: Any, trainable_specs: Any,
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
  param_norm_fn: Callable   # jitted: trainable -> the global L2 norm (replicated scalar)


def build_sharded_step(cfg, stage: Stage, mesh, rules, params: Any,
                       loss_normalizing_factor: Optional[float] = None) -> ShardedStep:
  """Split `params` (arrays or ShapeDtypeStructs) for `stage` and jit its step with shardings.

  The one step builder: the trainer, `promot plan` and `promot bench` all call it. `params`
  may be the t5x tree or the stacked (scanned-layer) tree; its logical axes follow it, and the
  optimizer updates a stacked leaf layer by layer (train/optimizer.py), as unscanned.
  """
  specs = tree_util.flatten(transformer.logical_axes(cfg, stacked=stacking.is_stacked(params)))
  specs = tree_util.unflatten({p: specs[p] for p in tree_util.flatten(params)})
  trainable, _ = split_params(params, stage)
  t_specs, f_specs = split_params(specs, stage)
  t_shard = partitioning.logical_to_sharding(t_specs, mesh, rules)
  f_shard = partitioning.logical_to_sharding(f_specs, mesh, rules)
  partitioning.check_divisible(merge_params(*split_params(params, stage)),
                  merge_params(t_shard, f_shard), mesh)
  optimizer = make_optimizer(stage, trainable)
  abstract_trainable = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                              trainable)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
  opt_shard = opt_state_shardings(abstract_opt, abstract_trainable, t_specs, mesh, rules)
  state_shard = TrainState(step=partitioning.replicated(mesh), trainable=t_shard,
                           opt_state=opt_shard)
  batch_shard = {k: partitioning.data_sharding(mesh) for k in batch_features(cfg)}
  step_fn = jax.jit(make_train_step(cfg, stage, optimizer, loss_normalizing_factor),
                    in_shardings=(state_shard, f_shard, batch_shard, partitioning.replicated(mesh)),
                    out_shardings=(state_shard, partitioning.replicated(mesh)),
                    donate_argnums=(0,))
  param_norm_fn = jax.jit(global_norm, in_shardings=(t_shard,),
                          out_shardings=partitioning.replicated(mesh))
  return ShardedStep(optimizer, t_shard, f_shard, state_shard, abstract_opt, step_fn,
                     param_norm_fn)


def init_state_on_mesh(sharded: ShardedStep, trainable: Any) -> TrainState:
  """A fresh TrainState (step 0, new optimizer state) laid out by `sharded`'s shardings."""
  optimizer = sharded.optimizer
  return jax.jit(lambda t: TrainState(jnp.zeros((), jnp.int32), t, optimizer.init(t)),
                 out_shardings=sharded.state_sharding)(trainable)


def place_params(sharded: ShardedStep, params: Any, stage: Stage) -> tuple[Any, Any]:
  """(trainable, frozen) of host `params` put on the mesh with `sharded`'s shardings."""
  trainable, frozen = split_params(params, stage)
  return (jax.device_put(trainable, sharded.trainable_sharding),
          jax.device_put(frozen, sharded.frozen_sharding))


def place_frozen(sharded: ShardedStep, frozen: Any) -> Any:
  """The frozen parameters alone (e.g. a stage-1 checkpoint's base) put on the mesh."""
  return jax.device_put(frozen, sharded.frozen_sharding)


def abstract_on_mesh(sharded: ShardedStep, params: Any, stage: Stage) -> tuple[Any, Any]:
  """(all parameters, optimizer state) as ShapeDtypeStructs carrying their mesh shardings:
  the restore targets of a stage's checkpoint."""
  with_sharding = lambda tree, shardings: jax.tree_util.tree_map(  # noqa: E731
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
  trainable, frozen = split_params(params, stage)
  return (merge_params(with_sharding(trainable, sharded.trainable_sharding),
                       with_sharding(frozen, sharded.frozen_sharding)),
          with_sharding(sharded.abstract_opt_state, sharded.state_sharding.opt_state))



@dataclasses.dataclass
class StageLayout:
  """The layout the step trains and the t5x layout checkpoints keep, for one stage.

  Without `cfg.scan_layers` both are one ShardedStep and the moves return their inputs. With
  it, `step` trains the stacked tree and `t5x` gives the checkpoint layout's shardings and
  optimizer-state structure (its own step function is never compiled). `to_step`/`to_t5x`
  move parameters and optimizer state between them on the mesh (one jitted call each, the
  output laid out by the target's shardings), so a scanned run reads and writes the same
  checkpoints as an unrolled one. A move holds both layouts of what it moves for its duration.
  """
  cfg: Any
  step: ShardedStep
  t5x: ShardedStep

  @property
  def scanned(self) -> bool:
    return self.step is not self.t5x

  def to_step(self, trainable: Any, frozen: Any, opt_state: Any = None) -> tuple[Any, Any, Any]:
    """(trainable, frozen, opt_state) in the t5x layout -> the step's layout."""
    if not self.scanned:
      return trainable, frozen, opt_state
    return self._move(trainable, frozen, opt_state, stacking.stack_layers,
                      stacking.stack_opt_state, self.step)

  def to_t5x(self, trainable: Any, frozen: Any, opt_state: Any = None) -> tuple[Any, Any, Any]:
    """(trainable, frozen, opt_state) in the step's layout -> the t5x (checkpoint) layout."""
    if not self.scanned:
      return trainable, frozen, opt_state
    return self._move(trainable, frozen, opt_state, stacking.unstack_layers,
                      stacking.unstack_opt_state, self.t5x)

  def _move(self, trainable, frozen, opt_state, move_params, move_opt, target: ShardedStep):
    cfg = self.cfg
    params_fn = jax.jit(lambda t, f: (move_params(t, cfg), move_params(f, cfg)),
                        out_shardings=(target.trainable_sharding, target.frozen_sharding))
    trainable, frozen = params_fn(trainable, frozen)
    if opt_state is not None:
      opt_state = jax.jit(lambda o: move_opt(o, cfg),
                          out_shardings=target.state_sharding.opt_state)(opt_state)
    return trainable, frozen, opt_state


def build_stage_layout(cfg, stage: Stage, mesh, rules, params: Any,
                       loss_normalizing_factor: Optional[float] = None) -> StageLayout:
  """The StageLayout of `stage` for t5x-tree `params` (arrays or ShapeDtypeStructs)."""
  unrolled = cfg.replace(scan_layers=False)
  t5x = build_sharded_step(unrolled, stage, mesh, rules, params, loss_normalizing_factor)
  if not cfg.scan_layers:
    return StageLayout(cfg, t5x, t5x)
  stacked = stacking.stack_layers(
      jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), cfg)
  step = build_sharded_step(cfg, stage, mesh, rules, stacked, loss_normalizing_factor)
  return StageLayout(cfg, step, t5x)
