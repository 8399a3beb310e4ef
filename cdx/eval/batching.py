"""Batched generation and scoring of many tokenized prompts, bucketed by length.

  replies = generate_tokens(cfg, params, prompts, pixels, batch_size=16, max_new_tokens=32,
                            eos_id=..., pad_id=...)      # [[token ids up to EOS], ...]
  logps = score_tokens(cfg, params, prompts, continuations, pixels, batch_size=16,
                       pad_id=...)                        # [[log P(cont k | prompt)], ...]

prompts: token-id lists (image block already expanded, `templates.encode_prompt`);
pixels(i) -> float32 [H, W, 3], the image of prompt i (None: every prompt is text-only).

Prompts are sorted by length and cut into batches of `batch_size` neighbours, so a
batch holds prompts of similar length (little padding); each batch is right-padded to a
multiple of `LENGTH_BUCKET` tokens and always has `batch_size` rows (a short last batch
repeats its last prompt), so jit compiles one program per bucket. Generation runs the KV
cache loop of `cdx.eval.generate` on the whole batch. Results come back in the order of
`prompts`, and a prompt's result does not depend on its batch neighbours (greedy decoding,
per-row masks; tests/test_eval_batching.py checks batch 16 == batch 1).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from cdx.eval import generate as gen
from cdx.models import mllm

LENGTH_BUCKET = 32  # prompt rows are padded to a multiple: few compiled shapes
Pixels = Callable[[int], np.ndarray] | None
Progress = Callable[[int], None] | None   # called with the number of prompts done


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
  """Indices of `lengths` sorted by length (stable), cut into chunks of batch_size."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _padded(prompts: Sequence[Sequence[int]], index: list[int], batch_size: int,
            pad_id: int, pixels: Pixels) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """ids, mask int32 [batch_size, L] (L a multiple of LENGTH_BUCKET) and pixels."""
  rows = [prompts[i] for i in index] + [prompts[index[-1]]] * (batch_size - len(index))
  length = -(-max(map(len, rows)) // LENGTH_BUCKET) * LENGTH_BUCKET
  ids = np.full((batch_size, length), pad_id, np.int32)
  mask = np.zeros((batch_size, length), np.int32)
  for b, row in enumerate(rows):
    ids[b, :len(row)], mask[b, :len(row)] = row, 1
  if pixels is None:
    return ids, mask, None
  images = [pixels(i) for i in index]
  return ids, mask, np.stack(images + [images[-1]] * (batch_size - len(index)))


def _batches(prompts, batch_size, pad_id, pixels) -> Iterator[tuple[list[int], tuple]]:
  if any(not p for p in prompts):
    raise ValueError("every prompt needs at least one token.")
  for index in length_batches([len(p) for p in prompts], batch_size):
    yield index, _padded(prompts, index, batch_size, pad_id, pixels)


def generate_tokens(cfg: mllm.MllmConfig, params: dict, prompts: Sequence[Sequence[int]],
                    pixels: Pixels, batch_size: int, max_new_tokens: int,
                    eos_id: int | None, pad_id: int,
                    progress: Progress = None) -> list[list[int]]:
  """Greedy continuation of every prompt: its tokens up to and including EOS."""
  out: list[list[int] | None] = [None] * len(prompts)
  for index, (ids, mask, pix) in _batches(prompts, batch_size, pad_id, pixels):
    tokens, lengths = gen.generate(cfg, params, ids, mask, pix, max_new_tokens, eos_id,
                                   pad_id)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for b, i in enumerate(index):
      out[i] = tokens[b, :lengths[b]].tolist()
    if progress:
      progress(len(index))
  return out


def score_tokens(cfg: mllm.MllmConfig, params: dict, prompts: Sequence[Sequence[int]],
                 continuations: Sequence[Sequence[Sequence[int]]], pixels: Pixels,
                 batch_size: int, pad_id: int,
                 progress: Progress = None) -> list[list[float]]:
  """log P(continuation k | prompt i) summed over its tokens, for each prompt i and each
  of its K continuations (K the same for every prompt); one forward pass per batch."""
  if len(continuations) != len(prompts):
    raise ValueError(f"{len(continuations)} continuation lists for {len(prompts)} prompts.")
  out: list[list[float] | None] = [None] * len(prompts)
  for index, (ids, mask, pix) in _batches(prompts, batch_size, pad_id, pixels):
    conts = [continuations[i] for i in index]
    conts += [conts[-1]] * (batch_size - len(index))
    logp = np.asarray(gen.score_continuations(cfg, params, ids, mask, pix, conts, pad_id,
                                              length_multiple=LENGTH_BUCKET), np.float64)
    for b, i in enumerate(index):
      out[i] = logp[b].tolist()
    if progress:
      progress(len(index))
  return out
