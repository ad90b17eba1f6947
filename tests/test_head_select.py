"""Greedy decoding's argmax through the int8 copy of the head (model/head_select.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promot_jax.model import config, decoding, head_select, transformer as model

select = jax.jit(head_select.argmax, static_argnames='candidates')


def head_of(kernel_t):
  return jax.jit(head_select.quantize)(jnp.asarray(kernel_t, jnp.float32))


def plain_argmax(hidden, kernel_t):
  return np.asarray(jnp.argmax(jnp.asarray(hidden) @ jnp.asarray(kernel_t).T, axis=1))


@pytest.mark.parametrize('vocab', [4100, 1000])
def test_the_bound_holds_and_the_argmax_is_the_float32_one(vocab):
  rng = np.random.default_rng(vocab)
  for scale in (0.05, 1.0, 30.0):
    kernel_t = (rng.normal(size=(vocab, 64)) * scale).astype(np.float32)
    kernel_t[3] = 0.0                                  # an all-zero row (scale 1, q 0)
    hidden = rng.normal(size=(8, 64)).astype(np.float32) * [[1], [10], [0.01], [1], [1], [1],
                                                            [1], [1]]
    hidden[3, :60] = 0.0                               # a sparse row
    head = head_of(kernel_t)
    a, e = jax.jit(head_select.logit_bounds)(hidden, head)
    exact = hidden.astype(np.float64) @ kernel_t.T.astype(np.float64)
    assert (np.abs(exact - np.asarray(a)) <= np.asarray(e)).all()
    np.testing.assert_array_equal(np.asarray(select(hidden, head)), plain_argmax(hidden, kernel_t))


def test_the_bound_holds_where_rounding_errors_line_up():
  """Worst case for the estimate: every weight and hidden entry rounds by almost half a step
  in the direction that makes all errors add up."""
  embed, vocab = 64, 300
  step = 1.0 / 127
  kernel_t = np.full((vocab, embed), 40.49 * step, np.float32)
  kernel_t[:, 0] = 1.0                                  # max |W_v| = 1: s_v = 1/127
  kernel_t[1] = -kernel_t[1]
  hidden = np.full((2, embed), 60.49 * step, np.float32)
  hidden[:, 0] = 1.0
  hidden[1, 1:] = 60.51 * step
  head = head_of(kernel_t)
  a, e = jax.jit(head_select.logit_bounds)(hidden, head)
  exact = hidden.astype(np.float64) @ kernel_t.T.astype(np.float64)
  err = np.abs(exact - np.asarray(a))
  assert (err <= np.asarray(e)).all()
  assert (err > 0.5 * np.asarray(e)).any()   # the bound is not loose by orders here


def test_near_ties_below_int8_resolution_go_to_the_larger_float32_logit():
  rng = np.random.default_rng(0)
  vocab, embed = 1024, 32
  kernel_t = rng.normal(size=(vocab, embed)).astype(np.float32) * 0.01
  hidden = rng.normal(size=(3, embed)).astype(np.float32)
  best = (np.round(hidden[0] / np.abs(hidden[0]).max() * 127) / 127).astype(np.float32)
  kernel_t[700] = best
  kernel_t[300] = best + 1e-4 * np.sign(hidden[0])      # larger by 1e-4 |h|_1: same int8 row
  kernel_t[900] = best                                   # ties with 700 exactly
  hidden[1] = hidden[0]
  hidden[2] = -hidden[0]                                 # another row's own winner
  head = head_of(kernel_t)
  np.testing.assert_array_equal(np.asarray(head.q[300]), np.asarray(head.q[700]))
  got = np.asarray(select(hidden, head))
  np.testing.assert_array_equal(got, plain_argmax(hidden, kernel_t))
  assert got[0] == got[1] == 300
  kernel_t[300] = best - 1e-4 * np.sign(hidden[0])       # now smaller: the exact tie, low index
  got = np.asarray(select(hidden, head_of(kernel_t)))
  assert got[0] == 700
  np.testing.assert_array_equal(got, plain_argmax(hidden, kernel_t))


def test_more_candidates_than_kept_or_a_non_finite_row_take_the_full_product():
  rng = np.random.default_rng(1)
  vocab, embed = 1000, 16
  kernel_t = rng.normal(size=(vocab, embed)).astype(np.float32)
  kernel_t[500:600] = kernel_t[0] * 3 * (1 + 1e-6 * np.arange(100))[:, None]   # 100 near-equal
  hidden = rng.normal(size=(4, embed)).astype(np.float32)
  hidden[1] = kernel_t[0] * 10                           # row 1: those rows win
  head = head_of(kernel_t)
  a, e = jax.jit(head_select.logit_bounds)(hidden, head)
  reach = jnp.max(a - e, axis=1, keepdims=True)
  count = np.asarray(head_select.within_reach(a + e, reach, 8)[1])
  assert count[1] > 8 and count[0] <= 8                 # row 1 overflows 8 candidates
  for k in (8, 64, 128):
    np.testing.assert_array_equal(np.asarray(select(hidden, head, candidates=k)),
                                  plain_argmax(hidden, kernel_t))
  hidden[2, 3] = np.nan                                  # NaN logits: the first NaN, as argmax
  np.testing.assert_array_equal(np.asarray(select(hidden, head)), plain_argmax(hidden, kernel_t))


@pytest.mark.parametrize('vocab', [1000, 4096, 300])
def test_within_reach_lists_the_first_indices_in_order(vocab):
  rng = np.random.default_rng(vocab)
  x = rng.normal(size=(5, vocab)).astype(np.float32)
  wanted = [3, 10, 40, 1, 70]
  reach = np.sort(x, axis=1)[np.arange(5), -np.array(wanted)][:, None]
  ids, count = jax.jit(head_select.within_reach, static_argnums=2)(x, reach, 64)
  for b in range(5):
    want = np.flatnonzero(x[b] >= reach[b])
    assert int(count[b]) == len(want) == wanted[b]
    n = min(64, len(want))
    np.testing.assert_array_equal(np.asarray(ids[b, :n]), want[:n])
    assert ((0 <= np.asarray(ids[b])) & (np.asarray(ids[b]) < vocab)).all()


CFG = config.get_config('mt5_tiny', prompt_length=4, dropout_rate=0.0)


def test_greedy_takes_the_int8_path_on_cpu_and_gives_the_plain_path_tokens(monkeypatch):
  assert decoding.greedy_uses_int8_head(CFG, with_prompt=True)
  assert not decoding.greedy_uses_int8_head(CFG.replace(dtype='bfloat16'), True)
  lora = CFG.replace(lora_rank=2, lora_targets='logits_dense')
  assert not decoding.greedy_uses_int8_head(lora, True)
  assert decoding.greedy_uses_int8_head(lora, False)
  params = model.init_params(CFG, jax.random.PRNGKey(3))
  confident = jax.tree_util.tree_map(lambda x: x, params)
  confident['decoder']['logits_dense']['kernel'] = params['decoder']['logits_dense']['kernel'] * 4
  enc = np.array(jax.random.randint(jax.random.PRNGKey(4), (4, 24), 2, 259), np.int32)
  enc[2, 7:] = 0
  for p in (params, confident):
    head = decoding.quantized_head(CFG, p, True)
    assert decoding.quantized_head(CFG, p, True) is head                 # kept per head array
    assert head.kernel_t is decoding.transposed_head(CFG, p)             # no third float32 copy
    int8 = np.asarray(decoding.greedy_decode(CFG, p, enc, 10, with_prompt=True, eos_id=-1))
    traced = np.asarray(decoding.greedy_decode_jitted(CFG, p, enc, 10, True, jnp.int32(-1)))
    with monkeypatch.context() as m:
      m.setattr(decoding, 'greedy_uses_int8_head', lambda *a: False)
      decoding.greedy_decode_jitted.clear_cache()
      plain = np.asarray(decoding.greedy_decode(CFG, p, enc, 10, with_prompt=True, eos_id=-1))
    decoding.greedy_decode_jitted.clear_cache()
    np.testing.assert_array_equal(int8, plain)
    np.testing.assert_array_equal(traced, plain)


def test_programs_traced_for_another_platform_take_no_cpu_only_head_path():
  """Ahead-of-time compiles for a TPU slice on this CPU host (promot plan) trace the plain
  head: no int8 copy, no transposed copy, jax's own kernel gradient."""
  from promot_jax.model import layers
  params = jax.eval_shape(lambda: model.init_params(CFG, jax.random.PRNGKey(0)))
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)

  def greedy_text():
    fn = jax.jit(lambda p, t: decoding.greedy_decode_jitted(CFG, p, t, 4, True, jnp.int32(1)))
    return fn.lower(params, tokens).as_text()

  assert 'xi8>' in greedy_text() and layers.decodes_with_transposed_head()
  with layers.compiling_for('tpu'):
    assert layers.target_platform() == 'tpu'
    assert not layers.decodes_with_transposed_head()
    assert not layers.products_with_own_kernel_gradient()
    assert 'xi8>' not in greedy_text()
  assert layers.target_platform() == 'cpu'
