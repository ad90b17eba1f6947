"""`promot convert`, `promot info` and `promot smoke` as a user runs them."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from promot_jax import cli, tree_util
from promot_jax.checkpoints import orbax_io, t5x
from promot_jax.model import transformer as model


def run_cli(*args):
  return cli.main([str(a) for a in args])


@pytest.fixture(scope='module')
def t5x_dir(tmp_path_factory, tiny_config):
  params = model.init_params(tiny_config, jax.random.PRNGKey(7))
  params = jax.tree_util.tree_map(np.asarray, params)
  root = tmp_path_factory.mktemp('t5x_model')
  path = t5x.write_t5x_checkpoint(params, str(root / 'checkpoint_1000'), step=1000)
  return path, params, root


def test_convert_t5x_to_orbax_is_bit_exact(t5x_dir, tmp_path, capsys):
  src, params, _ = t5x_dir
  dst = tmp_path / 'converted'
  assert run_cli('convert', '--from', 't5x', '--src', src, '--dst', dst, '--model', 'mt5_tiny') == 0
  assert 'wrote' in capsys.readouterr().out
  restored = orbax_io.restore_params(str(dst), as_numpy=True)
  got, want = tree_util.flatten(restored), tree_util.flatten(params)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  meta = orbax_io.read_meta(str(dst))
  assert meta['source_format'] == 't5x' and meta['config']['emb_dim'] == 32
  # refusing to overwrite keeps what is there
  before = sorted(os.listdir(dst))
  assert run_cli('convert', '--src', src, '--dst', dst) == 2
  assert 'already holds a checkpoint' in capsys.readouterr().err
  assert sorted(os.listdir(dst)) == before


def test_convert_auto_detects_and_infers_config(t5x_dir, tmp_path):
  src, params, _ = t5x_dir
  assert run_cli('convert', '--src', src, '--dst', tmp_path / 'auto') == 0
  cfg = orbax_io.read_config(str(tmp_path / 'auto'))
  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (512, 32, 4, 8, 64)


def test_info_reports_tree_count_and_prompt(t5x_dir, tmp_path, capsys):
  src, params, _ = t5x_dir
  assert run_cli('info', src, '--json') == 0
  info = json.loads(capsys.readouterr().out)
  assert info['format'] == 't5x' and info['has_prompt'] is False
  assert info['num_params'] == tree_util.count_params(params)
  assert info['tree']['encoder/layers_0/attention/query/kernel'][0] == [32, 32]
  # a promot checkpoint with a prompt
  with_prompt = dict(params, prompt={'prompt': np.ones((5, 32), np.float32)})
  from promot_jax.model import config
  orbax_io.save_params(str(tmp_path / 'p'), with_prompt, config.get_config('mt5_tiny',
                                                                          prompt_length=5))
  assert run_cli('info', tmp_path / 'p') == 0
  out = capsys.readouterr().out
  assert 'prompt:     yes (5, 32)' in out and 'parameters: ' in out


def test_bad_inputs_are_clear_errors(t5x_dir, tmp_path, capsys):
  src, _, root = t5x_dir
  (tmp_path / 'junk').mkdir()
  (tmp_path / 'junk' / 'notes.txt').write_text('hi')
  assert run_cli('info', tmp_path / 'junk') == 2
  assert 'is not a checkpoint promot_jax can read' in capsys.readouterr().err
  assert run_cli('info', tmp_path / 'nowhere') == 2
  assert 'does not exist' in capsys.readouterr().err
  # shape mismatch names the parameter and both shapes
  assert run_cli('convert', '--src', src, '--dst', tmp_path / 'x', '--model', 'mt5_small') == 2
  err = capsys.readouterr().err
  assert 'token_embedder/embedding' in err and '(512, 32)' in err and '(250112, 512)' in err
  assert not (tmp_path / 'x').exists()
  # a t5x model dir instead of a checkpoint_<step> dir
  assert run_cli('info', root) == 2
  assert 'checkpoint_1000' in capsys.readouterr().err


def test_smoke_command_runs_tiny_model(tmp_path):
  out = tmp_path / 'smoke.json'
  proc = subprocess.run([sys.executable, '-m', 'promot_jax.cli', 'smoke', '--model', 'mt5_tiny',
                         '--prompt_length', '4', '--input_length', '16', '--json', str(out)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert 'smoke run OK' in proc.stdout
  summary = json.loads(out.read_text())
  assert summary['encoder_mask_length'] == 4 + 16
  assert summary['prompt_effect'] > 0 and summary['logits_finite']
