"""Tokenizers: train a tiny Qwen-style byte-level BPE, or load any local HF tokenizer.

`build_tokenizer` trains a byte-level BPE on a text corpus with the `tokenizers` library
and saves it as a `transformers` tokenizer directory (`PreTrainedTokenizerFast`). Its
special tokens follow Qwen: `<|endoftext|>` ends every answer (EOS), `<|extra_0|>` pads,
`<image>` is the image placeholder (one id, expanded later into the visual block). There
is no BOS token: encoding never prepends anything.

`load_tokenizer` opens such a directory, or a real Qwen one, and returns the tokenizer with
the three ids the data layer needs (`TokenIds`). A tokenizer without `<image>` gets it added
as a special token (its id is reported in `TokenIds.image`); one whose pad is missing or
equals EOS (Qwen1.5's) gets `<|extra_0|>`, and its `pad_token` is set to it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
import transformers

from cdx.data import templates

EOS = "<|endoftext|>"
PAD = "<|extra_0|>"
IMAGE = "<image>"
SPECIAL_TOKENS = (EOS, PAD, IMAGE)


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The token ids the data layer relies on."""
  image: int
  pad: int
  eos: int


def _corpus_with_templates(corpus: Iterable[str]) -> Iterable[str]:
  # Template words first so that the system text and role markers become few tokens.
  yield from templates.template_texts()
  yield from corpus


def build_tokenizer(corpus: Iterable[str], path: str | os.PathLike,
                    vocab_size: int = 1024) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE on `corpus` (deterministic) and saves it to `path`.

  Args:
    corpus: texts to learn merges from (questions, answers, captions).
    path: output directory; becomes loadable with `load_tokenizer` or
      `transformers.AutoTokenizer.from_pretrained`.
    vocab_size: target vocabulary size including the 256 byte symbols and specials.

  Returns:
    The saved tokenizer.
  """
  min_size = 256 + len(SPECIAL_TOKENS)
  if vocab_size < min_size:
    raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at "
                     f"least {min_size} (256 bytes + {len(SPECIAL_TOKENS)} specials).")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  # A list (not a generator) keeps training single-pass and order-stable.
  tok.train_from_iterator(list(_corpus_with_templates(corpus)), trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
      additional_special_tokens=[IMAGE])
  fast.save_pretrained(str(path))
  return fast


def _single_id(tokenizer, token: str) -> int | None:
  ids = tokenizer.convert_tokens_to_ids([token])
  tid = ids[0] if ids else None
  if tid is None or tid == tokenizer.unk_token_id:
    return None
  return int(tid)


def load_tokenizer(path: str | os.PathLike) -> tuple[transformers.PreTrainedTokenizerBase,
                                                       TokenIds]:
  """Loads a local HF tokenizer dir; adds `<image>` (and a pad ≠ EOS) when missing.

  Returns:
    (tokenizer, TokenIds(image, pad, eos)).
  """
  if not os.path.isdir(path):
    raise ValueError(f"tokenizer path {str(path)!r} is not a directory; pass a local HF "
                     "tokenizer dir (e.g. one written by build_tokenizer).")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
  eos = _single_id(tokenizer, EOS)
  if eos is None:
    eos = tokenizer.eos_token_id
  if eos is None:
    raise ValueError(f"tokenizer at {str(path)!r} has neither {EOS!r} nor an eos_token.")
  image = _single_id(tokenizer, IMAGE)
  if image is None:
    tokenizer.add_tokens([IMAGE], special_tokens=True)
    image = _single_id(tokenizer, IMAGE)
  pad = _single_id(tokenizer, PAD)
  if pad is None:
    pad = tokenizer.pad_token_id
    if pad is None or pad == eos:
      tokenizer.add_tokens([PAD], special_tokens=True)
      pad = _single_id(tokenizer, PAD)
  # The tokenizer's own pad_token must name the same id (it is saved next to HF exports,
  # whose config says pad_token_id = pad).
  tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad))
  return tokenizer, TokenIds(image=int(image), pad=int(pad), eos=int(eos))


def fingerprint(tokenizer) -> str:
  """Short hash of the vocabulary: teacher, student and data must share one tokenizer."""
  vocab = sorted(tokenizer.get_vocab().items())
  return hashlib.sha1(json.dumps(vocab).encode()).hexdigest()[:16]
