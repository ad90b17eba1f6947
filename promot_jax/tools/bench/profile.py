"""Where a train step's time goes, by timing its phases as separate jitted programs.

For a stage: the forward pass and loss alone; forward + backward (gradients of the trainable
subtree, as the step takes them); the optimizer update alone; and the output head alone
(the [tokens, embed] x [embed, vocab] logits matmul with the cross-entropy, forward and
forward + backward), which is the part that grows with mT5's 250k vocabulary. The pieces are
the train step's own (`train_step.forward`, `losses.cross_entropy_with_z_loss`, the stage's
optimizer); the full step itself is timed by the train section.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from promot_jax.model import losses, prompt
from promot_jax.model.transformer import Transformer
from promot_jax.tools.bench.common import BenchConfig, Timer, run_round_robin
from promot_jax.tools.bench.jax_bench import model_config, stage_for
from promot_jax.train import step as train_step
from promot_jax.train.optimizer import make_optimizer
from promot_jax.train.stages import merge_params, split_params


def _phase_timers(bc: BenchConfig, name: str, params: dict, batch: dict) -> list[Timer]:
  stage = stage_for(name)
  cfg = model_config(bc)
  if not stage.with_prompt:
    params = prompt.without_prompt(params)
  model = Transformer(cfg.replace(dropout_rate=stage.dropout_rate))
  trainable, frozen = jax.device_put(split_params(params, stage))
  batch = jax.device_put(batch)
  rng = train_step.dropout_key(jax.random.PRNGKey(0)) if stage.dropout_rate > 0 else None

  def loss(trainable, frozen, batch):
    logits = train_step.forward(model, stage, merge_params(trainable, frozen), batch, rng)
    return losses.cross_entropy_with_z_loss(logits, batch['decoder_target_tokens'],
                                            batch['decoder_loss_weights'],
                                            stage.label_smoothing, stage.z_loss)[0]

  forward = jax.jit(loss)
  backward = jax.jit(jax.value_and_grad(loss))
  optimizer = make_optimizer(stage, trainable)
  opt_state = optimizer.init(trainable)
  grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 1e-3), trainable)

  @jax.jit
  def update(grads, opt_state, trainable):
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return jax.tree_util.tree_map(jnp.add, trainable, updates), opt_state

  # The output head alone: decoder states [tokens, embed] -> logits -> loss.
  kernel = frozen.get('decoder', {}).get('logits_dense', {}).get('kernel')
  if kernel is None:
    kernel = trainable['decoder']['logits_dense']['kernel']
  hidden = jnp.asarray(np.random.default_rng(0).standard_normal(
      (bc.batch, bc.targets, cfg.emb_dim)), jnp.float32)

  def head(hidden, kernel):
    logits = jnp.einsum('bte,ev->btv', hidden, kernel)              # [batch, targets, vocab]
    return losses.cross_entropy_with_z_loss(logits, batch['decoder_target_tokens'],
                                            batch['decoder_loss_weights'],
                                            stage.label_smoothing, stage.z_loss)[0]

  head_fwd = jax.jit(head)
  # Stage 1 needs only d(hidden); stages that train the head also need d(kernel).
  head_args = (0,) if 'logits_dense' in frozen.get('decoder', {}) else (0, 1)
  head_bwd = jax.jit(jax.grad(head, argnums=head_args))
  block = jax.block_until_ready
  return [Timer(f'{name}/forward', lambda: block(forward(trainable, frozen, batch))),
          Timer(f'{name}/forward+backward', lambda: block(backward(trainable, frozen, batch))),
          Timer(f'{name}/optimizer', lambda: block(update(grads, opt_state, trainable))),
          Timer(f'{name}/head_forward', lambda: block(head_fwd(hidden, kernel))),
          Timer(f'{name}/head_forward+backward', lambda: block(head_bwd(hidden, kernel)))]


def breakdown(bc: BenchConfig, params: dict, batch: dict, log: Callable[[str], None] = print,
              stage_names=('prompt_tuning', 'finetune')) -> dict:
  """Median seconds per phase, per stage (compile excluded: each phase runs once first)."""
  out = {}
  for name in stage_names:
    timers = _phase_timers(bc, name, params, batch)
    run_round_robin(timers, bc.repeats, log)
    out[name] = {t.name.split('/', 1)[1]: t.median_s for t in timers}
  return out
