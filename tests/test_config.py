"""Model configs: published sizes, gin model files, HF config.json, shape inference."""

import json

import pytest

from promot_jax import tree_util
from promot_jax.checkpoints import loading
# Published parameter counts (mT5 paper; T5 v1.1 release), in millions, with the tolerance
from promot_jax.ginconf import parse as gin_utils
from promot_jax.model import config, transformer as model

# of how they are quoted (~300M, ~580M, ~1.2B, ~3.7B, ~13B).
PUBLISHED_M = {
    'mt5_small': (300, 0.02), 'mt5_base': (580, 0.02), 'mt5_large': (1200, 0.05),
    'mt5_xl': (3700, 0.03), 'mt5_xxl': (13000, 0.03),
    't5_1_1_small': (77, 0.03), 't5_1_1_base': (248, 0.03), 't5_1_1_large': (783, 0.03),
    't5_1_1_xl': (2850, 0.03), 't5_1_1_xxl': (11100, 0.03),
}


@pytest.mark.parametrize('name', sorted(PUBLISHED_M))
def test_parameter_counts_match_published_sizes(name):
  # jax.eval_shape: no memory is allocated even for XXL.
  count = tree_util.count_params(model.abstract_params(config.get_config(name)))
  published, tol = PUBLISHED_M[name]
  assert abs(count / 1e6 - published) / published <= tol, (name, count)


def test_prompt_adds_exactly_its_parameters():
  base = tree_util.count_params(model.abstract_params(config.get_config('mt5_xxl')))
  with_prompt = tree_util.count_params(
      model.abstract_params(config.get_config('mt5_xxl', prompt_length=100)))
  assert with_prompt - base == 100 * 4096


@pytest.mark.parametrize('name', sorted(config.CONFIGS))
def test_gin_model_file_gives_the_named_config(name):
  gin_utils.parse_gin([f'models/{name}.gin'], ['PROMPT_LENGTH = 100', 'DROPOUT_RATE = 0.1'])
  assert gin_utils.macro('MODEL_CONFIG') == config.get_config(name, prompt_length=100,
                                                              dropout_rate=0.1)


def test_gin_typo_is_a_clear_error():
  with pytest.raises(ValueError, match="doesn't have a parameter named 'emb_dimm'"):
    gin_utils.parse_gin(['models/mt5_tiny.gin'], ['config.T5Config.emb_dimm = 3'])
  with pytest.raises(FileNotFoundError, match='not found'):
    gin_utils.parse_gin(['models/mt5_nope.gin'])


def test_unknown_config_name_lists_choices():
  with pytest.raises(ValueError, match='mt5_small'):
    config.get_config('mt5_smal')


def test_config_from_hf_reads_t5_v1_1_and_rejects_relu(tmp_path):
  hf = {'vocab_size': 250112, 'd_model': 512, 'd_kv': 64, 'd_ff': 1024, 'num_layers': 8,
        'num_decoder_layers': 8, 'num_heads': 6, 'feed_forward_proj': 'gated-gelu',
        'tie_word_embeddings': False, 'dropout_rate': 0.1}
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  assert config.config_from_hf(tmp_path) == config.get_config('mt5_small')
  assert config.config_from_hf(config.config_to_hf(config.get_config('mt5_xl'))) == \
      config.get_config('mt5_xl')
  with pytest.raises(ValueError, match='gated-gelu'):
    config.config_from_hf({**hf, 'feed_forward_proj': 'relu'})
  # transformers 5 writes tie_word_embeddings=true into every MT5 config: not a rejection
  assert config.config_from_hf({**hf, 'tie_word_embeddings': True}) == config.get_config('mt5_small')


@pytest.mark.parametrize('name', ['mt5_tiny', 'mt5_xxl', 't5_1_1_base'])
def test_config_inferred_from_parameter_shapes(name):
  cfg = config.get_config(name, prompt_length=20)
  inferred = loading.config_from_params(model.abstract_params(cfg))
  assert inferred.architecture() == cfg.architecture()
