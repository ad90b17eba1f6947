"""Building blocks of the T5 v1.1 / mT5 network, named as in t5x's parameter tree.

Every parameter is created through `logical_param`, which attaches logical axis names
('vocab', 'embed', 'mlp', 'heads', 'kv', 'joined_kv', 'relpos_buckets', ...) so that one
table of rules (promot_jax.mesh) lays out any model size on any mesh.
Kernels are stored 2-D ([in, out]) exactly as t5x stores them, so t5x checkpoints load
without reshaping.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from promot_jax.model.lora import LORA_RANK_AXIS, LoraSpec, a_init as lora_a_init

Array = jax.Array
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
BIG_NEG = -1e10


def logical_param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
           axes: tuple[str, ...]) -> Array:
  """A float32 parameter carrying logical axis names (boxed at init, plain when applied)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), jnp.float32)


def constrain(x: Array, axes: tuple[str, ...]) -> Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh/rules context)."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    scale = logical_param(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(var + self.epsilon)
    return jnp.asarray(y * scale, self.dtype)


# The decoding cache's copy of a kernel stored [out, in] (Dense(cache_transposed=True)).
TRANSPOSED_KERNEL = 'transposed_kernel'


_compiling_for: list[str] = []


@contextlib.contextmanager
def compiling_for(platform: str):
  """Programs traced inside are laid out for `platform` ('cpu', 'tpu', ...) rather than for
  this process's default backend: ahead-of-time compiles for a TPU slice on a CPU host
  (tools/plan.py) must not take the CPU-only layouts below. jax's trace caches do not know
  this setting, so they are cleared on the way in and out of a change."""
  if platform == target_platform():
    yield
    return
  jax.clear_caches()
  _compiling_for.append(platform)
  try:
    yield
  finally:
    _compiling_for.pop()
    jax.clear_caches()


def target_platform() -> str:
  """The platform programs traced now are for: `compiling_for`'s, else the default backend."""
  return _compiling_for[-1] if _compiling_for else jax.default_backend()


def decodes_with_transposed_head() -> bool:
  """Whether decoding multiplies with a transposed copy of the output head (Dense below):
  on XLA:CPU, where it pays; accelerators lay the product out themselves."""
  return target_platform() == 'cpu'


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def kernel_product(x: Array, kernel: Array, transpose_cotangent: bool = False) -> Array:
  """x [..., in] @ kernel [in, out], whose kernel gradient is one product over the leading axes.

  jax's rule for the kernel's cotangent forms dy^T x and transposes it; XLA:CPU then writes
  dy (often the output of a long elementwise fusion: the gated GELU's backward, the loss's
  gradient) transposed with strided stores and multiplies with Eigen. Written as x^T dy it
  transposes x instead (a plain copy of a stored activation) and runs the product through
  its GEMM library: the fine-tuning step's kernel gradients, the head's [512, 250112] one
  included, got faster (README, Performance).

  `transpose_cotangent`: (dy^T x)^T instead, which transposes dy and the [out, in] result.
  For the MLP's `wo` (MlpBlock) x is the widest activation (mlp_dim) and XLA:CPU does not
  copy it: it recomputes the gated activation and its dropout mask inside the strided
  transposing copy (8 such [1024, 1824] fusions, ~25 ms each, in a traced stage-2 step),
  while dy there is half as wide and made by a short fusion. Same values and cotangents as
  jnp.einsum either way (tests/test_model.py).
  """
  return jnp.einsum('...i,io->...o', x, kernel)


def _kernel_product_fwd(x, kernel, transpose_cotangent):
  return kernel_product(x, kernel, transpose_cotangent), (x, kernel)


def _kernel_product_bwd(transpose_cotangent, residuals, dy):
  x, kernel = residuals
  lead = ''.join(chr(ord('a') + i) for i in range(x.ndim - 1))
  dx = jnp.einsum('...o,io->...i', dy, kernel)
  if transpose_cotangent:
    return dx, jnp.einsum(f'{lead}o,{lead}i->oi', dy, x).T
  return dx, jnp.einsum(f'{lead}i,{lead}o->io', x, dy)


kernel_product.defvjp(_kernel_product_fwd, _kernel_product_bwd)


def products_with_own_kernel_gradient() -> bool:
  """Whether Dense multiplies through `kernel_product`: on XLA:CPU, where the layout of
  jax's own rule is slow; accelerators lay the product out themselves."""
  return target_platform() == 'cpu'


@jax.custom_vjp
def add_shared_bias(logits: Array, bias: Array) -> Array:
  """logits [batch, ...] + bias [1, ...], whose bias gradient sums the batch as a product.

  jax's rule reduces the cotangent over the batch axis. The relative-position bias is made
  once per stack and added in every layer, so XLA:CPU merges the layers' reductions into one
  fusion, which it runs far below memory speed (174 ms for eight [8, 6, 228, 228] cotangents
  in a traced mT5-small stage-2 step); the same sums as ones [batch] x cotangent [batch, n]
  products take a few ms. Same values and cotangents as `logits + bias` (tests/test_model.py).
  """
  return logits + bias


def _add_shared_bias_fwd(logits, bias):
  return logits + bias, None


def _add_shared_bias_bwd(_, g):
  ones = jnp.ones((g.shape[0],), g.dtype)
  return g, jnp.einsum('b,b...->...', ones, g)[None]


add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def add_bias(logits: Array, bias: Array) -> Array:
  """logits + bias, through `add_shared_bias` where one bias row serves a batch on CPU."""
  if (target_platform() == 'cpu' and bias.shape[0] == 1 and logits.shape[0] > 1
      and bias.ndim == logits.ndim and bias.shape[1:] == logits.shape[1:]):
    return add_shared_bias(logits, bias)
  return logits + bias


class Dense(nn.Module):
  """A bias-free dense layer with a 2-D kernel [in, out] (t5x's DenseGeneral storage).

  The LoRA seam: given an attached `lora` spec whose targets match this module's path, the
  layer owns lora_a [in, rank] and lora_b [rank, out] and adds scale * (x A) B (model/lora.py).

  `cache_transposed`: while decoding (the 'cache' collection mutable) the layer keeps its
  kernel transposed, [out, in], in the cache, made once when the cache is built, and
  multiplies a few rows at a time with that copy. For mT5's [512, 250112] output head on
  XLA:CPU a product of 8 rows with the [out, in] copy took 30 ms against 49 ms with the stored
  [in, out] kernel (32 rows: 56 vs 88 ms; `python -m promot_jax.tools.bench.alone head
  --rows 8 [--stored]`), at every decoded position. Training never sees it.

  `transpose_cotangent`: on CPU, the kernel gradient transposes the output's cotangent rather
  than the input (`kernel_product`); same values.
  """
  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Initializer = default_kernel_init
  dtype: Any = jnp.float32
  lora: Optional[LoraSpec] = None
  cache_transposed: bool = False
  transpose_cotangent: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = logical_param(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                    self.kernel_axes)
    x = jnp.asarray(x, self.dtype)
    if self.cache_transposed and self.is_mutable_collection('cache'):
      if not self.has_variable('cache', TRANSPOSED_KERNEL):       # building the cache
        self.put_variable('cache', TRANSPOSED_KERNEL, constrain(
            jnp.asarray(kernel, self.dtype).T, self.kernel_axes[::-1]))
      y = jnp.einsum('...i,oi->...o', x, self.get_variable('cache', TRANSPOSED_KERNEL))
    elif products_with_own_kernel_gradient():
      y = kernel_product(x, jnp.asarray(kernel, self.dtype), self.transpose_cotangent)
    else:
      y = jnp.einsum('...i,io->...o', x, jnp.asarray(kernel, self.dtype))
    if self.lora is not None and self.lora.applies('/'.join(self.path)):
      rank = self.lora.rank
      a = logical_param(self, 'lora_a', lora_a_init, (x.shape[-1], rank),
                        (self.kernel_axes[0], LORA_RANK_AXIS))
      b = logical_param(self, 'lora_b', nn.initializers.zeros, (rank, self.features),
                        (LORA_RANK_AXIS, self.kernel_axes[1]))
      low = jnp.einsum('...i,ir->...r', x, jnp.asarray(a, self.dtype))
      y = y + jnp.einsum('...r,ro->...o', low, jnp.asarray(b, self.dtype)) * jnp.asarray(
          self.lora.scale, self.dtype)
    return y


# The variable collection that stands in for the embedding table in a sparse train step:
# {GATHERED: {'token_embedder': {'ids': [K] sorted token ids, 'rows': [K, embed] their rows}}}.
GATHERED = 'gathered'


class Embed(nn.Module):
  """Token embedding table [vocab, embed] (t5x: token_embedder/embedding).

  Given the GATHERED collection instead of the table, the lookup reads only those rows (every
  token looked up must be among `ids`, which are sorted): a train step then differentiates
  with respect to the [K, embed] rows the batch uses, not the whole table (train/step.py).
  """
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    if self.has_variable(GATHERED, 'rows'):
      ids, rows = self.get_variable(GATHERED, 'ids'), self.get_variable(GATHERED, 'rows')
      slots = jnp.searchsorted(ids, tokens)               # tokens' positions among `ids`
      return jnp.asarray(jnp.take(rows, slots, axis=0), self.dtype)
    table = logical_param(self, 'embedding', nn.initializers.normal(stddev=1.0),
                   (self.num_embeddings, self.features), ('vocab', 'embed'))
    return jnp.asarray(jnp.take(table, tokens, axis=0), self.dtype)  # [batch, length, embed]

  def attend(self, query: Array) -> Array:
    """Logits by the transposed table (only for tied-embedding configs)."""
    table = self.variables['params']['embedding']
    return jnp.einsum('...e,ve->...v', query, jnp.asarray(table, self.dtype))


class MlpBlock(nn.Module):
  """Gated MLP: act_0(x W_0) * act_1(x W_1) -> dropout -> W_o (T5 v1.1's gated-GELU)."""
  mlp_dim: int
  activations: Sequence[str] = ('gelu', 'linear')
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  lora: Optional[LoraSpec] = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    emb = x.shape[-1]
    h = None
    for i, act in enumerate(self.activations):
      y = Dense(self.mlp_dim, ('embed', 'mlp'), dtype=self.dtype, lora=self.lora,
                name=f'wi_{i}')(x)
      y = y if act == 'linear' else getattr(nn, act)(y)  # nn.gelu is the tanh approximation
      h = y if h is None else h * y
    h = constrain(h, ('batch', 'length', 'mlp'))           # [batch, length, mlp]
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
    return Dense(emb, ('mlp', 'embed'), dtype=self.dtype, lora=self.lora,
                 transpose_cotangent=True, name='wo')(h)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's log-spaced relative-position buckets (computed on the host: lengths are static)."""
  n = -np.asarray(relative_position, np.int64)
  ret = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide='ignore'):
    large = max_exact + (
        np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
        / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return ret + np.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  """Per-head scalar bias by relative-position bucket, shared by all layers of a stack."""
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool) -> Array:
    rel = np.arange(klen)[None, :] - np.arange(qlen)[:, None]           # [q, k]
    buckets = relative_position_bucket(rel, bidirectional, self.num_buckets, self.max_distance)
    table = logical_param(self, 'rel_embedding',
                   nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
                   (self.num_heads, self.num_buckets), ('heads', 'relpos_buckets'))
    bias = jnp.take(jnp.asarray(table, self.dtype), jnp.asarray(buckets), axis=1)  # [heads, q, k]
    return bias[None]                                                   # [1, heads, q, k]


# The cache entries of a cross-attention's projected encoder keys and values (decoding).
FIXED_KEY, FIXED_VALUE = 'fixed_key', 'fixed_value'
# A self-attention's cached keys and values, one row per decoded sequence (beam search
# reorders them).
SELF_CACHE = ('cached_key', 'cached_value')


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with t5x's parameter layout and key/value cache.

  As in T5, no 1/sqrt(head_dim) factor appears in the forward pass: it is folded into the
  query initialiser. With `decode=True` the keys/values of past positions live in the
  'cache' collection and each call appends one position.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  float32_logits: bool = True
  lora: Optional[LoraSpec] = None   # adapters on the projections its targets name

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array],
               bias: Optional[Array] = None, *, deterministic: bool = True,
               decode: bool = False, fixed_kv: bool = False) -> Array:
    # inputs_q [batch, q_len, embed]; inputs_kv [batch, kv_len, embed];
    # mask broadcastable to [batch, heads, q_len, kv_len]; bias to the same.
    # decode with fixed_kv (cross-attention): inputs_kv is the same at every call, so its keys
    # and values are projected once, by the call that creates the cache, and kept there
    # heads-major ([batch, heads, kv_len, kv]), the layout the score and output products read.
    # (Left to XLA, the projection is hoisted out of the decoding loop but the transposes to
    # that layout are not: one per key and value per layer per step, a fifth of a beam-4
    # decode of mT5-small.) When inputs_kv has fewer rows than inputs_q (beam search: one
    # encoder row per example, its beams' rows b * beams + k in inputs_q), each example's
    # queries attend to its one copy of the keys and values, its beams taken as query
    # positions: no per-beam copies to project or read.
    inner = self.num_heads * self.head_dim
    depth_scaling = np.sqrt(self.head_dim).astype(np.float32)

    def query_init(*args):
      return default_kernel_init(*args) / depth_scaling

    def project(name, x, init=default_kernel_init):
      y = Dense(inner, ('embed', 'joined_kv'), kernel_init=init, dtype=self.dtype,
                lora=self.lora, name=name)(x)
      return y.reshape(y.shape[:-1] + (self.num_heads, self.head_dim))  # [batch, len, heads, kv]

    def keys_and_values():
      key = constrain(project('key', inputs_kv), ('batch', 'length', 'heads', 'kv'))
      value = constrain(project('value', inputs_kv), ('batch', 'length', 'heads', 'kv'))
      return key, value

    query = project('query', inputs_q, query_init)
    query = constrain(query, ('batch', 'length', 'heads', 'kv'))
    kv_axes = 'bkhd'
    if decode and fixed_kv:
      kv_axes = 'bhkd'
      if self.has_variable('cache', FIXED_KEY):
        key, value = self.get_variable('cache', FIXED_KEY), self.get_variable('cache', FIXED_VALUE)
      else:
        key, value = (jnp.swapaxes(x, 1, 2) for x in keys_and_values())
        self.put_variable('cache', FIXED_KEY, key)
        self.put_variable('cache', FIXED_VALUE, value)
    else:
      key, value = keys_and_values()
      if decode:
        kv_axes = 'bhkd'
        key, value, mask, bias = self._update_cache(key, value, mask, bias)

    q_shape = query.shape
    if key.shape[0] != q_shape[0]:           # beams share their example's keys and values
      query = query.reshape((key.shape[0], -1) + q_shape[2:])
    if self.float32_logits:
      query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    logits = jnp.einsum(f'bqhd,{kv_axes}->bhqk', query, key)            # [batch, heads, q, k]
    if bias is not None:
      logits = add_bias(logits, bias.astype(logits.dtype))
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.asarray(BIG_NEG, logits.dtype))
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    out = jnp.einsum(f'bhqk,{kv_axes}->bqhd', weights, value.astype(self.dtype))  # [b, q, heads, kv]
    out = out.reshape(q_shape[:2] + (inner,))
    return Dense(inputs_q.shape[-1], ('joined_kv', 'embed'), dtype=self.dtype, lora=self.lora,
                 name='out')(out)

  def _update_cache(self, key, value, mask, bias):
    """Write this step's key/value at the cache index; attend to positions <= index.

    The cache is kept heads-major, [batch, heads, max_length, kv], the layout the score and
    output products read (as the cross-attention's fixed keys/values): kept [batch,
    max_length, heads, kv], XLA:CPU transposed the whole cached key and value of every layer
    at every step before its products."""
    key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)       # [batch, heads, 1, kv]
    initialized = self.has_variable('cache', SELF_CACHE[0])
    cached_key = self.variable('cache', SELF_CACHE[0], jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable('cache', SELF_CACHE[1], jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    if not initialized:  # the init call only sizes the cache: [batch, heads, max_length, kv]
      return key, value, mask, bias
    batch, heads, max_length, depth = cached_key.value.shape
    if key.shape[2] != 1:
      raise ValueError(f'Cached decoding takes one position per call, got {key.shape[2]}.')
    index = cache_index.value
    zero = jnp.array(0, jnp.int32)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (zero, zero, index, zero))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value, (zero, zero, index, zero))
    cache_index.value = index + 1
    step_mask = (jnp.arange(max_length) <= index)[None, None, None, :]  # [1, 1, 1, max_length]
    mask = step_mask if mask is None else jnp.logical_and(mask, step_mask)
    if bias is not None:  # bias holds all [max_length, max_length] rows; take this query's row
      bias = jax.lax.dynamic_slice(bias, (zero, zero, index, zero),
                                   (bias.shape[0], bias.shape[1], 1, bias.shape[3]))
    return cached_key.value, cached_value.value, mask, bias


def make_attention_mask(query_valid: Array, key_valid: Array) -> Array:
  """[batch, q] x [batch, k] validity -> [batch, 1, q, k] boolean mask."""
  return jnp.logical_and(query_valid[:, None, :, None], key_valid[:, None, None, :])


def make_causal_mask(length: int) -> Array:
  return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]  # [1, 1, q, k]
