"""The removable format modules: LoRA beside the soft prompt, per-task prompts, and the runs
that use them (LoRA-ProMoT, multi-task ProMoT, sequential ProMoT) end to end on the tiny model.

Each run checks what its stages may change: stage 1 only the module, stage 2 only the model;
with the module removed, stage 1's result is exactly the pretrained network.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promot_jax import cli, mesh as partitioning, tree_util
from promot_jax.checkpoints import orbax_io, resolve
from promot_jax.model import config as config_lib, formats, lora, prompt, transformer as model
from promot_jax.train import sharding, stages

ENC = jnp.array([[5, 6, 7, 8, 1, 0], [9, 4, 3, 1, 0, 0], [7, 7, 2, 9, 5, 1], [3, 1, 0, 0, 0, 0]])
DEC = jnp.array([[0, 4, 5, 6], [0, 8, 1, 0], [0, 3, 3, 9], [0, 2, 1, 0]])
TGT = jnp.array([[4, 5, 6, 1], [8, 1, 0, 0], [3, 3, 9, 1], [2, 1, 0, 0]])


def lora_config(**kw):
  return config_lib.get_config('mt5_tiny', lora_rank=2, **kw)


def with_b(params, value):
  """`params` with every lora_b set to `value` (a fresh adapter has B = 0)."""
  return tree_util.unflatten({p: (np.full_like(v, value) if p.endswith('/lora_b') else v)
                              for p, v in tree_util.flatten(params).items()})


def test_lora_adapters_initialised_from_a_checkpoint_are_the_ones_the_network_creates():
  cfg = lora_config()
  base = jax.tree_util.tree_map(np.asarray, model.init_params(cfg.base()))
  made = tree_util.flatten(lora.initialize_lora(base, cfg, jax.random.PRNGKey(1)))
  want = tree_util.flatten(model.abstract_params(cfg))
  assert {p: v.shape for p, v in made.items()} == {p: tuple(v.shape) for p, v in want.items()}
  adapters = [p for p in made if lora.is_lora_path(p)]
  # PEFT's q, v for T5: encoder self-attention, decoder self- and cross-attention, every layer.
  assert len(adapters) == 2 * 2 * (2 + 2 * 2)
  assert made['encoder/layers_0/attention/query/lora_a'].shape == (32, 2)
  assert made['decoder/layers_1/encoder_decoder_attention/value/lora_b'].shape == (2, 32)
  axes = tree_util.flatten(model.logical_axes(cfg))
  assert tuple(axes['encoder/layers_0/attention/value/lora_b']) == ('lora_rank', 'joined_kv')
  with pytest.raises(ValueError, match='matches no kernel'):
    lora.initialize_lora(base, cfg.replace(lora_targets='nothing_like_this'))


def test_a_fresh_adapter_is_the_pretrained_network_and_removing_it_restores_it():
  cfg = lora_config()
  base = jax.tree_util.tree_map(np.asarray, model.init_params(cfg.base()))
  params = lora.initialize_lora(base, cfg, jax.random.PRNGKey(1))
  pretrained = model.compute_logits(cfg.base(), base, ENC, DEC, TGT)
  np.testing.assert_array_equal(model.compute_logits(cfg, params, ENC, DEC, TGT, True), pretrained)
  trained = with_b(params, 0.1)
  attached = model.compute_logits(cfg, trained, ENC, DEC, TGT, True)
  assert float(jnp.max(jnp.abs(attached - pretrained))) > 1e-2
  np.testing.assert_array_equal(model.compute_logits(cfg, trained, ENC, DEC, TGT, False),
                                pretrained)                    # the switch off: exactly removed
  merged = model.compute_logits(cfg.base(), lora.merged_kernels(trained, cfg), ENC, DEC, TGT)
  np.testing.assert_allclose(merged, attached, atol=2e-5)       # x W + s (x A) B = x (W + s A B)
  scanned = model.compute_logits(cfg.replace(scan_layers=True), trained, ENC, DEC, TGT, True)
  np.testing.assert_allclose(scanned, attached, atol=1e-5)


def test_lora_stage_trains_and_stores_optimizer_state_for_the_adapters_alone():
  cfg = lora_config()
  params = model.abstract_params(cfg)
  stage = stages.lora_tuning()
  trainable, frozen = stages.split_params(params, stage)
  assert set(tree_util.flatten(trainable)) == {p for p in tree_util.flatten(params)
                                               if lora.is_lora_path(p)}
  layout = sharding.build_stage_layout(cfg, stage, partitioning.make_mesh(1),
                                       partitioning.standard_logical_axis_rules(), params)
  opt_leaves = jax.tree_util.tree_leaves(layout.step.abstract_opt_state)
  adapter_size = tree_util.count_params(trainable)
  assert sum(int(np.prod(x.shape)) for x in opt_leaves) <= 2 * adapter_size + 8
  # stage 2 trains every weight but no adapter
  model_stage = stages.model_tuning()
  assert not any(lora.is_lora_path(p) for p in tree_util.flatten(
      stages.split_params(params, model_stage)[0]))


def test_per_task_prompts_route_each_row_and_a_swap_changes_exactly_its_rows():
  cfg = config_lib.get_config('mt5_tiny', prompt_length=3, prompt_tasks=('a', 'b'))
  params = jax.tree_util.tree_map(np.asarray, model.init_params(cfg, jax.random.PRNGKey(2)))
  assert sorted(params['prompt']) == ['a', 'b']
  ids = jnp.array([0, 1, 0, 1])
  before = np.asarray(model.compute_logits(cfg, params, ENC, DEC, TGT, True, ids))
  swapped = dict(params, prompt={'a': params['prompt']['b'], 'b': params['prompt']['a']})
  after = np.asarray(model.compute_logits(cfg, swapped, ENC, DEC, TGT, True, ids))
  assert (np.abs(after - before).max(axis=(1, 2)) > 1e-4).all()   # both tasks' prompts moved
  only_a = dict(params, prompt={'a': params['prompt']['b'], 'b': params['prompt']['b']})
  after_a = np.asarray(model.compute_logits(cfg, only_a, ENC, DEC, TGT, True, ids))
  np.testing.assert_array_equal(after_a[[1, 3]], before[[1, 3]])   # task b's rows: untouched
  assert (np.abs(after_a[[0, 2]] - before[[0, 2]]).max(axis=(1, 2)) > 1e-4).all()
  # one task's prompt selected = an ordinary single-prompt model on that task's rows
  single_cfg, single = prompt.select_task_prompt(cfg, params, 'b')
  assert single_cfg.prompt_tasks == () and single['prompt'].keys() == {'prompt'}
  np.testing.assert_allclose(
      np.asarray(model.compute_logits(single_cfg, single, ENC, DEC, TGT, True))[[1, 3]],
      before[[1, 3]], atol=1e-6)
  with pytest.raises(ValueError, match='prompt_ids'):
    model.compute_logits(cfg, params, ENC, DEC, TGT, True)


# ------------------------------------------------------------------ the runs, end to end

SHORT = ['--gin.EVAL_BATCHES=1', '--gin.LOG_EVERY=2', '--gin.PROMPT_TUNING_STEPS=4',
         '--gin.MODEL_TUNING_STEPS=4', '--gin.PROMPT_CHECKPOINT_PERIOD=2',
         '--gin.MODEL_CHECKPOINT_PERIOD=2']
RUNS = {'lora': ('runs/lora_promot_tiny_cpu.gin',
                 ['--gin.LORA_TUNING_STEPS=4', '--gin.LORA_CHECKPOINT_PERIOD=2']),
        'multitask': ('runs/multitask_promot_tiny_cpu.gin', []),
        'sequential': ('runs/sequential_promot_tiny_cpu.gin', [])}


@pytest.fixture(scope='module', params=sorted(RUNS))
def finished_run(request, tmp_path_factory):
  name = request.param
  gin_file, extra = RUNS[name]
  model_dir = str(tmp_path_factory.mktemp(name))
  assert cli.main(['run', '--gin_file', gin_file, f"--gin.MODEL_DIR='{model_dir}'", *SHORT,
                   *extra]) == 0
  with open(os.path.join(model_dir, 'run.json')) as f:
    stage_names = [s['name'] for s in json.load(f)['stages']]
  return name, model_dir, stage_names


def kept(model_dir, stage):
  """(config, flat numpy params) of a stage's kept checkpoint (a stage-1 one rebuilt on its base)."""
  cfg, params = resolve.load_checkpoint(resolve.resolve_checkpoint(os.path.join(model_dir, stage)))
  return cfg, tree_util.flatten(jax.tree_util.tree_map(np.asarray, params))


def split(flat):
  return ({p: v for p, v in flat.items() if formats.is_module_path(p)},
          {p: v for p, v in flat.items() if not formats.is_module_path(p)})


def assert_same(a, b, what):
  assert a.keys() == b.keys(), what
  for p in a:
    np.testing.assert_array_equal(a[p], b[p], err_msg=f'{what}: {p}')


def assert_changed(a, b, what):
  assert any(not np.array_equal(a[p], b[p]) for p in a), f'{what}: nothing changed'


def test_each_stage_changes_only_what_it_may(finished_run):
  name, model_dir, stage_names = finished_run
  cfg, first = kept(model_dir, stage_names[0])
  pretrained = jax.tree_util.tree_map(np.asarray, model.init_params(cfg.base(),
                                                                    jax.random.PRNGKey(0)))
  pretrained = tree_util.flatten(pretrained)
  module1, base1 = split(first)
  assert_same(base1, pretrained, f'{name} stage 1 (the frozen model)')
  # Removed, the stage-1 module leaves exactly the pretrained network.
  enc, dec, tgt = ENC % cfg.vocab_size, DEC % cfg.vocab_size, TGT % cfg.vocab_size
  np.testing.assert_array_equal(
      model.compute_logits(cfg, tree_util.unflatten(first), enc, dec, tgt, False),
      model.compute_logits(cfg.base(), tree_util.unflatten(pretrained), enc, dec, tgt))
  fresh = formats.initialize_missing(tree_util.unflatten(pretrained), cfg,
                                     rng=jax.random.PRNGKey(1))   # what stage 1 started from
  assert_changed(module1, split(tree_util.flatten(fresh))[0], f'{name} stage 1 (the module)')
  previous = first
  for stage in stage_names[1:]:
    _, now = kept(model_dir, stage)
    module_now, base_now = split(now)
    module_before, base_before = split(previous)
    if stage.startswith('model_tuning'):      # stage 2: the model trains, the module is frozen
      assert_same(module_now, module_before, f'{name} {stage} (the module)')
      assert_changed(base_now, base_before, f'{name} {stage} (the model)')
    else:                                     # a later task's stage 1: only its own prompt
      assert_same(base_now, base_before, f'{name} {stage} (the model)')
      own = [p for p in module_now if not np.array_equal(module_now[p], module_before[p])]
      assert own == [f'prompt/{stage.removeprefix("prompt_tuning_")}'], own
    previous = now
  if name == 'lora':
    assert stage_names == ['lora_tuning', 'model_tuning']
    # the stage-1 checkpoint holds the adapters alone (plus a reference to the base)
    ckpt = resolve.resolve_checkpoint(os.path.join(model_dir, 'lora_tuning'))
    assert all(lora.is_lora_path(p) for p in tree_util.flatten(orbax_io.param_shapes(ckpt)))
  if name == 'sequential':
    assert stage_names == ['prompt_tuning_toy_sorted', 'model_tuning_toy_sorted',
                           'prompt_tuning_toy_reverse', 'model_tuning_toy_reverse']
    _, last = kept(model_dir, stage_names[-1])
    np.testing.assert_array_equal(last['prompt/toy_sorted'], first['prompt/toy_sorted'])


def test_eval_attaches_the_module_on_the_target_task_only(finished_run, tmp_path):
  name, model_dir, stage_names = finished_run
  finetuned = {'multitask': 'toy_mix'}.get(name, 'toy_sorted')
  icl = "['toy_reverse']" if name != 'multitask' else '[]'
  out = tmp_path / 'eval'
  assert cli.main(['eval', '--gin_file', 'eval/toy.gin', '--checkpoint', model_dir,
                   f"--gin.OUT_DIR='{out}'", f"--gin.FINETUNED_TASK='{finetuned}'",
                   f'--gin.ICL_TASKS={icl}', '--gin.MAX_EVAL_EXAMPLES=4']) == 0
  results = {os.path.basename(os.path.dirname(p)): json.load(open(p))
             for p in glob.glob(str(out / '*' / 'results.json'))}
  assert len(results) == len(stage_names), sorted(results)     # every stage's kept checkpoint
  for res in results.values():
    tasks = res['tasks']
    for task, entry in tasks.items():
      assert entry['with_prompt'] == (entry['role'] == 'finetuned'), (task, entry)
    if name == 'multitask':    # each task of the mixture with its own prompt
      assert sorted(tasks) == ['toy_reverse', 'toy_sorted']
      assert all(e['with_prompt'] for e in tasks.values())
  # promot report heads each column with the method the trainer recorded (no labels given)
  labels = sorted(r['checkpoint']['method'] for r in results.values())
  assert labels == sorted({'lora': ['LoRA tuning (r=2)', 'LoRA-ProMoT (r=2)'],
                           'multitask': ['Prompt tuning', 'Multi-task ProMoT'],
                           'sequential': [
                               'Sequential ProMoT: (none) (+ prompt of toy_sorted)',
                               'Sequential ProMoT: toy_sorted',
                               'Sequential ProMoT: toy_sorted (+ prompt of toy_reverse)',
                               'Sequential ProMoT: toy_sorted -> toy_reverse']}[name])
  assert cli.main(['report', *glob.glob(str(out / '*' / 'results.json')),
                   '--out_dir', str(tmp_path / 'report')]) == 0
  table = (tmp_path / 'report' / 'report.md').read_text()
  assert all(label in table for label in labels), table


@pytest.mark.parametrize('run, flag, message', [
    ('lora', '--gin.LORA_RANK=0', 'LORA_RANK'),
    ('lora', "--gin.LORA_TARGETS='nothing_matches'", 'matches no kernel'),
    ('multitask', "--gin.PROMPT_TASKS=['toy_sorted']", 'toy_reverse'),
    ('multitask', "--gin.PROMPT_TASKS=['toy_sorted', 'toy_sorted']", 'twice'),
    ('sequential', '--gin.PROMPT_LENGTH=0', 'PROMPT_LENGTH'),
])
def test_a_bad_module_setting_is_a_clear_error_before_anything_is_written(
    tmp_path, capsys, run, flag, message):
  gin_file, extra = RUNS[run]
  model_dir = tmp_path / 'run'
  code = cli.main(['run', '--gin_file', gin_file, f"--gin.MODEL_DIR='{model_dir}'", *SHORT,
                   *extra, flag])
  err = capsys.readouterr().err
  assert code == 2 and message in err, err
  assert not model_dir.exists() or not any(model_dir.iterdir())
