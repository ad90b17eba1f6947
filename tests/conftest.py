"""Shared fixtures: tiny configs and parameters (tests never download anything)."""

import dataclasses
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from promot_jax.checkpoints import orbax_io  # noqa: E402
from promot_jax.model import config, transformer as model  # noqa: E402


@pytest.fixture(scope='session')
def tiny_config():
  return config.get_config('mt5_tiny', dropout_rate=0.0)


@pytest.fixture(scope='session')
def tiny_prompt_config(tiny_config):
  return tiny_config.replace(prompt_length=5)


@pytest.fixture(scope='session')
def tiny_params(tiny_prompt_config):
  """Random tiny-model parameters including a 5-vector prompt."""
  return model.init_params(tiny_prompt_config, jax.random.PRNGKey(42))


@dataclasses.dataclass(frozen=True)
class Pretrained:
  path: str      # an orbax checkpoint of the tiny model: a run's INITIAL_CHECKPOINT_PATH
  params: dict   # the same parameters as numpy arrays


@pytest.fixture(scope='session')
def pretrained(tmp_path_factory) -> Pretrained:
  """A converted (orbax) tiny mT5 checkpoint with random weights, shared by the run tests."""
  path = str(tmp_path_factory.mktemp('pretrained') / 'mt5_tiny')
  cfg = config.get_config('mt5_tiny')
  params = jax.tree_util.tree_map(np.asarray, model.init_params(cfg, jax.random.PRNGKey(1)))
  orbax_io.save_params(path, params, cfg, {'source': 'test'})
  return Pretrained(path, params)
