"""Parity with Hugging Face transformers (torch, CPU, float32) for HF-format MT5 checkpoints.

Random-weight MT5ForConditionalGeneration models are saved with transformers, read back with
promot_jax.checkpoints.hf, and must give the same logits (max abs diff <= 1e-4) and the same
greedy tokens as transformers itself, at the tiny shape and at the mT5-small shape.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_numpy = pytest.importorskip('safetensors.numpy')

from promot_jax import tree_util
from promot_jax.checkpoints import hf  # noqa: E402
from promot_jax.model import decoding, transformer as model  # noqa: E402
from promot_jax.model.config import get_config  # noqa: E402

TINY = dict(vocab_size=512, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
SMALL = dict(vocab_size=250112, d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8)
EOS_ID = 1
TOLERANCE = 1e-4
# Encoder 64 positions (row 1 padded from 40) and decoder 48 positions: relative distances
# reach well into the log-spaced buckets (beyond 8 bidirectional, 16 causal).
ENC_LEN, ENC_PAD_FROM, DEC_LEN = 64, 40, 48
TIED_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')


def make_hf_model(shape: dict, seed: int, untie: bool = True):
  """A random MT5ForConditionalGeneration in eval mode, laid out like the official mT5 weights.

  transformers 5 ties lm_head to the input embedding for every new MT5 model; the official
  checkpoints have their own head, so by default one is drawn here (std d_model**-0.5, as t5x
  initialises it, with the EOS row zeroed so that greedy decoding rarely stops early). Layer
  norm scales are perturbed away from 1 so that a mix-up of two norms cannot go unnoticed.
  """
  torch.manual_seed(seed)
  cfg = transformers.MT5Config(**shape, dropout_rate=0.0)
  m = transformers.MT5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if 'layer_norm' in name:
        p.add_(0.2 * torch.randn_like(p))
    if untie:
      head = torch.randn(shape['vocab_size'], shape['d_model']) * shape['d_model'] ** -0.5
      head[EOS_ID] = 0.0
      m.lm_head.weight = torch.nn.Parameter(head)
  return m


def save_hf(m, path: str, **kwargs) -> str:
  m.save_pretrained(path, **kwargs)
  return str(path)


def make_batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Encoder tokens [2, 64] (row 1 padded with 0 from position 40), decoder inputs [2, 48]."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (2, ENC_LEN)).astype(np.int32)
  enc[1, ENC_PAD_FROM:] = 0
  dec = rng.integers(2, vocab, (2, DEC_LEN)).astype(np.int32)
  dec[:, 0] = 0  # T5's decoder start token
  return enc, dec


def hf_logits(m, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = m(input_ids=torch.tensor(enc, dtype=torch.long),
            attention_mask=torch.tensor(enc != 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long))
  return out.logits.float().numpy()


def our_logits(cfg, params, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
  return np.asarray(model.Transformer(cfg).apply({'params': params}, jnp.asarray(enc),
                                                 jnp.asarray(dec)))


def hf_greedy(m, enc: np.ndarray, steps: int, eos_id: int = EOS_ID) -> np.ndarray:
  """transformers' greedy tokens [batch, steps]: start token stripped, 0-padded to `steps`."""
  with torch.no_grad():
    out = m.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                     attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                     do_sample=False, num_beams=1, max_new_tokens=steps, min_new_tokens=0,
                     eos_token_id=eos_id, pad_token_id=0, decoder_start_token_id=0).numpy()
  assert (out[:, 0] == 0).all()
  out = out[:, 1:]
  return np.pad(out, ((0, 0), (0, steps - out.shape[1])))


def assert_logits_match(m, cfg, params, vocab: int) -> float:
  enc, dec = make_batch(vocab)
  ref, got = hf_logits(m, enc, dec), our_logits(cfg, params, enc, dec)
  assert got.shape == ref.shape == (2, DEC_LEN, vocab)
  diff = float(np.abs(ref - got).max())
  print(f'max |logits diff| = {diff:.3g} (max |logit| {np.abs(ref).max():.3g})')
  assert diff <= TOLERANCE
  return diff


def assert_greedy_matches(m, cfg, params, vocab: int, steps: int) -> np.ndarray:
  enc, _ = make_batch(vocab, seed=1)
  ref = hf_greedy(m, enc, steps)
  got = np.asarray(decoding.greedy_decode(cfg, params, jnp.asarray(enc), max_decode_length=steps))
  np.testing.assert_array_equal(got, ref)
  return got


@pytest.fixture(scope='module')
def tiny_hf(tmp_path_factory):
  """(torch model, its saved directory) at the mt5_tiny shape."""
  m = make_hf_model(TINY, seed=0)
  return m, save_hf(m, tmp_path_factory.mktemp('hf_tiny'))


@pytest.fixture(scope='module')
def tiny_loaded(tiny_hf):
  return hf.load_hf_params(tiny_hf[1])


@pytest.fixture(scope='module')
def small_hf(tmp_path_factory):
  """(torch model, config, params) at the mT5-small shape (300M random parameters)."""
  m = make_hf_model(SMALL, seed=1)
  path = save_hf(m, tmp_path_factory.mktemp('hf_small'))
  cfg, params = hf.load_hf_params(path)
  shutil.rmtree(path)  # 1.2 GB; everything needed is in memory now
  return m, cfg, params


# ---------------------------------------------------------------------------------------------
# Tiny shape.


def test_tiny_config_matches_mt5_tiny(tiny_loaded):
  cfg, params = tiny_loaded
  assert cfg.architecture() == get_config('mt5_tiny').architecture()
  tree_util.check_tree_matches(params, model.abstract_params(cfg), source='test')
  assert all(v.dtype == np.float32 for v in tree_util.flatten(params).values())


def test_tiny_logits_match_transformers(tiny_hf, tiny_loaded):
  cfg, params = tiny_loaded
  assert_logits_match(tiny_hf[0], cfg, params, TINY['vocab_size'])


def test_tiny_loads_with_given_config(tiny_hf, tiny_loaded):
  cfg = get_config('mt5_tiny', dropout_rate=0.0, prompt_length=5)
  got_cfg, params = hf.load_hf_params(tiny_hf[1], cfg)
  assert got_cfg == cfg and 'prompt' not in params
  for p, v in tree_util.flatten(tiny_loaded[1]).items():
    np.testing.assert_array_equal(tree_util.flatten(params)[p], v)


def test_tiny_greedy_matches_transformers(tiny_hf, tiny_loaded):
  cfg, params = tiny_loaded
  tokens = assert_greedy_matches(tiny_hf[0], cfg, params, TINY['vocab_size'], steps=40)
  assert not (tokens == EOS_ID).any()  # ran the full length: every step was compared


def test_tiny_greedy_stops_at_eos_like_transformers(tiny_hf, tiny_loaded):
  """Declare a token that the model emits at step 6 of row 0 to be EOS: both stop and pad alike."""
  (m, _), (cfg, params) = tiny_hf, tiny_loaded
  enc, _ = make_batch(TINY['vocab_size'], seed=1)
  steps = 40
  free = np.asarray(decoding.greedy_decode(cfg, params, jnp.asarray(enc), max_decode_length=steps))
  eos = int(free[0, 5])
  assert eos != 0
  ref = hf_greedy(m, enc, steps, eos_id=eos)
  got = np.asarray(decoding.greedy_decode(cfg, params, jnp.asarray(enc), max_decode_length=steps,
                                          eos_id=eos))
  np.testing.assert_array_equal(got, ref)
  stop = int(np.argmax(got[0] == eos))
  assert stop <= 5 and (got[0, stop + 1:] == 0).all()


def test_transformers5_tied_head_loads(tmp_path):
  """A fresh transformers-5 MT5 ties lm_head to `shared` and saves no lm_head.weight."""
  m = make_hf_model(TINY, seed=3, untie=False)
  path = save_hf(m, tmp_path / 'tied')
  cfg, params = hf.load_hf_params(path)
  np.testing.assert_array_equal(params['decoder']['logits_dense']['kernel'],
                                params['token_embedder']['embedding'].T)
  assert_logits_match(m, cfg, params, TINY['vocab_size'])


def test_round_trip_is_bit_exact(tiny_hf, tiny_loaded):
  m, path = tiny_hf
  cfg, params = tiny_loaded
  exported = hf.to_hf_state_dict(params, cfg)
  saved = safetensors_numpy.load_file(os.path.join(path, hf.SAFE_WEIGHTS))
  assert sorted(exported) == sorted(saved)
  expected = {k: v.numpy() for k, v in m.state_dict().items() if k not in TIED_COPIES}
  assert sorted(exported) == sorted(expected)
  for name, value in exported.items():
    assert value.dtype == saved[name].dtype == np.float32, name
    assert value.shape == saved[name].shape, name
    assert np.array_equal(value, saved[name]) and np.array_equal(value, expected[name]), name


def _write_torch_bin(m, path: str, shards: int) -> None:
  """pytorch_model.bin (or `shards` shards + index), as transformers 4 wrote them.

  transformers 5's save_pretrained always writes safetensors (safe_serialization=False is
  gone), so the .bin layout is produced directly: the full state dict, tied copies included.
  """
  os.makedirs(path)
  m.config.save_pretrained(path)
  state = m.state_dict()
  if shards == 1:
    torch.save(state, os.path.join(path, hf.TORCH_WEIGHTS))
    return
  names = list(state)
  weight_map = {}
  for s in range(shards):
    part = names[s::shards]
    file = f'pytorch_model-{s + 1:05d}-of-{shards:05d}.bin'
    torch.save({k: state[k] for k in part}, os.path.join(path, file))
    weight_map.update({k: file for k in part})
  with open(os.path.join(path, hf.TORCH_INDEX), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)


@pytest.mark.parametrize('layout', ['sharded_safetensors', 'pytorch_bin', 'sharded_pytorch_bin'])
def test_other_file_layouts_load_identically(layout, tiny_hf, tiny_loaded, tmp_path):
  m, _ = tiny_hf
  path = str(tmp_path / layout)
  if layout == 'sharded_safetensors':
    save_hf(m, path, max_shard_size='50KB')
    assert os.path.exists(os.path.join(path, hf.SAFE_INDEX))
  else:
    _write_torch_bin(m, path, shards=1 if layout == 'pytorch_bin' else 3)
    # transformers itself accepts the directory, with the same weights.
    again = transformers.MT5ForConditionalGeneration.from_pretrained(path)
    assert torch.equal(again.lm_head.weight, m.lm_head.weight)
  assert hf.is_hf_checkpoint(path)
  cfg, params = hf.load_hf_params(path)
  assert cfg == tiny_loaded[0]
  want = tree_util.flatten(tiny_loaded[1])
  got = tree_util.flatten(params)
  assert sorted(got) == sorted(want)
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=p)


def test_bfloat16_safetensors_load_as_float32(tiny_hf, tmp_path):
  m16 = copy.deepcopy(tiny_hf[0]).to(torch.bfloat16)
  path = save_hf(m16, tmp_path / 'bf16')
  cfg, params = hf.load_hf_params(path)
  want = {k: v.float().numpy() for k, v in m16.state_dict().items() if k not in TIED_COPIES}
  for name, value in hf.to_hf_state_dict(params, cfg).items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, want[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# Errors and detection.


def test_shape_mismatch_names_parameter_and_shapes(tiny_hf):
  with pytest.raises(ValueError) as e:
    hf.load_hf_params(tiny_hf[1], get_config('mt5_tiny', emb_dim=64))
  msg = str(e.value)
  assert 'token_embedder/embedding' in msg and '(512, 32)' in msg and '(512, 64)' in msg


def test_layer_count_mismatch_is_explained(tiny_hf):
  with pytest.raises(ValueError, match='2 encoder and 2 decoder blocks'):
    hf.load_hf_params(tiny_hf[1], get_config('mt5_tiny', num_encoder_layers=1,
                                             num_decoder_layers=1))


def test_directory_without_weights(tiny_hf, tmp_path):
  path = tmp_path / 'no_weights'
  path.mkdir()
  shutil.copy(os.path.join(tiny_hf[1], hf.CONFIG_NAME), path)
  (path / 'spiece.model').write_bytes(b'')
  with pytest.raises(FileNotFoundError) as e:
    hf.load_hf_params(str(path))
  msg = str(e.value)
  assert 'config.json' in msg and 'spiece.model' in msg  # what was found
  assert hf.SAFE_WEIGHTS in msg and hf.TORCH_WEIGHTS in msg  # what is accepted


def test_missing_directory():
  with pytest.raises(FileNotFoundError, match='does not exist'):
    hf.load_hf_params('/nonexistent/hf_model_dir')
  assert not hf.is_hf_checkpoint('/nonexistent/hf_model_dir')


def test_missing_shard_is_named(tiny_hf, tmp_path):
  path = str(tmp_path / 'sharded')
  save_hf(tiny_hf[0], path, max_shard_size='50KB')
  with open(os.path.join(path, hf.SAFE_INDEX)) as f:
    shard = sorted(set(json.load(f)['weight_map'].values()))[0]
  os.remove(os.path.join(path, shard))
  with pytest.raises(FileNotFoundError, match=shard):
    hf.load_hf_params(path)


def _copy_with(tiny_dir: str, dest, extra: dict | None = None, config: dict | None = None) -> str:
  shutil.copytree(tiny_dir, dest)
  if extra:
    file = os.path.join(dest, hf.SAFE_WEIGHTS)
    tensors = safetensors_numpy.load_file(file)
    tensors.update(extra)
    safetensors_numpy.save_file(tensors, file)
  if config:
    file = os.path.join(dest, hf.CONFIG_NAME)
    with open(file) as f:
      data = json.load(f)
    data.update(config)
    with open(file, 'w') as f:
      json.dump(data, f)
  return str(dest)


def test_unexpected_key_is_reported(tiny_hf, tmp_path):
  path = _copy_with(tiny_hf[1], tmp_path / 'extra',
                    extra={'encoder.block.0.layer.1.DenseReluDense.wi.weight':
                           np.zeros((64, 32), np.float32)})
  with pytest.raises(ValueError, match=r'DenseReluDense\.wi\.weight.*T5 v1\.0'):
    hf.load_hf_params(path)


def test_untied_input_embedding_is_rejected(tiny_hf, tmp_path):
  path = _copy_with(tiny_hf[1], tmp_path / 'untied_in',
                    extra={'encoder.embed_tokens.weight': np.zeros((512, 32), np.float32)})
  with pytest.raises(ValueError, match='encoder.embed_tokens.weight differs'):
    hf.load_hf_params(path)


def test_untied_config_without_head_is_rejected(tmp_path):
  m = make_hf_model(TINY, seed=3, untie=False)  # saves no lm_head.weight
  path = _copy_with(save_hf(m, tmp_path / 'tied'), tmp_path / 'untied_no_head',
                    config={'tie_word_embeddings': False, 'transformers_version': '4.40.0'})
  with pytest.raises(ValueError, match='has no lm_head.weight'):
    hf.load_hf_params(path)


def test_relu_t5_config_is_rejected(tiny_hf, tmp_path):
  path = _copy_with(tiny_hf[1], tmp_path / 'relu', config={'feed_forward_proj': 'relu'})
  with pytest.raises(ValueError, match='gated-gelu'):
    hf.load_hf_params(path)


def test_rescaled_tied_t5_is_rejected(tiny_hf, tmp_path):
  path = _copy_with(tiny_hf[1], tmp_path / 't5_tied',
                    config={'model_type': 't5', 'tie_word_embeddings': True,
                            'transformers_version': '4.40.0'})
  with pytest.raises(ValueError, match=r'd_model\*\*-0\.5'):
    hf.load_hf_params(path)


def test_other_model_type_is_rejected(tiny_hf, tmp_path):
  path = _copy_with(tiny_hf[1], tmp_path / 'umt5', config={'model_type': 'umt5'})
  with pytest.raises(ValueError, match="model_type='umt5'"):
    hf.load_hf_params(path)


def test_is_hf_checkpoint(tiny_hf, tmp_path):
  assert hf.is_hf_checkpoint(tiny_hf[1])
  assert not hf.is_hf_checkpoint(str(tmp_path))
  assert not hf.is_hf_checkpoint(os.path.join(tiny_hf[1], hf.SAFE_WEIGHTS))
  assert not hf.is_hf_checkpoint('gs://bucket/model')


# ---------------------------------------------------------------------------------------------
# mT5-small shape (vocab 250112, d_model 512, 8 + 8 layers). Slow on CPU: building the
# 300M-parameter torch model takes ~20 s and transformers' generate ~1 s per step.


@pytest.mark.slow
def test_small_logits_match_transformers(small_hf):
  m, cfg, params = small_hf
  assert cfg.architecture() == get_config('mt5_small').architecture()
  assert_logits_match(m, cfg, params, SMALL['vocab_size'])


@pytest.mark.slow
def test_small_greedy_matches_transformers(small_hf):
  m, cfg, params = small_hf
  tokens = assert_greedy_matches(m, cfg, params, SMALL['vocab_size'], steps=40)
  assert not (tokens == EOS_ID).any()
