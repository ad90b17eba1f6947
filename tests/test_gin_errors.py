"""Gin mistakes stop `promot run` / `promot train` with one line (file and line, exit 2) before
anything in MODEL_DIR is written: unknown macros (gin itself accepts any new macro) and
malformed syntax. No training happens in these tests."""

import os

import pytest

from promot_jax import cli
from promot_jax.ginconf import check as gin_check, loaders, parse as gin_utils

RUN = 'runs/promot_tiny_cpu.gin'


def snapshot(root):
  """Every path under root with its size and mtime (None if root does not exist)."""
  if not os.path.exists(root):
    return None
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs + files:
      p = os.path.join(d, name)
      out[p] = (os.path.getsize(p), os.path.getmtime(p))
  return out


@pytest.fixture
def model_dirs(tmp_path):
  """An existing MODEL_DIR holding a previous run's file, and one that does not exist yet."""
  used = tmp_path / 'used'
  (used / 'prompt_tuning').mkdir(parents=True)
  (used / 'prompt_tuning' / 'done.json').write_text('{"train_steps": 30}')
  return used, tmp_path / 'fresh'


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def fails_cleanly(command, gin_file, model_dirs, capsys, *flags):
  """Run the command against both MODEL_DIRs; exit 2, one stderr line, nothing written."""
  errors = []
  for model_dir in model_dirs:
    before = snapshot(model_dir)
    code = cli.main([command, '--gin_file', gin_file, f"--gin.MODEL_DIR='{model_dir}'", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert snapshot(model_dir) == before
    assert err.count('\n') == 1 and err.startswith(f'promot {command}: error: ')
    errors.append(err)
  assert errors[0] == errors[1]
  return errors[0]


# ---------------------------------------------------------------------------- unknown macros


@pytest.mark.parametrize('command', ['run', 'train'])
def test_a_misspelt_macro_in_a_run_file_names_the_line_and_the_closest_macro(
    tmp_path, model_dirs, capsys, command):
  gin_file = write(tmp_path, 'typo.gin', f"include '{RUN}'\n\nTRAIN_STPES = 10\n")
  err = fails_cleanly(command, gin_file, model_dirs, capsys)
  assert f'Unknown gin macro: TRAIN_STPES (set in {gin_file} line 3; did you mean TRAIN_STEPS?)' \
      in err


def test_misspelt_macros_in_flags_are_all_named(model_dirs, capsys):
  err = fails_cleanly('run', RUN, model_dirs, capsys, '--gin.BATCH_SZE=8',
                      '--gin.PROMPT_TUNING_STEP=3')
  assert 'Unknown gin macros: BATCH_SZE (set in --gin.BATCH_SZE=8; did you mean BATCH_SIZE?)' in err
  assert 'PROMPT_TUNING_STEP (set in --gin.PROMPT_TUNING_STEP=3; did you mean ' \
         'PROMPT_TUNING_STEPS?)' in err


def test_a_macro_only_an_absent_stage_would_read_is_unknown(tmp_path, model_dirs, capsys):
  # The run has no finetune stage included, so nothing reads FINETUNE_STEPS.
  err = fails_cleanly('run', RUN, model_dirs, capsys, '--gin.FINETUNE_STEPS=10')
  assert 'FINETUNE_STEPS' in err and 'did you mean' in err


def test_macros_that_something_reads_are_accepted(tmp_path):
  # a helper macro read by another macro, a stage file whose stage the run does not use,
  # and a macro read only by a binding given as a flag
  gin_file = write(tmp_path, 'ok.gin', f"include '{RUN}'\ninclude 'stages/finetune.gin'\n"
                   "STEPS_EVERYWHERE = 7\nPROMPT_TUNING_STEPS = %STEPS_EVERYWHERE\n"
                   "MY_SEED = 3\n")
  run = loaders.load_run([gin_file], ["--gin.MODEL_DIR='/unused'", '--gin.SEED=%MY_SEED'])
  assert run.stages[0].train_steps == 7 and run.seed == 3
  assert [s.name for s in run.stages] == ['prompt_tuning', 'model_tuning']


def test_binding_what_a_model_file_macro_feeds_is_accepted_and_wins():
  # config.T5Config.scan_layers bound directly leaves the model file's SCAN_LAYERS unread
  run = loaders.load_run([RUN], ["--gin.MODEL_DIR='/unused'",
                                 '--gin.config.T5Config.scan_layers=True'])
  assert run.model_config.scan_layers
  run = loaders.load_run([RUN], ["--gin.MODEL_DIR='/unused'", '--gin.SCAN_LAYERS=True',
                                 "--gin.REMAT_POLICY='full'"])
  assert run.model_config.scan_layers and run.model_config.remat_policy == 'full'


def test_a_misspelt_scan_macro_names_the_right_one(tmp_path, model_dirs, capsys):
  err = fails_cleanly('run', RUN, model_dirs, capsys, '--gin.SCAN_LAYER=True')
  assert 'SCAN_LAYER ' in err and 'did you mean SCAN_LAYERS' in err


def test_every_shipped_run_file_reads_all_its_macros():
  runs = os.path.join(gin_utils.GIN_DIR, 'runs')
  names = sorted(os.path.relpath(os.path.join(d, f), gin_utils.GIN_DIR)
                 for d, _, files in os.walk(runs) for f in files if f.endswith('.gin'))
  assert 'runs/demo/promot.gin' in names and len(names) >= 9
  for name in names:
    gin_utils.parse_gin([name], ["MODEL_DIR='/unused'"])
    assert gin_check.unread_macros() == [], name


# ---------------------------------------------------------------------------- malformed syntax


@pytest.mark.parametrize('text, where, what', [
    ("STAGES = [%PROMPT_TUNING,\nSEED = 1\n", 'line 2', "'[' is never closed"),
    ("stages.prompt_tuning.train_steps = (1\n", 'line 2', "'(' is never closed"),
    ("TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 4]\n", 'line 2', "']' closes nothing"),
    ("BATCH_SIZE = 8 +\n", 'line 2', 'Expected newline'),
    ("include 'models/mt5_tinny.gin'\n", 'line 2',
     "include 'models/mt5_tinny.gin' not found"),
])
def test_malformed_gin_is_one_line_with_file_and_line(tmp_path, model_dirs, capsys, text, where,
                                                      what):
  gin_file = write(tmp_path, 'bad.gin', f"include '{RUN}'\n" + text)
  err = fails_cleanly('run', gin_file, model_dirs, capsys)
  assert f'{gin_file} {where}: {what}' in err


def test_a_bad_include_suggests_the_closest_gin_file(tmp_path, model_dirs, capsys):
  gin_file = write(tmp_path, 'bad.gin', "include 'models/mt5_tinny.gin'\n")
  assert "did you mean 'models/mt5_tiny.gin'?" in fails_cleanly('run', gin_file, model_dirs, capsys)


def test_a_syntax_error_inside_an_included_file_names_that_file(tmp_path, model_dirs, capsys):
  inner = write(tmp_path, 'inner.gin', "# a comment (with a bracket) and a 'string [' are fine\n"
                "LOG_EVERY = 5\nTASK_MODULES = ['promot_tasks.toy'\n")
  outer = write(tmp_path, 'outer.gin', f"include '{RUN}'\ninclude '{inner}'\n")
  err = fails_cleanly('train', outer, model_dirs, capsys)
  assert f"{inner} line 3: '[' is never closed" in err


def test_an_unclosed_bracket_in_a_flag(model_dirs, capsys):
  err = fails_cleanly('run', RUN, model_dirs, capsys, '--gin.PROMPT_INIT_CLASS_LABELS=[1, 2')
  assert "--gin.PROMPT_INIT_CLASS_LABELS=[1, 2: '[' is never closed" in err


def test_user_gin_files_outside_the_package_via_gin_search_paths(tmp_path, monkeypatch, capsys):
  """A run file of one's own, found through --gin_search_paths, includes the shipped ones."""
  mine = tmp_path / 'my_configs'
  mine.mkdir()
  (mine / 'my_run.gin').write_text("include 'runs/promot_tiny_cpu.gin'\nBATCH_SIZE = 7\n")
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  run = loaders.load_run(['my_run.gin'], ["--gin.MODEL_DIR='/unused'"], [str(mine)])
  assert run.batch_size == 7 and run.mixture_or_task_name == 'toy_sorted'
  with pytest.raises(FileNotFoundError, match='my_run.gin'):
    loaders.load_run(['my_run.gin'], ["--gin.MODEL_DIR='/unused'"])
  # The command line spelling, --gin_search_paths=DIR[,DIR]: the file is found, parsed and
  # read up to the run's first check (the task module), which fails before MODEL_DIR is made.
  (mine / 'bad.gin').write_text("include 'my_run.gin'\nTASK_MODULES = ['no_such_module']\n")
  code = cli.main(['run', '--gin_file=bad.gin', f'--gin_search_paths={mine},{tmp_path}',
                   f"--gin.MODEL_DIR='{tmp_path / 'run'}'"])
  err = capsys.readouterr().err
  assert code == 2 and "Cannot import task module 'no_such_module'" in err, err
  assert not (tmp_path / 'run').exists()
