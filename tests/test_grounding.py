"""cdx.analysis.grounding: the loss with real, grey and another sample's image."""
import jax
import numpy as np
import pytest

from cdx.analysis import grounding
from cdx.models import mllm
import hf_fixtures as F
from cdx import hf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llava"))
  F.save_llava(path)
  return hf.load_llava(path)


def _batch(cfg, n=4, seed=0):
  rng = np.random.RandomState(seed)
  nv = mllm.num_visual_tokens(cfg)
  ids = np.concatenate([np.full((n, nv), cfg.image_token_id), rng.randint(1, 60, (n, 6))], 1)
  labels = np.where(np.arange(ids.shape[1]) >= nv, ids, -100).astype(np.int32)
  size = cfg.vision.image_size
  return {"input_ids": ids.astype(np.int32), "labels": labels,
          "attention_mask": np.ones_like(ids, np.int32),
          "pixel_values": rng.randn(n, size, size, 3).astype(np.float32)}


def test_a_model_that_reads_the_image_scores_differently_without_it(model):
  cfg, params = model
  out = grounding.image_reliance(cfg, params, _batch(cfg), batch_size=3)  # two chunks
  assert out["tokens"] == 4 * 6
  assert all(np.isfinite(out[k]) for k in ("real", "grey", "other"))
  assert abs(out["real"] - out["grey"]) > 1e-4 and abs(out["real"] - out["other"]) > 1e-4


def test_a_model_blind_to_the_image_scores_the_same(model):
  cfg, params = model
  # Zero adapter output: every image becomes the same embeddings.
  blind = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if "adapter" in jax.tree_util.keystr(path) else x, params)
  out = grounding.image_reliance(cfg, blind, _batch(cfg))
  np.testing.assert_allclose([out["grey"], out["other"]], [out["real"]] * 2, rtol=1e-6)


def test_bad_batches_are_refused(model):
  cfg, params = model
  one = {k: v[:1] for k, v in _batch(cfg).items()}
  with pytest.raises(ValueError, match=">= 2 samples"):
    grounding.image_reliance(cfg, params, one)
  unsupervised = dict(_batch(cfg), labels=np.full((4, mllm.num_visual_tokens(cfg) + 6), -100))
  with pytest.raises(ValueError, match="no supervised tokens"):
    grounding.image_reliance(cfg, params, unsupervised)


def test_token_classes_split_the_same_losses(model):
  cfg, params = model
  batch = _batch(cfg)
  targets = batch["labels"][:, 1:]
  low = [int(t) for t in np.unique(targets[targets >= 0]) if t < 30]
  out = grounding.image_reliance(cfg, params, batch, token_classes={"low": low, "none": [999]})
  c = out["classes"]
  assert c["low"]["tokens"] == int(np.isin(targets, low).sum()) > 0
  assert c["none"] == {"real": None, "grey": None, "other": None, "tokens": 0}
  # Each class's mean is the mean of its tokens: low + the rest recombine to the total.
  rest = grounding.image_reliance(
      cfg, params, batch, token_classes={"rest": [t for t in range(200) if t not in low]})
  r = rest["classes"]["rest"]
  for k in ("real", "grey", "other"):
    total = (c["low"][k] * c["low"]["tokens"] + r[k] * r["tokens"]) / out["tokens"]
    np.testing.assert_allclose(total, out[k], rtol=1e-5)
