"""A CPU smoke run: build a model, attach a soft prompt, run it and print what happened.

This is what a user runs on a laptop before renting a pod: it proves the install works and
shows the cost of one forward pass at a given size (random weights unless --checkpoint).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from promot_jax import tree_util
from promot_jax.checkpoints.loading import load_pretrained
from promot_jax.ginconf.parse import resolve_model
from promot_jax.model import decoding, prompt, transformer as model


def _gib(nbytes: int) -> str:
  return f'{nbytes / 2**30:.2f} GiB'


def run_smoke(model_name: str = 'mt5_small', prompt_length: int = 100, batch: int = 2,
              input_length: int = 64, target_length: int = 16, decode_length: int = 8,
              checkpoint: Optional[str] = None, seed: int = 0, log=print) -> dict[str, Any]:
  """Build, attach a prompt, run forward passes with and without it, decode; return a summary."""
  t0 = time.perf_counter()
  if checkpoint:
    cfg, params = load_pretrained(checkpoint)
    cfg = cfg.replace(prompt_length=prompt_length)
    source = checkpoint
  else:
    cfg = resolve_model(model_name).replace(prompt_length=prompt_length)
    params = model.init_params(cfg.base(), jax.random.PRNGKey(seed))
    source = f'{model_name} (random weights)'
  params = prompt.initialize_prompt(params, prompt_length, 'vocab', rng=jax.random.PRNGKey(seed))
  n_model = tree_util.count_params(prompt.without_prompt(params))
  n_prompt = int(np.prod(params['prompt']['prompt'].shape))
  log(f'model      {source}: {n_model / 1e6:.1f}M parameters '
      f'({_gib(4 * n_model)} float32), devices: {jax.devices()}')
  log(f'prompt     [{prompt_length}, {cfg.emb_dim}] = {n_prompt} parameters '
      f'({100 * n_prompt / n_model:.4f}% of the model); built in {time.perf_counter() - t0:.1f}s')

  rng = np.random.default_rng(seed)
  enc = rng.integers(2, cfg.vocab_size, (batch, input_length)).astype(np.int32)
  enc[:, -1] = 1                                                        # EOS
  enc[0, input_length // 2:] = 0                                        # a padded row
  dec_target = rng.integers(2, cfg.vocab_size, (batch, target_length)).astype(np.int32)
  dec_input = np.concatenate([np.zeros((batch, 1), np.int32), dec_target[:, :-1]], axis=1)

  summary: dict[str, Any] = {'model': source, 'num_params': n_model, 'prompt_params': n_prompt}
  logits = {}
  for with_prompt in (False, True):
    t = time.perf_counter()
    out = model.compute_logits(cfg, params, enc, dec_input, dec_target, with_prompt=with_prompt)
    out.block_until_ready()
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = model.compute_logits(cfg, params, enc, dec_input, dec_target, with_prompt=with_prompt)
    out.block_until_ready()
    run = time.perf_counter() - t
    logits[with_prompt] = np.asarray(out, np.float32)
    tokens = batch * (input_length + (prompt_length if with_prompt else 0) + target_length)
    label = 'with prompt   ' if with_prompt else 'without prompt'
    log(f'forward    {label}: logits {tuple(out.shape)}, compile+run {first:.2f}s, '
        f'run {run:.3f}s ({tokens / run:.0f} tokens/s)')
    summary[f'forward_s_{"prompt" if with_prompt else "plain"}'] = run

  encoded, valid = model.Transformer(cfg).apply({'params': params}, jnp.asarray(enc),
                                                with_prompt=True, method=model.Transformer.encode)
  log(f'encoder    mask length with prompt: {valid.shape[1]} = {prompt_length} prompt + '
      f'{input_length} input positions; encoded {tuple(encoded.shape)}')
  diff = float(np.abs(logits[True] - logits[False]).max())
  log(f'prompt     max |logits(with) - logits(without)| = {diff:.4f}')
  t = time.perf_counter()
  tokens = np.asarray(decoding.greedy_decode(cfg, params, enc, decode_length, with_prompt=True))
  log(f'decode     greedy {decode_length} tokens with prompt (cached): {tokens[0].tolist()} '
      f'in {time.perf_counter() - t:.2f}s incl. compile')
  summary.update(prompt_effect=diff, encoder_mask_length=int(valid.shape[1]),
                 logits_finite=bool(np.isfinite(logits[True]).all()), decoded=tokens.tolist())
  if not summary['logits_finite']:
    raise RuntimeError('The forward pass produced non-finite logits.')
  log('smoke run OK')
  return summary
