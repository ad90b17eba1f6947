"""The soft prompt: its module, its initialisers and its .npy import/export.

The prompt is a [prompt_length, emb_dim] parameter at `prompt/prompt` in the model tree,
prepended to the encoder's embedded input. Pretrained checkpoints never hold it, so stage 1
creates it with `initialize_prompt` from one of four initialisers:

- 'uniform': U(-scale, scale) (scale 0.5 by default, the prompt-tuning convention);
- 'vocab': rows of the token embedding table sampled from the first `vocab_top_k` ids;
- 'class_labels': the mean sub-token embedding of each class label, the rest from 'vocab';
- 'file': a .npy file of shape [prompt_length, emb_dim].
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from promot_jax.model.layers import logical_param

Array = jax.Array
PROMPT_AXES = ('prompt', 'prompt_embed')


def uniform_init(scale: float = 0.5) -> Callable[..., Array]:
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, minval=-scale, maxval=scale)
  return init


class SoftPrompt(nn.Module):
  """Owns the prompt parameter and prepends it to embedded inputs, extending the mask."""
  length: int
  dtype: Any = jnp.float32
  init_scale: float = 0.5

  @nn.compact
  def __call__(self, embedded: Array, valid: Array) -> tuple[Array, Array]:
    # embedded [batch, length, embed]; valid [batch, length] (bool)
    batch, _, emb = embedded.shape
    prompt = logical_param(self, 'prompt', uniform_init(self.init_scale), (self.length, emb), PROMPT_AXES)
    prompt = jnp.broadcast_to(jnp.asarray(prompt, embedded.dtype)[None], (batch, self.length, emb))
    x = jnp.concatenate([prompt, embedded], axis=1)            # [batch, prompt + length, embed]
    mask = jnp.concatenate([jnp.ones((batch, self.length), jnp.bool_), valid], axis=1)
    return x, mask


def has_prompt(params: Mapping[str, Any]) -> bool:
  return 'prompt' in params and 'prompt' in params['prompt']


def get_prompt(params: Mapping[str, Any]) -> np.ndarray:
  if not has_prompt(params):
    raise ValueError('These parameters hold no soft prompt (no prompt/prompt). Train one with the '
                     'prompt_tuning stage or import one with promot_jax.model.prompt.load_prompt_npy.')
  return np.asarray(params['prompt']['prompt'])


def with_prompt_value(params: Mapping[str, Any], prompt: Array) -> dict[str, Any]:
  """A shallow copy of `params` whose prompt/prompt is `prompt` (other leaves shared)."""
  out = dict(params)
  out['prompt'] = {'prompt': prompt}
  return out


def without_prompt(params: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in params.items() if k != 'prompt'}


def npy_bytes(params: Mapping[str, Any]) -> bytes:
  """The prompt as the bytes of a float32 [prompt_length, emb_dim] .npy file."""
  buffer = io.BytesIO()
  np.save(buffer, get_prompt(params).astype(np.float32))
  return buffer.getvalue()


def save_prompt_npy(params: Mapping[str, Any], path: str | os.PathLike) -> str:
  """Write the prompt as a float32 [prompt_length, emb_dim] .npy file; returns the path."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.save(path, get_prompt(params).astype(np.float32))
  return path


def load_prompt_npy(path: str | os.PathLike, prompt_length: int, emb_dim: int) -> np.ndarray:
  """Read a .npy prompt and check it has the model's shape."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No prompt file at {path}')
  value = np.load(path)
  if value.shape != (prompt_length, emb_dim):
    raise ValueError(f'Prompt file {path} has shape {value.shape}; the model config expects '
                     f'[prompt_length, emb_dim] = {(prompt_length, emb_dim)}. Set PROMPT_LENGTH '
                     f'to {value.shape[0]} or use a prompt made for this model.')
  return value.astype(np.float32)


def initialize_prompt(params: Mapping[str, Any], prompt_length: int, method: str = 'uniform', *,
                      rng: Optional[Array] = None, scale: float = 0.5, vocab_top_k: int = 5000,
                      class_label_ids: Optional[Sequence[Sequence[int]]] = None,
                      path: Optional[str] = None) -> dict[str, Any]:
  """Return `params` with a freshly initialised prompt (other parameters untouched).

  `class_label_ids` are the token ids of each class label (e.g. the sentencepiece pieces of
  'True' and 'False'); each label's prompt row is the mean of its sub-token embeddings.
  """
  table = np.asarray(params['token_embedder']['embedding'])           # [vocab, embed]
  vocab, emb = table.shape
  rng = jax.random.PRNGKey(0) if rng is None else rng
  shape = (prompt_length, emb)
  if method == 'uniform':
    value = np.asarray(uniform_init(scale)(rng, shape))
  elif method in ('vocab', 'class_labels'):
    top_k = min(vocab_top_k, vocab)
    rows = np.asarray(jax.random.choice(rng, top_k, (prompt_length,), replace=top_k < prompt_length))
    value = table[rows].copy()
    if method == 'class_labels':
      if not class_label_ids:
        raise ValueError("prompt init 'class_labels' needs class_label_ids (token ids per label).")
      for i, ids in enumerate(list(class_label_ids)[:prompt_length]):
        ids = np.asarray(ids, np.int64)
        if ids.size == 0 or ids.max() >= vocab or ids.min() < 0:
          raise ValueError(f'Class label {i} has token ids {ids.tolist()} outside the '
                           f'vocabulary of size {vocab}.')
        value[i] = table[ids].mean(axis=0)
  elif method == 'file':
    if not path:
      raise ValueError("prompt init 'file' needs path=<.npy file>.")
    value = load_prompt_npy(path, prompt_length, emb)
  else:
    raise ValueError(f'Unknown prompt initialiser {method!r}; choose uniform, vocab, '
                     'class_labels or file.')
  return with_prompt_value(params, jnp.asarray(value, jnp.float32))
