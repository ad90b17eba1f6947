"""`promot demo`: the shipped pretrained model, the shortened pipeline end to end (slow), and
the reproduction of the shipped model by `promot demo --pretrain` (slow)."""

import json
import os

import pytest

from promot_jax import cli
from promot_jax.checkpoints import orbax_io
from promot_jax.ginconf import parse as gin_utils
from promot_jax.tools import demo

pytestmark = pytest.mark.filterwarnings('ignore')


def test_shipped_pretrained_model_matches_the_demo_architecture():
  assert orbax_io.is_orbax_checkpoint(demo.SHIPPED_PRETRAINED)
  cfg = orbax_io.read_config(demo.SHIPPED_PRETRAINED)
  expected = gin_utils.resolve_model('models/synth_tiny.gin')
  assert cfg.architecture() == expected.architecture()
  meta = orbax_io.read_meta(demo.SHIPPED_PRETRAINED)
  assert meta['gin_file'] == 'runs/demo/pretrain.gin' and 'validation' in meta


def test_missing_pretrained_model_is_a_clear_error(tmp_path, capsys):
  code = cli.main(['demo', '--pretrained', str(tmp_path / 'nope'), '--out_dir', str(tmp_path)])
  assert code == 2
  assert 'nope' in capsys.readouterr().err


@pytest.mark.slow
def test_shortened_demo_runs_every_part_and_writes_the_report(tmp_path):
  out = str(tmp_path / 'demo')
  assert cli.main(['demo', '--quick', '--pretrain', '--out_dir', out]) == 0
  report = json.load(open(os.path.join(out, 'results.json')))
  assert report['methods'] == ['Pretrained', 'Fine-tuning', 'Prompt tuning', 'ProMoT']
  assert report['finetuned_task'] == 'synth_has_a'
  assert report['shots'] == ['1shot', '4shot'] and len(report['tasks']) == 6
  for method in report['methods']:
    assert report['finetuned'][method]['score'] is not None
    assert report['finetuned'][method]['with_prompt'] == (method in ('Prompt tuning', 'ProMoT'))
    assert all(v is not None for v in report['norm_avg'][method].values())
  assert {'Fine-tuning', 'ProMoT'} <= set(report['histories'])
  text = open(os.path.join(out, 'report.md')).read()
  assert '**Norm. Avg.**' in text and 'Format specialization' in text
  assert os.path.getsize(os.path.join(out, 'report.png')) > 10_000
  # rerunning finds every part done and rebuilds the same report
  assert cli.main(['demo', '--quick', '--pretrain', '--out_dir', out]) == 0
  assert json.load(open(os.path.join(out, 'results.json')))['in_context'] == report['in_context']


@pytest.mark.slow
def test_pretrain_reproduces_the_shipped_model(tmp_path):
  """The full pretraining (runs/demo/pretrain.gin) from random weights gives the shipped model:
  bit-identical when nothing numeric has changed; on another CPU (XLA may order float sums
  differently) or after a numerically equivalent rewrite (the loss's custom gradient), its
  held-out in-context accuracy must match the shipped model's within 5 points."""
  run = demo.Demo(str(tmp_path / 'demo'))
  reproduced = run.pretrain()
  diff = demo.max_param_difference(reproduced, demo.SHIPPED_PRETRAINED)
  if diff != 0.0:
    shipped = orbax_io.read_meta(demo.SHIPPED_PRETRAINED)['validation']
    again = demo.validation_accuracy(reproduced)
    assert abs(again - shipped) <= 5.0, (diff, again, shipped)


@pytest.mark.slow
def test_demo_methods_add_lora_promot_and_multitask_promot_columns(tmp_path, capsys):
  out = str(tmp_path / 'demo')
  assert cli.main(['demo', '--quick', '--methods', 'lora,multitask', '--out_dir', out]) == 0
  report = json.load(open(os.path.join(out, 'results.json')))
  assert report['methods'] == ['Pretrained', 'Fine-tuning', 'Prompt tuning', 'ProMoT',
                               'LoRA-ProMoT (r=4)', 'Multi-task ProMoT']
  by_task = report['finetuned_by_task']
  assert by_task['synth_has_a']['LoRA-ProMoT (r=4)']['with_prompt']
  # multi-task ProMoT is scored on both of its tasks, each with its own prompt
  assert set(by_task['synth_sorted']) == {'Multi-task ProMoT'}
  assert by_task['synth_has_a']['Multi-task ProMoT']['with_prompt']
  for method in report['methods']:
    assert all(v is not None for v in report['norm_avg'][method].values())
  assert cli.main(['demo', '--methods', 'lora,bogus', '--out_dir', out]) == 2
  assert 'bogus' in capsys.readouterr().err
