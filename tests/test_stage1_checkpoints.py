"""Stage 1 saves only what it trains: the prompt, its optimizer state, the data position and a
fingerprinted reference to the frozen base. Restoring rebuilds the whole model from the base;
a changed base is a clear error naming both fingerprints; resuming stage 1 is exact."""

import json
import os

import jax
import numpy as np
import pytest

from promot_jax import cli, tree_util
from promot_jax.checkpoints import loading, orbax_io, resolve

RUN = 'runs/promot_tiny_cpu.gin'


def flags(model_dir, base, *extra):
  return ['--gin_file', RUN, f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.INITIAL_CHECKPOINT_PATH='{base}'", '--stage', 'prompt_tuning',
          '--gin.PROMPT_CHECKPOINT_PERIOD=2', '--gin.EVAL_BATCHES=1',
          "--gin.KEEP_METRIC='validation/sequence_accuracy'", *extra]


def size_of(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope='module')
def base(tmp_path_factory, pretrained):
  """A copy of the pretrained checkpoint that a test may change."""
  path = str(tmp_path_factory.mktemp('base') / 'mt5_tiny')
  cfg = orbax_io.read_config(pretrained.path)
  orbax_io.save_params(path, pretrained.params, cfg)
  return path


@pytest.fixture(scope='module')
def stage1(tmp_path_factory, base):
  model_dir = tmp_path_factory.mktemp('run')
  assert cli.main(['train', *flags(model_dir, base, '--gin.TRAIN_STEPS=6')]) == 0
  return model_dir


def test_a_stage1_checkpoint_holds_the_prompt_and_a_reference_to_its_base(stage1, base,
                                                                         pretrained):
  ckpt = os.path.join(stage1, 'prompt_tuning', 'checkpoint_6')
  assert set(tree_util.flatten(orbax_io.param_shapes(ckpt))) == {'prompt/prompt'}
  meta = orbax_io.read_meta(ckpt)
  assert meta['base']['path'] == os.path.abspath(base)
  assert meta['base']['fingerprint'] == loading.fingerprint(base)
  full_model = size_of(base)
  print(f'stage-1 checkpoint {size_of(ckpt):,} bytes; the full tiny model {full_model:,} bytes')
  assert size_of(ckpt) < full_model / 4
  # restored, it is the base with the trained prompt: what eval, export and stage 2 see
  cfg, params = resolve.load_checkpoint(ckpt)
  flat = tree_util.flatten(jax.tree_util.tree_map(np.asarray, params))
  for path, value in tree_util.flatten(pretrained.params).items():
    np.testing.assert_array_equal(flat[path], value, err_msg=path)
  assert flat['prompt/prompt'].shape == (cfg.prompt_length, cfg.emb_dim)


def test_resuming_stage1_from_a_prompt_only_checkpoint_is_exact(stage1, base, tmp_path):
  straight = tmp_path / 'straight'
  assert cli.main(['train', *flags(straight, base, '--gin.TRAIN_STEPS=8')]) == 0
  resumed = tmp_path / 'resumed'
  assert cli.main(['train', *flags(resumed, base, '--gin.TRAIN_STEPS=4')]) == 0
  assert cli.main(['train', *flags(resumed, base, '--gin.TRAIN_STEPS=8')]) == 0
  a = orbax_io.restore_params(str(straight / 'prompt_tuning' / 'checkpoint_8'), as_numpy=True)
  b = orbax_io.restore_params(str(resumed / 'prompt_tuning' / 'checkpoint_8'), as_numpy=True)
  np.testing.assert_array_equal(a['prompt']['prompt'], b['prompt']['prompt'])


def test_a_changed_base_is_a_clear_error_naming_both_fingerprints(stage1, base, pretrained,
                                                                  capsys, tmp_path):
  ckpt = os.path.join(stage1, 'prompt_tuning', 'checkpoint_6')
  saved = orbax_io.read_meta(ckpt)['base']['fingerprint']
  changed = jax.tree_util.tree_map(lambda x: x + 1.0, pretrained.params)
  orbax_io.save_params(base, changed, orbax_io.read_config(base), overwrite=True)
  with pytest.raises(ValueError, match=f'not the one.*{saved[:16]}'):
    resolve.load_checkpoint(ckpt)
  # stage 2 from it stops before writing anything, with the same message
  model_dir = tmp_path / 'stage2'
  code = cli.main(['train', '--gin_file', RUN, f"--gin.MODEL_DIR='{model_dir}'",
                   f"--gin.PREVIOUS_CHECKPOINT_PATH='{ckpt}'", '--stage', 'model_tuning'])
  err = capsys.readouterr().err
  assert code == 2 and saved[:16] in err and 'fingerprint' in err
  assert not model_dir.exists()
  assert json.dumps(saved)   # (the saved fingerprint itself is untouched)
