"""`promot export`: a promot_jax checkpoint -> a Hugging Face MT5 directory (+ PEFT adapters).

  promot export --to hf --checkpoint MODEL_DIR/model_tuning --out DIR [--adapter_out DIR]

Writes DIR/config.json, DIR/model.safetensors and DIR/generation_config.json, loadable with
transformers' MT5ForConditionalGeneration.from_pretrained(DIR). The weights are renamed by
checkpoints/hf.py's name table (the one the HF loader reads with), so export and import
cannot drift apart. When the checkpoint holds a soft prompt it is also written as a PEFT
prompt-tuning adapter (default DIR/prompt_adapter: adapter_config.json +
adapter_model.safetensors) for PeftModel.from_pretrained(base, adapter_dir).

How PEFT's prompt tuning (peft 0.21, task_type SEQ_2_SEQ_LM) relates to promot_jax's prompt:
  - same: the virtual-token vectors are concatenated in front of the embedded encoder input,
    unscaled (T5 does not scale embeddings), and the encoder attention mask grows by
    num_virtual_tokens ones in front; T5's relative position bias then sees the prompt at
    positions 0..P-1 and the input after it, exactly as in promot_jax.Transformer.encode.
  - differs: PEFT extends the mask only when `attention_mask` is passed. Without one the
    encoder attends to every position, padding included, whereas promot_jax masks token id 0.
    Pass attention_mask=(input_ids != 0) to get promot_jax's behaviour.
  - differs: for SEQ_2_SEQ_LM PEFT defaults to num_transformer_submodules=2 and keeps
    2 * P vectors, of which the encoder uses the first P (prompt tuning never feeds the
    decoder). The adapter written here sets num_transformer_submodules=1 and stores exactly the
    [P, d_model] prompt, so nothing unused is written.
  - the decoder is untouched by both; labels and decoder masks are not shifted.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Optional

import numpy as np

from promot_jax import tree_util
from promot_jax.checkpoints import hf, loading, orbax_io, resolve
from promot_jax.checkpoints.manager import StageCheckpoints
from promot_jax.model import formats, lora, prompt as prompt_lib
from promot_jax.model.config import T5Config, config_to_hf

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
PEFT_PROMPT_KEY = 'prompt_embeddings'   # the key PEFT's prompt encoders save and load
GENERATION_CONFIG = 'generation_config.json'
DEFAULT_ADAPTER_SUBDIR = 'prompt_adapter'
DEFAULT_LORA_SUBDIR = 'lora_adapter'
PEFT_PREFIX = 'base_model.model.'        # PEFT's key prefix for the wrapped model's modules


def load_for_export(checkpoint: str) -> tuple[T5Config, dict[str, Any]]:
  """(config as trained, float32 numpy params) of a checkpoint or MODEL_DIR/<stage> dir."""
  resolved = resolve.resolve_checkpoint(checkpoint)
  return loading.load_pretrained(resolved)   # a stage-1 checkpoint is rebuilt on its base


def _prepare_dir(path: str, overwrite: bool, what: str) -> str:
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path):
    if orbax_io.is_orbax_checkpoint(path) or StageCheckpoints(path).kept() is not None:
      raise FileExistsError(f'{path} holds promot_jax checkpoints; export somewhere else.')
    if not overwrite:
      raise FileExistsError(f'{path} is not empty; choose another {what} or pass --overwrite.')
    shutil.rmtree(path)
  os.makedirs(path, exist_ok=True)
  return path


def _save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # optional dependency

  # transformers checks the 'format' metadata when it reads safetensors written elsewhere.
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
            metadata={'format': 'pt'})


def write_hf_model(params: Mapping[str, Any], config: T5Config, out: str) -> str:
  """Write config.json, model.safetensors and generation_config.json into `out`."""
  state = hf.to_hf_state_dict(params, config)
  _save_safetensors({k: np.asarray(v, np.float32) for k, v in state.items()},
                    os.path.join(out, hf.SAFE_WEIGHTS))
  with open(os.path.join(out, hf.CONFIG_NAME), 'w') as f:
    json.dump(config_to_hf(config), f, indent=2)
  generation = {'decoder_start_token_id': 0, 'eos_token_id': 1, 'pad_token_id': 0}
  with open(os.path.join(out, GENERATION_CONFIG), 'w') as f:
    json.dump(generation, f, indent=2)
  return out


def peft_adapter_config(config: T5Config, prompt_length: int, base_model: str) -> dict[str, Any]:
  """PEFT's PromptTuningConfig fields for our prompt (random init: the weights are in the file)."""
  return {
      'peft_type': 'PROMPT_TUNING',
      'task_type': 'SEQ_2_SEQ_LM',
      'num_virtual_tokens': prompt_length,
      'token_dim': config.emb_dim,
      'num_transformer_submodules': 1,     # the encoder only: promot_jax has one prompt
      'num_attention_heads': config.num_heads,
      'num_layers': config.num_encoder_layers,
      'prompt_tuning_init': 'RANDOM',
      'base_model_name_or_path': base_model,
      'inference_mode': True,
  }


def write_peft_prompt(prompt: np.ndarray, config: T5Config, adapter_out: str,
                      base_model: str) -> str:
  """Write the [P, d_model] prompt as a PEFT prompt-tuning adapter directory."""
  prompt = np.asarray(prompt, np.float32)                            # [P, embed]
  if prompt.ndim != 2 or prompt.shape[1] != config.emb_dim:
    raise ValueError(f'The prompt has shape {prompt.shape}; expected [prompt_length, '
                     f'{config.emb_dim}].')
  _save_safetensors({PEFT_PROMPT_KEY: prompt}, os.path.join(adapter_out, ADAPTER_WEIGHTS))
  with open(os.path.join(adapter_out, ADAPTER_CONFIG), 'w') as f:
    json.dump(peft_adapter_config(config, prompt.shape[0], base_model), f, indent=2)
  return adapter_out


def peft_lora_config(config: T5Config, modules: list[str], base_model: str) -> dict[str, Any]:
  """PEFT's LoraConfig fields for our adapters (the exact HF module names they sit on)."""
  return {
      'peft_type': 'LORA',
      'task_type': 'SEQ_2_SEQ_LM',
      'r': config.lora_rank,
      'lora_alpha': config.lora_alpha,
      'lora_dropout': 0.0,
      'target_modules': sorted(modules),
      'bias': 'none',
      'fan_in_fan_out': False,
      'use_rslora': False,
      'base_model_name_or_path': base_model,
      'inference_mode': True,
  }


def write_peft_lora(params: Mapping[str, Any], config: T5Config, adapter_out: str,
                    base_model: str) -> list[str]:
  """Write the LoRA adapters as a PEFT LoRA adapter directory; returns the HF module names."""
  flat = tree_util.flatten(params)
  hf_names = {ours: name[:-len('.weight')] for name, ours, _ in hf.name_map(config.base())}
  tensors, modules = {}, []
  for path in sorted(p for p in flat if p.endswith('/lora_a')):
    module = path[:-len('/lora_a')]
    name = hf_names.get(f'{module}/kernel')
    if name is None:
      raise ValueError(f'The adapter on {module} has no Hugging Face module to sit on.')
    modules.append(name)
    tensors[f'{PEFT_PREFIX}{name}.lora_A.weight'] = np.asarray(flat[path], np.float32).T
    tensors[f'{PEFT_PREFIX}{name}.lora_B.weight'] = np.asarray(flat[f'{module}/lora_b'],
                                                               np.float32).T
  _save_safetensors(tensors, os.path.join(adapter_out, ADAPTER_WEIGHTS))
  with open(os.path.join(adapter_out, ADAPTER_CONFIG), 'w') as f:
    json.dump(peft_lora_config(config, modules, base_model), f, indent=2)
  return modules


def export_hf(checkpoint: str, out: str, *, adapter_out: Optional[str] = None,
              with_adapter: bool = True, overwrite: bool = False) -> dict[str, Any]:
  """Export a checkpoint; returns what was written ({'model': dir, 'adapter': dir or None,
  'lora_adapter': dir or None, ...}). `adapter_out` names the prompt's adapter directory (or,
  for a LoRA-only checkpoint, the LoRA one)."""
  config, params = load_for_export(checkpoint)
  modules, base = formats.split_modules(params)
  out = _prepare_dir(out, overwrite, '--out')
  write_hf_model(base, config.base(), out)
  written = {'model': out, 'adapter': None, 'prompt_length': 0, 'lora_adapter': None,
             'lora_modules': 0, 'num_params': tree_util.count_params(base)}
  if not with_adapter:
    return written
  names = prompt_lib.prompt_names(params)
  if names:
    prompt_out = _prepare_dir(adapter_out or os.path.join(out, DEFAULT_ADAPTER_SUBDIR),
                              overwrite, '--adapter_out')
    for name in names:
      target = prompt_out if name == 'prompt' else os.path.join(prompt_out, name)
      os.makedirs(target, exist_ok=True)
      write_peft_prompt(prompt_lib.get_prompt(params, None if name == 'prompt' else name),
                        config, target, out)
    written.update(adapter=prompt_out, prompt_length=config.prompt_length,
                   prompt_tasks=[n for n in names if n != 'prompt'])
  if lora.has_lora(params):
    lora_out = adapter_out if adapter_out and not names else os.path.join(out, DEFAULT_LORA_SUBDIR)
    lora_out = _prepare_dir(lora_out, overwrite, '--adapter_out')
    written.update(lora_adapter=lora_out,
                   lora_modules=len(write_peft_lora(params, config, lora_out, out)))
  return written


def command(args) -> int:
  if args.to != 'hf':
    raise ValueError(f'Unknown export format {args.to!r}; supported: hf.')
  written = export_hf(args.checkpoint, args.out, adapter_out=args.adapter_out,
                      with_adapter=not args.no_adapter, overwrite=args.overwrite)
  print(f'wrote {written["model"]}: MT5ForConditionalGeneration, '
        f'{written["num_params"] / 1e6:.2f}M parameters (config.json, {hf.SAFE_WEIGHTS})')
  if written['adapter']:
    tasks = written.get('prompt_tasks')
    print(f'wrote {written["adapter"]}: PEFT prompt-tuning adapter'
          + (f's, one per task in its sub-directory ({", ".join(tasks)})' if tasks else '')
          + f', {written["prompt_length"]} virtual tokens. Load with '
          f'PeftModel.from_pretrained(base, "{written["adapter"]}") and pass attention_mask.')
  if written['lora_adapter']:
    print(f'wrote {written["lora_adapter"]}: PEFT LoRA adapter on {written["lora_modules"]} '
          f'modules. Load with PeftModel.from_pretrained(base, "{written["lora_adapter"]}").')
  return 0
