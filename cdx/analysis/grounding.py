"""Does a model read the image? Its loss on the supervised tokens with the right image, a grey
image and another sample's image.

  out = image_reliance(cfg, params, batch)
  # {"real": nats/token, "grey": ..., "other": ..., "tokens": n}

batch: the training pipeline's padded batch (`cdx.data.pipeline.pad_batch`: input_ids,
labels (-100 masked), attention_mask [B, L], pixel_values f32 [B, H, W, 3] normalized).
"grey" feeds zeros (mid-grey after normalization); "other" rolls the images by one row, so
each sample sees a real image of the same world that belongs to another sample. A model
that ignores the image scores the same in all three; one that reads it loses on both
(grey also shows how it does on an out-of-distribution input, other is the cleaner
control). Captions are determined by their image, so on captions the gap should be large
once a model has learnt them; on a question the gap is what the image adds.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cdx.models import mllm


@functools.partial(jax.jit, static_argnums=0)
def _nll(cfg: mllm.MllmConfig, params: dict, ids, pixels, mask, labels):
  """(summed nats over supervised next-token targets, their count)."""
  logits, _ = mllm.forward(cfg, params, ids, pixels, mask)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  target = labels[:, 1:]
  keep = target >= 0
  tok = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(keep, tok, 0.0)), jnp.sum(keep)


def image_reliance(cfg: mllm.MllmConfig, params: dict, batch: dict,
                   batch_size: int = 32) -> dict:
  """Mean loss per supervised token with real, grey and another sample's images."""
  n = len(batch["input_ids"])
  if n < 2:
    raise ValueError(f"image_reliance needs >= 2 samples (the 'other' image), got {n}.")
  pixels = np.asarray(batch["pixel_values"], np.float32)
  variants = {"real": pixels, "grey": np.zeros_like(pixels),
              "other": np.roll(pixels, 1, axis=0)}
  out = {}
  for name, px in variants.items():
    total = count = 0.0
    for i in range(0, n, batch_size):
      s = slice(i, i + batch_size)
      a, c = _nll(cfg, params, jnp.asarray(batch["input_ids"][s]), jnp.asarray(px[s]),
                  jnp.asarray(batch["attention_mask"][s]), jnp.asarray(batch["labels"][s]))
      total, count = total + float(a), count + float(c)
    if not count:
      raise ValueError("image_reliance: the batch has no supervised tokens (labels all -100).")
    out[name] = total / count
  out["tokens"] = int(count)
  return out
