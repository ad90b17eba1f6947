"""Every column of the paper is one shipped run file away, and each run file's checkpoints are
labelled with the paper's name for its method (train/methods.py), which `promot report` uses.

The run files are built as `promot run` builds them (gin -> RunConfig), without training.
"""

import os

import pytest

from promot_jax.ginconf import loaders, parse
from promot_jax.model import formats, lora
from promot_jax.train import methods

# run file (both sizes) -> the label of each stage's kept checkpoint, in order
EXPECTED = {
    'finetune_rte': ['Fine-tuning'],
    'prompt_tuning_rte': ['Prompt tuning'],
    'promot_rte': ['Prompt tuning', 'ProMoT'],
    'promot_enfr': ['Prompt tuning', 'ProMoT'],
    'joint_rte': ['Joint'],
    'finetune_1shot_rte': ['Fine-tuning + 1-shot prompt'],
    'random_prompt_finetune_rte': ['Fixed random prompt + fine-tuning'],
    'promot_1shot_rte': ['Prompt tuning', 'ProMoT + 1-shot'],
    'lora2_promot_rte': ['LoRA tuning (r=2)', 'LoRA-ProMoT (r=2)'],
    'lora4_promot_rte': ['LoRA tuning (r=4)', 'LoRA-ProMoT (r=4)'],
    'multitask_promot_rte_enfr': ['Prompt tuning', 'Multi-task ProMoT'],
    'sequential_promot_rte_enfr': [
        'Sequential ProMoT: (none) (+ prompt of promot_rte)', 'Sequential ProMoT: promot_rte',
        'Sequential ProMoT: promot_rte (+ prompt of promot_wmt14_enfr)',
        'Sequential ProMoT: promot_rte -> promot_wmt14_enfr'],
}
TINY = {'promot_tiny_cpu': ['Prompt tuning', 'ProMoT'],
        'lora_promot_tiny_cpu': ['LoRA tuning (r=2)', 'LoRA-ProMoT (r=2)'],
        'multitask_promot_tiny_cpu': ['Prompt tuning', 'Multi-task ProMoT'],
        'sequential_promot_tiny_cpu': [
            'Sequential ProMoT: (none) (+ prompt of toy_sorted)', 'Sequential ProMoT: toy_sorted',
            'Sequential ProMoT: toy_sorted (+ prompt of toy_reverse)',
            'Sequential ProMoT: toy_sorted -> toy_reverse']}
FILES = {f'runs/{name}_mt5_{size}.gin': labels for name, labels in EXPECTED.items()
         for size in ('xxl', 'small')}
FILES.update({f'runs/{name}.gin': labels for name, labels in TINY.items()})


def labels_of(run):
  return [methods.method_label(run.stages, i, run.model_config, run.mixture_or_task_name)
          for i in range(len(run.stages))]


@pytest.mark.parametrize('gin_file', sorted(FILES))
def test_each_run_file_is_its_method(gin_file):
  run = loaders.load_run([gin_file], ["MODEL_DIR='/unused'"])
  run.validate()
  assert labels_of(run) == FILES[gin_file]
  assert len(set(labels_of(run))) == len(run.stages)     # report columns never collide
  cfg = run.model_config
  first = run.stages[0]
  if 'lora' in gin_file:
    assert formats.kinds(cfg) == ('lora',) and first.trainable == lora.LORA_PATH_REGEX
  if 'random_prompt' in gin_file:
    assert first.start_from == 'pretrained' and first.with_prompt
    assert not first.is_trainable('prompt/prompt') and first.is_trainable(
        'encoder/layers_0/mlp/wo/kernel')
  if 'multitask' in gin_file or 'sequential' in gin_file:
    assert len(cfg.prompt_tasks) == 2
  if gin_file.endswith('_xxl.gin'):
    assert cfg.emb_dim == 4096 and run.num_partitions == 8 and run.distributed


def test_every_shipped_run_file_is_listed_here():
  shipped = sorted(f'runs/{f}' for f in os.listdir(os.path.join(parse.GIN_DIR, 'runs'))
                   if f.endswith('.gin'))
  assert shipped == sorted(FILES)


def test_eval_files_for_both_suites():
  rte = loaders.load_eval_config(['eval/promot_rte.gin'], [])
  enfr = loaders.load_eval_config(['eval/promot_enfr.gin'], [])
  assert (rte.finetuned_task, enfr.finetuned_task) == ('promot_rte', 'promot_wmt14_enfr')
  assert enfr.icl_tasks == rte.icl_tasks and len(rte.icl_tasks) == 16
  assert enfr.task_feature_lengths['targets'] == 256 and enfr.decoding == 'beam'
