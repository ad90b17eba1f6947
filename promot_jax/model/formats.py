"""Removable format modules: the one abstraction behind the soft prompt and LoRA.

A format module is a set of parameters that
- stage 1 trains with the model frozen (`stages.prompt_tuning`, `stages.lora_tuning`),
- stage 2 keeps attached and frozen while the model trains (`stages.model_tuning`),
- evaluation on other tasks removes (`with_prompt=False`: the pretrained network exactly).

Kinds, each with one seam in the network (model/transformer.py):
- 'prompt': prompt/prompt [P, E], or prompt/<task> per task (T5Config.prompt_tasks), routed by
  each example's prompt id; prepended to the embedded encoder input (model/prompt.py);
- 'lora': <module>/lora_a, lora_b beside each targeted kernel (T5Config.lora_rank); added to
  that layer's output (model/lora.py).

The switch keeps its first name, `with_prompt`, everywhere (stages, decoding, evaluation):
True attaches every module the config has, False none.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import jax

from promot_jax import tree_util
from promot_jax.model import lora, prompt

KINDS = ('prompt', 'lora')
# Every format-module parameter path; stage presets build their regexes from it.
MODULE_REGEX = r'^prompt/|' + lora.LORA_PATH_REGEX.lstrip('^')
NOT_MODULE_REGEX = r'^(?!prompt/)(?!.*' + lora.LORA_PATH_REGEX + ')'


def is_module_path(path: str) -> bool:
  """Whether a '/'-joined parameter path belongs to a format module."""
  return re.search(MODULE_REGEX, path) is not None


def kinds(cfg) -> tuple[str, ...]:
  """The module kinds a config has, e.g. ('prompt',) or ('lora',)."""
  return tuple(k for k, on in (('prompt', cfg.prompt_length > 0), ('lora', cfg.lora_rank > 0))
               if on)


def split_modules(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(module parameters, base parameters) of a parameter tree; their union is `params`."""
  flat = tree_util.flatten(params)
  return (tree_util.unflatten({p: v for p, v in flat.items() if is_module_path(p)}),
          tree_util.unflatten({p: v for p, v in flat.items() if not is_module_path(p)}))


def without_modules(params: Mapping[str, Any]) -> dict[str, Any]:
  """The base network's parameters: every format module removed."""
  return split_modules(params)[1]


def module_paths(params: Mapping[str, Any]) -> list[str]:
  return sorted(p for p in tree_util.flatten(params) if is_module_path(p))


def missing_modules(params: Mapping[str, Any], cfg) -> tuple[str, ...]:
  """The module kinds `cfg` has that `params` do not hold yet (to initialise)."""
  out = []
  if cfg.prompt_length > 0:
    have = set(prompt.prompt_names(params))
    if not (set(cfg.prompt_tasks) <= have if cfg.prompt_tasks else 'prompt' in have):
      out.append('prompt')
  if cfg.lora_rank > 0 and not lora.has_lora(params):
    out.append('lora')
  return tuple(out)


def initialize_missing(params: Mapping[str, Any], cfg, *, rng: jax.Array,
                       prompt_init: str = 'uniform', prompt_init_file: Optional[str] = None,
                       class_label_ids: Optional[Sequence[Sequence[int]]] = None,
                       log=lambda message: None) -> dict[str, Any]:
  """`params` with every module `cfg` has but `params` lack freshly initialised."""
  params = dict(params)
  for kind in missing_modules(params, cfg):
    if kind == 'prompt':
      names = list(cfg.prompt_tasks) or ['prompt']
      log(f'initialising {len(names)} [{cfg.prompt_length}, {cfg.emb_dim}] prompt(s) '
          f'({prompt_init}{": " + ", ".join(cfg.prompt_tasks) if cfg.prompt_tasks else ""})')
      params = prompt.initialize_prompt(
          params, cfg.prompt_length, prompt_init, rng=rng,
          path=prompt_init_file, class_label_ids=class_label_ids, tasks=tuple(cfg.prompt_tasks))
    else:
      params = lora.initialize_lora(params, cfg, rng=jax.random.fold_in(rng, 1))
      log(f'initialising rank-{cfg.lora_rank} LoRA adapters on '
          f'{len(lora.targeted_kernels(params, lora.spec_of(cfg)))} kernels '
          f'({cfg.lora_targets})')
  return params


def infer_modules(params: Mapping[str, Any], cfg):
  """`cfg` with its module fields read from the shapes in `params` (prompt length, per-task
  prompts, LoRA rank); fields the parameters say nothing about are kept."""
  flat = tree_util.flatten(params)
  names = prompt.prompt_names(params)
  if names:
    cfg = cfg.replace(prompt_length=int(flat[f'prompt/{names[0]}'].shape[0]),
                      prompt_tasks=() if names == ['prompt'] else tuple(
                          t for t in (cfg.prompt_tasks or names) if t in names))
  a = next((v for p, v in flat.items() if p.endswith('/lora_a')), None)
  if a is not None:
    cfg = cfg.replace(lora_rank=int(a.shape[-1]))
  return cfg
