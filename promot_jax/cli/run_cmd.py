"""`promot run`, `train`, `smoke`, `convert` and `info`: the commands on a run or a checkpoint."""

from __future__ import annotations

import argparse
import json

from promot_jax import tree_util
from promot_jax.checkpoints import loading, orbax_io
from promot_jax.model import formats
from promot_jax.cli import commands, local_pod
from promot_jax.ginconf import loaders
from promot_jax.ginconf.parse import resolve_model
from promot_jax.tools.smoke import run_smoke
from promot_jax.train import runner


def run(args: argparse.Namespace) -> int:
  run = loaders.load_run(args.gin_file, args.gin_flags, args.gin_search_paths)
  if getattr(args, 'local_processes', None):
    return local_pod.launch(commands.without_local_pod_arguments(args.argv),
                            args.local_processes, args.local_devices, run.model_dir)
  runner.run_stages(run, getattr(args, 'stage', None))
  return 0


def smoke(args: argparse.Namespace) -> int:
  summary = run_smoke(args.model, args.prompt_length, args.batch, args.input_length,
                      args.target_length, args.decode_length, args.checkpoint, args.seed)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(summary, f, indent=2)
  return 0


def convert(args: argparse.Namespace) -> int:
  cfg = resolve_model(args.model) if args.model else None
  fmt = getattr(args, 'from')
  print(f'reading {args.src} (format: {fmt})', flush=True)
  cfg, params = loading.load_pretrained(args.src, cfg, fmt)
  fmt = loading.detect_format(args.src) if fmt == 'auto' else fmt
  orbax_io.save_params(args.dst, params, cfg, {'source': args.src, 'source_format': fmt},
                       overwrite=args.overwrite)
  print(f'wrote {args.dst}: {tree_util.count_params(params) / 1e6:.2f}M parameters, '
        f'config {json.dumps(cfg.architecture())}')
  return 0


def info(args: argparse.Namespace) -> int:
  fmt = loading.detect_format(args.path)
  if fmt == 'orbax':  # metadata only: no array is read
    cfg, shapes = orbax_io.read_config(args.path), orbax_io.param_shapes(args.path)
  else:
    cfg, shapes = loading.load_pretrained(args.path, fmt=fmt)
  flat = tree_util.flatten(shapes)
  info = {'path': args.path, 'format': fmt, 'num_params': tree_util.count_params(shapes),
          'has_prompt': 'prompt/prompt' in flat,
          'prompt_shape': list(flat['prompt/prompt'].shape) if 'prompt/prompt' in flat else None,
          'format_modules': list(formats.kinds(formats.infer_modules(shapes, cfg.base()))),
          'config': cfg.to_dict(),
          'tree': {p: [list(v.shape), str(v.dtype)] for p, v in sorted(flat.items())}}
  if args.json:
    print(json.dumps(info, indent=2))
    return 0
  print(f'{args.path}  [{fmt}]')
  for p, (shape, dtype) in info['tree'].items():
    if args.full or not any(f'layers_{i}/' in p for i in range(1, 1000)):
      print(f'  {p:<60} {str(tuple(shape)):<18} {dtype}')
  if not args.full:
    print('  (layers_1.. elided: same names as layers_0; --full lists all)')
  print(f'parameters: {info["num_params"]:,} ({info["num_params"] / 1e6:.1f}M)')
  print(f'prompt:     {"yes " + str(tuple(info["prompt_shape"])) if info["has_prompt"] else "no"}')
  print(f'modules:    {", ".join(info["format_modules"]) or "none"} (removable format modules)')
  print(f'config:     {json.dumps(cfg.architecture())}')
  return 0
