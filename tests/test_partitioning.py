"""Partitioning: one train step gives the same numbers on one device and on any (data, model) mesh.

The meshes need 8 devices. XLA fakes them on the CPU only when XLA_FLAGS says so before jax
starts, so this module runs itself as a script in a fresh process (`python test_partitioning.py
OUT_DIR`) that trains on every mesh and writes what it saw to OUT_DIR; the tests read that.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from toy_inputs import host_params, toy_batch

from promot_jax import mesh as partitioning, tree_util
from promot_jax.model import config
from promot_jax.train import sharding, sparse, stages
from promot_jax.train.sharding import build_sharded_step, init_state_on_mesh

# mt5_tiny with one layer each side (XLA:CPU compile time grows with layers), and emb_dim 128 so
# that Adafactor factors the [512, 128] embedding and logits moments (dims >= 128): the sharded
# factored moments are then part of what must agree. heads 4, joined_kv 32, mlp 64 and vocab 512
# all divide by the model axis sizes 1, 2 and 4.
CFG = config.get_config('mt5_tiny', prompt_length=4, emb_dim=128, num_encoder_layers=1,
                        num_decoder_layers=1, dropout_rate=0.0)
STAGES = {
    'prompt_tuning': stages.prompt_tuning(learning_rate=0.3),         # the paper's
    'model_tuning': stages.model_tuning(dropout_rate=0.0, learning_rate=1e-2),
    # the same with the input embedding's gradient and update dense (train/sparse.py): the
    # vocab-split table must get the same update from the batch's rows as from the dense path
    'model_tuning_dense': stages.model_tuning(dropout_rate=0.0, learning_rate=1e-2,
                                              sparse_embedding=False),
}
# name: (num_partitions, how many of the 8 devices); '1x1' is the single-device reference.
MESHES = {'1x1': (1, 1), '8x1': (1, 8), '4x2': (2, 8), '2x4': (4, 8)}
GLOBAL_BATCH, STEPS = 8, 3
# Halves XLA:CPU compile time; every mesh compiles with the same flags, so agreement still means
# the partitioning is right.
XLA_FLAGS = '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'






def layout(x):
  return {'spec': list(x.sharding.spec), 'shape': list(x.shape),
          'shard_shape': list(x.addressable_shards[0].data.shape),
          'replicated': bool(x.sharding.is_fully_replicated)}


def error_of(fn):
  try:
    fn()
  except ValueError as e:
    return str(e)
  return None


def train_on_every_mesh(out_dir):
  """The script's body (8 fake devices): train each stage on each mesh, record what happened."""
  assert jax.device_count() == 8, jax.devices()
  params, rules = host_params(CFG), partitioning.standard_logical_axis_rules()
  np.savez(os.path.join(out_dir, 'initial.npz'), **tree_util.flatten(params))
  seen = {'losses': {}, 'layout': {}, 'opt_layout': {}, 'sparse': {}}
  for stage_name, stage in STAGES.items():
    seen['sparse'][stage_name] = sparse.plan(CFG, stage, stages.split_params(params, stage)[0],
                                             toy_batch(0, batch=GLOBAL_BATCH))
    for mesh_name, (num_partitions, num_devices) in MESHES.items():
      mesh = partitioning.make_mesh(num_partitions, jax.devices()[:num_devices])
      sharded = build_sharded_step(CFG, stage, mesh, rules, params)
      trainable, frozen = stages.split_params(params, stage)
      frozen = jax.device_put(frozen, sharded.frozen_sharding)
      state = init_state_on_mesh(sharded, jax.device_put(trainable, sharded.trainable_sharding))
      losses = []
      for i in range(STEPS):
        batch = partitioning.global_batch_from_host(toy_batch(i, batch=GLOBAL_BATCH), mesh)
        state, metrics = sharded.step_fn(state, frozen, batch, jax.random.PRNGKey(0))
        losses.append(float(metrics['loss']))
      key = f'{stage_name}/{mesh_name}'
      seen['losses'][key] = losses
      np.savez(os.path.join(out_dir, key.replace('/', '_') + '.npz'),
               **tree_util.flatten(jax.device_get(state.trainable)))
      if mesh_name == '2x4':
        everything = tree_util.flatten(stages.merge_params(state.trainable, frozen))
        seen['layout'][stage_name] = {p: layout(v) for p, v in everything.items()}
        seen['opt_layout'][stage_name] = {
            jax.tree_util.keystr(path): layout(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state) if leaf.ndim}
  mesh_8x1 = partitioning.make_mesh(1)
  seen['errors'] = {
      'batch 12 on 8x1': error_of(lambda: partitioning.check_batch_divisible(12, mesh_8x1)),
      'batch 16 on 8x1': error_of(lambda: partitioning.check_batch_divisible(16, mesh_8x1)),
      'batch 12 on 2x4': error_of(
          lambda: partitioning.check_batch_divisible(12, partitioning.make_mesh(4))),
      'num_partitions 3': error_of(lambda: partitioning.make_mesh(3)),
  }
  with open(os.path.join(out_dir, 'seen.json'), 'w') as f:
    json.dump(seen, f)


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  """Run this file as a script on 8 fake CPU devices; returns (what it saw, its output dir)."""
  out_dir = tmp_path_factory.mktemp('meshes')
  env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS='cpu')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  proc = subprocess.run([sys.executable, __file__, str(out_dir)], env=env, capture_output=True,
                        text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(out_dir / 'seen.json') as f:
    return json.load(f), out_dir


def trained(out_dir, stage_name, mesh_name):
  with np.load(out_dir / f'{stage_name}_{mesh_name}.npz') as f:
    return dict(f)


# The logical axis rules.

def test_standard_rules_replicate_the_prompt_and_split_batch_and_mlp():
  rules = partitioning.standard_logical_axis_rules()
  assert dict(rules)['prompt'] is None and dict(rules)['prompt_embed'] is None
  assert dict(rules)['batch'] == 'data'
  assert dict(rules)['mlp'] == 'model'
  assert nn.logical_to_mesh_axes(('prompt', 'prompt_embed'), rules) == PartitionSpec(None, None)
  assert nn.logical_to_mesh_axes(('embed', 'mlp'), rules) == PartitionSpec(None, 'model')


def test_an_override_takes_precedence_over_the_standard_rule():
  rules = partitioning.standard_logical_axis_rules((('mlp', None), ('embed', 'model')))
  assert [r for r in rules if r[0] == 'mlp'] == [('mlp', None)]      # replaced, not shadowed
  assert nn.logical_to_mesh_axes(('embed', 'mlp'), rules) == PartitionSpec('model', None)
  assert dict(rules)['batch'] == 'data'                               # the others stay


# Clear errors for layouts that cannot work.

def test_a_batch_must_divide_the_data_axis(eight_devices):
  errors = eight_devices[0]['errors']
  assert 'BATCH_SIZE=12 is not divisible' in errors['batch 12 on 8x1']
  assert 'multiple of 8, e.g. 16' in errors['batch 12 on 8x1']
  assert errors['batch 16 on 8x1'] is None
  assert errors['batch 12 on 2x4'] is None          # the data axis is 2 there, not 8 devices


def test_num_partitions_must_divide_the_devices(eight_devices):
  message = eight_devices[0]['errors']['num_partitions 3']
  assert 'num_partitions=3 must divide the 8 devices' in message
  assert '[1, 2, 4, 8]' in message


# The same step on every mesh.

@pytest.mark.parametrize('stage_name', list(STAGES))
def test_every_mesh_computes_the_single_device_losses(eight_devices, stage_name):
  losses = eight_devices[0]['losses']
  reference = losses[f'{stage_name}/1x1']
  assert len(reference) == STEPS and np.all(np.isfinite(reference))
  for mesh_name in ('8x1', '4x2', '2x4'):
    np.testing.assert_allclose(losses[f'{stage_name}/{mesh_name}'], reference, rtol=1e-5,
                               err_msg=mesh_name)


@pytest.mark.parametrize('stage_name', list(STAGES))
def test_every_mesh_makes_the_single_device_updates(eight_devices, stage_name):
  out_dir = eight_devices[1]
  reference = trained(out_dir, stage_name, '1x1')
  with np.load(out_dir / 'initial.npz') as f:
    initial = dict(f)
  # the updates are not vanishing: a mismatch would show far above the tolerance
  assert all(np.abs(v - initial[p]).max() > 1e-3 for p, v in reference.items())
  # Meshes sum gradients in another order, so each gradient differs in its last float32 bits.
  # Adafactor steps each element by about lr * g / rms(g): where a gradient element nearly
  # cancels, that noise becomes ~1e-4 of a step (seen: prompt 7e-5 after three lr-0.3 steps that
  # moved it by up to 1.1; with SGD the same runs agree to 1e-7). So the updated parameters must
  # agree to 1e-3 of the learning rate: 3e-4 for the prompt, 1e-5 for the weights (seen: 1e-6).
  atol = 1e-3 * STAGES[stage_name].learning_rate
  for mesh_name in ('8x1', '4x2', '2x4'):
    got = trained(out_dir, stage_name, mesh_name)
    assert sorted(got) == sorted(reference)
    for path, value in reference.items():
      np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=atol,
                                 err_msg=f'{mesh_name}: {path}')


def test_the_sparse_embedding_update_equals_the_dense_one_on_every_mesh(eight_devices):
  seen, out_dir = eight_devices
  assert seen['sparse'] == {'prompt_tuning': False, 'model_tuning': True,
                            'model_tuning_dense': False}
  atol = 1e-3 * STAGES['model_tuning'].learning_rate
  for mesh_name in MESHES:
    dense = trained(out_dir, 'model_tuning_dense', mesh_name)
    for path, value in trained(out_dir, 'model_tuning', mesh_name).items():
      np.testing.assert_allclose(value, dense[path], rtol=1e-5, atol=atol,
                                 err_msg=f'{mesh_name}: {path}')


def test_stage1_trains_only_the_prompt_and_stage2_everything_but_it(eight_devices):
  out_dir = eight_devices[1]
  assert list(trained(out_dir, 'prompt_tuning', '2x4')) == ['prompt/prompt']
  model_tuned = trained(out_dir, 'model_tuning', '2x4')
  assert 'prompt/prompt' not in model_tuned and 'decoder/logits_dense/kernel' in model_tuned


# The layout on the (2, 4) mesh.

@pytest.mark.parametrize('stage_name', list(STAGES))
def test_weights_are_split_over_model_and_the_prompt_is_replicated(eight_devices, stage_name):
  params = eight_devices[0]['layout'][stage_name]
  for path in ('encoder/layers_0/mlp/wi_0/kernel', 'decoder/layers_0/self_attention/query/kernel'):
    assert params[path]['spec'] == [None, 'model'], path             # [embed, mlp / joined_kv]
    assert params[path]['shard_shape'] == [params[path]['shape'][0],
                                           params[path]['shape'][1] // 4], path
  assert params['encoder/layers_0/mlp/wo/kernel']['spec'] == ['model', None]
  assert params['token_embedder/embedding']['shard_shape'] == [512 // 4, 128]
  prompt = params['prompt/prompt']
  assert prompt['replicated'] and prompt['shard_shape'] == prompt['shape'] == [4, 128]


def test_adafactor_moments_are_split_like_their_parameters(eight_devices):
  moments = eight_devices[0]['opt_layout']['model_tuning']
  # unfactored [embed, mlp] kernel: the second moment has its shape and its layout
  wi = [m for path, m in moments.items()
        if "['mlp']['wi_0']['kernel']" in path and m['shape'] == [128, 64]]
  assert wi and all(m['spec'] == [None, 'model'] for m in wi)
  # factored [vocab, embed] embedding: the vocab-long factor is split, the embed-long one is not
  emb = {tuple(m['shape']): m for path, m in moments.items() if "['token_embedder']" in path}
  assert emb[(512,)]['spec'] == ['model'] and emb[(512,)]['shard_shape'] == [128]
  assert emb[(128,)]['replicated']


if __name__ == '__main__':
  train_on_every_mesh(sys.argv[1])


def test_square_factored_moments_follow_their_own_axis():
  """For a square kernel both Adafactor factors have the same shape; each must still be laid
  out by the axis it keeps (optax: v_row drops the last of two equal axes, v_col the first)."""
  import jax.numpy as jnp
  import optax
  mesh = partitioning.make_mesh(1)
  rules = partitioning.standard_logical_axis_rules()
  trainable = {'w': jax.ShapeDtypeStruct((256, 256), jnp.float32)}
  specs = {'w': jax.sharding.PartitionSpec('embed', 'mlp')}
  opt_state = jax.eval_shape(optax.adafactor(0.1).init, trainable)
  factored = sharding.opt_state_shardings(opt_state, trainable, specs, mesh, rules)[0]
  assert tuple(factored.v_row['w'].spec) == (None,)
  assert tuple(factored.v_col['w'].spec) == ('model',)
