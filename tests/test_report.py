"""`promot report`: methods from stages, the paper's table layout, Norm. Avg., charts, history."""

import json
import os

import matplotlib.image
import pytest

from promot_jax import cli
from promot_jax.checkpoints.manager import HISTORY_FILE, read_history
from promot_jax.tools import report


def _entry(metric, score, shots, rate=None, role='in_context', with_prompt=False):
  return {'metric': metric, metric: score, 'shots': shots, 'role': role,
          'with_prompt': with_prompt, 'format_rate': rate}


def _write_results(root, stage, scores, finetuned_score, with_prompt, history=None):
  """A results.json as promot eval writes it, for a checkpoint of MODEL_DIR/<stage>."""
  stage_dir = os.path.join(root, 'run', stage)
  ckpt = os.path.join(stage_dir, 'checkpoint_20')
  os.makedirs(ckpt, exist_ok=True)
  if history:
    with open(os.path.join(stage_dir, HISTORY_FILE), 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in history)
  tasks = {'cls': _entry('accuracy', finetuned_score, 0, role='finetuned',
                         with_prompt=with_prompt)}
  for (task, k), (score, rate) in scores.items():
    tasks[f'{task}_{k}shot'] = _entry('accuracy', score, k, rate)
  results = {'checkpoint': {'name': f'{stage}_checkpoint_20', 'resolved': ckpt},
             'settings': {'finetuned_task': 'cls'}, 'tasks': tasks, 'failed': []}
  path = os.path.join(root, 'eval', stage, 'results.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f)
  return path


@pytest.fixture
def results(tmp_path):
  grid = lambda a, b: {('rev', 1): (a, 0.0), ('rev', 4): (a + 10, 0.0),  # noqa: E731
                       ('cnt', 1): (b, 0.5), ('cnt', 4): (b + 10, 0.25)}
  return [
      _write_results(str(tmp_path), 'model_tuning', grid(40, 60), 95.0, True,
                     history=[{'step': 10, 'format/rev_1shot': 0.0, 'format/cnt_1shot': 0.5},
                              {'step': 20, 'format/rev_1shot': 0.25, 'format/cnt_1shot': 0.25}]),
      _write_results(str(tmp_path), 'finetune', grid(0, 20), 96.0, False),
      _write_results(str(tmp_path), 'pretrain', grid(50, 70), 50.0, False),
  ]


def test_columns_follow_the_paper_and_norm_avg_is_the_plain_mean(results):
  built = report.build(report.load_results(results))
  assert built['methods'] == ['Pretrained', 'Fine-tuning', 'ProMoT']
  assert built['shots'] == ['1shot', '4shot'] and built['tasks'] == ['cnt', 'rev']
  assert built['norm_avg']['ProMoT'] == {'1shot': 50.0, '4shot': 60.0}
  assert built['norm_avg']['Fine-tuning'] == {'1shot': 10.0, '4shot': 20.0}
  assert built['finetuned']['Fine-tuning'] == {'score': 96.0, 'metric': 'accuracy',
                                               'with_prompt': False}
  assert built['format_rate']['cnt']['ProMoT'] == {'1shot': 50.0, '4shot': 25.0}
  assert list(built['histories']) == ['ProMoT']


def test_markdown_table_has_the_paper_cells(results):
  text = report.markdown(report.build(report.load_results(results)))
  assert '| task | Pretrained | Fine-tuning | ProMoT |' in text
  assert '| **Norm. Avg.** | **60.00 / 70.00** | **10.00 / 20.00** | **50.00 / 60.00** |' in text
  assert '| rev (accuracy) | 50.00 / 60.00 | 0.00 / 10.00 | 40.00 / 50.00 |' in text
  assert '| accuracy | 50.00 (no prompt) | 96.00 (no prompt) | 95.00 |' in text
  assert '| format rate | 25.0 | 25.0 |' in text   # mean over probe tasks, per step


def test_command_writes_markdown_png_and_json(results, tmp_path, capsys):
  out = str(tmp_path / 'report')
  assert cli.main(['report', *results, '--out_dir', out]) == 0
  assert '**Norm. Avg.**' in capsys.readouterr().out
  image = matplotlib.image.imread(os.path.join(out, 'report.png'))
  assert image.ndim == 3 and image.shape[0] > 500          # three panels, not an empty figure
  data = json.load(open(os.path.join(out, 'results.json')))
  assert data['in_context']['rev']['Pretrained'] == {'1shot': 50.0, '4shot': 60.0}


def test_labels_override_methods_and_clashes_are_refused(results, tmp_path, capsys):
  built = report.build(report.load_results([f'Mine={results[0]}', results[1]]))
  assert built['methods'] == ['Fine-tuning', 'Mine']
  assert cli.main(['report', results[1], results[1], '--out_dir', str(tmp_path)]) == 2
  assert 'same method' in capsys.readouterr().err


def test_bad_inputs_fail_clearly(tmp_path, capsys):
  assert cli.main(['report', str(tmp_path / 'nope.json')]) == 2
  assert 'No results file' in capsys.readouterr().err
  bad = tmp_path / 'results.json'
  bad.write_text('{"tasks": 1')
  assert cli.main(['report', str(bad)]) == 2
  assert 'not a JSON results file' in capsys.readouterr().err
  bad.write_text('[1, 2]')
  assert cli.main(['report', str(tmp_path)]) == 2
  assert 'not a promot eval results.json' in capsys.readouterr().err


def test_history_keeps_the_last_line_of_a_step_and_skips_a_torn_line(tmp_path):
  (tmp_path / HISTORY_FILE).write_text(
      '{"step": 20, "a": 1}\n{"step": 10, "a": 2}\n{"step": 20, "a": 3}\n{"step": 30, "a"')
  assert read_history(str(tmp_path)) == [{'step': 10, 'a': 2}, {'step': 20, 'a': 3}]
  assert read_history(str(tmp_path / 'missing')) == []


def _seed_results(root, ft_rev, promot_rev, cosine=None):
  """Pretrained, Fine-tuning and ProMoT results of one seed (histories at step 20)."""
  grid = lambda a: {('rev', 1): (a, 0.0), ('rev', 4): (a + 10, 0.0)}  # noqa: E731
  history = [{'step': 20, 'format/rev_1shot': 0.5}]
  paths = [_write_results(root, 'pretrain', grid(50), 50.0, False),
           _write_results(root, 'finetune', grid(ft_rev), 96.0, False, history=history),
           _write_results(root, 'model_tuning', grid(promot_rev), 94.0, True, history=history)]
  if cosine:
    with open(os.path.join(root, 'run', 'finetune', report.COSINE_FILE), 'w') as f:
      json.dump({'cosine': cosine}, f)
  return paths


def test_gradient_cosine_is_read_with_the_format_history_and_charted(tmp_path):
  paths = _seed_results(str(tmp_path), 10, 40, cosine={'0': 0.998, '20': 0.0412})
  built = report.build(report.load_results(paths))
  assert built['histories']['Fine-tuning']['cosine'] == {'0': 0.998, '20': 0.0412}
  assert built['histories']['ProMoT']['cosine'] == {}
  text = report.markdown(built)
  assert '| gradient cosine | 0.041 |' in text and "stage's start: 0.998" in text
  report.write(built, str(tmp_path / 'out'))
  assert os.path.getsize(tmp_path / 'out' / 'report.png') > 10_000


def test_seeds_combine_into_means_with_every_seed_and_its_ordering(tmp_path):
  reports = [report.build(report.load_results(_seed_results(str(tmp_path / str(s)), ft, pm)))
             for s, (ft, pm) in enumerate([(10, 40), (30, 20)])]
  built = report.combine(reports, [0, 1])
  assert built['norm_avg']['Fine-tuning'] == {'1shot': 20.0, '4shot': 30.0}
  assert built['norm_avg']['ProMoT'] == {'1shot': 30.0, '4shot': 40.0}
  assert built['spread']['ProMoT'] == {'1shot': [20.0, 40.0], '4shot': [30.0, 50.0]}
  assert built['in_context']['rev']['ProMoT'] == {'1shot': 30.0, '4shot': 40.0}
  assert built['finetuned']['ProMoT']['score'] == 94.0
  assert [s['norm_avg']['ProMoT']['1shot'] for s in built['seeds']] == [40.0, 20.0]
  text = report.markdown(built)
  assert '- seed 0: 1-shot Pretrained > ProMoT > Fine-tuning' in text
  assert '- seed 1: 1-shot Pretrained > Fine-tuning > ProMoT' in text
  assert '| 1 | Norm. Avg. | 50.00 / 60.00 | 30.00 / 40.00 | 20.00 / 30.00 |' in text
  assert '| 1-shot | 50.00–50.00 | 10.00–30.00 | 20.00–40.00 |' in text


def test_ordering_marks_ties_at_the_reports_precision():
  norm_avg = {'Pretrained': {'1shot': 67.4501}, 'Prompt tuning': {'1shot': 67.4499},
              'ProMoT': {'1shot': 65.73}, 'Fine-tuning': {'1shot': 16.6}}
  assert report.ordering(norm_avg, '1shot') == \
      'Pretrained = Prompt tuning > ProMoT > Fine-tuning'
