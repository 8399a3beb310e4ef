"""The task prompts of docs/METHOD.md §9: the user-turn texts evaluation asks.

The scorers (`cdx.eval.scoring`) ask them and the synthetic world (`cdx.data.synthetic`)
teaches them verbatim, so they live here, below both. Each is the text of the user turn
without any image placeholder: the chat template (`cdx.data.templates`) places the image.
"""

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."


def vqa_prompt(question: str) -> str:
  """The question with the short-answer instruction of docs/METHOD.md §9."""
  return question + VQA_SUFFIX


def sugarcrepe_question(a: str, b: str) -> str:
  """The two-choice question of docs/METHOD.md §9 (the space before `(B)` is deliberate)."""
  return (f"Which caption best describes the image?\n(A) {a}\n (B) {b}\n"
          "Answer with the option's alphabet from the given choices directly.")


def yes_no_prompt(caption: str) -> str:
  """The question whose P("Yes") scores an (image, caption) pair."""
  return f'Does this figure show "{caption}"? Please answer yes or no.'
