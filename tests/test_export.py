"""`promot export --to hf`: transformers and PEFT reproduce promot_jax's logits.

A tiny random promot_jax checkpoint (with a 5-vector prompt) is exported; transformers'
MT5ForConditionalGeneration must give promot_jax's logits without the prompt, PEFT's
prompt-tuning adapter on top of it promot_jax's logits with the prompt, and promot_jax's own
HF loader must read the export back bit for bit.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

from toy_inputs import host_params  # noqa: E402
from toy_inputs import stage_dir as make_stage_dir  # noqa: E402

from promot_jax import tree_util
from promot_jax.checkpoints import hf, orbax_io  # noqa: E402
from promot_jax.cli import app as cli  # noqa: E402
from promot_jax.model import config, transformer as model
from promot_jax.tools import export

CFG = config.get_config('mt5_tiny', prompt_length=5, dropout_rate=0.0)
TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def params():
  """Random tiny parameters; the prompt is drawn far from the embeddings so it matters."""
  p = host_params(CFG, seed=7)
  p['prompt']['prompt'] = 2 * np.random.default_rng(3).standard_normal(
      p['prompt']['prompt'].shape).astype(np.float32)
  return p


@pytest.fixture(scope='module')
def stage_dir(tmp_path_factory, params):
  """MODEL_DIR/model_tuning with one checkpoint and the kept.json that names it."""
  return make_stage_dir(tmp_path_factory.mktemp('run'), params, CFG, step=10)


@pytest.fixture(scope='module')
def exported(stage_dir, tmp_path_factory):
  return export.export_hf(stage_dir, str(tmp_path_factory.mktemp('export') / 'hf'))


@pytest.fixture(scope='module')
def hf_model(exported):
  return transformers.MT5ForConditionalGeneration.from_pretrained(exported['model']).eval()


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Encoder tokens [2, 24] (row 1 padded from 14) and decoder inputs [2, 10]."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, CFG.vocab_size, (2, 24)).astype(np.int32)
  enc[1, 14:] = 0
  dec = rng.integers(2, CFG.vocab_size, (2, 10)).astype(np.int32)
  dec[:, 0] = 0
  return enc, dec


def torch_logits(m, enc: np.ndarray, dec: np.ndarray, mask: bool = True) -> np.ndarray:
  kwargs = {'attention_mask': torch.tensor(enc != 0).long()} if mask else {}
  with torch.no_grad():
    return m(input_ids=torch.tensor(enc).long(), decoder_input_ids=torch.tensor(dec).long(),
             **kwargs).logits.float().numpy()


def ours(params, enc, dec, with_prompt: bool) -> np.ndarray:
  return np.asarray(model.compute_logits(CFG, params, jnp.asarray(enc), jnp.asarray(dec),
                                         with_prompt=with_prompt))


def test_writes_model_and_adapter_files(exported):
  assert sorted(os.listdir(exported['model'])) == sorted(
      [hf.CONFIG_NAME, hf.SAFE_WEIGHTS, export.GENERATION_CONFIG, export.DEFAULT_ADAPTER_SUBDIR])
  assert sorted(os.listdir(exported['adapter'])) == sorted(
      [export.ADAPTER_CONFIG, export.ADAPTER_WEIGHTS])
  with open(os.path.join(exported['adapter'], export.ADAPTER_CONFIG)) as f:
    adapter = json.load(f)
  assert adapter['task_type'] == 'SEQ_2_SEQ_LM' and adapter['peft_type'] == 'PROMPT_TUNING'
  assert adapter['num_virtual_tokens'] == CFG.prompt_length == exported['prompt_length']


def test_transformers_matches_promot_without_prompt(hf_model, params):
  enc, dec = batch()
  diff = float(np.abs(torch_logits(hf_model, enc, dec) - ours(params, enc, dec, False)).max())
  print(f'max |logits diff| without prompt: {diff:.3g}')
  assert diff <= TOLERANCE


def test_peft_adapter_matches_promot_with_prompt(exported, params):
  enc, dec = batch(1)
  base = transformers.MT5ForConditionalGeneration.from_pretrained(exported['model'])
  peft_model = peft.PeftModel.from_pretrained(base, exported['adapter']).eval()
  got = torch_logits(peft_model, enc, dec)
  want = ours(params, enc, dec, True)
  diff = float(np.abs(got - want).max())
  print(f'max |logits diff| with prompt (PEFT): {diff:.3g}')
  assert diff <= TOLERANCE
  # The prompt changes the logits by far more than the tolerance: the check can tell.
  assert np.abs(want - ours(params, enc, dec, False)).max() > 100 * TOLERANCE
  # Documented difference: PEFT without an attention_mask attends to padding. The unpadded
  # row still matches, the padded one does not.
  unmasked = torch_logits(peft_model, enc, dec, mask=False)
  assert np.abs(unmasked[0] - want[0]).max() <= TOLERANCE
  assert np.abs(unmasked[1] - want[1]).max() > 100 * TOLERANCE


def test_round_trip_through_hf_loader_is_identical(exported, params):
  cfg, loaded = hf.load_hf_params(exported['model'])
  assert cfg.architecture() == CFG.replace(prompt_length=0).architecture()
  want = tree_util.flatten({k: v for k, v in params.items() if k != 'prompt'})
  got = tree_util.flatten(loaded)
  assert sorted(got) == sorted(want)
  for path, value in want.items():
    assert got[path].dtype == value.dtype, path
    np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_cli_export_refuses_overwrite_and_missing_checkpoint(stage_dir, tmp_path, capsys):
  out = str(tmp_path / 'hf')
  assert cli.main(['export', '--to', 'hf', '--checkpoint', stage_dir, '--out', out]) == 0
  assert 'PEFT prompt-tuning adapter, 5 virtual tokens' in capsys.readouterr().out
  assert cli.main(['export', '--checkpoint', stage_dir, '--out', out]) == 2
  assert '--overwrite' in capsys.readouterr().err
  assert cli.main(['export', '--checkpoint', stage_dir, '--out', out, '--overwrite']) == 0
  assert cli.main(['export', '--checkpoint', str(tmp_path / 'nope'), '--out', out,
                   '--overwrite']) == 2
  assert 'does not exist' in capsys.readouterr().err
  # Never over a checkpoint, even with --overwrite.
  assert cli.main(['export', '--checkpoint', stage_dir, '--out', stage_dir, '--overwrite']) == 2
  assert os.path.exists(os.path.join(stage_dir, 'kept.json'))


def test_checkpoint_without_prompt_writes_no_adapter(params, tmp_path):
  bare = {k: v for k, v in params.items() if k != 'prompt'}
  ckpt = orbax_io.save_params(str(tmp_path / 'finetune'), bare, CFG.replace(prompt_length=0))
  written = export.export_hf(ckpt, str(tmp_path / 'hf'))
  assert written['adapter'] is None
  assert export.DEFAULT_ADAPTER_SUBDIR not in os.listdir(written['model'])


# ------------------------------------------------------------------------ LoRA -> PEFT LoRA
LORA_CFG = config.get_config('mt5_tiny', lora_rank=4, lora_alpha=8.0, dropout_rate=0.0,
                             lora_targets=r'(attention/(query|value)|mlp/wo)$')


@pytest.fixture(scope='module')
def lora_params():
  """Tiny parameters with trained-looking adapters (B drawn, not zero) on q, v and the MLP out."""
  from promot_jax.model import lora
  p = lora.initialize_lora(host_params(LORA_CFG.base(), seed=7), LORA_CFG)
  rng = np.random.default_rng(5)
  return tree_util.unflatten({k: (0.3 * rng.standard_normal(v.shape).astype(np.float32)
                                  if k.endswith('/lora_b') else v)
                              for k, v in tree_util.flatten(p).items()})


def test_lora_exports_as_a_peft_lora_adapter_with_the_same_logits(lora_params, tmp_path, capsys):
  stage = make_stage_dir(tmp_path / 'run', lora_params, LORA_CFG, step=10)
  assert cli.main(['export', '--to', 'hf', '--checkpoint', stage, '--out',
                   str(tmp_path / 'hf')]) == 0
  assert 'PEFT LoRA adapter on 16 modules' in capsys.readouterr().out
  adapter = tmp_path / 'hf' / export.DEFAULT_LORA_SUBDIR
  with open(adapter / export.ADAPTER_CONFIG) as f:
    written = json.load(f)
  assert (written['peft_type'], written['r'], written['lora_alpha']) == ('LORA', 4, 8.0)
  assert 'decoder.block.1.layer.1.EncDecAttention.v' in written['target_modules']
  base = transformers.MT5ForConditionalGeneration.from_pretrained(str(tmp_path / 'hf'))
  peft_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
  enc, dec = batch(2)
  want = np.asarray(model.compute_logits(LORA_CFG, lora_params, jnp.asarray(enc),
                                         jnp.asarray(dec), with_prompt=True))
  diff = float(np.abs(torch_logits(peft_model, enc, dec) - want).max())
  print(f'max |logits diff| with LoRA (PEFT): {diff:.3g}')
  assert diff <= TOLERANCE
  off = np.asarray(model.compute_logits(LORA_CFG, lora_params, jnp.asarray(enc),
                                        jnp.asarray(dec), with_prompt=False))
  assert np.abs(want - off).max() > 100 * TOLERANCE              # the adapters matter
  with peft_model.disable_adapter():                              # PEFT's switch = ours
    assert np.abs(torch_logits(peft_model, enc, dec) - off).max() <= TOLERANCE
