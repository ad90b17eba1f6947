"""Picking tokens from the output head's logits over a large vocabulary: top-k, and greedy
decoding's argmax without a float32 pass over the whole head (CPU).

Greedy decoding needs only the argmax of each row's logits h W. With few rows (a decoding
batch) the float32 product is bound by reading the head: mT5's [250112, 512] kernel is 512 MB,
read once per decoded position. Here an int8 copy of the head (a quarter of the bytes; XLA:CPU
multiplies int8 with int8 into int32 exactly) gives every logit to within a bound that is
computed, not guessed; only the few tokens whose interval can still reach the row's best
lower bound get their float32 logit from the float32 rows, and the argmax is taken over those:

  W_v ~ s_v q_v     q_v int8, s_v = max|W_v| / 127          (once per head, kept)
  h   ~ t hq        hq int8,  t = max|h| / 127               (per row, per step)
  a_v = t s_v (hq . q_v)                                     (exact integer product)
  |h . W_v - a_v| <= |h - t hq| |W_v| + t |hq| |W_v - s_v q_v|
  (Cauchy-Schwarz), plus float32 rounding of h . W_v in any order (gamma_E |h| |W_v|) and of
  a_v itself, all times a margin for the rounding of the bound's own arithmetic.

No token outside the candidate set can have the largest float32 logit, so the result is the
argmax of the float32 logits, lowest index first among equal ones, up to the summation order
of each float32 dot product (values within float32 rounding of each other may rank either
way, as between any two float32 implementations). Where more than `candidates` tokens of a
row stay in reach, or the hidden state is not finite, the step takes the full float32 product
instead (the same product decoding computes without this). tests/test_head_select.py checks it
against the plain argmax, near ties and the fallback included.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def top_k(x: Array, k: int) -> tuple[Array, Array]:
  """jax.lax.top_k over the last axis of x [rows, vocab], the same values and indices (equal
  values: lower index first), in two short passes when vocab splits into chunks: the k chunks
  with the largest maxima hold the k largest values, so only those k chunks are ranked.
  XLA:CPU's top_k over mT5's 250,112 logits of 32 rows takes 8-9 ms; this ~1 ms.
  """
  rows, vocab = x.shape
  chunk = next((c for c in (256, 128, 64) if vocab % c == 0 and vocab // c >= k), None)
  if chunk is None:
    return jax.lax.top_k(x, k)
  chunks = x.reshape(rows, vocab // chunk, chunk)
  _, best = jax.lax.top_k(jnp.max(chunks, axis=-1), k)
  best = jnp.sort(best, axis=-1)          # candidates in vocabulary order, so ties break as one
  candidates = jnp.take_along_axis(chunks, best[:, :, None], axis=1).reshape(rows, k * chunk)
  values, position = jax.lax.top_k(candidates, k)
  index = jnp.take_along_axis(best, position // chunk, axis=1) * chunk + position % chunk
  return values, index


CANDIDATES = 64
_U = 2.0 ** -24            # float32 unit roundoff
_MARGIN = 1.0 + 2.0 ** -10  # covers the rounding of the bound's own float32 arithmetic


class QuantizedHead(NamedTuple):
  """The output head [vocab, embed] (transposed, as decoding keeps it) and its int8 copy."""
  kernel_t: Array      # [vocab, embed] float32: candidates' exact rows, and the fallback
  q: Array             # [vocab, embed] int8
  scale: Array         # [vocab] float32 s_v
  norm: Array          # [vocab] |W_v|
  error_norm: Array    # [vocab] |W_v - s_v q_v|


def int8_parts(kernel_t: Array) -> tuple[Array, Array, Array, Array]:
  """QuantizedHead's fields after kernel_t: (q, scale, norm, error_norm) of a float32 head
  stored [vocab, embed], one scale per vocabulary row."""
  kernel_t = jnp.asarray(kernel_t, jnp.float32)
  peak = jnp.max(jnp.abs(kernel_t), axis=1)
  scale = jnp.where(peak > 0, peak / 127.0, 1.0)
  q = jnp.clip(jnp.round(kernel_t / scale[:, None]), -127, 127)
  error = kernel_t - q * scale[:, None]
  return (q.astype(jnp.int8), scale, jnp.linalg.norm(kernel_t, axis=1),
          jnp.linalg.norm(error, axis=1))


def quantize(kernel_t: Array) -> QuantizedHead:
  """The head stored [vocab, embed] with its int8 copy (int8_parts)."""
  kernel_t = jnp.asarray(kernel_t, jnp.float32)
  return QuantizedHead(kernel_t, *int8_parts(kernel_t))


def full_argmax(hidden: Array, kernel_t: Array) -> Array:
  """argmax of the float32 logits hidden [rows, embed] x kernel_t [vocab, embed]^T."""
  return jnp.argmax(jnp.einsum('be,ve->bv', hidden, kernel_t), axis=-1).astype(jnp.int32)


def logit_bounds(hidden: Array, head: QuantizedHead) -> tuple[Array, Array]:
  """(a, e) [rows, vocab]: every float32 logit h . W_v lies within a +- e."""
  embed = hidden.shape[-1]
  peak = jnp.max(jnp.abs(hidden), axis=1, keepdims=True)
  t = jnp.where(peak > 0, peak / 127.0, 1.0)
  hq = jnp.clip(jnp.round(hidden / t), -127, 127)
  product = jnp.einsum('be,ve->bv', hq.astype(jnp.int8), head.q,
                       preferred_element_type=jnp.int32)
  a = product.astype(jnp.float32) * (t * head.scale[None, :])
  gamma = embed * _U / (1.0 - embed * _U)
  h_norm = jnp.linalg.norm(hidden, axis=1, keepdims=True)
  h_error = jnp.linalg.norm(hidden - hq * t, axis=1, keepdims=True)
  q_norm = t * jnp.linalg.norm(hq, axis=1, keepdims=True)
  e = _MARGIN * ((h_error + gamma * h_norm) * head.norm[None, :]
                 + q_norm * head.error_norm[None, :]) + 4.0 * _U * jnp.abs(a)
  return a, e


def within_reach(upper: Array, reach: Array, k: int, chunk: int = 256
                 ) -> tuple[Array, Array]:
  """The first k indices v (in vocabulary order) of each row with upper[:, v] >= reach.

  upper [rows, vocab]; reach [rows, 1]. Returns (ids [rows, k], count [rows]); a row's ids past
  its count are other vocabulary ids. No sort: per-chunk counts and their running sum say
  which chunk holds the j-th index and its rank there, and only those k chunks are read again.
  """
  rows, vocab = upper.shape
  n = -(-vocab // chunk)
  mask = jnp.pad(upper >= reach, ((0, 0), (0, n * chunk - vocab)))
  chunks = mask.reshape(rows, n, chunk)
  per_chunk = jnp.sum(chunks, axis=2, dtype=jnp.int32)               # [rows, n]
  ends = jnp.cumsum(per_chunk, axis=1)
  slots = jnp.arange(k, dtype=jnp.int32)
  where = jnp.minimum(jax.vmap(lambda e: jnp.searchsorted(e, slots, side='right'))(ends), n - 1)
  rank = slots[None, :] - (jnp.take_along_axis(ends, where, axis=1)
                           - jnp.take_along_axis(per_chunk, where, axis=1))
  sub = jnp.take_along_axis(chunks, where[:, :, None], axis=1)       # [rows, k, chunk]
  hit = sub & (jnp.cumsum(sub, axis=2, dtype=jnp.int32) == rank[:, :, None] + 1)
  ids = (where * chunk + jnp.argmax(hit, axis=2)).astype(jnp.int32)
  return ids, ends[:, -1]


def argmax(hidden: Array, head: QuantizedHead, candidates: int = CANDIDATES) -> Array:
  """Token ids [rows] with the largest float32 logit hidden [rows, embed] . W_v (see above)."""
  hidden = jnp.asarray(hidden, jnp.float32)
  a, e = logit_bounds(hidden, head)
  reach = jnp.max(a - e, axis=1, keepdims=True)           # the best guaranteed logit per row
  ids, count = within_reach(a + e, reach, candidates)
  overflow = jnp.any(count > candidates) | ~jnp.all(jnp.isfinite(hidden))

  def exact(_):
    # The candidates come first, in vocabulary order, so equal logits go to the lowest id;
    # ids past a row's count repeat a real token, which cannot beat the best candidate and,
    # if it ties with it, comes later in the list.
    rows = jnp.take(head.kernel_t, ids, axis=0)          # [rows, candidates, embed]
    logits = jnp.einsum('be,bke->bk', hidden, rows)
    return jnp.take_along_axis(ids, jnp.argmax(logits, axis=1)[:, None], axis=1)[:, 0]

  return jax.lax.cond(overflow, lambda _: full_argmax(hidden, head.kernel_t), exact, None)
