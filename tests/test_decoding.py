"""Greedy and beam search with the KV cache, candidate scoring and rank classification.

Shapes match tests/test_evaluation.py's toy suite (batch 4, inputs 40, 12 decode steps, the
mt5_tiny config with a 4-vector prompt), so compiled programs are shared across the files:
on a small CPU, compiling dominates the run time. For the same reason width 4 and scoring run
with the prompt only (the prompt / no-prompt difference is the encoder's, which the width-1
and greedy tests cover both ways).
"""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promot_jax.model import config, decoding, layers, stacking, transformer as model

CFG = config.get_config('mt5_tiny', prompt_length=4, dropout_rate=0.0)
BATCH, LENGTH, STEPS = 4, 40, 12


@pytest.fixture(scope='module')
def params():
  return model.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope='module')
def confident_params(params):
  """The same model with logits x4: peaked next-token distributions, like a trained model's."""
  out = jax.tree_util.tree_map(lambda x: x, params)
  out['decoder']['logits_dense']['kernel'] = params['decoder']['logits_dense']['kernel'] * 4
  return out


@pytest.fixture(scope='module')
def enc():
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(1), (BATCH, LENGTH), 2, 259),
                    np.int32)
  tokens[1, 20:] = 0   # padded rows
  tokens[2, 9:] = 0
  return tokens


def eos_of(tokens: np.ndarray) -> int:
  """A token greedy decoding emits early, used as a stand-in EOS so that sequences end."""
  return int(tokens[0, 3])


def length_to_eos(row: np.ndarray, eos: int) -> int:
  hits = np.flatnonzero(row == eos)
  return int(hits[0]) + 1 if hits.size else len(row)


def upto_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
  out = tokens.copy()
  for row in out:
    row[length_to_eos(row, eos):] = 0
  return out


def penalised(log_prob: float, length: int) -> float:
  return log_prob / float(decoding.length_penalty(length, 0.6))


@pytest.mark.parametrize('with_prompt', [False, True])
def test_beam_width_one_equals_greedy(params, enc, with_prompt):
  greedy = np.asarray(decoding.greedy_decode(CFG, params, enc, STEPS, with_prompt=with_prompt,
                                             eos_id=-1))
  beam = decoding.beam_search(CFG, params, enc, STEPS, beam_size=1, with_prompt=with_prompt,
                              eos_id=-1)
  np.testing.assert_array_equal(np.asarray(beam), greedy)
  # With a real EOS and no length penalty, width 1 also stops exactly where greedy stops.
  eos = eos_of(greedy)
  greedy = np.asarray(decoding.greedy_decode(CFG, params, enc, STEPS, with_prompt=with_prompt,
                                             eos_id=eos))
  beam = decoding.beam_search(CFG, params, enc, STEPS, beam_size=1, alpha=0.0,
                              with_prompt=with_prompt, eos_id=eos)
  np.testing.assert_array_equal(np.asarray(beam), greedy)
  assert (greedy == 0).any()   # a row ended and was padded


def test_beam_scores_are_uncached_log_probs_and_beat_greedy(params, confident_params, enc):
  for p in (params, confident_params):
    eos = eos_of(np.asarray(decoding.greedy_decode(CFG, p, enc, STEPS, with_prompt=True,
                                                   eos_id=-1)))
    greedy = np.asarray(decoding.greedy_decode(CFG, p, enc, STEPS, with_prompt=True, eos_id=eos))
    out = decoding.beam_search(CFG, p, enc, STEPS, beam_size=4, alpha=0.6, with_prompt=True,
                               eos_id=eos, return_scores=True)
    tokens = np.asarray(out.tokens)
    # One uncached teacher-forced pass scores both the chosen beam and greedy's sequence.
    lp = np.asarray(decoding.score_candidates(
        CFG, p, enc, np.stack([upto_eos(tokens, eos), greedy], 1), with_prompt=True))
    for b in range(BATCH):
      n = length_to_eos(tokens[b], eos)
      np.testing.assert_array_equal(tokens[b, n:], 0)            # padding after EOS
      np.testing.assert_allclose(lp[b, 0], out.log_probs[b], atol=1e-4)
      np.testing.assert_allclose(out.scores[b], penalised(out.log_probs[b], n), atol=1e-5)
    assert any(length_to_eos(t, eos) < STEPS for t in tokens)     # EOS handling exercised
    assert not np.array_equal(tokens, greedy)                      # beam search did search
  # Beam search does not promise to beat greedy on a near-uniform random model (it may
  # prune greedy's prefix); on a confident one width 4 finds a score at least as good.
  for b in range(BATCH):
    assert float(out.scores[b]) >= penalised(lp[b, 1], length_to_eos(greedy[b], eos)) - 1e-5


def reference_beam_search(params, enc_row, beams, alpha, eos, with_prompt):
  """The same algorithm in plain Python, re-running the full decoder for every prefix."""
  def next_log_probs(prefixes):
    dec = np.zeros((BATCH, STEPS), np.int32)              # [beams <= BATCH, STEPS] inputs
    for i, p in enumerate(prefixes):
      dec[i, 1:len(p) + 1] = p
    logits = model.compute_logits(CFG, params, np.repeat(enc_row[None], BATCH, 0), dec,
                                  with_prompt=with_prompt)
    lp = np.asarray(jax.nn.log_softmax(logits))
    return [lp[i, len(p)] for i, p in enumerate(prefixes)]

  penalty = lambda n: ((5 + n) / 6) ** alpha  # noqa: E731
  live, finished = [((), 0.0)], []
  for i in range(STEPS):
    nxt = next_log_probs([p for p, _ in live])
    cands = sorted(((s + float(nxt[j][t]), p + (t,)) for j, (p, s) in enumerate(live)
                    for t in range(CFG.vocab_size)), key=lambda c: -c[0])[:2 * beams]
    finished = sorted(finished + [(s / penalty(i + 1), p) for s, p in cands if p[-1] == eos],
                      key=lambda c: -c[0])[:beams]
    live = [(p, s) for s, p in cands if p[-1] != eos][:beams]
    if len(finished) == beams and min(f[0] for f in finished) > max(
        s for _, s in live) / penalty(STEPS):
      break
  return max(finished + [(s / penalty(STEPS), p) for p, s in live], key=lambda c: c[0])


def test_cached_beam_search_equals_an_uncached_reference(params, enc):
  eos = eos_of(np.asarray(decoding.greedy_decode(CFG, params, enc, STEPS, with_prompt=True,
                                                 eos_id=-1)))
  out = decoding.beam_search(CFG, params, enc, STEPS, beam_size=4, with_prompt=True, eos_id=eos,
                             return_scores=True)
  for b in range(BATCH):
    score, seq = reference_beam_search(params, enc[b], 4, 0.6, eos, True)
    np.testing.assert_array_equal(np.asarray(out.tokens[b, :len(seq)]), seq)
    np.testing.assert_allclose(float(out.scores[b]), score, atol=1e-4)


def test_decoding_with_scanned_layers_equals_the_unrolled_model(params, enc):
  """Under scanned layers each cache leaf has a leading [layers] axis: the beam reorder must
  pick rows on the axis after it (it once skipped those leaves: other tokens, no error)."""
  scanned = CFG.replace(scan_layers=True)
  stacked = stacking.stack_layers(params, scanned)
  want = decoding.beam_search(CFG, params, enc, STEPS, beam_size=4, with_prompt=True,
                              return_scores=True)
  got = decoding.beam_search(scanned, stacked, enc, STEPS, beam_size=4, with_prompt=True,
                             return_scores=True)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), atol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(decoding.greedy_decode(scanned, stacked, enc, STEPS, with_prompt=True)),
      np.asarray(decoding.greedy_decode(CFG, params, enc, STEPS, with_prompt=True)))


def test_repeated_calls_do_not_recompile(params, enc):
  decoding.beam_search(CFG, params, enc, STEPS, beam_size=4, with_prompt=True, eos_id=-1)
  decoding.greedy_decode(CFG, params, enc, STEPS, with_prompt=True, eos_id=-1)
  before = (decoding.beam_search_jitted._cache_size(), decoding.greedy_decode_jitted._cache_size())
  # Other values, and arguments passed another way, reuse the compiled programs.
  decoding.beam_search(CFG, params, enc + 1, STEPS, 4, 0.3, True, 5)
  decoding.greedy_decode(CFG, params, enc + 1, STEPS, True)
  decoding.greedy_decode(CFG, params, enc, max_decode_length=STEPS, eos_id=3, with_prompt=True)
  assert (decoding.beam_search_jitted._cache_size(), decoding.greedy_decode_jitted._cache_size()) == before


def test_score_candidates_equal_compute_logits_and_rank(params, enc):
  rng = np.random.default_rng(0)
  cands = rng.integers(2, 259, (BATCH, 2, STEPS)).astype(np.int32)
  cands[:, 0, 4:] = 0          # different lengths, 0-padded
  cands[:, 1, 7:] = 0
  scores = np.asarray(decoding.score_candidates(CFG, params, enc, cands, with_prompt=True))
  assert scores.shape == (BATCH, 2)
  for c in range(2):
    logits = model.compute_logits(CFG, params, enc, np.asarray(decoding.shift_right(cands[:, c])),
                                  with_prompt=True)
    lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), cands[:, c, :, None], -1)
    np.testing.assert_allclose(scores[:, c], np.where(cands[:, c] > 0, lp[..., 0], 0).sum(-1),
                               atol=1e-4)
  best = np.asarray(decoding.rank_classify(CFG, params, enc, cands, with_prompt=True))
  np.testing.assert_array_equal(best, scores.argmax(-1))


def test_bad_beam_arguments(params, enc):
  with pytest.raises(ValueError, match='beam_size'):
    decoding.beam_search(CFG, params, enc, STEPS, beam_size=0, with_prompt=True)
  with pytest.raises(ValueError, match='alpha'):
    decoding.beam_search(CFG, params, enc, STEPS, alpha=-1.0, with_prompt=True)


def test_length_penalty_is_t5x():
  np.testing.assert_allclose(float(decoding.length_penalty(7, 0.6)), (12 / 6) ** 0.6, rtol=1e-6)
  assert float(decoding.length_penalty(3, 0.0)) == 1.0
  assert jnp.array_equal(decoding.shift_right(jnp.array([[5, 6, 7]])), jnp.array([[0, 5, 6]]))


@pytest.mark.parametrize('vocab', [250112, 512, 4100, 300])
def test_top_k_equals_lax_top_k_ties_included(vocab):
  """decoding.top_k (chunked where the vocabulary splits) against jax.lax.top_k: random rows,
  rows of few distinct values (ties across chunks), a constant row and -inf entries."""
  rng = np.random.default_rng(vocab)
  x = rng.normal(size=(6, vocab)).astype(np.float32)
  x[1] = rng.integers(0, 3, vocab)          # three values: every rank a tie
  x[2] = 0.5                                # one value
  x[3, ::7] = -np.inf
  x[4] = np.round(x[4], 1)                  # many ties among the largest
  x[5] = 0.0                                # the larger maximum in a later chunk, and a tie
  x[5, [vocab - 5, 5, vocab - 10, 10]] = [3.0, 2.0, 1.0, 1.0]   # between the two chunks
  for k in (1, 2, 4, 8):
    got, want = jax.jit(decoding.top_k, static_argnums=1)(x, k), jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_decoding_cache_holds_the_output_head_transposed_on_cpu(params, enc):
  """On CPU the cache carries the [vocab, embed] copy of the head that every decoding step
  multiplies with (layers.Dense(cache_transposed=True)); the cached-vs-uncached tests above
  check the logits it gives."""
  assert jax.default_backend() == 'cpu'
  net = model.Transformer(CFG)
  encoded, valid = net.apply({'params': params}, enc, method=model.Transformer.encode)
  cache = decoding.init_cache(net, params, encoded, valid, BATCH, STEPS)
  copy = cache['decoder']['logits_dense'][layers.TRANSPOSED_KERNEL]
  np.testing.assert_array_equal(np.asarray(copy),
                                np.asarray(params['decoder']['logits_dense']['kernel']).T)


def test_self_attention_cache_is_heads_major_and_filled_one_position_a_step(params, enc):
  """Each self-attention layer keeps [batch, heads, max_length, kv], the layout its score and
  output products read (kept [batch, length, heads, kv], XLA:CPU transposed every layer's
  whole cache at every step), and a decoding step writes its position there only."""
  net = model.Transformer(CFG)
  encoded, valid = net.apply({'params': params}, enc, method=model.Transformer.encode)
  cache = decoding.init_cache(net, params, encoded, valid, BATCH, STEPS)
  start = jnp.zeros((BATCH, 1), jnp.int32)
  _, cache = decoding.decode_step(net, params, cache, encoded, valid, start, STEPS)
  _, cache = decoding.decode_step(net, params, cache, encoded, valid, start + 5, STEPS)
  for i in range(CFG.num_decoder_layers):
    attention = cache['decoder'][f'layers_{i}']['self_attention']
    for name in layers.SELF_CACHE:
      kv = np.asarray(attention[name])
      assert kv.shape == (BATCH, CFG.num_heads, STEPS, CFG.head_dim), name
      assert np.all(np.any(kv[:, :, :2] != 0, axis=-1)), name      # positions 0 and 1 written
      assert not np.any(kv[:, :, 2:]), name                           # the rest still zero
    assert int(attention['cache_index']) == 2


def test_transposed_head_is_made_once_per_head_array_and_dropped_with_it(params):
  kernel = params['decoder']['logits_dense']['kernel']
  first = decoding.transposed_head(CFG, params)
  assert decoding.transposed_head(CFG, params) is first          # kept: no second copy
  np.testing.assert_array_equal(np.asarray(first), np.asarray(kernel).T)
  # Other parameters (a new head array) get their own copy, freed when that array is.
  other = {'decoder': {'logits_dense': {'kernel': kernel + 1.0}}}
  copy = decoding.transposed_head(CFG, other)
  assert copy is not first
  np.testing.assert_array_equal(np.asarray(copy), np.asarray(kernel + 1.0).T)
  copy_ref = weakref.ref(copy)
  del other, copy
  gc.collect()
  assert copy_ref() is None
  # Under a trace there is nothing to keep: the jitted decoder makes its own copy.
  seen = []
  jax.jit(lambda p: seen.append(decoding.transposed_head(CFG, p)) or 0)(params)
  assert seen == [None]
