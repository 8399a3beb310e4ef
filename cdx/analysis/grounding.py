"""Does a model read the image? Its loss on the supervised tokens with the right image, a grey
image and another sample's image.

  out = image_reliance(cfg, params, batch, token_classes={"shape": [ids...], ...})
  # {"real": nats/token, "grey": ..., "other": ..., "tokens": n,
  #  "classes": {"shape": {"real": ..., "grey": ..., "other": ..., "tokens": n}, ...}}

batch: the training pipeline's padded batch (`cdx.data.pipeline.pad_batch`: input_ids,
labels (-100 masked), attention_mask [B, L], pixel_values f32 [B, H, W, 3] normalized).
"grey" feeds zeros (mid-grey after normalization); "other" rolls the images by one row, so
each sample sees a real image of the same world that belongs to another sample. A model
that ignores the image scores the same in all three; one that reads it loses on both
(grey also shows how it does on an out-of-distribution input, other is the cleaner
control). Captions are determined by their image, so on captions the gap should be large
once a model has learnt them; on a question the gap is what the image adds.

`token_classes` splits the same numbers by the target token's word class (e.g. the
synthetic world's colour, shape and size words, `cdx.data.synthetic.text.WORD_CLASSES`):
a model can read colours from the image long before shapes.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cdx.models import mllm


@functools.partial(jax.jit, static_argnums=0)
def _token_nll(cfg: mllm.MllmConfig, params: dict, ids, pixels, mask, labels):
  """f32 [B, L-1] nats of each next-token target (0 where unsupervised), int32 targets."""
  logits, _ = mllm.forward(cfg, params, ids, pixels, mask)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  target = labels[:, 1:]
  tok = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(target >= 0, tok, 0.0), target


def image_reliance(cfg: mllm.MllmConfig, params: dict, batch: dict, batch_size: int = 32,
                   token_classes: dict[str, Sequence[int]] | None = None) -> dict:
  """Mean loss per supervised token with real, grey and another sample's images, overall
  and (with `token_classes`: class name -> token ids) per class of the target token."""
  n = len(batch["input_ids"])
  if n < 2:
    raise ValueError(f"image_reliance needs >= 2 samples (the 'other' image), got {n}.")
  pixels = np.asarray(batch["pixel_values"], np.float32)
  variants = {"real": pixels, "grey": np.zeros_like(pixels),
              "other": np.roll(pixels, 1, axis=0)}
  classes = {name: np.asarray(list(ids), np.int64)
             for name, ids in (token_classes or {}).items()}
  out: dict = {"classes": {name: {} for name in classes}} if classes else {}
  for name, px in variants.items():
    nll, target = [], []
    for i in range(0, n, batch_size):
      s = slice(i, i + batch_size)
      a, t = _token_nll(cfg, params, jnp.asarray(batch["input_ids"][s]), jnp.asarray(px[s]),
                        jnp.asarray(batch["attention_mask"][s]),
                        jnp.asarray(batch["labels"][s]))
      nll.append(np.asarray(a).ravel())
      target.append(np.asarray(t).ravel())
    nll, target = np.concatenate(nll), np.concatenate(target)
    keep = target >= 0
    if not keep.any():
      raise ValueError("image_reliance: the batch has no supervised tokens (labels all -100).")
    out[name] = float(nll[keep].sum() / keep.sum())
    out["tokens"] = int(keep.sum())
    for cls, ids in classes.items():
      sel = np.isin(target, ids)
      out["classes"][cls].update({name: float(nll[sel].mean()) if sel.any() else None,
                                  "tokens": int(sel.sum())})
  return out
