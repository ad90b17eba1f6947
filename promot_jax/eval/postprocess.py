"""From a model's output text to a prediction, as the paper scores it.

An encoder-decoder's output is only the continuation, so any marker of a new example in it
(a blank line, `Q:`, `Translate`, `Article:`) ends the answer; classification compares the
answer's first word. Task modules build their few-shot inputs with the same separators
(promot_tasks.templates re-exports them), so the text written and the text cut agree.
"""

from __future__ import annotations

import string
from typing import Any, Dict, List, Optional

DEMO_JOINER = ' '           # between a demonstration's input and its target
EXAMPLE_SEPARATOR = '\n\n'  # between demonstrations and before the query
ANSWER_SEPARATOR = '\t'     # joins the accepted answers of a QA example

# Where a new example would start inside generated text.
NEW_EXAMPLE_MARKERS = (EXAMPLE_SEPARATOR, 'Q:', 'Translate', 'Article:')


def as_text(value: Any) -> str:
  """bytes (from tf.data) or str -> str."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def truncate_at_new_example(text: Any) -> str:
  """The generated text up to where a new example would begin, stripped."""
  text = as_text(text)
  cut = len(text)
  for marker in NEW_EXAMPLE_MARKERS:
    at = text.find(marker)
    if at >= 0:
      cut = min(cut, at)
  return text[:cut].strip()


def first_word(text: Any) -> str:
  """First whitespace-separated word with surrounding punctuation removed."""
  words = as_text(text).split()
  return words[0].strip(string.punctuation) if words else ''


def split_answers(answers: Any) -> List[str]:
  """The accepted answers of a QA example (joined with ANSWER_SEPARATOR in its features)."""
  text = as_text(answers)
  return [a for a in text.split(ANSWER_SEPARATOR) if a] if text else []


def postprocess_generation(output: Any, example: Optional[Dict[str, Any]] = None,
                           is_target: bool = False) -> str:
  """seqio postprocess_fn for free-text tasks (targets are left alone)."""
  del example
  return as_text(output) if is_target else truncate_at_new_example(output)


def postprocess_classification(output: Any, example: Optional[Dict[str, Any]] = None,
                               is_target: bool = False) -> str:
  """seqio postprocess_fn for classification: the first word of the answer."""
  del example
  if is_target:
    return as_text(output)
  return first_word(truncate_at_new_example(output))
