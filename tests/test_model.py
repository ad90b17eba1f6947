"""The encoder-decoder and its soft prompt: tree, axes, masks, prompt on/off, decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promot_jax import tree_util
from promot_jax.model import decoding, layers, transformer as model
from promot_jax.model.transformer import Transformer

ENC = np.array([[5, 6, 7, 8, 1, 0, 0, 0], [9, 10, 11, 12, 13, 14, 15, 1]], np.int32)
DEC_IN = np.array([[0, 20, 21, 22], [0, 30, 31, 32]], np.int32)
DEC_TGT = np.array([[20, 21, 22, 1], [30, 31, 32, 1]], np.int32)


def test_parameter_tree_uses_t5x_names(tiny_params):
  flat = tree_util.flatten(tiny_params)
  for path in ['token_embedder/embedding', 'encoder/relpos_bias/rel_embedding',
               'encoder/layers_1/attention/query/kernel', 'encoder/layers_0/mlp/wi_1/kernel',
               'encoder/layers_0/pre_attention_layer_norm/scale', 'encoder/encoder_norm/scale',
               'decoder/layers_1/encoder_decoder_attention/out/kernel',
               'decoder/layers_0/pre_cross_attention_layer_norm/scale',
               'decoder/decoder_norm/scale', 'decoder/logits_dense/kernel', 'prompt/prompt']:
    assert path in flat, path
  assert flat['prompt/prompt'].shape == (5, 32)
  assert all(v.dtype == jnp.float32 for v in flat.values())


def test_every_parameter_has_logical_axes(tiny_prompt_config):
  axes = tree_util.flatten(model.logical_axes(tiny_prompt_config))
  shapes = tree_util.flatten(model.abstract_params(tiny_prompt_config))
  assert axes.keys() == shapes.keys()
  for path, spec in axes.items():
    assert len(spec) == len(shapes[path].shape) and all(spec), (path, spec)
  assert tuple(axes['prompt/prompt']) == ('prompt', 'prompt_embed')
  assert tuple(axes['encoder/layers_0/attention/query/kernel']) == ('embed', 'joined_kv')
  assert tuple(axes['decoder/logits_dense/kernel']) == ('embed', 'vocab')


def test_prompt_changes_output_only_when_attached(tiny_prompt_config, tiny_params):
  cfg = tiny_prompt_config
  plain = model.compute_logits(cfg, tiny_params, ENC, DEC_IN, DEC_TGT, with_prompt=False)
  other_prompt = dict(tiny_params, prompt={'prompt': tiny_params['prompt']['prompt'] + 1.0})
  plain_other = model.compute_logits(cfg, other_prompt, ENC, DEC_IN, DEC_TGT, with_prompt=False)
  np.testing.assert_array_equal(plain, plain_other)  # prompt values irrelevant when detached
  attached = model.compute_logits(cfg, tiny_params, ENC, DEC_IN, DEC_TGT, with_prompt=True)
  attached_other = model.compute_logits(cfg, other_prompt, ENC, DEC_IN, DEC_TGT, with_prompt=True)
  assert np.abs(attached - plain).max() > 1e-3
  assert np.abs(attached_other - attached).max() > 1e-3


def test_model_without_prompt_ignores_its_absence(tiny_config, tiny_params):
  no_prompt = {k: v for k, v in tiny_params.items() if k != 'prompt'}
  a = model.compute_logits(tiny_config, no_prompt, ENC, DEC_IN, DEC_TGT)
  b = model.compute_logits(tiny_config.replace(prompt_length=5), tiny_params, ENC, DEC_IN, DEC_TGT)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='hold no prompt'):
    model.compute_logits(tiny_config.replace(prompt_length=5), no_prompt, ENC, DEC_IN,
                         with_prompt=True)


def test_prompt_of_length_p_gives_mask_of_length_p_plus_t(tiny_prompt_config, tiny_params):
  m = Transformer(tiny_prompt_config)
  encoded, valid = m.apply({'params': tiny_params}, ENC, with_prompt=True, method=Transformer.encode)
  assert encoded.shape == (2, 5 + 8, 32) and valid.shape == (2, 5 + 8)
  np.testing.assert_array_equal(valid[:, :5], True)             # prompt positions always attend
  np.testing.assert_array_equal(valid[:, 5:], ENC > 0)          # padding stays masked
  _, plain_valid = m.apply({'params': tiny_params}, ENC, with_prompt=False,
                           method=Transformer.encode)
  assert plain_valid.shape == (2, 8)


def test_padding_does_not_leak_into_real_positions(tiny_prompt_config, tiny_params):
  # Extra padding on the encoder side must not change any logit.
  padded = np.concatenate([ENC, np.zeros((2, 5), np.int32)], axis=1)
  for with_prompt in (False, True):
    a = model.compute_logits(tiny_prompt_config, tiny_params, ENC, DEC_IN, DEC_TGT,
                             with_prompt=with_prompt)
    b = model.compute_logits(tiny_prompt_config, tiny_params, padded, DEC_IN, DEC_TGT,
                             with_prompt=with_prompt)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_decoder_is_causal(tiny_prompt_config, tiny_params):
  a = model.compute_logits(tiny_prompt_config, tiny_params, ENC, DEC_IN)
  changed = DEC_IN.copy()
  changed[:, 3] = 99
  b = model.compute_logits(tiny_prompt_config, tiny_params, ENC, changed)
  np.testing.assert_array_equal(a[:, :3], b[:, :3])
  assert np.abs(a[:, 3] - b[:, 3]).max() > 1e-4


@pytest.mark.parametrize('with_prompt', [False, True])
def test_cached_greedy_equals_uncached_forward(tiny_prompt_config, tiny_params, with_prompt):
  steps = 6
  cached = np.asarray(decoding.greedy_decode(tiny_prompt_config, tiny_params, ENC, steps,
                                             with_prompt=with_prompt, eos_id=-1))
  dec = np.zeros((2, steps), np.int32)
  for i in range(steps):  # re-run the whole decoder each step, no cache
    logits = model.compute_logits(tiny_prompt_config, tiny_params, ENC, dec,
                                  with_prompt=with_prompt)
    token = np.asarray(jnp.argmax(logits[:, i], -1))
    np.testing.assert_array_equal(cached[:, i], token)
    if i + 1 < steps:
      dec[:, i + 1] = token


def test_greedy_stops_at_eos_and_pads(tiny_config, tiny_params):
  params = {k: v for k, v in tiny_params.items() if k != 'prompt'}
  first = np.asarray(decoding.greedy_decode(tiny_config, params, ENC, 5, eos_id=-1))
  eos = int(first[0, 1])  # pretend the second token is EOS
  out = np.asarray(decoding.greedy_decode(tiny_config, params, ENC, 5, eos_id=eos))
  np.testing.assert_array_equal(out[0, :2], first[0, :2])
  np.testing.assert_array_equal(out[0, 2:], 0)


def test_dropout_is_off_by_default_and_on_when_enabled(tiny_prompt_config, tiny_params):
  cfg = tiny_prompt_config.replace(dropout_rate=0.5)
  m = Transformer(cfg)
  a = m.apply({'params': tiny_params}, ENC, DEC_IN, DEC_TGT)
  b = m.apply({'params': tiny_params}, ENC, DEC_IN, DEC_TGT)
  np.testing.assert_array_equal(a, b)
  c = m.apply({'params': tiny_params}, ENC, DEC_IN, DEC_TGT, enable_dropout=True,
              rngs={'dropout': jax.random.PRNGKey(0)})
  assert np.abs(a - c).max() > 1e-3


def test_bfloat16_activations_and_remat_keep_the_tree(tiny_prompt_config, tiny_params):
  ref = model.compute_logits(tiny_prompt_config, tiny_params, ENC, DEC_IN, DEC_TGT,
                             with_prompt=True)
  bf16 = tiny_prompt_config.replace(dtype='bfloat16')
  out = model.compute_logits(bf16, tiny_params, ENC, DEC_IN, DEC_TGT, with_prompt=True)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.15)
  for policy in ('full', 'minimal'):
    cfg = tiny_prompt_config.replace(remat_policy=policy)
    assert tree_util.flatten(model.abstract_params(cfg)).keys() == \
        tree_util.flatten(tiny_params).keys()
    np.testing.assert_allclose(
        model.compute_logits(cfg, tiny_params, ENC, DEC_IN, DEC_TGT, with_prompt=True), ref,
        atol=1e-5)


def test_relative_position_buckets_match_t5_layout():
  rel = np.arange(-200, 201)
  enc = layers.relative_position_bucket(rel, True, 32, 128)
  dec = layers.relative_position_bucket(rel, False, 32, 128)
  assert enc.min() == 0 and enc.max() == 31 and dec.min() == 0 and dec.max() == 31
  # exact buckets near zero, one per offset; far offsets share the last bucket
  assert enc[200] == 0 and enc[201] == 17 and enc[199] == 1   # bidirectional: future -> upper half
  assert dec[201:].max() == 0                                   # causal: future keys all bucket 0
  assert dec[200 - 7] == 7 and dec[0] == 31                     # causal uses all 32 for the past


@pytest.mark.parametrize('transpose_cotangent', [False, True])
@pytest.mark.parametrize('lead', [(6,), (2, 5), (2, 3, 4)])
def test_kernel_product_matches_einsum_and_its_gradients(lead, transpose_cotangent):
  """layers.kernel_product (Dense on CPU): jnp.einsum's values and both cotangents, with the
  kernel gradient's product either way round."""
  kx, kk, kd = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, lead + (7,))
  kernel = jax.random.normal(kk, (7, 9))
  dy = jax.random.normal(kd, lead + (9,))
  reference = lambda x, k: jnp.einsum('...i,io->...o', x, k)  # noqa: E731
  product = lambda x, k: layers.kernel_product(x, k, transpose_cotangent)  # noqa: E731
  np.testing.assert_allclose(product(x, kernel), reference(x, kernel), rtol=1e-6)
  ours = jax.vjp(product, x, kernel)[1](dy)
  theirs = jax.vjp(reference, x, kernel)[1](dy)
  for a, b in zip(ours, theirs):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(8, 3, 5, 5), (2, 4, 1, 7)])
def test_add_shared_bias_matches_the_broadcast_add_and_its_gradients(shape):
  """layers.add_shared_bias (the relative-position bias on CPU): logits + bias, and both
  cotangents, the bias's summed over the batch as a product with ones."""
  kl, kb, kg = jax.random.split(jax.random.PRNGKey(1), 3)
  logits = jax.random.normal(kl, shape)
  bias = jax.random.normal(kb, (1,) + shape[1:])
  g = jax.random.normal(kg, shape)
  np.testing.assert_array_equal(layers.add_shared_bias(logits, bias), logits + bias)
  ours = jax.vjp(layers.add_shared_bias, logits, bias)[1](g)
  theirs = jax.vjp(jnp.add, logits, bias)[1](g)
  for a, b in zip(ours, theirs):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # add_bias takes it only for one bias row shared by a batch, on CPU
  jaxpr = lambda b: str(jax.make_jaxpr(layers.add_bias)(logits, b))  # noqa: E731
  assert ('custom_vjp_call' in jaxpr(bias)) == (jax.default_backend() == 'cpu')
  assert 'custom_vjp_call' not in jaxpr(jnp.broadcast_to(bias, shape))


def test_dense_multiplies_through_kernel_product_on_cpu():
  dense = layers.Dense(4, ('embed', 'mlp'))
  x = jnp.ones((2, 3, 5))
  params = dense.init(jax.random.PRNGKey(0), x)
  jaxpr = str(jax.make_jaxpr(lambda p: dense.apply(p, x))(params))
  assert layers.products_with_own_kernel_gradient() == (jax.default_backend() == 'cpu')
  assert ('custom_vjp_call' in jaxpr) == layers.products_with_own_kernel_gradient()
