"""Composing a task: a new module, imported from gin, trained a few steps and evaluated."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from promot_jax import cli
from promot_jax.checkpoints import orbax_io
from promot_jax.model import transformer as model
from promot_jax.model.config import get_config

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def new_task_module(tmp_path, monkeypatch):
  """tasks/template.py copied to a temporary module that registers 'my_task' (byte vocabulary)."""
  src = open(os.path.join(HERE, '..', 'tasks', 'template.py')).read()
  src = src.replace("TASK_NAME = 'my_task'", "TASK_NAME = 'my_tmp_task'")
  src = src.replace("vocab = vocabulary or get_vocabulary()", "vocab = vocabulary or get_vocabulary('byte')")
  (tmp_path / 'my_tmp_tasks.py').write_text(src)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield 'my_tmp_tasks'
  sys.modules.pop('my_tmp_tasks', None)


def test_a_new_task_module_trains_and_evaluates(tmp_path, new_task_module):
  cfg = get_config('mt5_tiny')
  pre = str(tmp_path / 'pre')
  orbax_io.save_params(pre, jax.tree_util.tree_map(
      np.asarray, model.init_params(cfg, jax.random.PRNGKey(0))), cfg)
  model_dir = tmp_path / 'run'
  assert cli.main(['train', '--gin_file', 'runs/promot_tiny_cpu.gin',
                   f"--gin.TASK_MODULES=['{new_task_module}']",
                   "--gin.MIXTURE_OR_TASK_NAME='my_tmp_task'", f"--gin.MODEL_DIR='{model_dir}'",
                   f"--gin.INITIAL_CHECKPOINT_PATH='{pre}'", '--stage', 'prompt_tuning',
                   '--gin.TRAIN_STEPS=4', '--gin.PROMPT_CHECKPOINT_PERIOD=4',
                   '--gin.BATCH_SIZE=4', '--gin.EVAL_BATCHES=1']) == 0
  out = tmp_path / 'eval'
  assert cli.main(['eval', '--gin_file', 'eval/toy.gin', '--checkpoint',
                   str(model_dir / 'prompt_tuning'), '--out_dir', str(out),
                   f"--gin.TASK_MODULES=['{new_task_module}']",
                   "--gin.FINETUNED_TASK='my_tmp_task'", '--gin.ICL_TASKS=[]',
                   "--gin.SPLITS={'my_tmp_task': 'validation'}",
                   "--gin.METRICS={'my_tmp_task': 'accuracy'}",
                   "--gin.LABEL_SETS={'my_tmp_task': ('True', 'False')}"]) == 0
  results = [json.load(open(os.path.join(d, 'results.json')))
             for d in (out / n for n in os.listdir(out)) if os.path.isdir(d)]
  task = results[0]['tasks']['my_tmp_task']
  assert task['with_prompt'] is True and task['num_examples'] == 4
  assert 0 <= task['accuracy'] <= 100
