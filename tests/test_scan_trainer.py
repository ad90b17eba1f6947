"""`SCAN_LAYERS = True` in a run file: the trainer runs both stages with nn.scan over the layers
and trains exactly what the unrolled run trains; its checkpoints keep the t5x tree, so a scanned
run resumes unrolled and the reverse, and evaluation reads them unchanged.

The step-level equivalence (losses, parameters, per-layer Adafactor state) is in
tests/test_scan_training.py; these run `promot train`/`promot run` as a user does. The
multi-process scanned run is in tests/test_pod_rehearsal.py.
"""

import json
import os

import numpy as np
import pytest

from promot_jax import cli, tree_util
from promot_jax.checkpoints import orbax_io, resolve

RUN = 'runs/promot_tiny_cpu.gin'
STEPS = ['--gin.EVAL_BATCHES=1', '--gin.LOG_EVERY=1',
         "--gin.KEEP_METRIC='validation/sequence_accuracy'",
         '--gin.PROMPT_CHECKPOINT_PERIOD=2', '--gin.MODEL_CHECKPOINT_PERIOD=2']
SCANNED = ['--gin.SCAN_LAYERS=True']


def flags(model_dir, *extra):
  return ['--gin_file', RUN, f"--gin.MODEL_DIR='{model_dir}'", *STEPS, *extra]


def losses(model_dir, stage):
  """{step: (training loss, validation loss)} at each checkpoint of the stage."""
  stage_dir = os.path.join(model_dir, stage)
  with open(os.path.join(stage_dir, 'metrics.jsonl')) as f:
    validation = {r['step']: r['validation/loss'] for r in map(json.loads, f)}
  out = {}
  for step in validation:
    with open(os.path.join(stage_dir, f'checkpoint_{step}', 'state.json')) as f:
      out[step] = (json.load(f)['train_metrics']['loss'], validation[step])
  return out


def params_at(model_dir, stage, step):
  return tree_util.flatten(orbax_io.restore_params(
      os.path.join(model_dir, stage, f'checkpoint_{step}'), as_numpy=True))


def assert_close(a, b, what):
  assert a.keys() == b.keys(), what
  for path in a:
    np.testing.assert_allclose(b[path], a[path], rtol=1e-5, atol=1e-6, err_msg=f'{what} {path}')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{'unrolled'|'scanned': MODEL_DIR} of the two-stage tiny run, 4 + 4 steps."""
  out = {}
  for name, extra in (('unrolled', []), ('scanned', SCANNED)):
    out[name] = str(tmp_path_factory.mktemp(name))
    assert cli.main(['run', *flags(out[name], '--gin.PROMPT_TUNING_STEPS=4',
                                   '--gin.MODEL_TUNING_STEPS=4', *extra)]) == 0
  return out


@pytest.mark.parametrize('stage', ['prompt_tuning', 'model_tuning'])
def test_a_scanned_run_trains_like_the_unrolled_run(runs, stage):
  a, b = losses(runs['unrolled'], stage), losses(runs['scanned'], stage)
  assert sorted(a) == [2, 4] and a.keys() == b.keys()
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  assert_close(params_at(runs['unrolled'], stage, 4), params_at(runs['scanned'], stage, 4), stage)


def test_scanned_checkpoints_hold_the_t5x_tree_that_eval_reads(runs):
  ckpt = os.path.join(runs['scanned'], 'model_tuning', 'checkpoint_4')
  stored = tree_util.flatten(orbax_io.param_shapes(ckpt))
  assert 'encoder/layers_0/mlp/wi_0/kernel' in stored
  assert not any(p.startswith(('encoder/layers/', 'decoder/layers/')) for p in stored)
  cfg, params = resolve.load_checkpoint(ckpt)
  assert not cfg.scan_layers
  assert tree_util.flatten(params).keys() == stored.keys()


@pytest.mark.parametrize('stage,first,then', [
    ('prompt_tuning', SCANNED, []),     # scanned stage 1 resumed unrolled
    ('model_tuning', [], SCANNED),      # unrolled stage 2 resumed scanned
])
def test_a_run_resumes_across_layouts(runs, tmp_path, stage, first, then):
  """Stopped after 2 steps in one layout, finished in the other: the same 4-step result
  (parameters and the optimizer state that the resumed steps used)."""
  model_dir = str(tmp_path / 'switched')
  if stage == 'model_tuning':   # stage 1 as in the reference runs, then stage 2 switched
    assert cli.main(['train', *flags(model_dir, '--gin.PROMPT_TUNING_STEPS=4', '--stage',
                                     'prompt_tuning')]) == 0
  steps = {'prompt_tuning': '--gin.PROMPT_TUNING_STEPS', 'model_tuning': '--gin.MODEL_TUNING_STEPS'}
  common = ['--gin.PROMPT_TUNING_STEPS=4', '--stage', stage]
  assert cli.main(['train', *flags(model_dir, *common, f'{steps[stage]}=2', *first)]) == 0
  assert cli.main(['train', *flags(model_dir, *common, f'{steps[stage]}=4', *then)]) == 0
  assert sorted(losses(model_dir, stage)) == [2, 4]
  np.testing.assert_allclose(losses(model_dir, stage)[4], losses(runs['unrolled'], stage)[4],
                             rtol=1e-5)
  assert_close(params_at(runs['unrolled'], stage, 4), params_at(model_dir, stage, 4), stage)
