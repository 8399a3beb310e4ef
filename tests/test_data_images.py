"""SigLIP preprocessing: parity with transformers' processor, pad mode, zero image."""
import numpy as np
import pytest
from PIL import Image

from cdx.data import images


def _reference_processor(size):
  try:  # transformers 5 without torchvision: the PIL backend is the reference one
    from transformers.models.siglip.image_processing_pil_siglip import \
        SiglipImageProcessorPil as cls
  except ImportError:
    from transformers import SiglipImageProcessor as cls
  return cls(size={"height": size, "width": size})


@pytest.mark.parametrize("shape,size", [((37, 60, 3), 32), ((500, 300, 3), 384)])
def test_square_matches_transformers(shape, size):
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
  ref = _reference_processor(size)(image, return_tensors="np")["pixel_values"][0]
  ours = images.preprocess(image, size, "square")
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  # In [0,1]-scaled terms (normalized values span 2).
  assert np.abs(ours - np.transpose(ref, (1, 2, 0))).max() / 2 <= 1e-5


def test_pad_mode_fills_with_mean_and_centres():
  rng = np.random.default_rng(1)
  wide = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
  out = images.preprocess(wide, 40, "pad")
  fill = (127 / 255 - 0.5) / 0.5
  assert np.allclose(out[:10], fill, atol=1e-6) and np.allclose(out[30:], fill, atol=1e-6)
  # No resize is needed at size 40: the middle rows are the image itself.
  assert np.allclose(out[10:30], (np.asarray(wide, np.float32) / 255 - 0.5) / 0.5, atol=1e-6)
  # Square images are unchanged by padding.
  sq = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
  assert np.array_equal(images.preprocess(sq, 16, "pad"), images.preprocess(sq, 16, "square"))


def test_modes_and_zero_image():
  gray = Image.fromarray(np.full((8, 8), 255, np.uint8), mode="L")
  assert np.allclose(images.preprocess(gray, 8), 1.0)
  rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
  assert np.allclose(images.preprocess(rgba, 8), -1.0)
  z = images.zero_image(16)
  assert z.shape == (16, 16, 3) and z.dtype == np.float32 and not z.any()
  with pytest.raises(ValueError, match="mode"):
    images.preprocess(gray, 8, "crop")
