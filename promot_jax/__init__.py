"""promot_jax: ProMoT two-stage fine-tuning (soft prompt, then model) for mT5 in JAX/Flax.

The stable Python API (see README, "Python API"):
  get_config, config_from_hf, T5Config     model configurations
  load_pretrained, load_hf, load_t5x       weights from HF / t5x / promot_jax checkpoints
  init_params, abstract_params             random or shape-only parameters
  compute_logits, greedy_decode            run the model, with or without the prompt
  initialize_prompt, save_prompt_npy, load_prompt_npy
  initialize_lora, without_modules         LoRA adapters; the base network without any module
"""

__version__ = '0.1.0'

from promot_jax.checkpoints.loading import load_pretrained
from promot_jax.model.config import T5Config, config_from_hf, get_config
from promot_jax.model.decoding import greedy_decode
from promot_jax.model.formats import without_modules
from promot_jax.model.lora import initialize_lora
from promot_jax.model.prompt import initialize_prompt, load_prompt_npy, save_prompt_npy
from promot_jax.model.transformer import abstract_params, compute_logits, init_params


def load_hf(path: str, config: 'T5Config | None' = None):
  """(config, params) from a Hugging Face MT5/T5 v1.1 directory."""
  return load_pretrained(path, config, fmt='hf')


def load_t5x(path: str, config: 'T5Config | None' = None):
  """(config, params) from a t5x checkpoint directory (local or gs://)."""
  return load_pretrained(path, config, fmt='t5x')
