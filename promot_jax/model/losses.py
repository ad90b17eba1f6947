"""Cross-entropy with label smoothing and z-loss, normalised as t5x does.

The per-token loss has a hand-written gradient (`jax.custom_vjp`). Automatic differentiation
of the textbook formula materialises a [tokens, vocab] zero buffer for the gather's
transpose and several more full-vocabulary passes; with mT5's 250k vocabulary those passes
are a visible share of a CPU step. The custom rule needs the logits and log Z only, and its
backward is one fused elementwise pass: softmax minus the smoothed one-hot, plus the z-loss
term.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _smoothing(vocab: int, label_smoothing: float) -> tuple[float, float, float]:
  """(confidence, low, normalizing constant) of t5x's label smoothing."""
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  normalizing_constant = -(confidence * jnp.log(confidence)
                           + (vocab - 1) * low * jnp.log(low + 1e-20))
  return confidence, low, normalizing_constant


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_losses(logits: Array, targets: Array, label_smoothing: float, z_loss: float):
  """Per-token (cross-entropy, z-loss, correct) of float32 logits [..., vocab]."""
  out, _ = _token_losses_fwd(logits, targets, label_smoothing, z_loss)
  return out


def _token_losses_fwd(logits, targets, label_smoothing, z_loss):
  confidence, low, nc = _smoothing(logits.shape[-1], label_smoothing)
  max_logit = jnp.max(logits, axis=-1)
  log_z = max_logit + jnp.log(jnp.sum(jnp.exp(logits - max_logit[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  # -(confidence * log p_t + low * sum_{v != t} log p_v) - constant; confidence + low*(V-1) = 1
  token_ce = log_z - confidence * target_logit - nc
  if label_smoothing > 0:
    token_ce = token_ce - low * (jnp.sum(logits, axis=-1) - target_logit)
  token_z = z_loss * jnp.square(log_z)
  # argmax == target without a separate argmax pass (ties count as correct)
  correct = (target_logit >= max_logit).astype(jnp.float32)
  return (token_ce, token_z, correct), (logits, targets, log_z)


def _token_losses_bwd(label_smoothing, z_loss, residuals, cotangents):
  logits, targets, log_z = residuals
  g_ce, g_z, _ = cotangents                              # `correct` has no gradient
  confidence, low, _ = _smoothing(logits.shape[-1], label_smoothing)
  probs = jnp.exp(logits - log_z[..., None])
  one_hot = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1) == \
      targets[..., None]
  soft_targets = jnp.where(one_hot, confidence, low)
  d_logits = (g_ce[..., None] * (probs - soft_targets)
              + (g_z * 2.0 * z_loss * log_z)[..., None] * probs)
  return d_logits, None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def cross_entropy_with_z_loss(logits: Array, targets: Array, weights: Array,
                              label_smoothing: float = 0.0, z_loss: float = 1e-4,
                              loss_normalizing_factor: Optional[float] = None,
                              ) -> tuple[Array, dict[str, Array]]:
  """Token cross-entropy of logits [batch, length, vocab] against int targets [batch, length].

  Label smoothing spreads `label_smoothing` of the mass over the other vocabulary entries,
  with the constant entropy term subtracted so a perfect model scores 0 (t5x's convention).
  z-loss adds z_loss * log(Z)^2 per token to keep the softmax normaliser near 1.
  The sum over weighted tokens is divided by `loss_normalizing_factor` when given (e.g.
  1024 * 229 for the public mT5 checkpoints), else by the number of weighted tokens.
  """
  token_loss, token_z, correct = _token_losses(logits.astype(jnp.float32),
                                               jnp.asarray(targets, jnp.int32),
                                               float(label_smoothing), float(z_loss))
  weights = weights.astype(jnp.float32)
  num_tokens = jnp.sum(weights)
  denom = loss_normalizing_factor if loss_normalizing_factor else jnp.maximum(num_tokens, 1.0)
  ce = jnp.sum(token_loss * weights) / denom
  zl = jnp.sum(token_z * weights) / denom
  correct = correct * weights
  metrics = {
      'cross_entropy': ce,
      'z_loss': zl,
      'num_tokens': num_tokens,
      'token_accuracy': jnp.sum(correct) / jnp.maximum(num_tokens, 1.0),
      # a sequence counts as right only if every weighted target token is
      'sequence_accuracy': jnp.mean(jnp.all((correct > 0) | (weights == 0), axis=-1)),
  }
  return ce + zl, metrics
