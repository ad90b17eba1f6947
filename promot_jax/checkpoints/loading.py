"""One entry point for pretrained weights in any supported format.

`load_pretrained(path)` recognises a Hugging Face directory, a t5x checkpoint (legacy
msgpack + zarr) or a promot_jax (orbax) checkpoint, reads it into the model's own tree, and
checks every shape against the config. t5x checkpoints carry no config, so one is inferred
from the parameter shapes (or checked against the one given).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional

import jax
import numpy as np

from promot_jax import mesh as partitioning, paths, tree_util
from promot_jax.checkpoints import hf, orbax_io, t5x
from promot_jax.model import formats, transformer as model
from promot_jax.model.config import T5Config, config_from_hf

FORMATS = ('auto', 'hf', 't5x', 'orbax')


def detect_format(path: str) -> str:
  """'hf', 't5x' or 'orbax'; a clear error when the path is none of them."""
  if not paths.exists(path):
    raise FileNotFoundError(f'No checkpoint at {path}: the path does not exist.')
  if orbax_io.is_orbax_checkpoint(path):
    return 'orbax'
  if t5x.is_t5x_checkpoint(path) or t5x.latest_t5x_checkpoint(path):
    return 't5x'  # a t5x model dir: load_t5x_params names the checkpoint_<step> to pass
  if hf.is_hf_checkpoint(path):
    return 'hf'
  listing = paths.listdir(path)[:12]
  raise ValueError(
      f'{path} is not a checkpoint promot_jax can read. Expected one of: a Hugging Face model '
      'directory (config.json + model.safetensors or pytorch_model.bin), a t5x checkpoint '
      'directory (checkpoint_<step>/ holding a msgpack file named "checkpoint"), or a promot_jax '
      f'checkpoint (params/ + promot.json). Found: {listing}')


def config_from_params(params: Mapping[str, Any], **overrides: Any) -> T5Config:
  """Infer the architecture from parameter shapes (t5x checkpoints store no config)."""
  flat = tree_util.flatten(params)

  def shape(path):
    if path not in flat:
      raise ValueError(f'Cannot infer the model config: no parameter {path} in the checkpoint.')
    return tuple(flat[path].shape)

  vocab, emb = shape('token_embedder/embedding')
  heads, buckets = shape('encoder/relpos_bias/rel_embedding')
  joined = shape('encoder/layers_0/attention/query/kernel')[1]
  mlp = shape('encoder/layers_0/mlp/wi_0/kernel')[1]
  count = lambda stack: len({p.split('/')[1] for p in flat  # noqa: E731
                             if p.startswith(f'{stack}/layers_')})
  cfg = T5Config(vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=joined // heads,
                 mlp_dim=mlp, num_encoder_layers=count('encoder'),
                 num_decoder_layers=count('decoder'), relative_attention_num_buckets=buckets,
                 logits_via_embedding='decoder/logits_dense/kernel' not in flat)
  return formats.infer_modules(params, cfg).replace(**overrides)


def load_pretrained(path: str, config: Optional[T5Config] = None, fmt: str = 'auto',
                    ) -> tuple[T5Config, dict[str, Any]]:
  """(config, params as float32 numpy) from an HF, t5x or promot_jax checkpoint.

  When `config` is given, the checkpoint must match its architecture; format modules (the
  prompt, LoRA adapters) may be absent from the checkpoint (pretrained weights never have
  them) and are then left out.
  """
  if fmt not in FORMATS:
    raise ValueError(f'Unknown checkpoint format {fmt!r}; choose one of {FORMATS}.')
  fmt = detect_format(path) if fmt == 'auto' else fmt
  if fmt == 'hf':
    found_cfg, params = hf.load_hf_params(path, config.base() if config else None)
  elif fmt == 't5x':
    params = t5x.load_t5x_params(path, dtype=np.float32)
    found_cfg = config_from_params(params)
  else:
    params = orbax_io.restore_params(path, as_numpy=True)
    found_cfg = orbax_io.read_config(path)
    base = orbax_io.read_meta(path).get('base')
    if base is not None:   # it stores what its stage trained; the rest is the base's
      params = tree_util.merge(load_base(base, found_cfg), params)
  if config is None:
    config = found_cfg
  tree_util.check_tree_matches(params, model.abstract_params(config), source=path,
                               ignore_missing=formats.is_module_path)
  return config, params


# --------------------------------------------------------------- checkpoints of one stage's part
# Stage 1 trains only the prompt: its checkpoints store the prompt (and its optimizer state) and
# a reference to the frozen base they rebuild from, with a fingerprint that tells a changed or
# wrong base apart: for 13B frozen weights that is 2 MB per checkpoint instead of 52 GB.

FINGERPRINT_SAMPLE = 1 << 16   # bytes read from the end of each of the largest files
FINGERPRINT_FILES = 8


def fingerprint(path: str) -> str:
  """A digest of a checkpoint directory: every file's name and size, the whole of the small
  ones (configs, metadata, manifests), and the last bytes of the largest ones."""
  files = paths.walk_files(path)
  digest = hashlib.sha256()
  for rel, size in files:
    digest.update(f'{rel}\0{size}\n'.encode())
  largest = sorted(files, key=lambda f: (-f[1], f[0]))[:FINGERPRINT_FILES]
  for rel, size in files:
    if size <= FINGERPRINT_SAMPLE:
      digest.update(paths.read_bytes(paths.join(path, rel)))
    elif (rel, size) in largest:
      digest.update(paths.read_bytes(paths.join(path, rel), offset=size - FINGERPRINT_SAMPLE))
  return digest.hexdigest()


def base_reference(path: Optional[str], config: T5Config, seed: int) -> dict[str, Any]:
  """How a stage-1 checkpoint names its frozen base: a checkpoint (path and fingerprint) or,
  without INITIAL_CHECKPOINT_PATH, the seed of the random initialisation."""
  if path:
    return {'path': paths.absolute(path), 'fingerprint': fingerprint(path)}
  arch = json.dumps({'architecture': config.architecture(), 'seed': seed}, sort_keys=True)
  return {'random_init_seed': seed, 'fingerprint': hashlib.sha256(arch.encode()).hexdigest()}


def check_base(base: Mapping[str, Any], config: T5Config) -> None:
  """A clear error when the base a stage-1 checkpoint names changed or is another one."""
  current = base_reference(base.get('path'), config, base.get('random_init_seed', 0))
  if current['fingerprint'] != base['fingerprint']:
    raise ValueError(
        f'The base checkpoint {base.get("path", "(random init)")} is not the one this stage-1 '
        f'checkpoint was trained on: fingerprint {current["fingerprint"][:16]} now, '
        f'{base["fingerprint"][:16]} when it was saved. Restore that base, or start stage 1 '
        'again from the new one.')


def load_base(base: Mapping[str, Any], config: T5Config) -> dict[str, Any]:
  """The frozen base parameters (float32 numpy, no prompt) a stage-1 checkpoint refers to;
  a clear error when the base changed or is another one than the checkpoint was trained on."""
  check_base(base, config)
  if 'path' in base:
    return load_pretrained(base['path'], config.base())[1]
  return jax.tree_util.tree_map(np.asarray, model.init_params(
      config.base(), jax.random.PRNGKey(base['random_init_seed'])))


def base_shapes(config: T5Config) -> dict[str, Any]:
  """The shapes of the base parameters (everything but the prompt)."""
  return model.abstract_params(config.base())


# ------------------------------------------------------------------------ straight onto a mesh
# Evaluation of a model larger than one device (mT5 XXL: ~52 GB in float32) reads each leaf
# into the mesh's shardings: orbax and t5x (tensorstore) read only the slices a process's
# devices hold; Hugging Face weights are read one leaf at a time and placed.


def param_shardings(config: T5Config, shapes: Mapping[str, Any], mesh, rules) -> dict[str, Any]:
  """{path: NamedSharding} of the parameters `shapes` ({path: shape}) by the logical axis
  rules; a clear error when a dimension does not split over its mesh axis."""
  specs = tree_util.flatten(model.logical_axes(config))
  missing = sorted(set(shapes) - set(specs))
  if missing:
    raise ValueError(f'The checkpoint holds parameters the model has no place for: {missing[:5]}')
  out = {p: partitioning.logical_to_sharding(specs[p], mesh, rules) for p in shapes}
  partitioning.check_divisible({p: jax.ShapeDtypeStruct(tuple(s), np.float32)
                                for p, s in shapes.items()}, out, mesh)
  return out


def load_on_mesh(path: str, mesh, rules, config: Optional[T5Config] = None,
                 dtype: Any = None, fmt: str = 'auto') -> tuple[T5Config, dict[str, Any]]:
  """(config, params as global jax.Arrays laid out on `mesh`) from any readable checkpoint.

  Like `load_pretrained`, but no leaf is gathered on one device or (except replicated leaves)
  whole in host memory; floating leaves are cast to `dtype` (e.g. bfloat16) while reading.
  A stage-1 checkpoint is rebuilt from its base the same way.
  """
  if fmt not in FORMATS:
    raise ValueError(f'Unknown checkpoint format {fmt!r}; choose one of {FORMATS}.')
  fmt = detect_format(path) if fmt == 'auto' else fmt
  cast = lambda x: x if dtype is None or not np.issubdtype(x.dtype, np.floating) \
      else x.astype(dtype)  # noqa: E731
  if fmt == 'orbax':
    found_cfg = orbax_io.read_config(path)
    config = config or found_cfg
    stored = tree_util.flatten(orbax_io.param_shapes(path))
    shardings = param_shardings(config, {p: v.shape for p, v in stored.items()}, mesh, rules)
    abstract = {p: jax.ShapeDtypeStruct(v.shape, v.dtype if dtype is None else dtype,
                                        sharding=shardings[p]) for p, v in stored.items()}
    params = orbax_io.restore_params(path, tree_util.unflatten(abstract))
    base = orbax_io.read_meta(path).get('base')
    if base is not None:   # the frozen rest, from the base it names (fingerprint checked)
      params = tree_util.merge(_base_on_mesh(base, found_cfg, mesh, rules, dtype), params)
  elif fmt == 't5x':
    found: dict[str, T5Config] = {}

    def shardings_for(shapes: dict[str, tuple]) -> dict[str, Any]:
      found['config'] = config_from_params(
          tree_util.unflatten({p: jax.ShapeDtypeStruct(s, np.float32) for p, s in shapes.items()}))
      return param_shardings(config or found['config'], shapes, mesh, rules)

    params = t5x.load_t5x_params(path, dtype=dtype or np.float32, shardings_for=shardings_for)
    config = config or found['config']
  else:
    def place(name: str, array: np.ndarray) -> jax.Array:
      sharding = param_shardings(config, {name: array.shape}, mesh, rules)[name]
      return partitioning.global_array(cast(array), sharding)

    config = config or config_from_hf(path)
    _, params = hf.load_hf_params(path, config.base(), place=place)
  tree_util.check_tree_matches(params, model.abstract_params(config), source=path,
                               ignore_missing=formats.is_module_path)
  return config, params


def _base_on_mesh(base: Mapping[str, Any], config: T5Config, mesh, rules, dtype) -> dict:
  check_base(base, config)
  if 'path' in base:
    return load_on_mesh(base['path'], mesh, rules, config.base(), dtype)[1]
  params = tree_util.flatten(load_base(base, config))
  shardings = param_shardings(config, {p: v.shape for p, v in params.items()}, mesh, rules)
  return tree_util.unflatten({
      p: partitioning.global_array(v if dtype is None else v.astype(dtype), shardings[p])
      for p, v in params.items()})
