"""Evaluation at pod scale, rehearsed on CPU devices: the checkpoint is read straight into the
mesh's shardings (orbax, t5x and Hugging Face formats; optionally cast to bfloat16), decoding
runs partitioned like the parameters, and every decoded string and score is the same on one
device, on 8 devices as (8,1), (4,2) and (2,4) meshes, and on 2 processes x 4 devices with the
model axis across both processes.

The model is the tiny mT5 with 8 heads (so an 8-way model axis divides them), random weights,
a 4-vector prompt: its outputs are arbitrary token strings, which is what makes identical
outputs a strict check.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from promot_jax import tree_util
from promot_jax.checkpoints import orbax_io, t5x
from promot_jax.model import config, transformer as model
from promot_jax.tools import export

CFG = config.get_config('mt5_tiny', prompt_length=4, dropout_rate=0.0).replace(num_heads=8,
                                                                               head_dim=4)
EVAL = ['--gin_file', 'eval/toy.gin', '--gin.MAX_EVAL_EXAMPLES=12',
        '--gin.NUM_SAVED_EXAMPLES=12', '--gin.EVAL_BATCH_SIZE=4']
TIMEOUT_S = 600


def environment(devices):
  env = dict(os.environ, PROMOT_HUGEPAGES='0', TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """(orbax checkpoint dir, the same parameters as numpy)."""
  params = jax.tree_util.tree_map(np.asarray, model.init_params(CFG, jax.random.PRNGKey(7)))
  path = str(tmp_path_factory.mktemp('ckpt') / 'tiny8')
  orbax_io.save_params(path, params, CFG)
  return path, params


def promot_eval(out_dir, ckpt, devices=1, *extra):
  cmd = [sys.executable, '-m', 'promot_jax.cli', 'eval', *EVAL, '--checkpoint', ckpt,
         '--out_dir', str(out_dir), *extra]
  proc = subprocess.run(cmd, env=environment(devices), capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (name,) = [n for n in os.listdir(out_dir) if os.path.isdir(os.path.join(out_dir, n))
             and n != 'logs']
  with open(os.path.join(out_dir, name, 'results.json')) as f:
    return json.load(f), proc.stdout


def decoded(results):
  """Every task's score and every example's output, for comparison."""
  return {task: (entry[entry['metric']], [(e['input'], e['output']) for e in entry['examples']])
          for task, entry in results['tasks'].items()}


@pytest.fixture(scope='module')
def reference(checkpoint, tmp_path_factory):
  results, _ = promot_eval(tmp_path_factory.mktemp('one_device'), checkpoint[0])
  assert results['settings']['mesh_shape'] == {'data': 1, 'model': 1}
  assert all(len(entry['examples']) == 12 for entry in results['tasks'].values())
  return results


@pytest.mark.parametrize('partitions', [1, 2, 4])
def test_eight_devices_decode_exactly_what_one_device_decodes(checkpoint, reference, tmp_path,
                                                              partitions):
  results, _ = promot_eval(tmp_path, checkpoint[0], 8, f'--gin.NUM_PARTITIONS={partitions}')
  assert results['settings']['mesh_shape'] == {'data': 8 // partitions, 'model': partitions}
  assert decoded(results) == decoded(reference)
  # each device holds its share of the parameters: replicated small leaves aside, total / model
  total = sum(int(np.prod(v.shape)) * 4 for v in jax.tree_util.tree_leaves(checkpoint[1]))
  per_device = results['settings']['param_bytes_per_device']
  replicated = reference['settings']['param_bytes_per_device'] - total
  assert replicated == 0
  print(f'{partitions}-way model axis: {per_device:,} bytes per device of {total:,}')
  assert per_device == pytest.approx(total / partitions, rel=0.05 if partitions > 1 else 0)
  assert results['settings']['largest_device_buffer_bytes'] < total / 2


def test_two_processes_with_the_model_axis_across_them_decode_the_same(checkpoint, reference,
                                                                       tmp_path):
  results, out = promot_eval(tmp_path, checkpoint[0], 1, '--gin.NUM_PARTITIONS=8',
                             '--local_processes', '2', '--local_devices', '4')
  assert "2 process(es), 8 devices, mesh {'data': 1, 'model': 8}" in out
  assert results['settings']['process_count'] == 2
  assert decoded(results) == decoded(reference)


def test_an_interrupted_evaluation_resumes_per_task(checkpoint, reference, tmp_path):
  """A results.json with one task finished (as an interrupted run leaves it): the rerun keeps
  that task and evaluates the rest; other settings redo everything."""
  first = tmp_path / 'out'
  results, _ = promot_eval(first, checkpoint[0])
  name = results['checkpoint']['name']
  path = first / name / 'results.json'
  partial = dict(results, tasks={'toy_sorted': dict(results['tasks']['toy_sorted'], seconds=-1)})
  path.write_text(json.dumps(partial))
  again, out = promot_eval(first, checkpoint[0])
  assert 'toy_sorted: already evaluated' in out and 'toy_reverse: in_context' in out
  assert again['tasks']['toy_sorted']['seconds'] == -1      # kept, not redone
  assert decoded(again) == decoded(reference)
  redo, out = promot_eval(first, checkpoint[0], 1, "--gin.DECODING='beam'")
  assert 'already evaluated' not in out and redo['tasks']['toy_sorted']['seconds'] != -1


LOAD_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from promot_jax import mesh as partitioning, tree_util
    from promot_jax.checkpoints import loading
    path, data, model_axis, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mesh = partitioning.make_mesh(model_axis)
    rules = partitioning.standard_logical_axis_rules()
    cfg, params = loading.load_on_mesh(path, mesh, rules, dtype=None if dtype == 'none' else dtype)
    out = {'values': {}, 'specs': {}, 'first_device_bytes': 0, 'largest': 0}
    for p, leaf in tree_util.flatten(params).items():
      out['values'][p] = np.asarray(partitioning.to_host(leaf), np.float32).ravel()[:50].tolist()
      out['specs'][p] = str(leaf.sharding.spec)
      out['dtype'] = str(leaf.dtype)
      for shard in leaf.addressable_shards:
        out['largest'] = max(out['largest'], shard.data.nbytes)
        if shard.device == jax.local_devices()[0]:
          out['first_device_bytes'] += shard.data.nbytes
    print(json.dumps(out))
''')


def load_in_subprocess(path, model_axis, dtype='none'):
  proc = subprocess.run([sys.executable, '-c', LOAD_SCRIPT, path, '8', str(model_axis), dtype],
                        env=environment(8), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope='module')
def formats(checkpoint, tmp_path_factory):
  """The same parameters as an orbax, a t5x and a Hugging Face checkpoint."""
  path, params = checkpoint
  root = tmp_path_factory.mktemp('formats')
  t5x_dir = t5x.write_t5x_checkpoint(params, str(root / 't5x' / 'checkpoint_0'))
  without_prompt = {k: v for k, v in params.items() if k != 'prompt'}
  hf_dir = str(root / 'hf')
  os.makedirs(hf_dir)
  export.write_hf_model(without_prompt, CFG.replace(prompt_length=0), hf_dir)
  return {'orbax': path, 't5x': t5x_dir, 'hf': hf_dir}


@pytest.mark.parametrize('fmt', ['orbax', 't5x', 'hf'])
def test_every_format_is_read_into_the_mesh_shardings(formats, checkpoint, fmt):
  flat = tree_util.flatten(checkpoint[1])
  got = load_in_subprocess(formats[fmt], 4)
  assert set(got['values']) == {p for p in flat if fmt != 'hf' or not p.startswith('prompt')}
  total = sum(v.nbytes for p, v in flat.items() if p in got['values'])
  for p, values in got['values'].items():
    np.testing.assert_allclose(values, flat[p].ravel()[:50], rtol=1e-6, err_msg=f'{fmt} {p}')
  assert got['specs']['encoder/layers_0/mlp/wi_0/kernel'] == "P(None, 'model')"
  assert got['specs']['token_embedder/embedding'] == "P('model', None)"
  assert got['first_device_bytes'] == pytest.approx(total / 4, rel=0.05)
  assert got['largest'] < total / 4
  half = load_in_subprocess(formats[fmt], 4, 'bfloat16')
  assert half['dtype'] == 'bfloat16'
  assert half['first_device_bytes'] == pytest.approx(got['first_device_bytes'] / 2, rel=0.01)


def diagnose(tmp_path, ckpt, devices, partitions):
  out = tmp_path / f'diagnose_{devices}_{partitions}.json'
  cmd = [sys.executable, '-m', 'promot_jax.cli', 'diagnose', '--gin_file',
         'runs/promot_tiny_cpu.gin', '--checkpoint', ckpt, '--num_batches', '2',
         '--json', str(out), f'--gin.NUM_PARTITIONS={partitions}',
         '--gin.config.T5Config.num_heads=8', '--gin.config.T5Config.head_dim=4']
  proc = subprocess.run(cmd, env=environment(devices), capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text())


def test_diagnose_cosines_on_a_mesh_equal_one_device(checkpoint, tmp_path):
  one = diagnose(tmp_path, checkpoint[0], 1, 1)
  mesh = diagnose(tmp_path, checkpoint[0], 8, 4)
  assert mesh['data']['mesh_shape'] == {'data': 2, 'model': 4}
  (a,), (b,) = one['checkpoints'], mesh['checkpoints']
  assert a['cosine'].keys() == b['cosine'].keys() and a['cosine']['overall'] < 0.999
  for kernel, value in a['cosine'].items():
    assert b['cosine'][kernel] == pytest.approx(value, abs=1e-5), kernel


LM_EVAL_SCRIPT = textwrap.dedent('''
    import json, sys
    from promot_jax.eval.lm_eval_adapter import PromotLM

    class Request:
      def __init__(self, *args):
        self.args = args

    lm = PromotLM(checkpoint=sys.argv[1], with_prompt='true', vocabulary='byte', batch_size=4,
                  num_partitions=sys.argv[2])
    contexts = ['is 3 more than 2?', 'the sky is', 'reverse: abc', 'a b c d e f g h', '1 2 3']
    ll = lm.loglikelihood([Request(c, t) for c in contexts for t in (' yes', ' no')])
    gen = lm.generate_until([Request(c, {'until': ['.'], 'max_gen_toks': 6}) for c in contexts])
    print(json.dumps({'loglikelihood': ll, 'generated': gen, 'mesh': dict(lm.mesh.shape)}))
''')


def test_lm_eval_adapter_on_a_mesh_scores_like_one_device(checkpoint):
  pytest.importorskip('lm_eval')
  got = {}
  for devices, partitions in ((1, 1), (8, 4)):
    proc = subprocess.run([sys.executable, '-c', LM_EVAL_SCRIPT, checkpoint[0], str(partitions)],
                          env=environment(devices), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got[partitions] = json.loads(proc.stdout.splitlines()[-1])
  assert got[4]['mesh'] == {'data': 2, 'model': 4}
  assert got[4]['generated'] == got[1]['generated']
  assert [g for _, g in got[4]['loglikelihood']] == [g for _, g in got[1]['loglikelihood']]
  np.testing.assert_allclose([v for v, _ in got[4]['loglikelihood']],
                             [v for v, _ in got[1]['loglikelihood']], rtol=1e-5)
