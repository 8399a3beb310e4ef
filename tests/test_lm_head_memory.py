"""The chunked LM head holds nothing of the head's size (docs/PERFORMANCE.md §1).

Compile-only memory checks of `losses.lm_kd_chunked` with a head much larger than one
chunk's logits, and equality of the [V, D] ("vd", tied table) and [D, V] ("dv") layouts.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdx.distill import losses
from cdx.models import mllm


def _case(rng, b=2, length=13, d=8, v=24):
  hs = jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32)
  ht = jnp.asarray(rng.standard_normal((b, length, d + 2)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
  wt = jnp.asarray(rng.standard_normal((d + 2, v + 3)), jnp.float32)
  labels = rng.integers(0, v, (b, length)).astype(np.int32)
  labels[:, :5] = losses.IGNORE
  labels[1, 9:] = losses.IGNORE
  return hs, table, ht, wt, jnp.asarray(labels)


@pytest.mark.parametrize("compact", [True, False])
def test_table_layout_equals_kernel_layout(compact):
  hs, table, ht, wt, labels = _case(np.random.default_rng(3))
  opts = losses.KDOptions(temperature=2.0, kind="jsd")

  def loss(hs, head, layout):
    s = losses.lm_kd_chunked(hs, head, ht, wt, labels, 4, opts, compact=compact,
                             head_layouts=(layout, "dv"))
    return s.lm_sum + 0.3 * s.kd_sum

  grad = jax.value_and_grad(loss, argnums=(0, 1))
  v_vd, (d_hs_vd, d_table) = grad(hs, table, "vd")
  v_dv, (d_hs_dv, d_kernel) = grad(hs, table.T, "dv")
  np.testing.assert_allclose(v_vd, v_dv, rtol=1e-6)
  np.testing.assert_allclose(d_hs_vd, d_hs_dv, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(d_table, d_kernel.T, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(d_table).sum()) > 0  # A trainable head still gets its gradient.


def test_bad_head_layout_is_rejected():
  hs, table, _, _, labels = _case(np.random.default_rng(4))
  with pytest.raises(ValueError, match="head_layouts"):
    losses.lm_kd_chunked(hs, table, None, None, labels, 4, head_layouts=("dv",))
  with pytest.raises(ValueError, match="head_layouts"):
    losses.lm_kd_chunked(hs, table, None, None, labels, 4, head_layouts=("vd", "kv"))


def test_mllm_lm_head_is_the_stored_array():
  params = {"llm": {"embed": {"embedding": jnp.ones((10, 4))},
                    "lm_head": {"kernel": jnp.zeros((4, 10))}}}
  for tie, layout in ((True, "vd"), (False, "dv")):
    cfg = mllm.make_config("base-patch16-224", dict(vocab_size=10, hidden_size=4,
                                                    num_layers=1, num_heads=1,
                                                    num_kv_heads=1, head_dim=4, mlp_dim=8,
                                                    tie_embeddings=tie),
                           image_token_id=3)
    head, got = mllm.lm_head(cfg, params)
    assert got == layout
    want = mllm.lm_head_kernel(cfg, params)
    np.testing.assert_array_equal(head.T if layout == "vd" else head, want)


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("compact", [True, False])
def test_frozen_head_backward_holds_no_head_sized_buffer(compact, layout):
  # Head 8 MiB f32; one chunk's logits [1, 16, 8192] 0.5 MiB. Before the custom VJP the
  # compact path kept a copy of the head (and a zero twin) as lax.cond residuals; a tied
  # head passed as embedding.T was a transposed copy. Either is >= 1x the head.
  b, length, d, v, chunk = 1, 256, 256, 8192, 16
  hs = jax.ShapeDtypeStruct((b, length, d), jnp.float32)
  shape = (d, v) if layout == "dv" else (v, d)
  head = jax.ShapeDtypeStruct(shape, jnp.float32)
  labels = jnp.where(jnp.arange(length) % 3 == 0, 5, losses.IGNORE)[None].astype(jnp.int32)

  def loss(hs, head):
    s = losses.lm_kd_chunked(hs, head, hs, head, labels, chunk, compact=compact,
                             head_layouts=(layout, layout))
    return s.lm_sum + s.kd_sum

  compiled = jax.jit(jax.grad(loss)).lower(hs, head).compile()  # d/d hidden only
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("backend gives no memory analysis")
  head_bytes = d * v * 4
  assert stats.temp_size_in_bytes < head_bytes / 2, stats.temp_size_in_bytes
