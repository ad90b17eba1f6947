"""Soft-prompt initialisers and .npy import/export."""

import jax
import numpy as np
import pytest

from promot_jax.model import prompt, transformer as model


@pytest.fixture(scope='module')
def base_params(tiny_config):
  return model.init_params(tiny_config, jax.random.PRNGKey(3))  # no prompt in the tree


def test_pretrained_tree_has_no_prompt_and_initialize_adds_it(base_params):
  assert not prompt.has_prompt(base_params)
  params = prompt.initialize_prompt(base_params, 7, 'uniform', rng=jax.random.PRNGKey(0),
                                    scale=0.25)
  value = prompt.get_prompt(params)
  assert value.shape == (7, 32)
  assert np.abs(value).max() <= 0.25 and value.std() > 0.05
  # every other parameter is the very same array
  for k in base_params:
    assert params[k] is base_params[k]


def test_vocab_init_copies_embedding_rows(base_params):
  params = prompt.initialize_prompt(base_params, 6, 'vocab', rng=jax.random.PRNGKey(1),
                                    vocab_top_k=100)
  table = np.asarray(base_params['token_embedder']['embedding'])
  for row in prompt.get_prompt(params):
    matches = np.where((table[:100] == row).all(axis=1))[0]
    assert len(matches) == 1


def test_class_label_init_averages_subtokens(base_params):
  labels = [[10, 11, 12], [40]]
  params = prompt.initialize_prompt(base_params, 4, 'class_labels', rng=jax.random.PRNGKey(2),
                                    class_label_ids=labels)
  table = np.asarray(base_params['token_embedder']['embedding'])
  value = prompt.get_prompt(params)
  np.testing.assert_allclose(value[0], table[[10, 11, 12]].mean(0), rtol=1e-6)
  np.testing.assert_allclose(value[1], table[40], rtol=1e-6)
  with pytest.raises(ValueError, match='outside the vocabulary'):
    prompt.initialize_prompt(base_params, 4, 'class_labels', class_label_ids=[[10**6]])
  with pytest.raises(ValueError, match='needs class_label_ids'):
    prompt.initialize_prompt(base_params, 4, 'class_labels')


def test_npy_export_import_round_trip(base_params, tmp_path):
  params = prompt.initialize_prompt(base_params, 5, 'uniform', rng=jax.random.PRNGKey(4))
  path = prompt.save_prompt_npy(params, tmp_path / 'sub' / 'prompt.npy')
  again = prompt.initialize_prompt(base_params, 5, 'file', path=path)
  np.testing.assert_array_equal(prompt.get_prompt(again), prompt.get_prompt(params))
  with pytest.raises(ValueError, match='has shape \\(5, 32\\).*PROMPT_LENGTH'):
    prompt.load_prompt_npy(path, 100, 32)
  with pytest.raises(FileNotFoundError):
    prompt.load_prompt_npy(tmp_path / 'missing.npy', 5, 32)


def test_unknown_initialiser_and_missing_prompt_are_clear(base_params):
  with pytest.raises(ValueError, match='Unknown prompt initialiser'):
    prompt.initialize_prompt(base_params, 5, 'zeros')
  with pytest.raises(ValueError, match='no soft prompt'):
    prompt.get_prompt(base_params)
