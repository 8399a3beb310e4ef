"""The attention override (Capture.override): identity with the model's own maps, a real
change otherwise, and rows that stay probability distributions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdx.models import attention
from cdx.models import mllm

VISION = dict(image_size=16, patch_size=8, hidden_size=16, num_layers=2, num_heads=2,
              mlp_dim=32)  # 4 patches -> Nv = 3


def _model():
  cfg = mllm.make_config(VISION, dict(vocab_size=32, hidden_size=16, num_layers=3,
                                      num_heads=4, num_kv_heads=2, head_dim=4, mlp_dim=32),
                         image_token_id=5, pad_token_id=0, eos_token_id=1)
  return cfg, mllm.init_params(cfg, jax.random.key(0))


def _run(cfg, params, ids, mask, pixels, capture, override=None):
  pos, _ = mllm.visual_positions(ids, cfg.image_token_id, mllm.num_visual_tokens(cfg))
  embeds = mllm.embed(cfg, params, ids, mllm.image_embeds(cfg, params, pixels))
  return mllm.decode(cfg, params, embeds, mask, capture, pos, attn_override=override)


IDS = np.array([[7, 5, 5, 5, 8, 9, 10], [9, 5, 5, 5, 11, 12, 0]], np.int32)
MASK = np.array([[1] * 7, [1] * 6 + [0]], np.int32)


def test_override_with_own_maps_changes_nothing_and_other_maps_do():
  cfg, params = _model()
  pixels = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  plain, inter = _run(cfg, params, IDS, MASK, pixels, mllm.Capture((0, 2)))
  own = inter["visual_attn"]  # [2, B, 3, 3]
  same, _ = _run(cfg, params, IDS, MASK, pixels, mllm.Capture((), override=(0, 2)), own)
  np.testing.assert_allclose(same, plain, atol=1e-6)
  uniform = jnp.broadcast_to(jnp.tril(jnp.ones((3, 3))) / jnp.arange(1, 4)[:, None],
                             own.shape)
  other, _ = _run(cfg, params, IDS, MASK, pixels, mllm.Capture((), override=(0, 2)),
                  0.5 * (own + uniform))
  assert np.abs(np.asarray(other - plain)).max() > 1e-4
  # Only the tokens from the first visual one on can change (causal mask).
  np.testing.assert_allclose(other[:, :1], plain[:, :1], atol=1e-6)
  with pytest.raises(ValueError, match="needs attn_override"):
    _run(cfg, params, IDS, MASK, pixels, mllm.Capture((), override=(1,)), own)
  with pytest.raises(ValueError, match="out of range"):
    _run(cfg, params, IDS, MASK, pixels, mllm.Capture((), override=(3,)), own[:1])


def test_override_visual_rows_sum_to_one_and_average_to_the_replacement():
  b, h, g, s, d, nv = 2, 4, 2, 7, 4, 3
  keys = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(keys[0], (b, s, h, d))
  k = jax.random.normal(keys[1], (b, s, g, d))
  v = jax.random.normal(keys[2], (b, s, g, d))
  mask = attention.causal_mask(jnp.ones((b, s), jnp.int32))
  pos = jnp.asarray([[1, 2, 3], [2, 3, 4]], jnp.int32)
  own = attention.visual_summary(q, k, mask, pos)
  target = jnp.tril(jax.random.uniform(keys[3], (b, nv, nv), minval=0.05))
  _, probs = attention.override_visual(q, k, v, mask, pos, target)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  assert float(probs.min()) >= 0.0
  # Before the row renormalization the heads' mean was the target: after it, the mean is
  # the target up to one positive factor per (head, row); with `own` it is exact.
  _, same = attention.override_visual(q, k, v, mask, pos, own)
  full = attention.full_probs(q, k, mask)
  np.testing.assert_allclose(same, jax.vmap(lambda p, i: p[:, i])(full, pos), atol=1e-6)
  block = jax.vmap(lambda p, i: p[..., i])(probs, pos)
  assert np.all((np.asarray(block) > 0) == (np.asarray(target)[:, None] > 0))
