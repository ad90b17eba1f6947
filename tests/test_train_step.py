"""Stage semantics of the train step: what trains, what stays bit-identical, state size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_inputs import toy_batch

from promot_jax import tree_util
from promot_jax.model import losses
from promot_jax.train import stages
from promot_jax.train.optimizer import make_optimizer
from promot_jax.train.step import init_train_state, make_train_step


def run_steps(cfg, params, stage, n=3):
  trainable, frozen = stages.split_params(params, stage)
  optimizer = make_optimizer(stage, trainable)
  state = init_train_state(trainable, optimizer)
  step = jax.jit(make_train_step(cfg, stage, optimizer))
  losses_seen = []
  for i in range(n):
    state, metrics = step(state, frozen, toy_batch(i), jax.random.PRNGKey(0))
    losses_seen.append(float(metrics['loss']))
  return stages.merge_params(state.trainable, frozen), state, losses_seen


def assert_same(a, b, same: bool):
  for path, x in tree_util.flatten(a).items():
    y = tree_util.flatten(b)[path]
    if same:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
    else:
      assert np.abs(np.asarray(x) - np.asarray(y)).max() > 0, f'{path} did not move'


def test_prompt_tuning_moves_only_the_prompt(tiny_prompt_config, tiny_params):
  stage = stages.prompt_tuning(learning_rate=0.3)
  after, state, _ = run_steps(tiny_prompt_config, tiny_params, stage)
  assert_same({k: v for k, v in after.items() if k != 'prompt'},
              {k: v for k, v in tiny_params.items() if k != 'prompt'}, same=True)
  assert_same(after['prompt'], tiny_params['prompt'], same=False)
  # The optimizer state is the prompt's alone: Adafactor keeps an unfactored second moment for a
  # [5, 32] matrix (dims below 128 are not factored), i.e. 5*32 floats, plus the step count.
  leaves = jax.tree_util.tree_leaves(state.opt_state)
  nbytes = sum(int(np.asarray(x).nbytes) for x in leaves)
  assert nbytes <= 4 * (5 * 32) + 64, nbytes
  assert tree_util.count_params(state.trainable) == 5 * 32


def test_model_tuning_freezes_the_prompt_and_moves_every_weight(tiny_prompt_config, tiny_params):
  stage = stages.model_tuning(dropout_rate=0.1, learning_rate=1e-2)
  after, state, _ = run_steps(tiny_prompt_config, tiny_params, stage)
  np.testing.assert_array_equal(after['prompt']['prompt'], tiny_params['prompt']['prompt'])
  assert_same({k: v for k, v in after.items() if k != 'prompt'},
              {k: v for k, v in tiny_params.items() if k != 'prompt'}, same=False)
  assert 'prompt' not in state.trainable


def test_finetune_runs_without_any_prompt(tiny_config, tiny_params):
  no_prompt = {k: v for k, v in tiny_params.items() if k != 'prompt'}
  stage = stages.finetune(learning_rate=1e-2, dropout_rate=0.0)
  after, _, seen = run_steps(tiny_config, no_prompt, stage)
  assert 'prompt' not in after and all(np.isfinite(seen))


def test_joint_trains_prompt_and_model_with_separate_scaling(tiny_prompt_config, tiny_params):
  after, state, _ = run_steps(tiny_prompt_config, tiny_params,
                             stages.joint(learning_rate=1e-2, dropout_rate=0.0))
  assert_same(after, tiny_params, same=False)


def test_loss_falls_when_one_batch_is_repeated(tiny_prompt_config, tiny_params):
  stage = stages.model_tuning(dropout_rate=0.0, label_smoothing=0.0, learning_rate=1e-2)
  trainable, frozen = stages.split_params(tiny_params, stage)
  optimizer = make_optimizer(stage, trainable)
  state = init_train_state(trainable, optimizer)
  step = jax.jit(make_train_step(tiny_prompt_config, stage, optimizer))
  seen = []
  for _ in range(15):
    state, metrics = step(state, frozen, toy_batch(0), jax.random.PRNGKey(0))
    seen.append(float(metrics['loss']))
  assert seen[-1] < 0.5 * seen[0], seen


def test_split_rejects_a_regex_that_matches_nothing(tiny_params):
  with pytest.raises(ValueError, match='matches no parameter'):
    stages.split_params(tiny_params, stages.prompt_tuning(trainable='^nothing/'))


def test_label_smoothing_and_z_loss_match_a_direct_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
  weights = (targets > 0).astype(np.float32)
  loss, m = losses.cross_entropy_with_z_loss(logits, targets, weights, label_smoothing=0.1,
                                             z_loss=1e-4)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  soft = np.full(logits.shape, 0.1 / 6)
  np.put_along_axis(soft, targets[..., None], 0.9, axis=-1)
  const = -(0.9 * np.log(0.9) + 6 * (0.1 / 6) * np.log(0.1 / 6))
  per_token = -(soft * logp).sum(-1) - const
  logz = np.log(np.exp(logits).sum(-1))
  expected = ((per_token + 1e-4 * logz ** 2) * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  # t5x's normalising factor divides the sum instead of the token count
  loss_f, _ = losses.cross_entropy_with_z_loss(logits, targets, weights, 0.1, 1e-4, 1024.0)
  np.testing.assert_allclose(float(loss_f), expected * weights.sum() / 1024.0, rtol=1e-5)


def _reference_loss(logits, targets, weights, label_smoothing, z_loss):
  """The textbook formula, differentiated by jax (what the custom gradient must equal)."""
  vocab = logits.shape[-1]
  confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  soft = jnp.where(jax.nn.one_hot(targets, vocab) > 0, confidence, low)
  per_token = -(soft * log_probs).sum(-1) + z_loss * log_z ** 2
  return (per_token * weights).sum() / weights.sum()


@pytest.mark.parametrize('label_smoothing,z_loss', [(0.0, 0.0), (0.1, 1e-4), (0.2, 1e-2)])
def test_cross_entropy_gradient_matches_autodiff_of_the_formula(label_smoothing, z_loss):
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 4, 11)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (3, 4)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (3, 4)), jnp.float32).at[0, 0].set(1.0)
  ours = jax.grad(lambda x: losses.cross_entropy_with_z_loss(
      x, targets, weights, label_smoothing, z_loss)[0])(logits)
  ref = jax.grad(_reference_loss)(logits, targets, weights, label_smoothing, z_loss)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6)
  # rows with weight 0 get no gradient; the others sum to ~0 (softmax minus a distribution)
  assert np.all(np.asarray(ours)[np.asarray(weights) == 0] == 0)
  # bf16 logits come back as bf16 cotangents
  g16 = jax.grad(lambda x: losses.cross_entropy_with_z_loss(
      x, targets, weights, label_smoothing, z_loss)[0])(logits.astype(jnp.bfloat16))
  assert g16.dtype == jnp.bfloat16


def test_token_accuracy_counts_argmax_hits():
  logits = jnp.asarray([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]]], jnp.float32)
  targets = jnp.asarray([[1, 2]], jnp.int32)
  _, m = losses.cross_entropy_with_z_loss(logits, targets, jnp.ones((1, 2)), 0.0, 0.0)
  assert float(m['token_accuracy']) == 0.5 and float(m['sequence_accuracy']) == 0.0


_RBG_SHARDING_SCRIPT = '''
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from promot_jax.train.step import dropout_key
key = dropout_key(jax.random.fold_in(jax.random.PRNGKey(0), 7))
mask = lambda x, k: jax.random.bernoulli(k, 0.9, x.shape)
x = jnp.zeros((8, 64, 32))
one = np.asarray(jax.jit(mask)(x, key))
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))
for spec in (P('data', None, None), P('data', None, 'model')):
  sh = NamedSharding(mesh, spec)
  many = jax.jit(mask, in_shardings=(sh, None), out_shardings=sh)(jax.device_put(x, sh), key)
  assert (np.asarray(many) == one).all(), spec
  assert 0.85 < one.mean() < 0.95
print('same masks')
'''


def test_dropout_masks_do_not_depend_on_the_device_layout():
  """dropout_key's masks are the same on 1 device and on a 4x2 data/model mesh."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  done = subprocess.run([sys.executable, '-c', _RBG_SHARDING_SCRIPT], capture_output=True,
                        text=True, env=env, timeout=300)
  assert done.returncode == 0 and 'same masks' in done.stdout, done.stderr[-2000:]


def test_dropout_bits_use_xla_threefry_on_cpu_and_the_default_generator_elsewhere():
  """dropout_key's bits: RngBitGenerator's ThreeFry when compiling for CPU (XLA:CPU's Philox,
  the default, is ~7x slower), the platform's default generator for a TPU."""
  from promot_jax.model import layers
  from promot_jax.train.step import dropout_key
  mask = lambda rng: jax.random.bernoulli(dropout_key(rng), 0.9, (4, 8))  # noqa: E731
  rng = jax.random.PRNGKey(3)
  cpu = jax.jit(mask).lower(rng).as_text()
  assert 'rng_bit_generator' in cpu and 'THREE_FRY' in cpu
  with layers.compiling_for('tpu'):
    tpu = jax.jit(mask).lower(rng).as_text()
  assert 'rng_bit_generator' in tpu and 'THREE_FRY' not in tpu and 'PHILOX' not in tpu
  a, b = np.asarray(mask(rng)), np.asarray(mask(jax.random.fold_in(rng, 1)))
  assert (a == np.asarray(mask(rng))).all() and not (a == b).all()


@pytest.mark.parametrize('stage_name', ['prompt_tuning', 'model_tuning'])
def test_a_poisoned_batch_leaves_finite_parameters_and_optimizer_state_untouched(
    tiny_prompt_config, tiny_params, stage_name):
  """From finite parameters, one batch whose loss is not finite (a NaN loss weight) changes
  nothing: parameters and optimizer state are bit-identical after it, and the next good batch
  trains as if the bad one had never come."""
  stage = {'prompt_tuning': stages.prompt_tuning(learning_rate=0.3),
           'model_tuning': stages.model_tuning(dropout_rate=0.0, learning_rate=1e-2)}[stage_name]
  trainable, frozen = stages.split_params(tiny_params, stage)
  optimizer = make_optimizer(stage, trainable)
  step = jax.jit(make_train_step(tiny_prompt_config, stage, optimizer))
  float_batch = lambda i: {**toy_batch(i), 'decoder_loss_weights':  # noqa: E731
                           toy_batch(i)['decoder_loss_weights'].astype(np.float32)}
  rng = jax.random.PRNGKey(0)
  state, _ = step(init_train_state(trainable, optimizer), frozen, float_batch(0), rng)
  before = jax.tree_util.tree_map(np.asarray, (state.trainable, state.opt_state))
  poisoned = float_batch(1)
  poisoned['decoder_loss_weights'][0, 0] = np.nan
  bad_state, metrics = step(state, frozen, poisoned, rng)
  assert not bool(metrics['finite']) and not np.isfinite(float(metrics['loss']))
  after = jax.tree_util.tree_map(np.asarray, (bad_state.trainable, bad_state.opt_state))
  for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(x, y)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(after))
  # the next good batch: the same update as from the state before the bad one
  good_after_bad, m1 = step(bad_state, frozen, float_batch(2), rng)
  assert bool(m1['finite'])
  assert_same(good_after_bad.trainable, state.trainable, same=False)
