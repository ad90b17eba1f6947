"""The reference side: transformers' MT5ForConditionalGeneration (random init, PyTorch CPU).

Three workloads at the benchmark's shapes, each matched to a promot_jax one:
- full fine-tuning (every weight, no prompt)        <-> promot_jax `finetune`
- PEFT prompt tuning (100 virtual tokens, frozen model) <-> promot_jax `prompt_tuning`
- generate(), greedy and beam 4, with the KV cache   <-> promot_jax greedy / beam search

Optimizer: transformers.optimization.Adafactor with a constant learning rate
(relative_step=False, warmup_init=False), decay_rate=-0.8 (optax's decay_rate=0.8: the second
moment decays as 1 - t^-0.8), clip_threshold=1.0 (optax's clipping_threshold), no momentum
(beta1=None), no weight decay; scale_parameter=True for weights and False for the prompt, as
the stages' multiply_by_parameter_scale. Differences that remain: transformers factors every
2-D parameter (the [100, 512] prompt too) where optax factors only when both dimensions are
>= 128; the loss is torch's cross-entropy with the stage's label smoothing (no z-loss term).
Dropout follows the stage (0.1 for fine-tuning, 0 for prompt tuning).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from promot_jax.model.config import T5Config, config_to_hf
from promot_jax.tools.bench.common import BenchConfig, Timer


def _hf_model(cfg: T5Config, dropout: float, seed: int):
  import torch  # optional dependency
  import transformers  # optional dependency
  torch.manual_seed(seed)
  hf = dict(config_to_hf(cfg), dropout_rate=dropout, tie_word_embeddings=False,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  return transformers.MT5ForConditionalGeneration(transformers.MT5Config(**hf))


def _adafactor(params, lr: float, scale_parameter: bool):
  from transformers.optimization import Adafactor  # optional dependency
  return Adafactor(params, lr=lr, scale_parameter=scale_parameter, relative_step=False,
                   warmup_init=False, decay_rate=-0.8, clip_threshold=1.0, beta1=None,
                   weight_decay=0.0)


def _tensors(batch: dict) -> dict:
  import torch  # optional dependency
  enc = torch.as_tensor(np.asarray(batch['encoder_input_tokens'], np.int64))
  return {'input_ids': enc, 'attention_mask': (enc != 0).long(),
          'labels': torch.as_tensor(np.asarray(batch['decoder_target_tokens'], np.int64))}


class TrainStep:
  """One optimizer step of a transformers (optionally PEFT-wrapped) model on a fixed batch."""

  def __init__(self, net, optimizer, batch: dict, label_smoothing: float):
    self.net, self.optimizer, self.inputs = net, optimizer, _tensors(batch)
    self.label_smoothing = label_smoothing
    self.net.train()

  def __call__(self) -> float:
    import torch  # optional dependency
    out = self.net(input_ids=self.inputs['input_ids'],
                   attention_mask=self.inputs['attention_mask'], labels=self.inputs['labels'])
    logits = out.logits                                  # [batch, targets, vocab]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), self.inputs['labels'].reshape(-1),
        label_smoothing=self.label_smoothing)
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def full_finetune(cfg: T5Config, bc: BenchConfig, batch: dict, stage) -> TrainStep:
  """Every weight trains (promot_jax `finetune`)."""
  net = _hf_model(cfg, stage.dropout_rate, bc.seed)
  return TrainStep(net, _adafactor(net.parameters(), stage.learning_rate, True), batch,
                   stage.label_smoothing)


def peft_prompt_tuning(cfg: T5Config, bc: BenchConfig, batch: dict, stage) -> TrainStep:
  """PEFT prompt tuning: `prompt_length` virtual tokens, the model frozen."""
  import peft  # optional dependency
  net = _hf_model(cfg, stage.dropout_rate, bc.seed)
  pcfg = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM,
                                 num_virtual_tokens=bc.prompt_length,
                                 prompt_tuning_init=peft.PromptTuningInit.RANDOM)
  net = peft.get_peft_model(net, pcfg)
  trainable = [p for p in net.parameters() if p.requires_grad]
  return TrainStep(net, _adafactor(trainable, stage.learning_rate, False), batch,
                   stage.label_smoothing)


def optimizer_state_bytes(step: TrainStep) -> int:
  import torch  # optional dependency
  return int(sum(v.numel() * v.element_size() for s in step.optimizer.state.values()
                 for v in s.values() if isinstance(v, torch.Tensor)))


def generate_timers(cfg: T5Config, bc: BenchConfig, batch: dict) -> list[Timer]:
  """generate() greedy and beam search; min_new_tokens = max_new_tokens so none stops early."""
  import torch  # optional dependency
  net = _hf_model(cfg, 0.0, bc.seed).eval()
  inputs = _tensors(batch)

  def run(beams: int) -> Any:
    with torch.no_grad():
      return net.generate(input_ids=inputs['input_ids'], attention_mask=inputs['attention_mask'],
                          max_new_tokens=bc.decode_length, min_new_tokens=bc.decode_length,
                          num_beams=beams, do_sample=False, length_penalty=0.6, use_cache=True)

  return [Timer('hf/greedy', lambda: run(1)), Timer(f'hf/beam{bc.beam_size}',
                                                    lambda: run(bc.beam_size))]


def torch_info() -> dict:
  import torch  # optional dependency
  import transformers  # optional dependency
  return {'torch': torch.__version__, 'transformers': transformers.__version__,
          'torch_threads': torch.get_num_threads()}
