"""`promot diagnose`: the paper's "format gradient" cosine.

ProMoT's argument (PAPER.md, "Format specialization"): early fine-tuning steps learn the
fine-tuned task's output *format* rather than the task. It is measured by comparing the
gradient of the loss on real batches with the gradient on the same batches whose targets are
shuffled across the batch (a seeded permutation of rows: the inputs no longer determine
their targets, so only what all targets share -- the format -- still pulls one way). The
cosine between the two is taken per kernel of the last decoder layer (MLP wi_0, wi_1, wo;
self- and encoder-decoder attention query/key/value/out) and over all of them together.
Near 1: the gradient is mostly format; lower: it carries the task.

  promot diagnose --gin_file=runs/promot_tiny_cpu.gin --checkpoint MODEL_DIR/model_tuning \
      [--checkpoint ...] [--num_batches 4] [--split train] [--layer -1] [--json OUT.json]

The run file gives the task, feature lengths and BATCH_SIZE (as for `promot train`; override
with --gin.BATCH_SIZE=...); each checkpoint gives its own model. Every checkpoint sees the same
batches and permutations. The loss is plain token cross-entropy (no label smoothing, no
z-loss), with the prompt attached when the checkpoint holds one (--with_prompt auto).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from promot_jax import mesh as partitioning, tree_util
from promot_jax.checkpoints import orbax_io, resolve
from promot_jax.data import pipeline as data
from promot_jax.ginconf import loaders
from promot_jax.model import formats, losses
from promot_jax.model.config import T5Config
from promot_jax.model.transformer import Transformer
from promot_jax.train.stages import merge_params

Batch = Mapping[str, np.ndarray]
# Kernels of one decoder layer, relative to decoder/layers_N/ (t5x names, see model.py).
LAYER_KERNELS = tuple(
    [f'mlp/{w}' for w in ('wi_0', 'wi_1', 'wo')]
    + [f'{attn}/{proj}' for attn in ('self_attention', 'encoder_decoder_attention')
       for proj in ('query', 'key', 'value', 'out')])
TARGET_FEATURES = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')


def decoder_layer_index(config: T5Config, layer: int) -> int:
  """The decoder layer number for `layer` (negative counts from the end), or a clear error."""
  n = config.num_decoder_layers
  index = layer + n if layer < 0 else layer
  if not 0 <= index < n:
    raise ValueError(f'No decoder layer {layer}: the model has {n} decoder layers; use 0..{n - 1} '
                     'or -1 for the last.')
  return index


def kernel_paths(config: T5Config, layer: int = -1) -> dict[str, str]:
  """{short name: '/'-joined parameter path} of the layer's MLP and attention kernels."""
  index = decoder_layer_index(config, layer)
  return {k: f'decoder/layers_{index}/{k}/kernel' for k in LAYER_KERNELS}


def shuffled_permutation(batch_size: int, seed: int) -> np.ndarray:
  """A seeded permutation of the batch rows that moves every row (no row keeps its targets)."""
  if batch_size < 2:
    raise ValueError('Shuffling targets across the batch needs a batch of at least 2 examples.')
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(batch_size)
    if not np.any(perm == np.arange(batch_size)):
      return perm


def permute_targets(batch: Batch, permutation: np.ndarray) -> dict[str, np.ndarray]:
  """The batch with its decoder features (targets, inputs, weights) reordered by row."""
  out = dict(batch)
  for key in TARGET_FEATURES:
    out[key] = np.asarray(batch[key])[permutation]
  return out


@functools.lru_cache(maxsize=8)
def _grad_fn(config: T5Config, paths: tuple[str, ...], with_prompt: bool) -> Callable:
  """jitted (selected, rest, batch) -> gradients of the mean token loss w.r.t. `selected`.

  Cached per (config, kernels, prompt) so that checkpoints of one model share the program.
  """
  net = Transformer(config)

  def loss(selected, rest, batch):
    logits = net.apply({'params': merge_params(selected, rest)}, batch['encoder_input_tokens'],
                       batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                       with_prompt=with_prompt)                      # [batch, T, vocab]
    value, _ = losses.cross_entropy_with_z_loss(
        logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'], 0.0, 0.0)
    return value

  return jax.jit(jax.grad(loss))


def cosine(a: np.ndarray, b: np.ndarray) -> Optional[float]:
  """cos(a, b) in float64; None when either vector is zero."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  norms = np.linalg.norm(a) * np.linalg.norm(b)
  return None if norms == 0 else float(np.dot(a, b) / norms)


def gradient_cosines(config: T5Config, params: Mapping[str, Any], batches: Sequence[Batch],
                     permutations: Sequence[np.ndarray], *, layer: int = -1,
                     with_prompt: bool = False, mesh=None) -> dict[str, Any]:
  """Real vs target-shuffled gradients of one decoder layer's kernels, summed over batches.

  `permutations[i]` reorders the targets of `batches[i]` (the identity gives cosine 1).
  Returns {'cosine': {kernel: c, 'overall': c}, 'grad_norm': {'real': .., 'format': ..}}.
  """
  if len(permutations) != len(batches):
    raise ValueError(f'{len(batches)} batches but {len(permutations)} permutations.')
  if with_prompt and 'prompt' not in params:
    raise ValueError('with_prompt=True but the checkpoint holds no prompt/prompt.')
  names = kernel_paths(config, layer)
  flat = tree_util.flatten(params)
  selected = tree_util.unflatten({p: flat[p] for p in names.values()})
  rest = tree_util.unflatten({p: v for p, v in flat.items() if p not in names.values()})
  grad = _grad_fn(config.replace(dropout_rate=0.0, scan_layers=False), tuple(names.values()),
                  with_prompt)
  place = (lambda x: jnp.asarray(x)) if mesh is None else (  # noqa: E731
      lambda x: partitioning.batch_array(x, mesh))
  totals = {'real': None, 'format': None}
  for batch, perm in zip(batches, permutations):
    for kind, b in (('real', batch), ('format', permute_targets(batch, perm))):
      g = tree_util.flatten(grad(selected, rest, {k: place(v) for k, v in b.items()}))
      g = {p: np.asarray(partitioning.to_host(v), np.float64) for p, v in g.items()}
      totals[kind] = g if totals[kind] is None else {p: totals[kind][p] + g[p] for p in g}
  real, fmt = totals['real'], totals['format']
  result = {'cosine': {}, 'grad_norm': {'real': {}, 'format': {}}}
  for short, path in names.items():
    result['cosine'][short] = cosine(real[path], fmt[path])
    result['grad_norm']['real'][short] = float(np.linalg.norm(real[path]))
    result['grad_norm']['format'][short] = float(np.linalg.norm(fmt[path]))
  order = list(names.values())
  result['cosine']['overall'] = cosine(np.concatenate([real[p].ravel() for p in order]),
                                       np.concatenate([fmt[p].ravel() for p in order]))
  return result


def diagnose_checkpoint(path: str, batches: Sequence[Batch], permutations: Sequence[np.ndarray],
                        *, layer: int = -1, with_prompt: str = 'auto', mesh=None,
                        rules=None) -> dict[str, Any]:
  """Load a checkpoint (or MODEL_DIR/<stage>'s kept one) and measure its gradient cosines.

  With `mesh` the checkpoint is read into the mesh's shardings (by the logical axis `rules`)
  and the gradients are computed partitioned like them.
  """
  if with_prompt not in ('auto', 'yes', 'no'):
    raise ValueError(f"with_prompt must be 'auto', 'yes' or 'no', got {with_prompt!r}.")
  resolved = resolve.resolve_checkpoint(path)
  config, params = resolve.load_checkpoint(resolved, mesh, rules)
  decoder_layer_index(config, layer)  # fail before any compilation
  has_prompt = bool(formats.module_paths(params))      # the prompt or LoRA adapters
  if with_prompt == 'yes' and not has_prompt:
    raise ValueError(f'{resolved} holds no prompt; use --with_prompt auto or no.')
  attach = has_prompt if with_prompt == 'auto' else with_prompt == 'yes'
  found = gradient_cosines(config, params, batches, permutations, layer=layer, with_prompt=attach,
                           mesh=mesh)
  return {'checkpoint': path, 'resolved': resolved, 'name': resolve.checkpoint_name(resolved),
          'with_prompt': attach, 'layer': decoder_layer_index(config, layer), **found}


def check_checkpoint(path: str, layer: int, with_prompt: str) -> None:
  """Cheap checks before any data is read: the checkpoint exists, has the layer and prompt."""
  resolved = resolve.resolve_checkpoint(path)
  if orbax_io.is_orbax_checkpoint(resolved):
    decoder_layer_index(orbax_io.read_config(resolved), layer)
  if with_prompt == 'yes' and not resolve.checkpoint_has_prompt(resolved):
    raise ValueError(f'{resolved} holds no prompt; use --with_prompt auto or no.')


def read_batches(gin_files: Sequence[str], gin_flags: Sequence[str], split: str,
                 num_batches: int, seed: int, search_paths: Sequence[str] = (),
                 ) -> tuple[list[dict[str, np.ndarray]], dict]:
  """`num_batches` batches of the run's task (its lengths and BATCH_SIZE), and a description."""
  if num_batches < 1:
    raise ValueError(f'--num_batches must be positive, got {num_batches}.')
  run = loaders.load_run(gin_files, gin_flags, search_paths)
  run.import_task_modules()
  it = data.make_batch_iterator(run.mixture_or_task_name, run.task_feature_lengths, split,
                                run.batch_size, seed=seed, shard_index=0, num_shards=1)
  batches = [next(it) for _ in range(num_batches)]
  return batches, {'task': run.mixture_or_task_name, 'split': split,
                   'batch_size': run.batch_size, 'num_batches': num_batches,
                   'task_feature_lengths': dict(run.task_feature_lengths), 'seed': seed,
                   'num_partitions': run.num_partitions,
                   'logical_axis_rules': [list(r) for r in run.logical_axis_rules]}


def table(results: Sequence[Mapping[str, Any]]) -> str:
  """Kernels down, checkpoints across: cosine(real gradient, format gradient)."""
  names = [r['name'] for r in results]
  cell = max([len(n) + 2 for n in names] + [12])
  head = f'{"kernel (decoder layer " + str(results[0]["layer"]) + ")":<36}' + ''.join(
      f'{n:>{cell}}' for n in names)
  lines = [head, '-' * len(head)]
  for kernel in list(LAYER_KERNELS) + ['overall']:
    values = [r['cosine'][kernel] for r in results]
    lines.append(f'{kernel:<36}' + ''.join(
        ('-' if v is None else f'{v:.4f}').rjust(cell) for v in values))
  return '\n'.join(lines)


def command(args) -> int:
  for path in args.checkpoint:
    check_checkpoint(path, args.layer, args.with_prompt)
  batches, described = read_batches(args.gin_file, getattr(args, 'gin_flags', []), args.split,
                                    args.num_batches, args.seed,
                                    getattr(args, 'gin_search_paths', None) or ())
  perms = [shuffled_permutation(len(b['decoder_target_tokens']), args.seed + i)
           for i, b in enumerate(batches)]
  # The run file's mesh (NUM_PARTITIONS, LOGICAL_AXIS_RULES) over this process's devices.
  mesh = partitioning.make_mesh(described['num_partitions'])
  rules = partitioning.standard_logical_axis_rules(
      tuple(tuple(r) for r in described['logical_axis_rules']))
  partitioning.check_batch_divisible(described['batch_size'], mesh)
  described['mesh_shape'] = {k: int(v) for k, v in mesh.shape.items()}
  results = [diagnose_checkpoint(path, batches, perms, layer=args.layer,
                                 with_prompt=args.with_prompt, mesh=mesh, rules=rules)
             for path in args.checkpoint]
  print(f'format-gradient cosine: {described["task"]} ({described["split"]}), '
        f'{described["num_batches"]} x {described["batch_size"]} examples, targets shuffled '
        f'across each batch (seed {args.seed})')
  print(table(results))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump({'data': described, 'checkpoints': results}, f, indent=2)
    print(f'wrote {args.json}')
  return 0
