"""`promot diagnose`: real vs target-shuffled ("format") gradient cosines.

The identity permutation must give cosine 1 for every kernel (the measure can tell when
nothing changed); shuffling random targets across the batch must give clearly less.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from toy_inputs import host_params, stage_dir as make_stage_dir, toy_batch

from promot_jax import cli
from promot_jax.model import config
from promot_jax.tools import diagnose

CFG = config.get_config('mt5_tiny', prompt_length=4, dropout_rate=0.0)


@pytest.fixture(scope='module')
def params():
  return host_params(CFG, seed=5)


@pytest.fixture(scope='module')
def batches():
  return [toy_batch(seed=s, batch=4, inputs=12, targets=5, vocab=CFG.vocab_size) for s in (0, 1)]


@pytest.fixture(scope='module')
def stage_dir(tmp_path_factory, params):
  """MODEL_DIR/model_tuning holding one checkpoint and its kept.json."""
  return make_stage_dir(tmp_path_factory.mktemp('run'), params, CFG, step=20)


def test_kernel_paths_name_the_last_decoder_layer():
  paths = diagnose.kernel_paths(CFG)
  assert len(paths) == 11 and paths['mlp/wo'] == 'decoder/layers_1/mlp/wo/kernel'
  assert paths['encoder_decoder_attention/query'] == (
      'decoder/layers_1/encoder_decoder_attention/query/kernel')
  assert diagnose.kernel_paths(CFG, 0)['self_attention/out'] == (
      'decoder/layers_0/self_attention/out/kernel')


def test_identity_permutation_gives_cosine_one(params, batches):
  identity = [np.arange(4)] * len(batches)
  found = diagnose.gradient_cosines(CFG, params, batches, identity, with_prompt=True)
  for kernel, value in found['cosine'].items():
    assert value == pytest.approx(1.0, abs=1e-9), kernel
  assert all(n > 0 for n in found['grad_norm']['real'].values())


def test_shuffled_targets_lower_the_cosine(params, batches):
  perms = [diagnose.shuffled_permutation(4, seed) for seed in range(len(batches))]
  found = diagnose.gradient_cosines(CFG, params, batches, perms, with_prompt=True)
  print({k: round(v, 4) for k, v in found['cosine'].items()})
  assert found['cosine']['overall'] < 0.9
  assert all(v < 0.99 for v in found['cosine'].values())
  # Same batches, the prompt off: a different model input, so different gradients.
  bare = diagnose.gradient_cosines(CFG, params, batches, perms, with_prompt=False)
  assert bare['grad_norm']['real']['mlp/wo'] != pytest.approx(
      found['grad_norm']['real']['mlp/wo'], rel=1e-3)


def test_shuffled_permutation_moves_every_row_and_is_seeded():
  perm = diagnose.shuffled_permutation(16, 3)
  assert sorted(perm) == list(range(16)) and not np.any(perm == np.arange(16))
  np.testing.assert_array_equal(perm, diagnose.shuffled_permutation(16, 3))
  with pytest.raises(ValueError, match='at least 2'):
    diagnose.shuffled_permutation(1, 0)


def test_bad_layer_and_checkpoint_are_clear_errors(stage_dir, tmp_path, batches):
  identity = [np.arange(4)] * len(batches)
  with pytest.raises(ValueError, match='No decoder layer 2: the model has 2 decoder layers'):
    diagnose.diagnose_checkpoint(stage_dir, batches, identity, layer=2)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    diagnose.diagnose_checkpoint(str(tmp_path / 'nope'), batches, identity)


def test_cli_errors_before_reading_data(stage_dir, tmp_path, capsys):
  base = ['diagnose', '--gin_file', 'runs/promot_tiny_cpu.gin']
  assert cli.main(base + ['--checkpoint', str(tmp_path / 'missing')]) == 2
  assert 'No checkpoint at' in capsys.readouterr().err
  assert cli.main(base + ['--checkpoint', stage_dir, '--layer', '-3']) == 2
  assert 'No decoder layer -3' in capsys.readouterr().err


def test_cli_writes_table_and_json(stage_dir, tmp_path, capsys):
  out = tmp_path / 'diag.json'
  code = cli.main(['diagnose', '--gin_file', 'runs/promot_tiny_cpu.gin', '--checkpoint',
                   stage_dir, '--num_batches', '1', '--json', str(out), '--gin.BATCH_SIZE=4',
                   # the shapes of toy_batch above: the compiled gradient program is reused
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 12, 'targets': 5}"])
  assert code == 0
  printed = capsys.readouterr().out
  assert 'encoder_decoder_attention/value' in printed and 'overall' in printed
  result = json.loads(out.read_text())
  assert result['data']['task'] == 'toy_sorted' and result['data']['batch_size'] == 4
  assert result['data']['task_feature_lengths'] == {'inputs': 12, 'targets': 5}
  entry = result['checkpoints'][0]
  assert entry['with_prompt'] and entry['layer'] == 1
  assert entry['resolved'].endswith('checkpoint_20')
  assert set(entry['cosine']) == set(diagnose.LAYER_KERNELS) | {'overall'}
  assert all(-1.0 <= v <= 1.0 + 1e-9 for v in entry['cosine'].values())
