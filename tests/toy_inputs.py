"""Inputs shared by the step-level tests (also imported by their subprocess scripts)."""

import numpy as np

from promot_jax import tree_util
from promot_jax.model import transformer as model


def host_params(cfg, seed=0):
  """Float32 numpy parameters of the model's tree (what a checkpoint load hands the trainer).

  Drawn with numpy from the abstract tree: initialising through flax op by op costs more CPU time
  than a whole multi-device test.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path.endswith('/scale'):
      return np.ones(leaf.shape, np.float32)
    if path == 'prompt/prompt':
      return rng.uniform(-0.5, 0.5, leaf.shape).astype(np.float32)
    scale = 1.0 if path.endswith('embedding') else leaf.shape[0] ** -0.5
    return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  return tree_util.map_with_path(draw, model.abstract_params(cfg))


def toy_batch(seed=0, batch=4, inputs=12, targets=5, vocab=512):
  """A random batch in the feature converter's layout, with one short input and target."""
  rng = np.random.default_rng(seed)
  tgt = rng.integers(2, vocab, (batch, targets)).astype(np.int32)
  tgt[:, -1] = 1
  tgt[0, 3:] = 0                                        # one shorter target
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  enc = rng.integers(2, vocab, (batch, inputs)).astype(np.int32)
  enc[1, 6:] = 0                                        # one shorter input
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': tgt, 'decoder_loss_weights': (tgt > 0).astype(np.int32)}


def stage_dir(root, params, cfg, step=10, stage='model_tuning'):
  """MODEL_DIR/<stage> holding one promot_jax checkpoint and the kept.json that names it."""
  import json
  import os

  from promot_jax.checkpoints import orbax_io
  path = os.path.join(str(root), stage)
  ckpt = orbax_io.save_params(os.path.join(path, f'checkpoint_{step}'), params, cfg)
  with open(os.path.join(path, 'kept.json'), 'w') as f:
    json.dump({'path': ckpt, 'step': step}, f)
  return path
