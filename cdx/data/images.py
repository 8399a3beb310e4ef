"""SigLIP image preprocessing (docs/METHOD.md §4), matching transformers' SiglipImageProcessor.

  square  resize straight to size×size (bicubic, PIL), scale 1/255, normalize
          (x - 0.5) / 0.5 → float32 [size, size, 3] in [-1, 1]. Used by every stage.
  pad     first expand to a square canvas filled with the mean colour (image centred,
          LLaVA's expand-to-square), then as `square`.

Text-only samples get `zero_image` (all zeros, i.e. the normalized mid-grey).

`load_image` returns RGB. PIL's own RGB conversion clips 16-bit and 32-bit grey images
(modes I;16*, I, F) at 255, which turns most of them white; they are rescaled to 8 bits
first (16-bit: /257; float: [0, 1] or [0, 255] as stored).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
MODES = ("square", "pad")


def _expand_to_square(image: Image.Image) -> Image.Image:
  w, h = image.size
  if w == h:
    return image
  side = max(w, h)
  fill = tuple(int(m * 255) for m in MEAN)
  canvas = Image.new(image.mode, (side, side), fill)
  canvas.paste(image, ((side - w) // 2, (side - h) // 2))
  return canvas


def preprocess(image: Image.Image, size: int = 384, mode: str = "square") -> np.ndarray:
  """PIL image (any mode) → normalized float32 [size, size, 3]."""
  if mode not in MODES:
    raise ValueError(f"image mode={mode!r} is unknown; use one of {MODES}")
  image = image.convert("RGB")
  if mode == "pad":
    image = _expand_to_square(image)
  if image.size != (size, size):
    image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
  x = np.asarray(image, np.float32) * np.float32(1 / 255)
  return ((x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).astype(np.float32)


def zero_image(size: int = 384) -> np.ndarray:
  """The pixel values of a text-only sample: float32 zeros [size, size, 3]."""
  return np.zeros((size, size, 3), np.float32)


def _to_8bit(image: Image.Image) -> Image.Image:
  """Deep grey modes (I;16*, I, F) → mode L with the full range mapped to 0..255."""
  x = np.asarray(image, np.float64)
  if image.mode == "F":
    x = x * 255 if np.nanmax(x, initial=0) <= 1 else x
  elif image.mode.startswith("I;16") or np.max(x, initial=0) > 255:
    x = x / 257  # 65535 -> 255 (an 'I' image holding more than 8 bits is 16-bit PNG data)
  x = np.nan_to_num(x)
  return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), mode="L")


def load_image(path: str) -> Image.Image:
  """Opens and fully decodes an image file into RGB (raises OSError if missing/corrupt)."""
  with Image.open(path) as im:
    im.load()
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
      return _to_8bit(im).convert("RGB")
    return im.convert("RGB")
