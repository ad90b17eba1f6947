"""The optimizer of a stage, built only over its trainable subtree.

Adafactor with factored second moments and t5x-like settings (decay 0.8, update clipping
1.0, constant learning rate): optax's arithmetic and state, reductions written for speed
(`train/adafactor.py`). In the joint stage the prompt and the weights train together;
the prompt then gets Adafactor without parameter scaling, the weights with it.

A stacked (scanned-layer) tree trains like the t5x tree: Adafactor treats the leading
[num_layers] axis of `encoder/layers/...` and `decoder/layers/...` leaves as that many
separate parameters (per-layer factored moments, parameter scale and update clipping).
Its state is the t5x tree's state with those statistics stacked; convert it with
`model.stacking.unstack_opt_state` before saving a t5x-layout checkpoint and with
`stack_opt_state` after restoring one. Adam and SGD are elementwise and need nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import optax

from promot_jax import tree_util
from promot_jax.model import formats, stacking
from promot_jax.train import adafactor
from promot_jax.train.stages import Stage


def _base(stage: Stage, scale_by_param: bool,
          batched: Optional[Callable[[str], bool]]) -> optax.GradientTransformation:
  if stage.optimizer == 'adafactor':
    return adafactor.adafactor(learning_rate=stage.learning_rate, decay_rate=stage.decay_rate,
                               multiply_by_parameter_scale=scale_by_param,
                               clipping_threshold=1.0, min_dim_size_to_factor=128,
                               batched=batched)
  if stage.optimizer == 'adam':
    return optax.adam(stage.learning_rate)
  return optax.sgd(stage.learning_rate)


def make_optimizer(stage: Stage, trainable: Mapping[str, Any]) -> optax.GradientTransformation:
  """The stage's optimizer for the `trainable` tree (with or without a format module).

  `trainable` may be the t5x tree or the stacked one (arrays or ShapeDtypeStructs); with stacked
  leaves each layer gets the update it would get in the t5x tree.
  """
  paths = tree_util.flatten(trainable)
  batched = (stacking.is_stacked_path if any(stacking.is_stacked_path(p) for p in paths)
             else None)
  has_module = any(formats.is_module_path(p) for p in paths)
  has_weights = any(not formats.is_module_path(p) for p in paths)
  if has_module and has_weights and stage.multiply_by_parameter_scale:
    # The format module (label 'prompt', its first kind) moves at the raw rate, as in stage 1.
    labels = tree_util.map_with_path(
        lambda path, _: 'prompt' if formats.is_module_path(path) else 'weights', trainable)
    return optax.multi_transform({'prompt': _base(stage, False, batched),
                                  'weights': _base(stage, True, batched)}, labels)
  return _base(stage, stage.multiply_by_parameter_scale, batched)
