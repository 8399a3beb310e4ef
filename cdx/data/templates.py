"""Chat templates (docs/METHOD.md §3): conversation → token ids and labels.

A `Conversation` is a list of (question, answer) turns with the image placeholder taken
out and a `has_image` flag: every template decides itself where the image goes.

Templates:
  qwen2_base  `{SYS} USER: <image>\\n{q} ASSISTANT: {a}<|endoftext|>USER: {q} ASSISTANT: ...`
              system text, user turns and ` ASSISTANT:` masked; ` {a}<|endoftext|>` supervised.
              A first turn that is only the image reads `USER: <image> ASSISTANT:`.
  pretrain    `<image>{caption}\\n`: only the image is masked, no system text, no EOS.

`encode` tokenizes the text as a list of segments, each with a "supervised" flag, so labels
line up with ids by construction; the one `<image>` id is then expanded in place into
`num_visual_tokens` copies. Segments are cut only where byte-level BPE splits anyway
(before the space that starts an answer, after `<|endoftext|>`), so the ids equal those of
the whole string. Output arrays are int32 [L]; labels are -100 where not supervised.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

IGNORE = -100
IMAGE = "<image>"
EOS = "<|endoftext|>"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's "
          "questions.")
TEMPLATES = ("qwen2_base", "pretrain")


class SampleError(ValueError):
  """A sample that cannot be used; `reason` is a short stable key for counting."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Turn:
  question: str
  answer: str | None  # None only for the last turn of a generation prompt


@dataclasses.dataclass(frozen=True)
class Conversation:
  turns: tuple[Turn, ...]
  has_image: bool


def template_texts() -> list[str]:
  """Fixed texts of every template (fed to tokenizer training so they stay compact)."""
  return [SYSTEM, f"{SYSTEM} USER: {IMAGE}\nQ ASSISTANT: A{EOS}USER: Q ASSISTANT:"]


def check_text(text: str, field: str) -> None:
  """Raises SampleError `bad_text` when `text` cannot be UTF-8 encoded (a lone surrogate,
  e.g. from a JSON escape "\\ud800" without its pair): no tokenizer accepts it."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise SampleError("bad_text", f"{field}: lone surrogate {text[e.start]!r} at character "
                      f"{e.start}; fix the text (a JSON escape without its pair?)") from None


def _strip_placeholder(text: str) -> str:
  # LLaVA convention: drop the placeholder and the whitespace it leaves at the ends.
  return text.replace(IMAGE, "").strip()


def _with_image(question: str) -> str:
  # As the official template: "<image>\n{q}" stripped, so a turn that is only the
  # image becomes "USER: <image> ASSISTANT:" (no "\n" before the space).
  question = question.strip()
  return f"{IMAGE}\n{question}" if question else IMAGE


def conversation_from_llava(messages: Sequence[Any], has_image: bool) -> Conversation:
  """Builds a Conversation from LLaVA `conversations` (`{from: human|gpt, value}`).

  `<image>` anywhere is removed (the template puts it back at the start of the first user
  turn). Raises SampleError with reason `bad_roles`, `bad_text`, `empty_answer`,
  `multiple_image_tokens` or `placeholder_without_image`.
  """
  if not isinstance(messages, (list, tuple)) or not messages:
    raise SampleError("bad_roles", "field 'conversations' must be a non-empty list")
  count = 0
  turns = []
  for i, msg in enumerate(messages):
    want = "human" if i % 2 == 0 else "gpt"
    if (not isinstance(msg, dict) or msg.get("from") != want
        or not isinstance(msg.get("value"), str)):
      got = msg.get("from") if isinstance(msg, dict) else type(msg).__name__
      hint = ""
      if got in ("user", "assistant", "system"):
        hint = " (ShareGPT roles: rename 'user' to 'human' and 'assistant' to 'gpt')"
      elif isinstance(msg, dict) and "role" in msg:
        hint = " (chat messages {role, content}: write {from: human|gpt, value} instead)"
      raise SampleError("bad_roles", f"conversations[{i}]: expected from={want!r} with a "
                        f"string 'value', got from={got!r}{hint}")
    check_text(msg["value"], f"conversations[{i}].value")
    count += msg["value"].count(IMAGE)
  if len(messages) % 2:
    raise SampleError("bad_roles", "conversations must end with a 'gpt' answer")
  if count > 1:
    raise SampleError("multiple_image_tokens",
                      f"{IMAGE} appears {count} times; at most one image is supported")
  if count and not has_image:
    raise SampleError("placeholder_without_image",
                      f"{IMAGE} in conversations but the sample has no 'image' field")
  for i in range(0, len(messages), 2):
    q, a = messages[i]["value"], messages[i + 1]["value"]
    if not a.strip():
      raise SampleError("empty_answer", f"conversations[{i + 1}]: empty 'value'")
    if IMAGE in q:
      q = _strip_placeholder(q)
    if IMAGE in a:
      a = _strip_placeholder(a)
    turns.append(Turn(q, a))
  return Conversation(tuple(turns), has_image)


def segments(conv: Conversation, template: str) -> list[tuple[str, bool]]:
  """Text segments with a supervised flag; a None answer makes a generation prompt."""
  if not conv.turns:
    raise ValueError("conversation has no turns")
  if any(t.answer is None for t in conv.turns[:-1]):
    raise ValueError("only the last turn may lack an answer (generation prompt)")
  if template == "qwen2_base":
    out = []
    prefix = SYSTEM + " "
    for i, turn in enumerate(conv.turns):
      question = turn.question
      if i == 0 and conv.has_image:
        question = _with_image(question)
      out.append((f"{prefix}USER: {question} ASSISTANT:", False))
      prefix = ""
      if turn.answer is not None:
        out.append((f" {turn.answer}{EOS}", True))
    return out
  if template == "pretrain":
    out = [(IMAGE if conv.has_image else "", False)]
    answer = conv.turns[0].answer
    if answer is not None:
      out.append((f"{answer}\n", True))
    return out
  raise ValueError(f"template={template!r} is unknown; use one of {TEMPLATES}")


def _image_id(tokenizer) -> int:
  tid = tokenizer.convert_tokens_to_ids(IMAGE)
  if tid is None or tid == tokenizer.unk_token_id:
    raise ValueError(f"tokenizer has no {IMAGE} token; load it with "
                     "cdx.data.tokenizer.load_tokenizer, which adds it")
  return int(tid)


def encode(conv: Conversation, tokenizer, template: str,
           num_visual_tokens: int) -> dict[str, Any]:
  """Tokenizes a conversation and expands the image placeholder.

  Returns:
    dict(input_ids int32 [L], labels int32 [L] (-100 = masked),
         image_start int (-1 without image), num_image_tokens int).
  """
  if num_visual_tokens < 1:
    raise ValueError(f"num_visual_tokens={num_visual_tokens} must be >= 1")
  image_id = _image_id(tokenizer)
  ids: list[int] = []
  sup: list[bool] = []
  for text, supervised in segments(conv, template):
    if not text:
      continue
    piece = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids.extend(piece)
    sup.extend([supervised] * len(piece))
  ids_np = np.asarray(ids, np.int32)
  sup_np = np.asarray(sup, bool)
  where = np.flatnonzero(ids_np == image_id)
  if len(where) != int(conv.has_image):
    raise SampleError("multiple_image_tokens",
                      f"expected {int(conv.has_image)} {IMAGE} token(s), found {len(where)} "
                      "(is the placeholder in the question text?)")
  image_start = -1
  if conv.has_image:
    image_start = int(where[0])
    reps = np.ones(len(ids_np), np.int64)
    reps[image_start] = num_visual_tokens
    ids_np = np.repeat(ids_np, reps)
    sup_np = np.repeat(sup_np, reps)
  labels = np.where(sup_np, ids_np, IGNORE).astype(np.int32)
  return dict(input_ids=ids_np, labels=labels, image_start=image_start,
              num_image_tokens=num_visual_tokens if conv.has_image else 0)


def encode_prompt(question: str, tokenizer, template: str, num_visual_tokens: int,
                  has_image: bool = True) -> dict[str, Any]:
  """Generation prompt of one question (`... USER: <image>\\n{q} ASSISTANT:`), no labels.

  Any `<image>` in `question` is dropped (the template places the image itself) and the
  question is stripped, with or without an image, as the official evaluation does.
  """
  return encode(Conversation((Turn(_strip_placeholder(question), None),), has_image),
                tokenizer, template,
                num_visual_tokens)


def truncate(example: dict[str, Any], max_length: int) -> dict[str, Any]:
  """Cuts an encoded example to `max_length` tokens, never through the image block.

  Raises SampleError `image_block_truncated` when the image block does not fit and
  `no_supervised_tokens` when no supervised label is left.
  """
  ids, labels = example["input_ids"], example["labels"]
  if example["image_start"] >= 0:
    end = example["image_start"] + example["num_image_tokens"]
    if end > max_length:
      raise SampleError("image_block_truncated",
                        f"image block ends at token {end} > max_length={max_length}")
  if len(ids) > max_length:
    example = dict(example, input_ids=ids[:max_length], labels=labels[:max_length])
  if not (example["labels"] != IGNORE).any():
    raise SampleError("no_supervised_tokens",
                      f"no supervised token within max_length={max_length}")
  return example
