"""Tests for promot_jax.checkpoints.t5x: legacy t5x layout round trip, portability, errors."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from flax import serialization

from promot_jax import tree_util
from promot_jax.checkpoints import t5x

BF16 = np.dtype(ml_dtypes.bfloat16)
QKV = ('query', 'key', 'value')


def tiny_mt5_tree(seed: int = 0) -> dict:
  """A parameter tree shaped like t5x's mT5 (emb 32, vocab 512), one layer per stack."""
  rng = np.random.default_rng(seed)

  def w(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)

  def layer(cross: bool) -> dict:
    out = {'attention' if not cross else 'self_attention':
           {**{n: {'kernel': w(32, 32)} for n in QKV}, 'out': {'kernel': w(32, 32)}},
           'pre_attention_layer_norm': {'scale': w(32)},
           'pre_mlp_layer_norm': {'scale': w(32)},
           'mlp': {'wi_0': {'kernel': w(32, 64)}, 'wi_1': {'kernel': w(32, 64)},
                   'wo': {'kernel': w(64, 32, dtype=BF16)}}}
    if cross:
      out['encoder_decoder_attention'] = {n: {'kernel': w(32, 32)} for n in (*QKV, 'out')}
      out['pre_cross_attention_layer_norm'] = {'scale': w(32)}
    return out

  return {
      'token_embedder': {'embedding': w(512, 32)},
      'encoder': {'layers_0': layer(False), 'relpos_bias': {'rel_embedding': w(4, 32)},
                  'encoder_norm': {'scale': w(32)}},
      'decoder': {'layers_0': layer(True), 'relpos_bias': {'rel_embedding': w(4, 32)},
                  'decoder_norm': {'scale': w(32)}, 'logits_dense': {'kernel': w(32, 512)}},
  }


def assert_trees_equal(got: dict, want: dict) -> None:
  got, want = tree_util.flatten(got), tree_util.flatten(want)
  assert sorted(got) == sorted(want)
  for path, value in want.items():
    assert got[path].dtype == value.dtype, path
    np.testing.assert_array_equal(got[path], value, err_msg=path)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """A model dir holding one t5x checkpoint of the tiny tree (read-only for the tests)."""
  params = tiny_mt5_tree()
  model_dir = tmp_path_factory.mktemp('model')
  ckpt = t5x.write_t5x_checkpoint(params, str(model_dir / 'checkpoint_1000'), step=1000)
  return params, ckpt


def test_round_trip_is_bit_exact(written):
  params, ckpt = written
  assert_trees_equal(t5x.load_t5x_params(ckpt), params)
  assert_trees_equal(t5x.load_t5x_params(os.path.join(ckpt, 'checkpoint')), params)
  assert_trees_equal(t5x.load_t5x_params(ckpt + '/'), params)


def test_layout_is_t5x_legacy(written):
  params, ckpt = written
  dotted = {'target.' + p.replace('/', '.') for p in tree_util.flatten(params)}
  assert set(os.listdir(ckpt)) == dotted | {'checkpoint'}
  for name in dotted:
    assert os.path.isfile(os.path.join(ckpt, name, '.zarray'))
  with open(os.path.join(ckpt, 'target.decoder.layers_0.mlp.wo.kernel', '.zarray')) as f:
    zarray = json.load(f)
  assert zarray['dtype'] == 'bfloat16' and zarray['compressor']['id'] == 'gzip'
  assert zarray['shape'] == [64, 32]

  with open(os.path.join(ckpt, 'checkpoint'), 'rb') as f:
    contents = serialization.msgpack_restore(f.read())
  assert set(contents) == {'version', 'optimizer'} and contents['version'] == 3
  assert set(contents['optimizer']) == {'target', 'state'}
  assert int(contents['optimizer']['state']['step']) == 1000
  assert contents['optimizer']['state']['param_states'] == {}
  leaf = contents['optimizer']['target']['encoder']['layers_0']['attention']['key']['kernel']
  assert {'driver', 'kvstore', 'metadata'} <= set(leaf) and leaf['driver'] == 'zarr'
  assert leaf['kvstore']['driver'] == 'file'
  assert leaf['kvstore']['path'].rstrip('/') == 'target.encoder.layers_0.attention.key.kernel'
  assert leaf['metadata']['shape'] == [32, 32]


def test_moved_checkpoint_still_loads(written, tmp_path, monkeypatch):
  params, ckpt = written
  moved = tmp_path / 'elsewhere' / 'checkpoint_1000'
  shutil.copytree(ckpt, moved)
  monkeypatch.chdir(tmp_path)  # and a relative path to it
  assert_trees_equal(t5x.load_t5x_params('elsewhere/checkpoint_1000'), params)


def test_gcs_written_checkpoint_copied_locally(written, tmp_path):
  """Checkpoints saved on GCS name a gcs kvstore with t5x's dummy bucket (older tensorstore put
  `path` at the top level of the spec); a local copy must read from the local zarr dirs."""
  params, ckpt = written
  local = tmp_path / 'checkpoint_1000'
  shutil.copytree(ckpt, local)
  contents = serialization.msgpack_restore((local / 'checkpoint').read_bytes())
  specs = list(t5x.flatten_target(contents['optimizer']['target']).values())
  for i, spec in enumerate(specs):
    rel = spec['kvstore'].pop('path')
    spec['kvstore'] = {'driver': 'gcs', 'bucket': 't5x-dummy-bucket'}
    if i % 2:
      spec['path'] = rel
    else:
      spec['kvstore']['path'] = rel
  (local / 'checkpoint').write_bytes(serialization.msgpack_serialize(contents))
  assert_trees_equal(t5x.load_t5x_params(str(local)), params)


def test_dtype_cast_and_progress(written):
  params, ckpt = written
  calls = []
  got = t5x.load_t5x_params(ckpt, dtype='bfloat16', progress=lambda d, t: calls.append((d, t)))
  n = len(tree_util.flatten(params))
  assert calls[-1] == (n, n) and len(calls) == n
  want = tree_util.map_with_path(lambda _, v: v.astype(BF16), params)
  assert_trees_equal(got, want)
  got = t5x.load_t5x_params(ckpt, dtype=np.float32)
  assert_trees_equal(got, tree_util.map_with_path(lambda _, v: v.astype(np.float32), params))


def test_inline_leaves_and_int_leaves(tmp_path):
  params = {'a': {'kernel': np.arange(12, dtype=np.float32).reshape(3, 4)},
            'b': {'scale': np.ones(3, BF16)}, 'c': {'ids': np.arange(5, dtype=np.int32)}}
  ckpt = t5x.write_t5x_checkpoint(params, str(tmp_path / 'checkpoint_0'), inline_threshold=8)
  assert sorted(os.listdir(ckpt)) == ['checkpoint', 'target.a.kernel']
  assert_trees_equal(t5x.load_t5x_params(ckpt), params)
  got = t5x.load_t5x_params(ckpt, dtype=np.float16)
  assert got['a']['kernel'].dtype == got['b']['scale'].dtype == np.float16
  assert got['c']['ids'].dtype == np.int32  # only floating leaves are cast


def test_steps_latest_and_detection(written, tmp_path):
  _, ckpt = written
  model_dir = tmp_path / 'model'
  for step in (5, 20):
    t5x.write_t5x_checkpoint({'w': np.zeros(2, np.float32)}, str(model_dir / f'checkpoint_{step}'))
  (model_dir / 'checkpoint_30.tmp-1234').mkdir()  # an unfinished save
  (model_dir / 'checkpoint_40').mkdir()  # no msgpack file
  assert t5x.t5x_checkpoint_steps(str(model_dir)) == [5, 20]
  assert t5x.latest_t5x_checkpoint(str(model_dir)) == str(model_dir / 'checkpoint_20')
  assert t5x.latest_t5x_checkpoint(str(tmp_path / 'nothing')) is None
  assert t5x.is_t5x_checkpoint(ckpt) and t5x.is_t5x_checkpoint(os.path.join(ckpt, 'checkpoint'))
  assert not t5x.is_t5x_checkpoint(str(model_dir))
  assert not t5x.is_t5x_checkpoint(str(model_dir / 'checkpoint_40'))
  assert not t5x.is_t5x_checkpoint(str(tmp_path / 'missing'))
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'checkpoint').write_bytes(b'\x00\x01 definitely not msgpack')
  assert not t5x.is_t5x_checkpoint(str(bad))


def test_error_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'does not exist.*checkpoint_<step>'):
    t5x.load_t5x_params(str(tmp_path / 'nope'))


def test_error_model_dir_lists_checkpoints(tmp_path):
  for step in (100, 2000):
    t5x.write_t5x_checkpoint({'w': np.zeros(2, np.float32)}, str(tmp_path / f'checkpoint_{step}'))
  with pytest.raises(ValueError, match=r'pass one of: .*checkpoint_100, .*checkpoint_2000 '
                                       r'\(latest is .*checkpoint_2000\)'):
    t5x.load_t5x_params(str(tmp_path))


def test_error_dir_without_checkpoint_file(tmp_path):
  (tmp_path / 'target.x').mkdir()
  with pytest.raises(FileNotFoundError, match='no `checkpoint` file'):
    t5x.load_t5x_params(str(tmp_path))


def test_error_corrupt_msgpack(written, tmp_path):
  _, ckpt = written
  broken = tmp_path / 'checkpoint_1000'
  shutil.copytree(ckpt, broken)
  data = (broken / 'checkpoint').read_bytes()
  (broken / 'checkpoint').write_bytes(data[:len(data) // 2])  # truncated copy
  with pytest.raises(ValueError, match='not a t5x checkpoint: it is not valid t5x msgpack'):
    t5x.load_t5x_params(str(broken))
  (broken / 'checkpoint').write_bytes(b'model_checkpoint_path: "model.ckpt-1000000"\n')
  with pytest.raises(ValueError, match='TensorFlow checkpoint index'):
    t5x.load_t5x_params(str(broken))


def test_error_no_target(tmp_path):
  (tmp_path / 'checkpoint').write_bytes(serialization.msgpack_serialize(
      {'version': 3, 'optimizer': {'state': {'step': np.asarray(0, np.int32)}}}))
  with pytest.raises(ValueError, match=r"no `target` \(model parameters\) dict; found \['state'\]"):
    t5x.load_t5x_params(str(tmp_path))


def test_error_missing_zarr_leaf(written, tmp_path):
  _, ckpt = written
  broken = tmp_path / 'checkpoint_1000'
  shutil.copytree(ckpt, broken)
  missing = broken / 'target.encoder.layers_0.attention.key.kernel'
  shutil.rmtree(missing)
  with pytest.raises(FileNotFoundError) as err:
    t5x.load_t5x_params(str(broken))
  assert 'encoder/layers_0/attention/key/kernel' in str(err.value)
  assert str(missing) in str(err.value)


def test_write_refuses_non_empty_dir(written):
  with pytest.raises(FileExistsError, match='not empty'):
    t5x.write_t5x_checkpoint({'w': np.zeros(1, np.float32)}, written[1])


def test_orbax_layout(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  params = {'encoder': {'layers_0': {'mlp': {'wo': {'kernel': np.ones((4, 2), np.float32)}}}}}
  state = {'version': 3, 'optimizer': {'target': params,
                                       'state': {'step': np.asarray(3, np.int32)}}}
  ocp.PyTreeCheckpointer().save(str(tmp_path / 'checkpoint_3' / 'state'), state)
  assert t5x.is_t5x_checkpoint(str(tmp_path / 'checkpoint_3'))
  assert t5x.latest_t5x_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint_3')
  assert_trees_equal(t5x.load_t5x_params(str(tmp_path / 'checkpoint_3')), params)
