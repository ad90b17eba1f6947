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
  """Owns the prompt parameter(s) and prepends one to embedded inputs, extending the mask.

  With `tasks` there is one prompt per task (prompt/<task>); each row gets the prompt its
  `prompt_ids` entry names (the index into `tasks`), so one batch may mix tasks.
  """
  length: int
  dtype: Any = jnp.float32
  init_scale: float = 0.5
  tasks: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, embedded: Array, valid: Array,
               prompt_ids: Optional[Array] = None) -> tuple[Array, Array]:
    # embedded [batch, length, embed]; valid [batch, length] (bool); prompt_ids [batch]
    batch, _, emb = embedded.shape
    shape, init = (self.length, emb), uniform_init(self.init_scale)
    if not self.tasks:
      prompt = logical_param(self, 'prompt', init, shape, PROMPT_AXES)
      prompt = jnp.broadcast_to(jnp.asarray(prompt, embedded.dtype)[None], (batch,) + shape)
    else:
      if prompt_ids is None:
        raise ValueError(f'The model has one prompt per task {list(self.tasks)}: pass '
                         'prompt_ids [batch] (the index of each row\'s task), or select one '
                         'task\'s prompt with promot_jax.model.prompt.select_task_prompt.')
      table = jnp.stack([logical_param(self, task, init, shape, PROMPT_AXES)
                         for task in self.tasks])             # [tasks, prompt, embed]
      prompt = jnp.take(jnp.asarray(table, embedded.dtype), prompt_ids, axis=0)
    x = jnp.concatenate([prompt, embedded], axis=1)            # [batch, prompt + length, embed]
    mask = jnp.concatenate([jnp.ones((batch, self.length), jnp.bool_), valid], axis=1)
    return x, mask


def has_prompt(params: Mapping[str, Any]) -> bool:
  """Whether `params` hold a prompt (the single prompt/prompt or any task's prompt/<task>)."""
  return isinstance(params.get('prompt'), Mapping) and bool(params['prompt'])


def prompt_names(params: Mapping[str, Any]) -> list[str]:
  """The names under prompt/: ['prompt'] for a single prompt, the task names for per-task ones."""
  return sorted(params['prompt']) if has_prompt(params) else []


def get_prompt(params: Mapping[str, Any], task: Optional[str] = None) -> np.ndarray:
  """The single prompt, or with `task` that task's prompt ([prompt_length, emb_dim])."""
  if not has_prompt(params):
    raise ValueError('These parameters hold no soft prompt (no prompt/prompt). Train one with the '
                     'prompt_tuning stage or import one with promot_jax.model.prompt.load_prompt_npy.')
  name = task or 'prompt'
  if name not in params['prompt']:
    raise ValueError(f'These parameters hold no prompt {name!r}; their prompts are '
                     f'{prompt_names(params)}' + ('' if task else ' (one per task: name the task)')
                     + '.')
  return np.asarray(params['prompt'][name])


def select_task_prompt(cfg, params: Mapping[str, Any], task: str) -> tuple[Any, dict[str, Any]]:
  """(config, params) of the single-prompt model that attaches `task`'s own prompt.

  A model with one prompt per task decodes one task at a time with that task's prompt: the
  result is an ordinary single-prompt model (prompt/prompt = prompt/<task>), so decoding,
  scoring and export need no routing. A config without `prompt_tasks` is returned as it is.
  """
  if not cfg.prompt_tasks:
    return cfg, dict(params)
  if task not in cfg.prompt_tasks:
    raise ValueError(f'No prompt for task {task!r}: the model has prompts for '
                     f'{list(cfg.prompt_tasks)}.')
  out = with_prompt_value(params, params['prompt'][task]) if has_prompt(params) else dict(params)
  return cfg.replace(prompt_tasks=()), out


def with_prompt_value(params: Mapping[str, Any], prompt: Array) -> dict[str, Any]:
  """A shallow copy of `params` whose prompt/prompt is `prompt` (other leaves shared)."""
  out = dict(params)
  out['prompt'] = {'prompt': prompt}
  return out


def without_prompt(params: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in params.items() if k != 'prompt'}


def npy_bytes(params: Mapping[str, Any], task: Optional[str] = None) -> bytes:
  """The prompt (or `task`'s) as the bytes of a float32 [prompt_length, emb_dim] .npy file."""
  buffer = io.BytesIO()
  np.save(buffer, get_prompt(params, task).astype(np.float32))
  return buffer.getvalue()


def npy_files(params: Mapping[str, Any]) -> dict[str, bytes]:
  """{file name: .npy bytes} of every prompt: prompt.npy, or prompt_<task>.npy per task."""
  return {('prompt.npy' if name == 'prompt' else f'prompt_{name}.npy'):
          npy_bytes(params, None if name == 'prompt' else name) for name in prompt_names(params)}


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
                      path: Optional[str] = None,
                      tasks: Sequence[str] = ()) -> dict[str, Any]:
  """Return `params` with a freshly initialised prompt (other parameters untouched).

  `class_label_ids` are the token ids of each class label (e.g. the sentencepiece pieces of
  'True' and 'False'); each label's prompt row is the mean of its sub-token embeddings.
  With `tasks`, each named task's prompt/<task> is initialised (each from its own key) and
  the prompts already present are kept.
  """
  if tasks:
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out = dict(params)
    prompts = dict(params.get('prompt') or {})
    for i, task in enumerate(tasks):
      if task not in prompts:
        prompts[task] = initialize_prompt(
            params, prompt_length, method, rng=jax.random.fold_in(rng, i), scale=scale,
            vocab_top_k=vocab_top_k, class_label_ids=class_label_ids, path=path)['prompt']['prompt']
    out['prompt'] = prompts
    return out
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
