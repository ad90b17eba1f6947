"""Decoding and scoring with a key/value cache: greedy, beam search, rank classification.

The encoder runs once (with or without the prompt); the decoder then takes one position per
step, reading past keys/values from the 'cache' collection. Beam search flattens the beams
into the decoder's batch ([batch * beams, ...]; the encoder's output and its cross-attention
keys/values stay one row per example) and reorders the self-attention cache rows whenever
beams are re-chosen. On CPU greedy decoding takes each token from the int8 copy of the head
and the float32 logits of the few tokens that can still win (model/head_select.py).
Each public function is jitted with its configuration and lengths static, so repeated calls
with the same shapes reuse the compiled program. Parameters may be sharded jax arrays: nothing
here moves them between devices.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from promot_jax.model import head_select, layers
from promot_jax.model.config import T5Config
from promot_jax.model.lora import spec_of as lora_spec_of
from promot_jax.model.transformer import Transformer

Array = jax.Array
PAD_ID, EOS_ID = 0, 1
top_k = head_select.top_k   # decoding.top_k, as before


# (id(head kernel array), kind) -> (weak reference to it, a copy made from it); see _kept.
_KEPT_HEADS: dict[tuple[int, str], tuple[Any, Any]] = {}


@jax.jit
def _transpose(kernel: Array) -> Array:
  return kernel.T


def _head_kernel(params: Mapping[str, Any]) -> Optional[Array]:
  """The stored output head when it is a concrete array (not traced), else None."""
  kernel = params.get('decoder', {}).get('logits_dense', {}).get('kernel')
  if kernel is None or not isinstance(kernel, jax.Array) or isinstance(kernel, jax.core.Tracer):
    return None
  return kernel


def _kept(kernel: Array, kind: str, build) -> Any:
  """build(), made once per head array and kind, and kept while that array lives."""
  key = (id(kernel), kind)
  hit = _KEPT_HEADS.get(key)
  if hit is not None and hit[0]() is kernel:
    return hit[1]
  copy = build()
  _KEPT_HEADS[key] = (weakref.ref(kernel, lambda _: _KEPT_HEADS.pop(key, None)), copy)
  return copy


def transposed_head(config: T5Config, params: Mapping[str, Any]) -> Optional[Array]:
  """The [vocab, embed] copy of the output head that decoding on CPU multiplies with
  (layers.Dense(cache_transposed=True)), made once per head array and kept while that array
  lives, so that repeated decoding calls with the same parameters (evaluation batches, the
  bench) do not each copy 512 MB (mT5's head). None where decoding makes no copy (not CPU,
  logits tied to the embedding) or cannot keep one (traced parameters): the jitted decoder
  then makes its own."""
  kernel = _head_kernel(params)
  if kernel is None or not layers.decodes_with_transposed_head():
    return None
  return _kept(kernel, 'transposed',
               lambda: _transpose(kernel.astype(jnp.dtype(config.dtype))))


def greedy_uses_int8_head(config: T5Config, with_prompt: bool) -> bool:
  """Whether greedy decoding picks tokens through the int8 copy of the head
  (model/head_select.py): on CPU (where decoding keeps the head transposed), for a float32
  head of its own (not tied to the embedding, no LoRA adapter on it)."""
  spec = lora_spec_of(config) if with_prompt else None
  return (layers.decodes_with_transposed_head() and not config.logits_via_embedding
          and jnp.dtype(config.dtype) == jnp.float32
          and not (spec is not None and spec.applies('decoder/logits_dense')))


# Only the int8 copy and its statistics are jitted: the float32 rows are the kept transposed
# array itself (a jitted function returning its input returns a copy, 512 MB for mT5).
_int8_parts = jax.jit(head_select.int8_parts)


def quantized_head(config: T5Config, params: Mapping[str, Any], with_prompt: bool = False
                   ) -> Optional[head_select.QuantizedHead]:
  """The head's transposed copy and its int8 copy for greedy decoding (head_select), kept
  like `transposed_head`'s copy; None where greedy does not use them or they cannot be kept."""
  kernel = _head_kernel(params)
  if kernel is None or not greedy_uses_int8_head(config, with_prompt):
    return None
  def build():
    kernel_t = transposed_head(config, params)
    return head_select.QuantizedHead(kernel_t, *_int8_parts(kernel_t))
  return _kept(kernel, 'int8', build)


def init_cache(model: Transformer, params: Mapping[str, Any], encoded: Array, valid: Array,
               batch: int, max_decode_length: int, with_prompt: bool = False,
               head_t: Optional[Array] = None, hidden_only: bool = False) -> Any:
  """The decoding cache: per self-attention layer zeroed keys/values [batch,
  heads, max_decode_length, kv] and an index; per cross-attention layer the encoder's keys and
  values projected once here ([encoded rows, heads, encoded length, kv]; layers.FIXED_KEY;
  `batch` may be a multiple of the encoded rows: beam search's beams share them); on CPU
  the output head transposed (`head_t` when given, from `transposed_head`), unless
  `hidden_only` (the decoder stops before the head: greedy's int8 path).

  Only the cache is used of this call, so under jit the rest of it (a decoder pass over a
  dummy input) is dead code that XLA removes; the decoding functions here are all jitted.
  """
  dummy = jnp.zeros((batch, max_decode_length), jnp.int32)
  _, variables = model.apply({'params': params}, encoded, valid, dummy, decode=True,
                             max_decode_length=max_decode_length, with_prompt=with_prompt,
                             hidden_only=hidden_only, method=Transformer.decode,
                             mutable=['cache'])
  cache = variables['cache']
  if head_t is not None:   # the kept copy replaces the one made here (then dead code)
    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: head_t if path[-1].key == layers.TRANSPOSED_KERNEL else x, cache)
  return cache


def decode_step(model: Transformer, params: Mapping[str, Any], cache: Any, encoded: Array,
                valid: Array, tokens: Array, max_decode_length: int,
                with_prompt: bool = False, hidden_only: bool = False) -> tuple[Array, Any]:
  """Logits [batch, vocab] for the next position given the previous tokens [batch, 1]
  (`hidden_only`: the decoder's final hidden states [batch, embed] instead).

  `with_prompt` attaches the decoder's share of the format modules (LoRA adapters)."""
  logits, updated = model.apply({'params': params, 'cache': cache}, encoded, valid, tokens,
                                decode=True, max_decode_length=max_decode_length,
                                with_prompt=with_prompt, hidden_only=hidden_only,
                                method=Transformer.decode, mutable=['cache'])
  return logits[:, 0, :].astype(jnp.float32), updated['cache']


def greedy_decode(config: T5Config, params: Mapping[str, Any], encoder_input_tokens: Array,
                  max_decode_length: int, with_prompt: bool = False,
                  eos_id: int = EOS_ID) -> Array:
  """Greedy decoding. Returns tokens [batch, max_decode_length], padded with 0 after EOS.

  One compiled program per (config, shapes, with_prompt), however the arguments are passed;
  `eos_id` is traced (-1 never stops early). On CPU the next token comes from an int8 copy of
  the head and the float32 logits of the few tokens that can still be the largest
  (model/head_select.py): the float32 argmax, without reading the float32 head every step.
  """
  return greedy_decode_jitted(*greedy_decode_arguments(
      config, params, encoder_input_tokens, max_decode_length, with_prompt, eos_id))


def greedy_decode_arguments(config: T5Config, params: Mapping[str, Any],
                            encoder_input_tokens: Array, max_decode_length: int,
                            with_prompt: bool = False, eos_id: int = EOS_ID) -> tuple:
  """The arguments `greedy_decode` passes to `greedy_decode_jitted` (with the kept head
  copies), e.g. to lower the same program (the bench's matmul floor)."""
  return (config, params, encoder_input_tokens, max_decode_length, with_prompt,
          jnp.int32(eos_id), transposed_head(config, params),
          quantized_head(config, params, with_prompt))


@functools.partial(jax.jit, static_argnames=('config', 'max_decode_length', 'with_prompt'))
def greedy_decode_jitted(config: T5Config, params: Mapping[str, Any], encoder_input_tokens: Array,
                   max_decode_length: int, with_prompt: bool, eos_id: Array,
                   head_t: Optional[Array] = None,
                   quantized: Optional[head_select.QuantizedHead] = None) -> Array:
  model = Transformer(config)
  batch = encoder_input_tokens.shape[0]
  int8_head = greedy_uses_int8_head(config, with_prompt)
  if int8_head and quantized is None:     # traced parameters: make the copies here
    quantized = head_select.quantize(params['decoder']['logits_dense']['kernel'].T)
  encoded, valid = model.apply({'params': params}, encoder_input_tokens, with_prompt=with_prompt,
                               method=Transformer.encode)
  cache = init_cache(model, params, encoded, valid, batch, max_decode_length, with_prompt, head_t,
                     hidden_only=int8_head)

  def body(state):
    i, cache, prev, out, done = state
    out_step, cache = decode_step(model, params, cache, encoded, valid, prev, max_decode_length,
                                  with_prompt, hidden_only=int8_head)
    if int8_head:
      token = head_select.argmax(out_step, quantized)
    else:
      token = jnp.argmax(out_step, axis=-1).astype(jnp.int32)           # [batch]
    token = jnp.where(done, PAD_ID, token)
    out = out.at[:, i].set(token)
    return i + 1, cache, token[:, None], out, done | (token == eos_id)

  def running(state):  # stop early once every row has produced EOS (the rest would be padding)
    return (state[0] < max_decode_length) & ~jnp.all(state[4])

  start = jnp.full((batch, 1), PAD_ID, jnp.int32)                     # T5's decoder start id is 0
  out = jnp.zeros((batch, max_decode_length), jnp.int32)
  done = jnp.zeros((batch,), jnp.bool_)
  state = (jnp.array(0, jnp.int32), cache, start, out, done)
  return jax.lax.while_loop(running, body, state)[3]


# ------------------------------------------------------------------------------ beam search

NEG_INF = -1.0e7  # a finite "minus infinity": sums of it stay ordered and never become NaN


class BeamSearchOutput(NamedTuple):
  """The best beam per example."""
  tokens: Array      # [batch, max_decode_length] int32, 0-padded after EOS
  scores: Array      # [batch] log-probability / length penalty (what beam search ranks by)
  log_probs: Array   # [batch] summed token log-probabilities (no length penalty)


def length_penalty(length: Array | int, alpha: float) -> Array:
  """t5x's brevity penalty ((5 + length) / 6) ** alpha; a beam's score is log_prob / this."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather_beams(x: Array, index: Array) -> Array:
  """x [batch, beams, ...] indexed by index [batch, k] along the beam axis -> [batch, k, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _reorder_cache(cache: Any, index: Array, batch: int, beams: int) -> Any:
  """Re-select the beam rows of every self-attention cache leaf (layers.SELF_CACHE: [batch *
  beams, heads, length, kv], with a leading [layers] axis under scanned layers) after beams
  were re-chosen. The cross-attention keys/values are the same for every beam of an example
  and the head's copy and the index are shared, so they stay as they are."""
  def gather(path, leaf):
    if path[-1].key not in layers.SELF_CACHE:
      return leaf
    axis = leaf.ndim - 4                                  # 1 under scanned layers, else 0
    if leaf.shape[axis] != batch * beams:
      raise ValueError(f'Cache leaf {jax.tree_util.keystr(path)} has shape {leaf.shape}; '
                       f'expected {batch * beams} beam rows on axis {axis}.')
    return jax.vmap(reorder)(leaf) if axis else reorder(leaf)

  def reorder(leaf):                                      # [batch * beams, ...]
    rows = leaf.reshape((batch, beams) + leaf.shape[1:])
    return _gather_beams(rows, index).reshape(leaf.shape)
  return jax.tree_util.tree_map_with_path(gather, cache)


@functools.partial(jax.jit, static_argnames=('config', 'max_decode_length', 'beam_size',
                                             'with_prompt'))
def beam_search_jitted(config: T5Config, params: Mapping[str, Any], encoder_input_tokens: Array,
                 max_decode_length: int, beam_size: int, alpha: Array, with_prompt: bool,
                 eos_id: Array, head_t: Optional[Array] = None) -> BeamSearchOutput:
  model = Transformer(config)
  batch, beams, length = encoder_input_tokens.shape[0], beam_size, max_decode_length
  encoded, valid = model.apply({'params': params}, encoder_input_tokens, with_prompt=with_prompt,
                               method=Transformer.encode)
  # The decoder runs on rows b * beams + k; the encoder's output stays one row per example,
  # whose cross-attention keys/values all its beams share (layers.MultiHeadAttention).
  cache = init_cache(model, params, encoded, valid, batch * beams, length, with_prompt, head_t)
  max_penalty = length_penalty(length, alpha)

  def body(state):
    (i, cache, last, live_seqs, live_lp, fin_seqs, fin_scores, fin_lp, fin_flags) = state
    logits, cache = decode_step(model, params, cache, encoded, valid,
                                last.reshape(batch * beams, 1), length, with_prompt)
    # 2 * beams candidates: even if `beams` of them end in EOS, `beams` stay alive. A beam's
    # best 2 * beams tokens by logit are its best by log-prob, and the example's best
    # 2 * beams candidates are among its beams' best, so only those get log-probs (the same
    # arithmetic as log_softmax) instead of all [batch, beams, vocab]; equal values still
    # rank by beam, then token.
    row_top, row_token = top_k(logits, 2 * beams)                    # [batch * beams, 2B]
    # The largest logit, without another pass over the row (a slice of row_top would do, but
    # XLA:CPU then lowers the top_k above to a full sort).
    row_max = jnp.max(row_top, axis=-1, keepdims=True)
    log_norm = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))
    row_lp = ((row_top - row_max) - log_norm).reshape(batch, beams, 2 * beams)
    candidates = (live_lp[:, :, None] + row_lp).reshape(batch, beams * 2 * beams)
    top_lp, top_index = jax.lax.top_k(candidates, 2 * beams)
    origin = top_index // (2 * beams)
    token = jnp.take_along_axis(row_token.reshape(batch, beams * 2 * beams), top_index,
                                axis=1).astype(jnp.int32)
    top_seqs = _gather_beams(live_seqs, origin).at[:, :, i].set(token)  # [batch, 2B, length]
    ends = token == eos_id
    # Live beams: the best candidates that did not end.
    live_lp, pick = jax.lax.top_k(jnp.where(ends, NEG_INF, top_lp), beams)
    live_seqs = _gather_beams(top_seqs, pick)
    cache = _reorder_cache(cache, _gather_beams(origin, pick), batch, beams)
    last = _gather_beams(token, pick)
    # Finished beams: keep the best `beams` of the old finished ones and those ending now.
    new_scores = jnp.where(ends, top_lp / length_penalty(i + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    fin_scores, pick = jax.lax.top_k(all_scores, beams)
    fin_seqs = _gather_beams(jnp.concatenate([fin_seqs, top_seqs], axis=1), pick)
    fin_lp = _gather_beams(jnp.concatenate([fin_lp, top_lp], axis=1), pick)
    fin_flags = _gather_beams(jnp.concatenate([fin_flags, ends], axis=1), pick)
    return i + 1, cache, last, live_seqs, live_lp, fin_seqs, fin_scores, fin_lp, fin_flags

  def running(state):
    i, live_lp, fin_scores, fin_flags = state[0], state[4], state[6], state[8]
    # A live beam can at best keep its log-prob and reach the largest penalty (alpha >= 0).
    best_live = jnp.max(live_lp, axis=1) / max_penalty
    worst_finished = jnp.min(jnp.where(fin_flags, fin_scores, NEG_INF), axis=1)
    return (i < length) & ~jnp.all(worst_finished > best_live)

  first = jnp.array([0.0] + [NEG_INF] * (beams - 1), jnp.float32)    # one real beam at start
  state = (jnp.array(0, jnp.int32), cache, jnp.full((batch, beams), PAD_ID, jnp.int32),
           jnp.zeros((batch, beams, length), jnp.int32), jnp.tile(first, (batch, 1)),
           jnp.zeros((batch, beams, length), jnp.int32), jnp.full((batch, beams), NEG_INF),
           jnp.zeros((batch, beams), jnp.float32), jnp.zeros((batch, beams), jnp.bool_))
  state = jax.lax.while_loop(running, body, state)
  _, _, _, live_seqs, live_lp, fin_seqs, fin_scores, fin_lp, fin_flags = state
  # Beams still alive when the loop stops compete as length-`max_decode_length` sequences; if
  # the loop stopped early they cannot win (that is why it stopped).
  scores = jnp.concatenate([jnp.where(fin_flags, fin_scores, NEG_INF),
                            live_lp / max_penalty], axis=1)
  best = jnp.argmax(scores, axis=1)[:, None]                          # [batch, 1]
  seqs = _gather_beams(jnp.concatenate([fin_seqs, live_seqs], axis=1), best)[:, 0]
  log_probs = _gather_beams(jnp.concatenate([fin_lp, live_lp], axis=1), best)[:, 0]
  return BeamSearchOutput(seqs, _gather_beams(scores, best)[:, 0], log_probs)


def beam_search(config: T5Config, params: Mapping[str, Any], encoder_input_tokens: Array,
                max_decode_length: int, beam_size: int = 4, alpha: float = 0.6,
                with_prompt: bool = False, eos_id: int = EOS_ID,
                return_scores: bool = False) -> Array | BeamSearchOutput:
  """Beam search with t5x's length penalty; the best sequence per example.

  Returns tokens [batch, max_decode_length] (0-padded after EOS), or with `return_scores`
  a BeamSearchOutput that also holds the penalised score and the raw log-probability. One
  compiled program per (config, shapes, beam_size, with_prompt); alpha and eos_id are traced.
  """
  out = beam_search_jitted(*beam_search_arguments(
      config, params, encoder_input_tokens, max_decode_length, beam_size, alpha, with_prompt,
      eos_id))
  return out if return_scores else out.tokens


def beam_search_arguments(config: T5Config, params: Mapping[str, Any],
                          encoder_input_tokens: Array, max_decode_length: int,
                          beam_size: int = 4, alpha: float = 0.6, with_prompt: bool = False,
                          eos_id: int = EOS_ID) -> tuple:
  """The arguments `beam_search` passes to `beam_search_jitted` (checked, with the kept
  transposed head), e.g. to lower the same program (the bench's matmul floor)."""
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size}.')
  if alpha < 0:
    raise ValueError(f'The length penalty alpha must be >= 0, got {alpha}.')
  return (config, params, encoder_input_tokens, max_decode_length, beam_size,
          jnp.float32(alpha), with_prompt, jnp.int32(eos_id), transposed_head(config, params))


# ------------------------------------------------------------------- scoring / classification

def shift_right(targets: Array) -> Array:
  """Decoder inputs for teacher forcing: the start id 0, then targets without the last one."""
  return jnp.pad(targets, [(0, 0)] * (targets.ndim - 1) + [(1, 0)])[..., :-1]


def score_candidates(config: T5Config, params: Mapping[str, Any], encoder_input_tokens: Array,
                     candidate_target_tokens: Array, with_prompt: bool = False) -> Array:
  """Summed log-likelihood [batch, n_cand] of each candidate target (teacher forced).

  encoder_input_tokens [batch, length]; candidate_target_tokens [batch, n_cand, target_length],
  0-padded (include EOS in a candidate for it to count). The encoder runs once per example.
  """
  return _score_candidates(config, params, encoder_input_tokens, candidate_target_tokens,
                           with_prompt)


@functools.partial(jax.jit, static_argnames=('config', 'with_prompt'))
def _score_candidates(config: T5Config, params: Mapping[str, Any], encoder_input_tokens: Array,
                      candidate_target_tokens: Array, with_prompt: bool) -> Array:
  model = Transformer(config)
  batch, n_cand, target_length = candidate_target_tokens.shape
  encoded, valid = model.apply({'params': params}, encoder_input_tokens, with_prompt=with_prompt,
                               method=Transformer.encode)
  encoded, valid = jnp.repeat(encoded, n_cand, axis=0), jnp.repeat(valid, n_cand, axis=0)
  targets = candidate_target_tokens.reshape(batch * n_cand, target_length).astype(jnp.int32)
  logits = model.apply({'params': params}, encoded, valid, shift_right(targets), targets,
                       with_prompt=with_prompt, method=Transformer.decode).astype(jnp.float32)
  token_lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(targets > 0, token_lp, 0.0), axis=-1).reshape(batch, n_cand)


def rank_classify(config: T5Config, params: Mapping[str, Any], encoder_input_tokens: Array,
                  candidate_target_tokens: Array, with_prompt: bool = False) -> Array:
  """Index [batch] of the most likely candidate (rank classification)."""
  scores = score_candidates(config, params, encoder_input_tokens, candidate_target_tokens,
                            with_prompt)
  return jnp.argmax(scores, axis=-1)
