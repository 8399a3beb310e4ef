"""TAF: post-connector init, TAF student assembly, and the export fold of the post-connector
into the adapter (cdx.models.adapter.fold_post_connector)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdx.distill import taf
from cdx.models import adapter as adapter_lib


def _adapter(seed, d_in, d_out, scale=0.3):
  # numpy test data: eager jax ops would each compile, which is slow on a busy CPU.
  rng = np.random.default_rng(seed)
  def normal(*shape):
    return (scale * rng.normal(size=shape)).astype(np.float32)
  return {"fc1": {"kernel": normal(d_in, d_out), "bias": normal(d_out)},
          "fc2": {"kernel": normal(d_out, d_out), "bias": normal(d_out)}}


def _mllm(seed, dv, d, vocab=11):
  return {"vision": {"w": np.ones((3, dv), np.float32)},
          "adapter": _adapter(seed, dv, d),
          "llm": {"embed": {"embedding": np.zeros((vocab, d), np.float32)}}}


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _apply_adapter(adapter, x):
  h = _gelu(x @ adapter["fc1"]["kernel"] + adapter["fc1"]["bias"])
  return h @ np.asarray(adapter["fc2"]["kernel"]) + np.asarray(adapter["fc2"]["bias"])


def test_post_connector_init_matches_torch_linear_distribution():
  fan_in, fan_out = 400, 300
  post = taf.init_post_connector(jax.random.key(0), fan_in, fan_out, jnp.bfloat16)
  assert post["kernel"].shape == (fan_in, fan_out) and post["bias"].shape == (fan_out,)
  assert post["kernel"].dtype == jnp.bfloat16
  w = np.asarray(post["kernel"], np.float32)
  bound = 1 / np.sqrt(fan_in)
  assert np.abs(w).max() <= bound * 1.01 and np.abs(w).max() > 0.95 * bound
  # U(-a, a) has std a / sqrt(3).
  np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.03)
  assert abs(w.mean()) < 0.01 * bound
  b = np.asarray(post["bias"], np.float32)
  assert np.abs(b).max() <= bound * 1.01 and b.std() > 0.4 * bound
  torch = pytest.importorskip("torch")
  ref = torch.nn.Linear(fan_in, fan_out)  # same bound as torch's own default
  assert abs(ref.weight.abs().max().item() - bound) < 0.01 * bound


def test_post_connector_bad_sizes():
  with pytest.raises(ValueError, match="teacher_hidden"):
    taf.init_post_connector(jax.random.key(0), 0, 4)


def test_make_taf_student_tree():
  teacher, student = _mllm(1, 6, 10), _mllm(2, 6, 4)
  out = taf.make_taf_student(student, teacher, jax.random.key(2))
  assert out["adapter"] is teacher["adapter"]
  assert out["vision"] is student["vision"] and out["llm"] is student["llm"]
  assert out["post"]["kernel"].shape == (10, 4) and out["post"]["bias"].shape == (4,)
  assert "post" not in student and student["adapter"] is not teacher["adapter"]
  # The chain vision -> teacher adapter -> post lands in the student's hidden size.
  feats = np.ones((2, 5, 6), np.float32)
  y = _apply_adapter(out["adapter"], feats) @ np.asarray(out["post"]["kernel"])
  assert y.shape == (2, 5, 4)


def test_make_taf_student_rejects_other_vision_width():
  with pytest.raises(ValueError, match="vision"):
    taf.make_taf_student(_mllm(3, 5, 4), _mllm(4, 6, 10), jax.random.key(0))
  with pytest.raises(ValueError, match="adapter"):
    taf.make_taf_student(_mllm(3, 6, 4), {"llm": {}}, jax.random.key(0))


def test_fold_post_connector_equals_composition():
  adapter = _adapter(4, 7, 9)
  post = taf.init_post_connector(jax.random.key(5), 9, 5)
  post = {k: np.asarray(v) for k, v in post.items()}
  x = np.random.default_rng(5).normal(size=(3, 4, 7)).astype(np.float32)
  folded = adapter_lib.fold_post_connector(adapter, post)
  assert folded["fc1"] is adapter["fc1"]
  assert folded["fc2"]["kernel"].shape == (9, 5) and folded["fc2"]["bias"].shape == (5,)
  want = _apply_adapter(adapter, x) @ post["kernel"] + post["bias"]
  np.testing.assert_allclose(_apply_adapter(folded, x), want, rtol=1e-5, atol=1e-5)


def test_fold_post_connector_shape_mismatch():
  adapter = _adapter(6, 7, 9)
  post = taf.init_post_connector(jax.random.key(7), 8, 5)
  with pytest.raises(ValueError, match="post-connector"):
    adapter_lib.fold_post_connector(adapter, post)
