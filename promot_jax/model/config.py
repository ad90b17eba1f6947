"""Model configurations: mT5 and T5 v1.1 sizes, plus tiny configs for tests.

Field names follow t5x's `network.T5Config` so that t5x gin files that set
`network.T5Config.emb_dim = ...` read the same here (`T5Config.emb_dim`).
Core code takes a plain `T5Config`; gin only binds it at the entry points.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

MT5_VOCAB_SIZE = 250112  # 250,000 sentencepiece pieces + 100 extra ids, padded to 128
T5_VOCAB_SIZE = 32128


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 v1.1 / mT5 encoder-decoder (and its soft prompt)."""

  vocab_size: int = MT5_VOCAB_SIZE
  emb_dim: int = 512            # d_model
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64            # d_kv
  mlp_dim: int = 1024           # d_ff
  mlp_activations: Sequence[str] = ('gelu', 'linear')  # gated-GELU
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False  # T5 v1.1 / mT5: untied logits
  dtype: str = 'float32'        # activation dtype ('bfloat16' on TPU); params stay float32
  float32_attention_logits: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # Removable format modules (model/formats.py). The soft prompt: 0 means the model has no
  # prompt parameter at all. `prompt_tasks` names one prompt per task (prompt/<task>, routed
  # by each example's prompt id) instead of the single prompt/prompt.
  prompt_length: int = 0
  prompt_tasks: Sequence[str] = ()
  # LoRA adapters beside every kernel whose module path (e.g. encoder/layers_0/attention/query)
  # the regex `lora_targets` finds: lora_a [in, rank], lora_b [rank, out], output scaled by
  # lora_alpha / lora_rank (PEFT's convention). 0: none.
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_targets: str = r'attention/(query|value)$'
  # Memory/speed knobs, no effect on the parameter tree.
  remat_policy: str = 'none'    # 'none' | 'full' | 'minimal' (save dots)
  # Run each stack's layers under nn.scan (one compiled layer body, params stacked on a
  # leading 'layers' axis inside the step). Checkpoints keep the t5x tree (layers_N).
  scan_layers: bool = False

  def __post_init__(self):
    # Hashable whatever the caller passed (gin gives lists): the config is a static jit argument.
    for key in ('mlp_activations', 'prompt_tasks'):
      object.__setattr__(self, key, tuple(getattr(self, key)))
    if len(set(self.prompt_tasks)) != len(self.prompt_tasks):
      raise ValueError(f'PROMPT_TASKS names a task twice: {list(self.prompt_tasks)}')
    if self.prompt_tasks and self.prompt_length <= 0:
      raise ValueError('PROMPT_TASKS gives one prompt per task, but PROMPT_LENGTH is 0; set '
                       'the prompt length (the paper uses 100).')

  def replace(self, **changes: Any) -> 'T5Config':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['mlp_activations'] = list(self.mlp_activations)
    d['prompt_tasks'] = list(self.prompt_tasks)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'T5Config':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'Unknown T5Config fields {unknown}; known fields: {sorted(known)}')
    d = dict(d)
    for key in ('mlp_activations', 'prompt_tasks'):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)

  @property
  def has_format_module(self) -> bool:
    """Whether the config has any removable format module (prompt or LoRA)."""
    return self.prompt_length > 0 or self.lora_rank > 0

  def base(self) -> 'T5Config':
    """This config without any format module: the pretrained network's parameter tree."""
    return self.replace(prompt_length=0, prompt_tasks=(), lora_rank=0)

  def architecture(self) -> dict[str, Any]:
    """The fields that decide the parameter tree's shapes (not dropout, dtype, remat)."""
    keys = ('vocab_size', 'emb_dim', 'num_heads', 'num_encoder_layers', 'num_decoder_layers',
            'head_dim', 'mlp_dim', 'logits_via_embedding', 'prompt_length')
    d = self.to_dict()
    d['mlp_activations'] = list(self.mlp_activations)
    arch = {k: d[k] for k in keys + ('mlp_activations',)}
    # Written only when set, so the architecture of a run made before they existed is unchanged.
    if self.prompt_tasks:
      arch['prompt_tasks'] = list(self.prompt_tasks)
    if self.lora_rank:
      arch.update(lora_rank=self.lora_rank, lora_targets=self.lora_targets)
    return arch


def _size(vocab: int, emb: int, heads: int, layers: int, mlp: int, head_dim: int = 64) -> T5Config:
  return T5Config(vocab_size=vocab, emb_dim=emb, num_heads=heads, num_encoder_layers=layers,
                  num_decoder_layers=layers, head_dim=head_dim, mlp_dim=mlp)


# Published sizes (mT5 paper, table of model sizes; T5 v1.1 release notes).
CONFIGS: dict[str, T5Config] = {
    # Tests: a few hundred thousand parameters, compiles in seconds on a laptop CPU.
    'mt5_tiny': _size(vocab=512, emb=32, heads=4, layers=2, mlp=64, head_dim=8),
    'mt5_small': _size(MT5_VOCAB_SIZE, 512, 6, 8, 1024),
    'mt5_base': _size(MT5_VOCAB_SIZE, 768, 12, 12, 2048),
    'mt5_large': _size(MT5_VOCAB_SIZE, 1024, 16, 24, 2816),
    'mt5_xl': _size(MT5_VOCAB_SIZE, 2048, 32, 24, 5120),
    'mt5_xxl': _size(MT5_VOCAB_SIZE, 4096, 64, 24, 10240),
    't5_1_1_small': _size(T5_VOCAB_SIZE, 512, 6, 8, 1024),
    't5_1_1_base': _size(T5_VOCAB_SIZE, 768, 12, 12, 2048),
    't5_1_1_large': _size(T5_VOCAB_SIZE, 1024, 16, 24, 2816),
    't5_1_1_xl': _size(T5_VOCAB_SIZE, 2048, 32, 24, 5120),
    't5_1_1_xxl': _size(T5_VOCAB_SIZE, 4096, 64, 24, 10240),
}


def get_config(name: str, **overrides: Any) -> T5Config:
  """A named config (see `CONFIGS`), with optional field overrides."""
  if name not in CONFIGS:
    raise ValueError(f'Unknown model config {name!r}; choose one of {sorted(CONFIGS)}')
  return CONFIGS[name].replace(**overrides)


def config_from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> T5Config:
  """A T5Config from a Hugging Face T5/MT5 `config.json` (a file, its directory, or the dict).

  Only the T5 v1.1 layout (gated-GELU MLP) is supported; the original T5 (ReLU) is rejected
  with a clear message. `tie_word_embeddings` is not trusted here: transformers 5 writes
  `true` into every MT5 config it saves, so whether the output head is its own matrix is
  decided from the weight files (promot_jax.checkpoints.hf).
  """
  if isinstance(path_or_dict, Mapping):
    hf = dict(path_or_dict)
  else:
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
      path = os.path.join(path, 'config.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'No Hugging Face config.json at {path}')
    with open(path) as f:
      hf = json.load(f)
  act = hf.get('feed_forward_proj', 'relu')
  if act not in ('gated-gelu', 'gated-gelu_new'):
    raise ValueError(
        f'Hugging Face config has feed_forward_proj={act!r}; promot_jax implements the '
        'T5 v1.1 / mT5 layout (feed_forward_proj="gated-gelu").')
  num_layers = hf['num_layers']
  cfg = T5Config(
      vocab_size=hf['vocab_size'],
      emb_dim=hf['d_model'],
      num_heads=hf['num_heads'],
      num_encoder_layers=num_layers,
      num_decoder_layers=hf.get('num_decoder_layers') or num_layers,
      head_dim=hf['d_kv'],
      mlp_dim=hf['d_ff'],
      dropout_rate=hf.get('dropout_rate', 0.1),
      relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
      layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6),
  )
  return cfg.replace(**overrides)


def config_to_hf(cfg: T5Config) -> dict[str, Any]:
  """The Hugging Face `config.json` dict of an MT5ForConditionalGeneration with this shape."""
  return {
      'architectures': ['MT5ForConditionalGeneration'],
      'model_type': 'mt5',
      'vocab_size': cfg.vocab_size,
      'd_model': cfg.emb_dim,
      'd_kv': cfg.head_dim,
      'd_ff': cfg.mlp_dim,
      'num_layers': cfg.num_encoder_layers,
      'num_decoder_layers': cfg.num_decoder_layers,
      'num_heads': cfg.num_heads,
      'relative_attention_num_buckets': cfg.relative_attention_num_buckets,
      'relative_attention_max_distance': cfg.relative_attention_max_distance,
      'dropout_rate': cfg.dropout_rate,
      'layer_norm_epsilon': cfg.layer_norm_epsilon,
      'feed_forward_proj': 'gated-gelu',
      'tie_word_embeddings': False,
      'is_encoder_decoder': True,
      'pad_token_id': 0,
      'eos_token_id': 1,
      'decoder_start_token_id': 0,
  }
