"""Read (and name for export) Hugging Face MT5 / T5 v1.1 `...ForConditionalGeneration` weights.

Transformers 5 has no Flax classes, so the tensors are read straight from the files
(`model.safetensors`, sharded safetensors, or `pytorch_model.bin`, sharded or not) and renamed
into the t5x tree used by `promot_jax.model.transformer`. One table (`_GLOBAL`, `_ENCODER_LAYER`,
`_DECODER_LAYER`) drives both directions, so loading and exporting cannot drift apart.

HF `nn.Linear` weights are [out, in]; ours are [in, out], hence the transposes. The relative
position table is [buckets, heads] in HF and [heads, buckets] here.

The output head needs care because transformers changed its meaning across versions:
  - official mT5 / T5 v1.1 checkpoints store an untied `lm_head.weight` and never rescale;
  - transformers 5 forces `tie_word_embeddings=True` into every T5/MT5 config.json it writes,
    and a model created from scratch there has `lm_head` tied to `shared` (so the file has no
    `lm_head.weight`); MT5 in transformers 5 does not rescale, so the head is `shared`;
  - original T5 (and T5 in transformers 4 with tied embeddings, or T5 in transformers 5 with
    `scale_decoder_outputs`) multiplies the decoder output by d_model**-0.5 before the tied
    head. That is not the T5 v1.1 / mT5 layout and is rejected.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from promot_jax import tree_util
from promot_jax.model import formats, transformer as model
from promot_jax.model.config import T5Config, config_from_hf

CONFIG_NAME = 'config.json'
SAFE_WEIGHTS = 'model.safetensors'
SAFE_INDEX = 'model.safetensors.index.json'
TORCH_WEIGHTS = 'pytorch_model.bin'
TORCH_INDEX = 'pytorch_model.bin.index.json'
WEIGHT_FILES = (SAFE_INDEX, SAFE_WEIGHTS, TORCH_INDEX, TORCH_WEIGHTS)  # in order of preference
SUPPORTED_MODEL_TYPES = ('mt5', 't5')

# Keys HF writes that carry no parameter of their own: copies of `shared` (tied input
# embeddings; checked equal before being dropped) and a cross-attention position table that
# some old T5 checkpoints hold but no T5 model ever uses (transformers ignores it too).
_TIED_EMBEDDINGS = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
_UNUSED_KEYS = ('decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',)

_LM_HEAD = 'lm_head.weight'
_SHARED = 'shared.weight'

# (HF name, our path, transposed?). Layer rows are relative to `{stack}.block.{i}.` on the HF
# side and `{stack}/layers_{i}/` on ours.
_GLOBAL = (
    (_SHARED, 'token_embedder/embedding', False),
    ('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
     'encoder/relpos_bias/rel_embedding', True),
    ('encoder.final_layer_norm.weight', 'encoder/encoder_norm/scale', False),
    ('decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
     'decoder/relpos_bias/rel_embedding', True),
    ('decoder.final_layer_norm.weight', 'decoder/decoder_norm/scale', False),
    (_LM_HEAD, 'decoder/logits_dense/kernel', True),
)
_PROJECTIONS = (('q', 'query'), ('k', 'key'), ('v', 'value'), ('o', 'out'))
_MLP = ('wi_0', 'wi_1', 'wo')


def _attention_rows(hf_prefix: str, ours: str) -> tuple[tuple[str, str, bool], ...]:
  return tuple((f'{hf_prefix}.{h}.weight', f'{ours}/{o}/kernel', True) for h, o in _PROJECTIONS)


def _mlp_rows(hf_prefix: str) -> tuple[tuple[str, str, bool], ...]:
  return tuple((f'{hf_prefix}.{w}.weight', f'mlp/{w}/kernel', True) for w in _MLP)


_ENCODER_LAYER = (
    *_attention_rows('layer.0.SelfAttention', 'attention'),
    ('layer.0.layer_norm.weight', 'pre_attention_layer_norm/scale', False),
    *_mlp_rows('layer.1.DenseReluDense'),
    ('layer.1.layer_norm.weight', 'pre_mlp_layer_norm/scale', False),
)
_DECODER_LAYER = (
    *_attention_rows('layer.0.SelfAttention', 'self_attention'),
    ('layer.0.layer_norm.weight', 'pre_self_attention_layer_norm/scale', False),
    *_attention_rows('layer.1.EncDecAttention', 'encoder_decoder_attention'),
    ('layer.1.layer_norm.weight', 'pre_cross_attention_layer_norm/scale', False),
    *_mlp_rows('layer.2.DenseReluDense'),
    ('layer.2.layer_norm.weight', 'pre_mlp_layer_norm/scale', False),
)


def name_map(config: T5Config) -> list[tuple[str, str, bool]]:
  """Every (HF name, our '/'-joined path, transposed?) for a model of this shape (no prompt)."""
  if config.logits_via_embedding:
    raise ValueError('Hugging Face MT5 / T5 v1.1 checkpoints have an untied output head; this '
                     'config has logits_via_embedding=True, which has no HF counterpart here.')
  rows = list(_GLOBAL)
  for stack, count, table in (('encoder', config.num_encoder_layers, _ENCODER_LAYER),
                              ('decoder', config.num_decoder_layers, _DECODER_LAYER)):
    for i in range(count):
      rows += [(f'{stack}.block.{i}.{h}', f'{stack}/layers_{i}/{o}', t) for h, o, t in table]
  return rows


def _to_ours(array: np.ndarray, transposed: bool) -> np.ndarray:
  array = np.asarray(array, np.float32)
  return np.ascontiguousarray(array.T) if transposed else array


def to_hf_state_dict(params: Mapping[str, Any], config: T5Config) -> dict[str, np.ndarray]:
  """Our parameter tree -> HF MT5ForConditionalGeneration state dict (numpy, [out, in] kernels).

  The soft prompt, if any, has no HF counterpart and is left out; so are the tied
  `encoder/decoder.embed_tokens` copies of `shared.weight` (HF re-ties them on load).
  Arrays keep the dtype they have in `params` (float32 for loaded or trained weights).
  """
  flat = tree_util.flatten(params)
  out: dict[str, np.ndarray] = {}
  missing = []
  for hf_name, path, transposed in name_map(config):
    if path not in flat:
      missing.append(path)
      continue
    array = np.asarray(flat[path])
    out[hf_name] = np.ascontiguousarray(array.T) if transposed else array
  if missing:
    raise ValueError(f'Cannot export to Hugging Face names: the parameters lack {missing[:8]}'
                     + (' ...' if len(missing) > 8 else '') + '. Is the config the right one?')
  return out


# ---------------------------------------------------------------------------------------------
# Reading the files.


def _weight_files(path: str) -> tuple[str, list[str]]:
  """('safetensors' | 'torch', the weight files to read), or a clear error."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No Hugging Face model directory at {path}: the path does not exist.')
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'{path} is a file; pass the Hugging Face model directory that holds it (the one with '
        f'{CONFIG_NAME} and the weights).')
  for name in WEIGHT_FILES:
    full = os.path.join(path, name)
    if not os.path.isfile(full):
      continue
    kind = 'safetensors' if name.startswith('model.safetensors') else 'torch'
    if not name.endswith('.index.json'):
      return kind, [full]
    with open(full) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f'{full} has no "weight_map"; it is not a sharded-weights index.')
    shards = [os.path.join(path, s) for s in sorted(set(weight_map.values()))]
    absent = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
    if absent:
      raise FileNotFoundError(f'{full} lists shards that are not in {path}: {absent[:8]}. '
                              'Download the missing shard files.')
    return kind, shards
  found = sorted(os.listdir(path))
  raise FileNotFoundError(
      f'No model weights in {path}. Found {found[:20]}{" ..." if len(found) > 20 else ""}; '
      f'accepted: {SAFE_WEIGHTS}, sharded safetensors ({SAFE_INDEX} + shards), {TORCH_WEIGHTS}, '
      f'or sharded {TORCH_INDEX} + shards (e.g. download them with huggingface-cli download).')


def _safetensors_readers(files: list[str]) -> dict[str, Callable[[], np.ndarray]]:
  from safetensors import safe_open  # optional dependency
  readers: dict[str, Callable[[], np.ndarray]] = {}
  for file in files:
    handle = safe_open(file, framework='np')

    def read(name: str, handle=handle, file=file) -> np.ndarray:
      try:
        return handle.get_tensor(name)
      except (TypeError, ValueError):  # e.g. bfloat16 on a safetensors without ml_dtypes support
        with safe_open(file, framework='pt') as pt:
          return pt.get_tensor(name).float().numpy()

    for name in handle.keys():
      readers[name] = lambda name=name, read=read: read(name)
  return readers


def _torch_readers(files: list[str]) -> dict[str, Callable[[], np.ndarray]]:
  import torch  # only needed for .bin checkpoints  (optional dependency)
  readers: dict[str, Callable[[], np.ndarray]] = {}
  for file in files:
    try:
      state = torch.load(file, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
      state = torch.load(file, map_location='cpu', weights_only=True)
    for name, tensor in state.items():
      # A fresh float32 copy: the loaded tensor may be a view of the memory-mapped file.
      readers[name] = lambda t=tensor: t.detach().to(torch.float32, copy=True).numpy()
  return readers


def _read_hf_json(path: str) -> dict[str, Any]:
  file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(file):
    raise FileNotFoundError(f'No {CONFIG_NAME} in {path}; a Hugging Face model directory holds '
                            f'{CONFIG_NAME} next to the weights.')
  with open(file) as f:
    return json.load(f)


def _scales_decoder_output(hf: Mapping[str, Any]) -> bool:
  """Whether transformers multiplies the decoder output by d_model**-0.5 before the head."""
  if 'scale_decoder_outputs' in hf:  # T5 in transformers 5 records it explicitly
    return bool(hf['scale_decoder_outputs'])
  version = str(hf.get('transformers_version', ''))
  major = int(version.split('.')[0]) if version.split('.')[0].isdigit() else 4
  model_type = hf.get('model_type', 't5')
  if model_type == 'mt5' and major >= 5:
    return False  # MT5 in transformers 5 never rescales (and always writes tie=True)
  # transformers 4: rescale exactly when the embeddings are tied (MT5 defaulted to untied).
  return bool(hf.get('tie_word_embeddings', model_type != 'mt5'))


def _block_counts(names: Iterable[str]) -> dict[str, int]:
  counts = {'encoder': 0, 'decoder': 0}
  for name in names:
    m = re.match(r'(encoder|decoder)\.block\.(\d+)\.', name)
    if m:
      counts[m.group(1)] = max(counts[m.group(1)], int(m.group(2)) + 1)
  return counts


def is_hf_checkpoint(path: str) -> bool:
  """True for a local directory holding config.json and HF weights (or a T5/MT5 config.json)."""
  if path.startswith('gs://') or not os.path.isdir(path):
    return False
  if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
    return False
  if any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
    return True
  try:  # weights missing: still claim a T5/MT5 directory, so loading explains what is absent
    return _read_hf_json(path).get('model_type') in SUPPORTED_MODEL_TYPES
  except (OSError, ValueError):
    return False


def load_hf_params(path: str, config: Optional[T5Config] = None,
                   place: Optional[Callable[[str, np.ndarray], Any]] = None
                   ) -> tuple[T5Config, dict]:
  """(config, params) from a local HF MT5/T5 v1.1 ForConditionalGeneration directory.

  Params are float32 numpy arrays in the t5x tree of `promot_jax.model.transformer` (no prompt). When
  `config` is None it comes from the directory's config.json; otherwise the weights must
  match its shapes (a prompt_length > 0 is allowed: the prompt is simply absent).
  `place(path, array)` (e.g. onto a mesh) is applied to each leaf as soon as it is read, so
  the host holds one leaf at a time.
  """
  place = place or (lambda _, array: array)
  path = os.fspath(path)
  kind, files = _weight_files(path)
  hf = _read_hf_json(path)
  model_type = hf.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f'{path}/{CONFIG_NAME} has model_type={model_type!r}; promot_jax reads '
                     f'{SUPPORTED_MODEL_TYPES} checkpoints (MT5 / T5 v1.1 '
                     'ForConditionalGeneration).')
  if _scales_decoder_output(hf):
    raise ValueError(
        f'{path} is a tied-embedding T5 checkpoint whose decoder output is scaled by '
        'd_model**-0.5 before the shared embedding (original T5 / tie_word_embeddings=True under '
        'transformers 4, or scale_decoder_outputs=true). promot_jax implements the T5 v1.1 / mT5 '
        'layout with an untied lm_head and no rescaling; use an mT5 or T5 v1.1 checkpoint.')
  found_config = config_from_hf(hf)  # also checks gated-gelu
  config = found_config if config is None else config

  readers = _safetensors_readers(files) if kind == 'safetensors' else _torch_readers(files)
  try:
    rows = name_map(config.base())
  except ValueError as e:
    raise ValueError(f'Cannot load {path} with this config: {e}') from None
  # Names first (cheap), so that a wrong checkpoint fails before gigabytes are read.
  known = {r[0] for r in rows} | set(_UNUSED_KEYS)
  unexpected = []
  for name in sorted(set(readers) - known):
    if name in _TIED_EMBEDDINGS and _SHARED in readers:
      if not np.array_equal(readers[name](), readers[_SHARED]()):
        raise ValueError(f'{path}: {name} differs from {_SHARED}; untied input embeddings are not '
                         'part of the MT5 / T5 v1.1 layout.')
      continue
    unexpected.append(name)
  if unexpected:
    hints = []
    if any('DenseReluDense.wi.' in n for n in unexpected):
      hints.append('DenseReluDense.wi (no wi_0/wi_1) is the original T5 / T5 v1.0 ReLU MLP, '
                   'not the gated-GELU of mT5 / T5 v1.1')
    counts = _block_counts(readers)
    if (counts['encoder'], counts['decoder']) != (config.num_encoder_layers,
                                                  config.num_decoder_layers):
      hints.append(f'the checkpoint has {counts["encoder"]} encoder and {counts["decoder"]} '
                   f'decoder blocks, the model config {config.num_encoder_layers} and '
                   f'{config.num_decoder_layers}: pick the matching config')
    raise ValueError(
        f'{path} holds weights that the MT5 / T5 v1.1 layout has no place for: {unexpected[:8]}'
        + (' ...' if len(unexpected) > 8 else '') + ('. ' + '; '.join(hints) if hints else '')
        + '.')

  flat: dict[str, np.ndarray] = {}
  for hf_name, ours, transposed in rows:
    if hf_name in readers:
      flat[ours] = place(ours, _to_ours(readers[hf_name](), transposed))
  if _LM_HEAD not in readers and 'token_embedder/embedding' in flat:
    if not hf.get('tie_word_embeddings', model_type != 'mt5'):
      raise ValueError(f'{path} has no {_LM_HEAD} although its {CONFIG_NAME} declares an untied '
                       'output head (tie_word_embeddings=false); the weight files are incomplete.')
    # transformers 5 ties lm_head to shared (and then saves no lm_head.weight); without output
    # rescaling (checked above) the head is a copy of the embedding table.
    flat['decoder/logits_dense/kernel'] = place('decoder/logits_dense/kernel', np.ascontiguousarray(
        _to_ours(readers[_SHARED](), False).T))

  params = tree_util.unflatten(flat)
  tree_util.check_tree_matches(params, model.abstract_params(config), source=path,
                               ignore_missing=formats.is_module_path)
  return config, params
