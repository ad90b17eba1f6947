"""`promot demo`: the shipped pretrained model, the shortened pipeline end to end (slow), and
the reproduction of the shipped model by `promot demo --pretrain` (slow)."""

import json
import os

import jax
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


# A few steps of every part, a few eval examples, the 1-shot tasks: what CI can afford to run
# several times.
TINY = ['--gin.FINETUNE_STEPS=4', '--gin.PROMPT_TUNING_STEPS=4', '--gin.MODEL_TUNING_STEPS=4',
        '--gin.MODEL_CHECKPOINT_PERIOD=2', '--gin.PROMPT_CHECKPOINT_PERIOD=2',
        "--gin.ICL_TASKS=['synth_icl_1shot']"]


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent XLA compilation cache for this test only: the repeated runs reuse the first
  one's executables (same code, so the same numbers), which halves their time."""
  from jax._src import compilation_cache as cache
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (str(tmp_path / 'xla_cache'), 0.0, 0)):
    jax.config.update(name, value)
  cache.reset_cache()
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  cache.reset_cache()


def _without_paths(value):
  """A report with every absolute path (which differs between output dirs) left out."""
  if isinstance(value, dict):
    return {k: _without_paths(v) for k, v in value.items()
            if k not in ('sources', 'stage_dir', 'source')}
  if isinstance(value, list):
    return [_without_paths(v) for v in value]
  return value


def test_demo_is_deterministic_and_never_reuses_a_part_made_otherwise(tmp_path, compilation_cache):
  """Two runs of the (shortened) demo give the same report to the last digit: scores, format
  rates, training curves and gradient cosines. A rerun with other settings refuses to reuse a
  trained part unless told to remake it; evaluations made otherwise are remade by themselves."""
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  report_a = demo.Demo(a, quick=True, extra_flags=TINY).run()
  report_b = demo.Demo(b, quick=True, extra_flags=TINY).run()
  assert _without_paths(report_a) == _without_paths(report_b)
  history = report_a['histories']['Fine-tuning']
  assert [row['step'] for row in history['history']] == [2, 4]
  assert set(history['cosine']) == {'0', '2', '4'}
  assert all(-1 <= c <= 1 for c in history['cosine'].values())
  assert set(report_a['histories']['ProMoT']['cosine']) == {'0', '2', '4'}
  made_by = json.load(open(os.path.join(a, 'seed_0', 'finetune', 'made_by.json')))
  assert made_by['kind'] == 'train' and len(made_by['code']) == 64
  # other settings: the trained parts are not reused ...
  other = TINY + ['--gin.MODEL_LEARNING_RATE=0.01']
  with pytest.raises(demo.StalePartError, match='bindings'):
    demo.Demo(a, quick=True, extra_flags=other).run()
  # ... a part made before parts were recorded neither ...
  os.remove(os.path.join(b, 'seed_0', 'finetune', 'made_by.json'))
  with pytest.raises(demo.StalePartError, match='no made_by.json'):
    demo.Demo(b, quick=True, extra_flags=TINY).run()
  # ... and --redo remakes it, which gives the same numbers again
  assert _without_paths(demo.Demo(b, quick=True, extra_flags=TINY, redo=True).run()) == \
      _without_paths(report_a)
  # an evaluation made by other settings is remade without being asked
  record = os.path.join(a, 'seed_0', 'eval', 'promot', 'made_by.json')
  made = json.load(open(record))
  json.dump(dict(made, bindings=made['bindings'] + ['--gin.OTHER=1']), open(record, 'w'))
  lines = []
  assert _without_paths(demo.Demo(a, quick=True, extra_flags=TINY, log=lines.append).run()) == \
      _without_paths(report_a)
  assert any('remaking' in line and 'eval/promot' in line for line in lines)
  assert not any('remaking' in line and 'finetune' in line for line in lines)


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


# The target the shipped demo does not reach on the mean over seeds 0-2 (README, "Three
# seeds"): keep-best keeps the first checkpoint that solves the task (steps 900, 900, 1100),
# whose probes answer True/False 23-34% of the time, not 50%.
NOT_REACHED = ['fine-tuning answers in the label set >= 50% on the probe tasks (kept checkpoint)']


@pytest.mark.slow
def test_full_demo_over_three_seeds_meets_the_targets(tmp_path):
  """`promot demo --seeds 3` as shipped: every target of demo.TARGETS on the mean over the
  seeds, but for those the README reports as not reached (this fails when that changes, so
  the README gets updated), and ProMoT ahead of fine-tuning in context on every seed."""
  run = demo.Demo(str(tmp_path / 'demo'), seeds=3)
  built = run.run()
  assert len(built['seeds']) == 3
  missed = [text for text, value, _, _, met in run.targets if not met]
  assert missed == NOT_REACHED, run.targets
  for seed in built['seeds']:
    for shots in ('1shot', '4shot'):
      assert seed['norm_avg']['ProMoT'][shots] > seed['norm_avg']['Fine-tuning'][shots], seed


def _report(pre, ft, promot, ft_acc=100.0, promot_acc=99.0, ft_rate=0.6, promot_rate=0.0):
  def history(rate):
    return {'history': [{'step': 100, 'format/a': rate, 'format/b': rate}]}
  return {'shots': ['1shot', '4shot'],
          'norm_avg': {'Pretrained': {'1shot': pre, '4shot': pre},
                       'Fine-tuning': {'1shot': ft, '4shot': ft},
                       'ProMoT': {'1shot': promot, '4shot': promot}},
          'finetuned': {'Fine-tuning': {'score': ft_acc}, 'ProMoT': {'score': promot_acc}},
          'sources': {'Fine-tuning': '/r/finetune/checkpoint_100',
                      'ProMoT': '/r/model_tuning/checkpoint_100'},
          'histories': {'Fine-tuning': history(ft_rate), 'ProMoT': history(promot_rate)}}


def test_targets_are_checked_on_the_mean_over_seeds():
  met = demo.check_targets([_report(70, 14, 63), _report(70, 14, 56)])
  assert [m for *_, m in met] == [True] * 5
  assert met[0][1] == pytest.approx(85.0)         # ProMoT: (90% + 80%) / 2 of pretrained
  missed = demo.check_targets([_report(70, 35, 49, promot_acc=90.0, ft_rate=0.4,
                                       promot_rate=0.1)])
  assert [m for *_, m in missed] == [False] * 5
  assert '[ ] ProMoT keeps' in demo.targets_text(missed)
