"""A promot_jax checkpoint as an lm-evaluation-harness model (`--model promot`).

Importing this module registers the class under the names 'promot' and 'promot_jax' with
lm-eval's model registry. lm-eval 0.4.13 finds models only through that registry (its own
lazy table plus @register_model at import time; it reads no package entry points), so:

  - Python: `import promot_jax.eval.lm_eval_adapter` before lm_eval.simple_evaluate(model='promot', ...)
  - command line: `promot lm-eval run --model promot --model_args checkpoint=DIR,... --tasks ...`
    (promot_jax/cli/lm_eval_cmd.py imports this module, then hands the arguments to lm-eval's CLI).

model_args: checkpoint (a checkpoint dir or MODEL_DIR/<stage>), with_prompt (default false),
vocabulary ('byte' or a sentencepiece .model path; default PROMOT_VOCABULARY or the mT5
vocabulary, as promot_jax.data.pipeline.get_vocabulary), batch_size, max_input_length (longer contexts
keep their end), max_gen_toks, continuation_eos (score EOS after the continuation).

How requests map onto an encoder-decoder: the context (+ EOS, as seqio tasks feed inputs) is the
encoder input; the continuation, without its leading whitespace (the target delimiter belongs
to a decoder-only model's stream, not to a fresh decoder sequence), is the decoder target.
generate_until decodes greedily and cuts the text at the first stop string.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM  # optional dependency (pip install -e ".[lm_eval]")
from lm_eval.api.registry import register_model  # optional dependency

from promot_jax import mesh as partitioning
from promot_jax.checkpoints import resolve
from promot_jax.data import pipeline as data
from promot_jax.eval import task as eval_task
from promot_jax.model import decoding, transformer as model

_MIN_TARGET_BUCKET = 8


def _as_bool(value: Any) -> bool:
  if isinstance(value, str):
    if value.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
      raise ValueError(f'Expected true or false, got {value!r}.')
    return value.lower() in ('true', '1', 'yes')
  return bool(value)


def _target_bucket(longest: int) -> int:
  size = _MIN_TARGET_BUCKET
  while size < longest:
    size *= 2
  return size


@functools.partial(jax.jit, static_argnames=('config', 'with_prompt'))
def _score(config, params, enc, dec_in, dec_target, with_prompt):
  """(sum of target log-probs [batch], every target token is the argmax [batch])."""
  logits = model.compute_logits(config, params, enc, dec_in, dec_target, with_prompt)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)   # [batch, T, vocab]
  target_lp = jnp.take_along_axis(log_probs, dec_target[..., None], axis=-1)[..., 0]
  valid = dec_target > 0
  greedy = jnp.all((jnp.argmax(logits, -1) == dec_target) | ~valid, axis=-1)
  return jnp.sum(jnp.where(valid, target_lp, 0.0), axis=-1), greedy


@register_model('promot', 'promot_jax')
class PromotLM(LM):
  """loglikelihood and generate_until for a promot_jax encoder-decoder, prompt on or off."""

  def __init__(self, checkpoint: str, with_prompt: Any = False, vocabulary: Optional[str] = None,
               batch_size: Any = 8, max_input_length: int = 512, max_gen_toks: int = 32,
               continuation_eos: Any = False, max_batch_size: Optional[int] = None,
               device: Optional[str] = None, num_partitions: Any = 1,
               restore_dtype: Optional[str] = None, **unused: Any) -> None:
    super().__init__()
    del max_batch_size, device  # jax places the arrays; one fixed batch shape is compiled
    if unused:
      raise ValueError(f'Unknown promot model_args {sorted(unused)}; known: checkpoint, '
                       'with_prompt, vocabulary, batch_size, max_input_length, max_gen_toks, '
                       'continuation_eos, num_partitions, restore_dtype.')
    self.resolved = resolve.resolve_checkpoint(str(checkpoint))
    # The checkpoint read into a (data, model) mesh over every device, shard by shard.
    self.mesh = partitioning.make_mesh(int(num_partitions))
    self.config, self.params = resolve.load_checkpoint(
        self.resolved, self.mesh, partitioning.standard_logical_axis_rules(), restore_dtype)
    self.with_prompt = _as_bool(with_prompt)
    if self.with_prompt and 'prompt' not in self.params:
      raise ValueError(f'with_prompt=true but {self.resolved} holds no prompt; use '
                       'with_prompt=false or a ProMoT / prompt-tuning checkpoint.')
    self.vocab_name = vocabulary or 'default'
    self.vocab = data.check_vocabulary_readable(data.get_vocabulary(vocabulary))
    if self.vocab.vocab_size > self.config.vocab_size:
      raise ValueError(f'The vocabulary has {self.vocab.vocab_size} ids but the checkpoint embeds '
                       f'only {self.config.vocab_size}; pass the model\'s vocabulary=...')
    batch = str(batch_size)
    self.batch_size = int(batch) if batch.isdigit() and int(batch) > 0 else 8  # 'auto' -> 8
    data_axis = self.mesh.shape['data']   # whole rows per data position (padding dropped)
    self.batch_size = -(-self.batch_size // data_axis) * data_axis
    self.max_input_length = int(max_input_length)
    self.max_gen_toks = int(max_gen_toks)
    self.continuation_eos = _as_bool(continuation_eos)

  @property
  def tokenizer_name(self) -> str:
    return f'promot_jax:{self.vocab_name}'

  # ------------------------------------------------------------------------------- helpers

  def _encoder_batch(self, contexts: Sequence[str]) -> np.ndarray:
    rows = [np.asarray(list(self.vocab.encode(c)) + [self.vocab.eos_id], np.int32)
            for c in contexts]
    longest = max(len(r) for r in rows)
    length = eval_task.bucket_length(longest, self.max_input_length)  # noqa: SLF001
    return eval_task.pad_rows(rows, self.batch_size, length)[0]   # [batch_size, length]

  def _place(self, rows: np.ndarray) -> jax.Array:
    return partitioning.batch_array(rows, self.mesh)

  def _target_ids(self, continuation: str) -> list[int]:
    ids = list(self.vocab.encode(continuation.lstrip()))
    return ids + [self.vocab.eos_id] if self.continuation_eos else ids

  def _chunks(self, items: Sequence[Any]):
    for start in range(0, len(items), self.batch_size):
      yield items[start:start + self.batch_size]

  # ------------------------------------------------------------------------------ requests

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """log P(continuation | context) with the decoder teacher-forced on the continuation."""
    results: list[tuple[float, bool]] = []
    for chunk in self._chunks(list(requests)):
      contexts, continuations = zip(*(r.args for r in chunk))
      targets = [self._target_ids(c) for c in continuations]
      length = _target_bucket(max(len(t) for t in targets))
      dec_target = np.zeros((self.batch_size, length), np.int32)       # [batch_size, T]
      for i, t in enumerate(targets):
        dec_target[i, :len(t)] = t
      dec_in = np.concatenate([np.zeros((self.batch_size, 1), np.int32), dec_target[:, :-1]], 1)
      total, greedy = map(partitioning.to_host, _score(
          self.config, self.params, self._place(self._encoder_batch(contexts)),
          self._place(dec_in), self._place(dec_target), self.with_prompt))
      for i, request in enumerate(chunk):
        answer = (float(total[i]), bool(greedy[i]))
        results.append(answer)
        self.cache_hook.add_partial('loglikelihood', request.args, answer)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    raise NotImplementedError(
        'promot_jax is an encoder-decoder (mT5): a rolling, document-level perplexity '
        '(loglikelihood_rolling) has no single definition for it, so it is not implemented. '
        'Use tasks scored by loglikelihood (multiple_choice) or generate_until.')

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy decoding, cut at the first stop string of the request's `until`."""
    requests = list(requests)
    results: list[Optional[str]] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
      kwargs = dict(request.args[1] or {})
      if kwargs.get('do_sample'):
        raise ValueError('promot_jax decodes greedily; this task asks for sampling '
                         '(do_sample=True).')
      until = kwargs.get('until') or []
      until = (until,) if isinstance(until, str) else tuple(until)
      steps = int(kwargs.get('max_gen_toks', self.max_gen_toks))
      groups.setdefault((until, steps), []).append(i)
    for (until, steps), indices in groups.items():
      for chunk in self._chunks(indices):
        enc = self._encoder_batch([requests[i].args[0] for i in chunk])
        tokens = partitioning.to_host(decoding.greedy_decode(
            self.config, self.params, self._place(enc), steps, with_prompt=self.with_prompt,
            eos_id=self.vocab.eos_id))
        for row, i in enumerate(chunk):
          text = self.vocab.decode(tokens[row].tolist())
          for stop in until:
            if stop and stop in text:
              text = text[:text.index(stop)]
          results[i] = text
          self.cache_hook.add_partial('generate_until', requests[i].args, text)
    return results  # type: ignore[return-value]
