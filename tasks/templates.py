"""Prompt templates for the ProMoT tasks, as plain Python string functions.

Each input template is a `str.format` pattern with named fields. The same
patterns are filled inside tf.data by `promot_tasks.icl.tf_fill`, so the text built
here and the text the model sees cannot drift apart.

Templates from the paper (PaLM's formats): RTE, the translation prefix, the QA
`Q: ... A:` form, OpenbookQA's lettered choices and the summary form. Choices
made here because the paper does not spell them out are marked "(chosen)".

Few-shot layout (PaLM style): every demonstration is `"{inputs} {targets}"`
(one space between the filled input template and its answer), demonstrations
and the final query input are joined with a blank line (`"\\n\\n"`), and the
query ends with its input template, leaving the answer to the model.
"""

import string
from typing import List, Sequence, Tuple

# Joiners, markers and post-processing live in the library (promot_jax.eval.postprocess),
# which scores the outputs; they are re-exported here for the task modules.
from promot_jax.eval.postprocess import (ANSWER_SEPARATOR, DEMO_JOINER,  # noqa: F401
                                         EXAMPLE_SEPARATOR, NEW_EXAMPLE_MARKERS, first_word,
                                         postprocess_classification, postprocess_generation,
                                         split_answers, truncate_at_new_example)

# ----------------------------------------------------------------- templates

RTE_INPUT = '{premise} question: {hypothesis} Is it true or false? answer:'
# (chosen) Three-way NLI (SNLI, CB): the RTE form with a three-way question.
NLI3_INPUT = ('{premise} question: {hypothesis} Is it true, false or neither? '
              'answer:')
# (chosen) WiC: the paper gives no template; a yes/no question in the RTE form.
WIC_INPUT = ('{sentence1} {sentence2} question: Is the word "{word}" used with '
             'the same meaning in both sentences? answer:')
OPENBOOKQA_INPUT = 'Q: {stem} A) {choice_A} B) {choice_B} C) {choice_C} D) {choice_D} A:'
QA_INPUT = 'Q: {question} A:'
SUMMARY_INPUT = 'Article: {article} One sentence summary:'
TRANSLATION_INPUT = 'Translate English to {language}: {source}'

# Label verbalizers, indexed by the TFDS ClassLabel id.
RTE_LABELS = ('True', 'False')              # 0 entailment, 1 not_entailment
SNLI_LABELS = ('True', 'Neither', 'False')  # 0 entailment, 1 neutral, 2 contradiction
CB_LABELS = ('True', 'False', 'Neither')    # 0 entailment, 1 contradiction, 2 neutral
WIC_LABELS = ('No', 'Yes')                  # 0 False, 1 True
# (chosen) OpenbookQA answers with the letter of the right choice.
OPENBOOKQA_LABELS = ('A', 'B', 'C', 'D')    # answerKey 0..3



def template_fields(template: str) -> List[str]:
  """Names of the `{field}` slots of a template, in order."""
  return [name for _, name, _, _ in string.Formatter().parse(template)
          if name is not None]


def fill(template: str, **fields: str) -> str:
  """Fills a template; every slot must be given, nothing else."""
  expected = set(template_fields(template))
  if set(fields) != expected:
    raise ValueError(f'template wants {sorted(expected)}, got {sorted(fields)}')
  return template.format(**fields)


# ---------------------------------------------------------- per-task inputs

def rte(premise: str, hypothesis: str) -> str:
  """RTE input (PaLM template)."""
  return fill(RTE_INPUT, premise=premise, hypothesis=hypothesis)


def nli3(premise: str, hypothesis: str) -> str:
  """Three-way NLI input (SNLI, CB)."""
  return fill(NLI3_INPUT, premise=premise, hypothesis=hypothesis)


def wic(sentence1: str, sentence2: str, word: str) -> str:
  """WiC input."""
  return fill(WIC_INPUT, sentence1=sentence1, sentence2=sentence2, word=word)


def openbookqa(stem: str, choices: Sequence[str]) -> str:
  """OpenbookQA input with four lettered choices."""
  if len(choices) != 4:
    raise ValueError(f'OpenbookQA has 4 choices, got {len(choices)}')
  return fill(OPENBOOKQA_INPUT, stem=stem, choice_A=choices[0],
              choice_B=choices[1], choice_C=choices[2], choice_D=choices[3])


def qa(question: str) -> str:
  """Closed-book QA input (TriviaQA, WebQuestions)."""
  return fill(QA_INPUT, question=question)


def summary(article: str) -> str:
  """Summarization input (XSum, WikiLingua)."""
  return fill(SUMMARY_INPUT, article=article)


def translation_template(language: str) -> str:
  """The translation pattern with the target language filled in."""
  return TRANSLATION_INPUT.replace('{language}', language)


def translation(source: str, language: str) -> str:
  """English -> `language` translation input."""
  return fill(translation_template(language), source=source)


# ------------------------------------------------------------------ few-shot

def demonstration(inputs: str, targets: str) -> str:
  """One solved example: the input, a space, the answer."""
  return f'{inputs}{DEMO_JOINER}{targets}'


def join_few_shot(demonstrations: Sequence[Tuple[str, str]], query: str) -> str:
  """k solved `(inputs, targets)` pairs then the query, blank-line separated."""
  parts = [demonstration(i, t) for i, t in demonstrations] + [query]
  return EXAMPLE_SEPARATOR.join(parts)
