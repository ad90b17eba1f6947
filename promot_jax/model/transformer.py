"""The T5 v1.1 / mT5 encoder-decoder with its removable format modules (soft prompt, LoRA).

Parameter tree (identical to t5x's mT5 tree, plus the format modules' parameters):
  token_embedder/embedding                                 [vocab, embed]
  encoder/relpos_bias/rel_embedding                        [heads, buckets]
  encoder/layers_N/pre_attention_layer_norm/scale          [embed]
  encoder/layers_N/attention/{query,key,value}/kernel      [embed, heads*kv]
  encoder/layers_N/attention/out/kernel                    [heads*kv, embed]
  encoder/layers_N/pre_mlp_layer_norm/scale, mlp/{wi_0,wi_1,wo}/kernel
  encoder/encoder_norm/scale
  decoder/... (self_attention, encoder_decoder_attention, pre_cross_attention_layer_norm ...)
  decoder/decoder_norm/scale, decoder/logits_dense/kernel  [embed, vocab]
  prompt/prompt                                            [prompt_length, embed]
  (or prompt/<task> for each of T5Config.prompt_tasks)
  <targeted module>/lora_a [in, rank], lora_b [rank, out]  (T5Config.lora_rank > 0)

With `T5Config.scan_layers` each stack runs its layers under nn.scan and the step sees
them stacked: encoder/layers/<same names> with a leading [num_layers] axis (logical axis
'layers'). Users and checkpoints keep the t5x tree above; stacking.stack_layers /
unstack_layers convert, and `compute_logits` accepts either form.

Each format module kind has one seam, and `with_prompt=True` attaches them all: `encode`
embeds the tokens and the SoftPrompt module prepends its vectors and extends the mask before
the encoder stack runs; `layers.Dense` adds a targeted kernel's LoRA term. With
`with_prompt=False` the network is exactly the pretrained one, so the same parameters serve
with or without the modules (model/formats.py).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from promot_jax.model import layers
from promot_jax.model.config import T5Config
from promot_jax.model.lora import LoraSpec, spec_of as lora_spec_of
from promot_jax.model.prompt import SoftPrompt
from promot_jax.model.stacking import stack_layers, unstack_layers

Array = jax.Array


def _dtype(cfg: T5Config):
  return jnp.dtype(cfg.dtype)


def _maybe_remat(cls, cfg: T5Config):
  if cfg.remat_policy == 'none':
    return cls
  policy = {'full': None,
            'minimal': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}.get(cfg.remat_policy)
  if cfg.remat_policy not in ('full', 'minimal'):
    raise ValueError(f"Unknown remat_policy {cfg.remat_policy!r}; use 'none', 'full' or 'minimal'.")
  # Under scan the loop already keeps layers apart, so CSE prevention is not needed there.
  return nn.remat(cls, policy=policy, prevent_cse=not cfg.scan_layers)


def _scan_stack(cls, num_layers: int, num_args: int):
  """`cls` repeated `num_layers` times by nn.scan; params (and caches) stacked on axis 0."""
  return nn.scan(cls, variable_axes={'params': 0, 'cache': 0},
                 split_rngs={'params': True, 'dropout': True},
                 in_axes=(nn.broadcast,) * num_args, length=num_layers,
                 metadata_params={nn.PARTITION_NAME: 'layers'})


class EncoderLayer(nn.Module):
  config: T5Config
  deterministic: bool = True
  scanned: bool = False   # return (x, None), the carry/output pair nn.scan expects
  lora: Optional[LoraSpec] = None   # attached LoRA adapters (None: the plain network)

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array) -> Array:
    cfg, dt = self.config, _dtype(self.config)
    drop = lambda y: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(  # noqa: E731
        y, deterministic=self.deterministic)
    y = layers.RMSNorm(cfg.layer_norm_epsilon, dt, name='pre_attention_layer_norm')(x)
    y = layers.MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.dropout_rate, dt,
                                  cfg.float32_attention_logits, self.lora, name='attention')(
                                      y, y, mask, bias, deterministic=self.deterministic)
    x = x + drop(y)
    y = layers.RMSNorm(cfg.layer_norm_epsilon, dt, name='pre_mlp_layer_norm')(x)
    y = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, dt, self.lora,
                        name='mlp')(y, self.deterministic)
    x = x + drop(y)
    x = layers.constrain(x, ('batch', 'length', 'embed'))
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  config: T5Config
  deterministic: bool = True
  decode: bool = False
  scanned: bool = False
  lora: Optional[LoraSpec] = None

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_mask: Optional[Array],
               cross_mask: Array, bias: Array) -> Array:
    cfg, dt = self.config, _dtype(self.config)
    drop = lambda y: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(  # noqa: E731
        y, deterministic=self.deterministic)
    attn = lambda name: layers.MultiHeadAttention(  # noqa: E731
        cfg.num_heads, cfg.head_dim, cfg.dropout_rate, dt, cfg.float32_attention_logits,
        self.lora, name=name)
    y = layers.RMSNorm(cfg.layer_norm_epsilon, dt, name='pre_self_attention_layer_norm')(x)
    y = attn('self_attention')(y, y, self_mask, bias, deterministic=self.deterministic,
                               decode=self.decode)
    x = x + drop(y)
    y = layers.RMSNorm(cfg.layer_norm_epsilon, dt, name='pre_cross_attention_layer_norm')(x)
    y = attn('encoder_decoder_attention')(y, encoded, cross_mask, None,
                                          deterministic=self.deterministic,
                                          decode=self.decode, fixed_kv=True)
    x = x + drop(y)
    y = layers.RMSNorm(cfg.layer_norm_epsilon, dt, name='pre_mlp_layer_norm')(x)
    y = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, dt, self.lora,
                        name='mlp')(y, self.deterministic)
    x = x + drop(y)
    x = layers.constrain(x, ('batch', 'length', 'embed'))
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """The encoder stack over already-embedded inputs (the prompt seam sits before it)."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, valid: Array, deterministic: bool,
               lora: Optional[LoraSpec] = None) -> Array:
    # x [batch, length, embed]; valid [batch, length]
    cfg, dt = self.config, _dtype(self.config)
    length = x.shape[1]
    bias = layers.RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance, dt,
                                       name='relpos_bias')(length, length, bidirectional=True)
    mask = layers.make_attention_mask(valid, valid)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    layer_cls = _maybe_remat(EncoderLayer, cfg)
    if cfg.scan_layers:
      x, _ = _scan_stack(layer_cls, cfg.num_encoder_layers, 2)(
          cfg, deterministic, scanned=True, lora=lora, name='layers')(x, mask, bias)
    else:
      for i in range(cfg.num_encoder_layers):
        x = layer_cls(cfg, deterministic, lora=lora, name=f'layers_{i}')(x, mask, bias)
    x = layers.RMSNorm(cfg.layer_norm_epsilon, dt, name='encoder_norm')(x)
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_mask: Optional[Array], cross_mask: Array,
               deterministic: bool, decode: bool, max_decode_length: Optional[int],
               embedder: layers.Embed, lora: Optional[LoraSpec] = None,
               hidden_only: bool = False) -> Array:
    # y [batch, target_length, embed] (embedded decoder inputs); returns logits [batch, T, vocab]
    # (hidden_only: the normed hidden states [batch, T, embed] the head would multiply)
    cfg, dt = self.config, _dtype(self.config)
    length = max_decode_length if decode else y.shape[1]
    bias = layers.RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance, dt,
                                       name='relpos_bias')(length, length, bidirectional=False)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    layer_cls = _maybe_remat(DecoderLayer, cfg)
    if cfg.scan_layers:
      y, _ = _scan_stack(layer_cls, cfg.num_decoder_layers, 4)(
          cfg, deterministic, decode, scanned=True, lora=lora, name='layers')(
              y, encoded, self_mask, cross_mask, bias)
    else:
      for i in range(cfg.num_decoder_layers):
        y = layer_cls(cfg, deterministic, decode, lora=lora, name=f'layers_{i}')(
            y, encoded, self_mask, cross_mask, bias)
    y = layers.RMSNorm(cfg.layer_norm_epsilon, dt, name='decoder_norm')(y)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    if hidden_only:
      return y
    if cfg.logits_via_embedding:
      logits = embedder.attend(y) / jnp.sqrt(y.shape[-1]).astype(dt)
    else:
      # On CPU decoding reads the head from a transposed copy in the cache (layers.Dense).
      logits = layers.Dense(cfg.vocab_size, ('embed', 'vocab'), dtype=dt, lora=lora,
                            cache_transposed=decode and layers.decodes_with_transposed_head(),
                            name='logits_dense')(y)
    return layers.constrain(logits, ('batch', 'length', 'vocab'))


class Transformer(nn.Module):
  """mT5 / T5 v1.1 encoder-decoder with its removable format modules (model/formats.py).

  `with_prompt=True` attaches every format module the config has: the soft prompt (its seam:
  `encode` prepends it) and LoRA adapters (their seam: `layers.Dense`). False runs the plain
  pretrained network; module parameters in the tree are then not read.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, _dtype(cfg))
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.prompt_length > 0:
      self.prompt = SoftPrompt(cfg.prompt_length, _dtype(cfg), tasks=tuple(cfg.prompt_tasks))

  def _lora(self, with_prompt: bool) -> Optional[LoraSpec]:
    if with_prompt and not self.config.has_format_module:
      raise ValueError('with_prompt=True but the model config has no format module '
                       '(prompt_length=0 and lora_rank=0); set PROMPT_LENGTH (T5Config.'
                       'prompt_length) to the prompt length, or LORA_RANK for LoRA adapters.')
    return lora_spec_of(self.config) if with_prompt else None

  def encode(self, encoder_input_tokens: Array, *, with_prompt: bool = False,
             enable_dropout: bool = False, prompt_ids: Optional[Array] = None
             ) -> tuple[Array, Array]:
    """Returns (encoded [batch, P+T, embed], valid [batch, P+T]); P = 0 without the prompt.

    `prompt_ids` [batch] picks each row's prompt when the config has one per task.
    """
    lora = self._lora(with_prompt)
    x = self.token_embedder(encoder_input_tokens)                    # [batch, T, embed]
    valid = encoder_input_tokens > 0
    if with_prompt and self.config.prompt_length > 0:
      x, valid = self.prompt(x, valid, prompt_ids)                   # [batch, P+T, embed]
    x = layers.constrain(x, ('batch', 'length', 'embed'))
    return self.encoder(x, valid, not enable_dropout, lora), valid

  def decode(self, encoded: Array, encoder_valid: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Optional[Array] = None, *, enable_dropout: bool = False,
             decode: bool = False, max_decode_length: Optional[int] = None,
             with_prompt: bool = False, hidden_only: bool = False) -> Array:
    """Decoder logits [batch, target_length, vocab] given the encoder output.

    `with_prompt` attaches the decoder's LoRA adapters (the prompt itself lives in `encode`).
    `hidden_only` stops before the output head: the final hidden states [batch, target_length,
    embed] (greedy decoding picks tokens from them itself: model/head_select.py).
    """
    lora = self._lora(with_prompt)
    if decode:
      # One position per call; causality comes from the cache index. The cross-attention mask
      # is the encoder's alone ([batch, 1, 1, encoded]): beam search passes one encoder row per
      # example for all its beams (layers.MultiHeadAttention, fixed_kv).
      self_mask = None
      cross_mask = encoder_valid[:, None, None, :]
    else:
      length = decoder_input_tokens.shape[1]
      self_mask = layers.make_causal_mask(length)
      if decoder_target_tokens is not None:
        target_valid = decoder_target_tokens > 0
        self_mask = jnp.logical_and(self_mask, layers.make_attention_mask(target_valid,
                                                                          target_valid))
      else:
        target_valid = jnp.ones(decoder_input_tokens.shape, jnp.bool_)
      cross_mask = layers.make_attention_mask(target_valid, encoder_valid)
    y = self.token_embedder(decoder_input_tokens)
    return self.decoder(y, encoded, self_mask, cross_mask, not enable_dropout, decode,
                        max_decode_length, self.token_embedder, lora, hidden_only)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None, *, with_prompt: bool = False,
               enable_dropout: bool = False, prompt_ids: Optional[Array] = None) -> Array:
    """Teacher-forced logits [batch, target_length, vocab] (float32 unless dtype says so)."""
    encoded, valid = self.encode(encoder_input_tokens, with_prompt=with_prompt,
                                 enable_dropout=enable_dropout, prompt_ids=prompt_ids)
    return self.decode(encoded, valid, decoder_input_tokens, decoder_target_tokens,
                       enable_dropout=enable_dropout, with_prompt=with_prompt)


def _dummy_inputs(cfg: T5Config, batch: int = 1, length: int = 8):
  return jnp.ones((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32)


def init_boxed(cfg: T5Config, rng: Array, stacked: bool = False) -> Any:
  """Initialise parameters with their logical-axis boxes (use `init_params` for plain arrays).

  The t5x tree (layers_N) unless `stacked`, whatever `cfg.scan_layers` says.
  """
  enc, dec = _dummy_inputs(cfg)
  net = Transformer(cfg.replace(scan_layers=stacked))
  ids = jnp.zeros((enc.shape[0],), jnp.int32) if cfg.prompt_tasks else None
  return net.init(rng, enc, dec, with_prompt=cfg.has_format_module, prompt_ids=ids)['params']


def init_params(cfg: T5Config, rng: Optional[Array] = None,
                stacked: bool = False) -> dict[str, Any]:
  """Randomly initialised float32 parameters in the t5x tree (prompt included if configured).

  `stacked=True` gives the scanned layout instead (see stacking).
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return nn.unbox(init_boxed(cfg, rng, stacked))


def abstract_params(cfg: T5Config, stacked: bool = False) -> dict[str, Any]:
  """Shapes and dtypes of every parameter, without allocating (jax.eval_shape)."""
  return nn.unbox(jax.eval_shape(lambda r: init_boxed(cfg, r, stacked), jax.random.PRNGKey(0)))


def logical_axes(cfg: T5Config, stacked: bool = False) -> dict[str, Any]:
  """The logical axis names of every parameter: a tree of jax.sharding.PartitionSpec."""
  boxed = jax.eval_shape(lambda r: init_boxed(cfg, r, stacked), jax.random.PRNGKey(0))
  return nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnames=('config', 'with_prompt'))
def compute_logits(config: T5Config, params: Any, encoder_input_tokens: Array,
                   decoder_input_tokens: Array, decoder_target_tokens: Optional[Array] = None,
                   with_prompt: bool = False, prompt_ids: Optional[Array] = None) -> Array:
  """Teacher-forced logits [batch, target_length, vocab] for int32 token arrays (0 = padding)."""
  if with_prompt and config.prompt_length > 0 and 'prompt' not in params:
    raise ValueError('with_prompt=True but the parameters hold no prompt/prompt; initialise one '
                     '(promot_jax.initialize_prompt) or load a checkpoint that has it.')
  # Either tree form is accepted; convert to the one this config's network reads.
  params = stack_layers(params, config) if config.scan_layers else unstack_layers(params, config)
  return Transformer(config).apply({'params': params}, encoder_input_tokens, decoder_input_tokens,
                                   decoder_target_tokens, with_prompt=with_prompt,
                                   prompt_ids=prompt_ids)
