"""Format probes during training: format/<task> and icl/<task> at every validation, in the
checkpoint's state.json and in MODEL_DIR/<stage>/metrics.jsonl; bad probe settings fail early."""

import json
import os

from promot_jax import cli
from promot_jax.checkpoints.manager import read_history
from promot_jax.eval import registry
from promot_jax.train import probes

RUN = 'runs/promot_tiny_cpu.gin'


def _flags(model_dir, *extra):
  return ['train', '--gin_file', RUN, '--stage', 'prompt_tuning', f"--gin.MODEL_DIR='{model_dir}'",
          '--gin.TRAIN_STEPS=10', '--gin.EVAL_BATCHES=1', *extra]


def test_probes_record_format_rate_and_score_at_each_validation(tmp_path):
  model_dir = str(tmp_path / 'run')
  code = cli.main(_flags(model_dir, "--gin.FORMAT_PROBE_TASKS=['toy_reverse']",
                         "--gin.FORMAT_LABELS=['True', 'False']", '--gin.FORMAT_PROBE_EXAMPLES=8'))
  assert code == 0
  history = read_history(os.path.join(model_dir, 'prompt_tuning'))
  assert [row['step'] for row in history] == [10]
  row = history[0]
  assert 0.0 <= row['format/toy_reverse'] <= 1.0 and 0.0 <= row['icl/toy_reverse'] <= 100.0
  state = json.load(open(os.path.join(model_dir, 'prompt_tuning', 'checkpoint_10', 'state.json')))
  assert state['metrics']['format/toy_reverse'] == row['format/toy_reverse']
  assert 'validation/loss' in row   # the history holds every validation metric


def test_unknown_probe_task_or_missing_labels_stop_before_anything_is_written(tmp_path, capsys):
  model_dir = tmp_path / 'run'
  assert cli.main(_flags(str(model_dir), "--gin.FORMAT_PROBE_TASKS=['no_such_task']",
                         "--gin.FORMAT_LABELS=['True', 'False']")) == 2
  assert 'no_such_task' in capsys.readouterr().err
  assert cli.main(_flags(str(model_dir), "--gin.FORMAT_PROBE_TASKS=['toy_reverse']")) == 2
  assert 'FORMAT_LABELS' in capsys.readouterr().err
  assert not model_dir.exists()


def test_a_mixture_probes_for_every_label_of_its_tasks():
  registry.import_task_modules(['promot_tasks.synthetic', 'promot_tasks.toy'])
  assert probes.probe_labels('synth_classify', []) == ('False', 'True')
  assert probes.probe_labels('toy_mix', []) is None         # toy_reverse has no label set
  assert probes.probe_labels('toy_mix', ['yes']) == ('yes',)
