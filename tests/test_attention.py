"""cdx/models/attention.py: which fused-attention implementation `attend` picks.

No GPU here: the picking function is tested for every backend name, and `attend` on this
backend must take XLA's path whatever `fused` says (same values both ways).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdx.models import attention


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_low_precision_uses_cudnn(dtype):
  assert attention.implementation("gpu", dtype, 64) == "cudnn"
  assert attention.implementation("cuda", jnp.dtype(dtype), 128) == "cudnn"


@pytest.mark.parametrize("backend,dtype,head_dim,fused", [
    ("gpu", "float32", 64, True),     # cuDNN has no f32 attention: XLA.
    ("gpu", "bfloat16", 64, False),   # A captured layer keeps the exact path.
    ("gpu", "bfloat16", 256, True),   # Head dim beyond what cuDNN takes.
    ("gpu", "bfloat16", 36, True),    # Not a multiple of 8.
    ("cpu", "bfloat16", 64, True),
    ("tpu", "bfloat16", 64, True),
])
def test_everything_else_uses_xla(backend, dtype, head_dim, fused):
  assert attention.implementation(backend, dtype, head_dim, fused) == "xla"


@pytest.mark.parametrize("length", [24, 40])  # One block, and query-blocked (block 16).
def test_attend_on_this_backend_ignores_fused(length):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, length, 4, 8))
  k, v = (jax.random.normal(kk, (2, length, 2, 8)) for kk in keys[1:])
  valid = jnp.arange(length)[None] < jnp.asarray([[length], [length - 5]])
  mask = attention.causal_mask(valid)
  fused = attention.attend(q, k, v, mask, block=16, fused=True)
  exact = attention.attend(q, k, v, mask, block=16, fused=False)
  np.testing.assert_array_equal(np.asarray(fused), np.asarray(exact))
  # Against the probabilities written out: [B, H, T, S] @ v with GQA repeats.
  probs = attention.full_probs(q, k, mask)
  want = jnp.einsum("bhts,bshd->bthd", probs, jnp.repeat(v, 2, axis=2))
  np.testing.assert_allclose(np.asarray(exact), np.asarray(want), rtol=1e-5, atol=1e-5)
