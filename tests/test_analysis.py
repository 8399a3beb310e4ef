"""Attention diagnostics: the maps equal the model's own captured attention; heatmaps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdx.analysis import attention
from cdx.models import mllm

VISION = dict(image_size=16, patch_size=8, hidden_size=16, num_layers=2, num_heads=2,
              mlp_dim=32)  # 4 patches -> Nv = 3


def _model(hidden, layers, seed):
  cfg = mllm.make_config(VISION, dict(vocab_size=32, hidden_size=hidden, num_layers=layers,
                                      num_heads=2, num_kv_heads=2, head_dim=8,
                                      mlp_dim=2 * hidden), image_token_id=5, pad_token_id=0,
                         eos_token_id=1)
  return cfg, jax.jit(mllm.init_params, static_argnums=0)(cfg, jax.random.key(seed))


# Jitted: op by op, every op of the model would compile on its own.
_forward = jax.jit(mllm.forward, static_argnums=0, static_argnames="attn_layers")


def test_visual_attention_equals_each_models_captured_maps():
  s_cfg, s = _model(16, 2, 0)
  t_cfg, t = _model(24, 3, 1)
  t["vision"] = s["vision"]  # One shared vision tower, as in distillation.
  ids = np.array([[7, 5, 5, 5, 8, 9], [7, 8, 9, 10, 11, 12], [5, 5, 5, 7, 8, 0]], np.int32)
  mask = np.array([[1] * 6, [1] * 6, [1] * 5 + [0]], np.int32)
  pixels = np.asarray(jax.random.normal(jax.random.key(2), (3, 16, 16, 3)))
  batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
           "has_image": np.array([True, False, True])}
  s_maps, t_maps = attention.visual_attention(s_cfg, s, t_cfg, t, batch, (0, 1), (2,))
  assert s_maps.shape == (2, 2, 3, 3) and t_maps.shape == (1, 2, 3, 3)  # Image rows only.
  rows = np.array([0, 2])
  _, s_ref = _forward(s_cfg, s, ids[rows], pixels[rows], mask[rows], attn_layers=(0, 1))
  _, t_ref = _forward(t_cfg, t, ids[rows], pixels[rows], mask[rows], attn_layers=(2,))
  np.testing.assert_allclose(s_maps, s_ref["visual_attn"], atol=1e-6)
  np.testing.assert_allclose(t_maps, t_ref["visual_attn"], atol=1e-6)
  with pytest.raises(ValueError, match="no image"):
    attention.visual_attention(s_cfg, s, t_cfg, t, {**batch, "has_image": np.zeros(3, bool)},
                               (0,), (0,))


def test_patch_heatmap_places_column_means_on_the_grid():
  attn = np.zeros((3, 3), np.float32)
  attn[:, 2] = 1.0  # Every query looks at the third visual token = patch 3 of a 2x2 grid.
  grid = attention.patch_heatmap(attn)
  np.testing.assert_array_equal(grid, [[0.0, 0.0], [0.0, 1.0]])
  with pytest.raises(ValueError, match="square"):
    attention.patch_heatmap(np.ones((4, 4)))
