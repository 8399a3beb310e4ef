"""SigLIP encoder: parity with HF SiglipVisionModel, layer selection, variants, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_fixtures as F
from cdx import hf
from cdx.models import siglip


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("siglip"))
  return path, F.save_siglip(path)


def _hf_hidden(model, pixels: np.ndarray, layer: int) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
  return out.hidden_states[layer].numpy()


@pytest.mark.parametrize("layer", [-2, 1, -1])
def test_hidden_states_match_hf(hf_siglip, layer):
  path, model = hf_siglip
  cfg, params = hf.load_siglip(path, feature_layer=layer)
  pixels = np.random.RandomState(0).randn(2, F.IMAGE, F.IMAGE, 3).astype(np.float32)
  ours = siglip.Encoder(cfg, feature_layer=layer).apply({"params": params}, pixels)
  np.testing.assert_allclose(np.asarray(ours), _hf_hidden(model, pixels, layer), atol=1e-4)


def test_image_size_not_multiple_of_patch_matches_hf(tmp_path):
  model = F.save_siglip(str(tmp_path), image=30)  # 3x3 patches of 8 px, 6 px left over
  cfg, params = hf.load_siglip(str(tmp_path))
  pixels = np.random.RandomState(1).randn(1, 30, 30, 3).astype(np.float32)
  ours = siglip.Encoder(cfg).apply({"params": params}, pixels)
  np.testing.assert_allclose(np.asarray(ours), _hf_hidden(model, pixels, -2), atol=1e-4)


def test_only_layers_up_to_feature_layer_are_built(hf_siglip):
  _, params = hf.load_siglip(hf_siglip[0], feature_layer=-2)  # 3-layer tower
  assert sorted(k for k in params if k.startswith("layers_")) == ["layers_0", "layers_1"]


def test_so400m_param_count_matches_published():
  cfg = siglip.get_config("so400m-patch14-384")
  pixels = jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.float32)
  shapes = jax.eval_shape(siglip.Encoder(cfg, feature_layer=-1).init,
                          jax.random.PRNGKey(0), pixels)
  ours = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
  # google/siglip-so400m-patch14-384 vision tower: 428.2M including the attention-pooling
  # head (15.24M) that the MLLM never uses; the encoder alone is ~413.0M.
  published_without_head = 428.2e6 - 15.24e6
  assert abs(ours - published_without_head) / published_without_head < 0.005
  assert cfg.num_patches == 729


def test_unknown_variant_lists_known_names():
  with pytest.raises(ValueError, match="so400m-patch14-384"):
    siglip.get_config("so401m")
  with pytest.raises(ValueError, match="bogus"):
    siglip.get_config({"bogus": 1})


def test_bad_pixels_and_feature_layer_raise():
  cfg = siglip.SiglipConfig(image_size=16, patch_size=8, hidden_size=8, num_layers=2,
                            num_heads=2, mlp_dim=16)
  with pytest.raises(ValueError, match="NHWC"):
    siglip.Encoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 16, 16)))
  with pytest.raises(ValueError, match="feature_layer"):
    siglip.layers_needed(cfg, 5)
