"""The train step: loss on the merged parameters, gradients for the trainable subtree only.

`TrainState` holds only what changes (step, trainable parameters, their optimizer state);
the frozen parameters are a separate, read-only argument. In stage 1 (prompt tuning)
`trainable` is the [prompt_length, emb_dim] prompt alone, so jax.grad differentiates
only with respect to it: no weight gradient is ever materialised and the optimizer state
is the size of the prompt.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.extend.random
import jax.numpy as jnp
import optax

from promot_jax import tree_util
from promot_jax.model import layers, losses
from promot_jax.model.config import T5Config
from promot_jax.model.transformer import Transformer
from promot_jax.train import sparse
from promot_jax.train.stages import Stage, merge_params

Array = jax.Array
Batch = Mapping[str, Array]
# The batch features the step reads (seqio's EncDecFeatureConverter names, no packing).
FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
            'decoder_loss_weights')
PROMPT_IDS = 'prompt_ids'   # [batch]: each row's task index when the model has per-task prompts


def batch_features(cfg: T5Config) -> tuple[str, ...]:
  """The features a step of this model reads (plus each row's prompt id for per-task prompts)."""
  return FEATURES + ((PROMPT_IDS,) if cfg.prompt_tasks else ())


@flax.struct.dataclass
class TrainState:
  step: Array
  trainable: Any
  opt_state: Any


def init_train_state(trainable: Any, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    opt_state=optimizer.init(trainable))


def forward(model: Transformer, stage: Stage, params: Any, batch: Batch,
             dropout_rng: Optional[Array], extra_variables: Optional[dict] = None) -> Array:
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
  return model.apply({'params': params, **(extra_variables or {})}, batch['encoder_input_tokens'],
                     batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                     with_prompt=stage.with_prompt, enable_dropout=dropout_rng is not None,
                     prompt_ids=batch.get(PROMPT_IDS), rngs=rngs)


def _dropout_bits(key: Array, bit_width: int, shape) -> Array:
  """Bits from XLA's RngBitGenerator: its ThreeFry on CPU, the platform's default elsewhere.

  On CPU the default is Philox, which XLA:CPU runs ~7x slower than its ThreeFry (40 vs 6 ms
  for one [8, 6, 228, 228] attention mask here; ~0.3 s of a mT5-small stage-2 step, eight
  such masks in the encoder). Accelerators keep their default (a TPU's hardware generator).
  """
  algorithm = (jax.lax.RandomAlgorithm.RNG_THREE_FRY if layers.target_platform() == 'cpu'
               else jax.lax.RandomAlgorithm.RNG_DEFAULT)
  return jax.lax.rng_bit_generator(key, shape, dtype=jnp.dtype(f'uint{bit_width}'),
                                   algorithm=algorithm)[1]


# jax's 'rbg' keys (seeded, split and folded as those are) with the bits above.
_RBG = jax.extend.random.rbg_prng_impl
DROPOUT_PRNG = jax.extend.random.define_prng_impl(
    key_shape=_RBG.key_shape, seed=_RBG.seed, split=_RBG.split, random_bits=_dropout_bits,
    fold_in=_RBG.fold_in, name='promot_dropout', tag='pdrop')


def dropout_key(rng: Array) -> Array:
  """A key for dropout masks from XLA's RngBitGenerator, derived from `rng`.

  Dropout draws a random number per activation. With jax's default threefry keys XLA:CPU
  computes the hash in every fusion that consumes the mask, forward and backward, which cost
  0.6 s of a 5 s mT5-small fine-tuning step (README, Performance); these keys generate the
  bits once with XLA's own generator (`_dropout_bits`; t5x's `use_hardware_rng` does the same
  on TPU). The stream is still a pure function of the run's seed and the step, so resumed
  runs repeat it exactly. Parameter initialisation and everything else keep threefry.
  """
  data = jax.random.bits(rng, (4,), jnp.uint32)
  return jax.random.wrap_key_data(data, impl=DROPOUT_PRNG)


def global_norm(tree: Any) -> Array:
  """optax.global_norm, with each leaf's sum of squares written as a dot product.

  On XLA:CPU `jnp.sum(jnp.square(g))` gets its square merged (CSE) with the optimizer's
  own g * g, which then is materialised at full size for both; a vdot stays a separate
  memory-bound pass.
  """
  return jnp.sqrt(sum(sparse.sum_of_squares(x) for x in jax.tree_util.tree_leaves(tree)))


def make_train_step(cfg: T5Config, stage: Stage, optimizer: optax.GradientTransformation,
                    loss_normalizing_factor: Optional[float] = None) -> Callable:
  """train_step(state, frozen, batch, rng) -> (state, metrics); jit it with shardings."""
  model = Transformer(cfg.replace(dropout_rate=stage.dropout_rate))
  use_dropout = stage.dropout_rate > 0

  def train_step(state: TrainState, frozen: Any, batch: Batch, rng: Array):
    dropout_rng = dropout_key(jax.random.fold_in(rng, state.step)) if use_dropout else None

    def loss_fn(trainable, extra_variables=None):
      logits = forward(model, stage, merge_params(trainable, frozen), batch, dropout_rng,
                       extra_variables)
      return losses.cross_entropy_with_z_loss(
          logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'],
          stage.label_smoothing, stage.z_loss, loss_normalizing_factor)

    if sparse.plan(cfg, stage, state.trainable, batch):
      # The input embedding's gradient as the batch's rows (train/sparse.py).
      table = tree_util.flatten(state.trainable)[sparse.EMBEDDING]
      ids, rows = sparse.gather(table, batch)
      (loss, metrics), (grads, row_grads) = jax.value_and_grad(
          lambda t, r: loss_fn(t, sparse.gathered_variables(ids, r)), argnums=(0, 1),
          has_aux=True)(sparse.without_embedding(state.trainable), rows)
      grads = sparse.sparse_grads(grads, ids, row_grads, table.shape)
    else:
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # A non-finite loss or gradient leaves parameters and optimizer state as they were, so
    # the trainer can stop (or skip the batch) with nothing poisoned. The guard is folded
    # into the update (p + where(finite, u, 0) is one fused pass with the add) rather than a
    # select between old and new parameters, which costs a full extra read-and-write pass;
    # the optimizer state is small (factored) and is selected whole.
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    updates = sparse.tree_map(lambda u: sparse.guard(u, finite), updates)
    trainable = sparse.apply_updates(state.trainable, updates)
    opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                       new_opt_state, state.opt_state)
    # The parameters' norm is not a step metric: it is a full pass over every trainable
    # parameter that only log steps need (the trainer takes it then: ShardedStep.param_norm_fn).
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite)
    return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step


def make_eval_step(cfg: T5Config, stage: Stage,
                   loss_normalizing_factor: Optional[float] = None) -> Callable:
  """eval_step(params, batch) -> metrics summed over the batch (teacher-forced, no dropout)."""
  model = Transformer(cfg.replace(dropout_rate=0.0))

  def eval_step(params: Any, batch: Batch):
    logits = forward(model, stage, params, batch, None)
    targets, weights = batch['decoder_target_tokens'], batch['decoder_loss_weights']
    _, m = losses.cross_entropy_with_z_loss(logits, targets, weights, 0.0, 0.0, None)
    valid = weights > 0
    token_ok = (jnp.argmax(logits, -1) == targets) & valid
    real = jnp.any(valid, axis=-1)                       # rows that are not batch padding
    seq_ok = jnp.all(token_ok | ~valid, axis=-1) & real
    # sums, so the caller can average over any number of batches exactly
    return {'loss_sum': m['cross_entropy'] * m['num_tokens'], 'num_tokens': m['num_tokens'],
            'correct_tokens': jnp.sum(token_ok.astype(jnp.float32)),
            'correct_sequences': jnp.sum(seq_ok.astype(jnp.float32)),
            'num_sequences': jnp.sum(real.astype(jnp.float32))}

  return eval_step
