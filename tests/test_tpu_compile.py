"""`bench.py compile`: the DFT step compiled for a TPU topology, and its report arithmetic.

The arithmetic tests always run. The compile test needs libtpu (requirements-tpu.txt, not
a runtime or CI dependency) and skips without it.
"""
import importlib.util

import jax
import pytest

from cdx import paths as paths_lib
from launch import bench
from launch import tpu_compile

VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
              mlp_dim=64)  # 16 patches -> Nv = 15
STUDENT = dict(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=8, mlp_dim=64, rope_theta=1e4, tie_embeddings=True)
# One vocab size: libtpu 0.0.42 fails (an INTERNAL bitcast error) to compile the cut of the
# teacher's logits to a smaller student vocab (docs/PERFORMANCE.md §7).
TEACHER = dict(vocab_size=512, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=4,
               head_dim=12, mlp_dim=96, rope_theta=1e4, tie_embeddings=False)
MODELS = (VISION, STUDENT, TEACHER)


def test_hbm_is_argument_output_temp_minus_alias():
  m = {"argument": 7 << 30, "output": 2 << 30, "temp": 3 << 30, "alias": 2 << 30}
  assert tpu_compile.hbm_bytes(m) == 10 << 30
  m["alias"] = 0  # Nothing donated: the new state is a second copy.
  assert tpu_compile.hbm_bytes(m) == 12 << 30


def test_mfu_and_tokens_per_s_are_inverse():
  flops, chips, peak = 16e9, 8, 197e12
  # 8 chips at 197 TFLOP/s and 16 GFLOP per token: 98,500 tokens/s is exactly full use.
  assert tpu_compile.mfu(flops, 98_500, chips, peak) == pytest.approx(1.0)
  assert tpu_compile.mfu(flops, 98_500 / 4, chips, peak) == pytest.approx(0.25)
  for u in (0.1, 0.4, 0.9):
    tps = tpu_compile.tokens_per_s_at(u, flops, chips, peak)
    assert tpu_compile.mfu(flops, tps, chips, peak) == pytest.approx(u)
  # Twice the chips at the same throughput: half the utilization.
  assert tpu_compile.mfu(flops, 1e4, 2 * chips, peak) == pytest.approx(
      tpu_compile.mfu(flops, 1e4, chips, peak) / 2)


def test_parse_mesh_and_topology_errors():
  assert tpu_compile.parse_mesh("fsdp=4,tensor=2") == {"data": 1, "fsdp": 4, "tensor": 2}
  assert tpu_compile.parse_mesh("data=2") == {"data": 2, "fsdp": 1, "tensor": 1}
  for bad in ("fsdp=0", "pipeline=2", "fsdp"):
    with pytest.raises(ValueError, match="--mesh"):
      tpu_compile.parse_mesh(bad)
  assert tpu_compile.chip_of("v5e:2x4").hbm_bytes == 16 * 2**30
  with pytest.raises(ValueError, match="--topology"):
    tpu_compile.chip_of("v3:2x2")


def _flops(seq):
  b = bench.build("tiny", seq=seq, batch=1, abstract=True, models=MODELS)
  params = paths_lib.merge(b.state["params"], b.frozen)
  return b, tpu_compile.model_flops_per_token(b.student_cfg, b.teacher_cfg, params,
                                              b.state["lora"], b.teacher, seq)


def test_model_flops_per_token_terms():
  """Linear terms are per token (seq-independent); attention grows linearly in seq;
  per-image work (vision tower, adapter, post-connector) is spread over the row."""
  b, short = _flops(96)
  _, long = _flops(192)
  s, t = b.student_cfg.text, b.teacher_cfg.text
  # Attention: 4 * layers * heads * head_dim FLOPs per token per context token; the
  # student runs it forward and (2x) backward, the teacher forward only.
  assert long["teacher"] - short["teacher"] == 4 * t.num_layers * t.num_heads * t.head_dim * 96
  assert long["student"] - short["student"] == \
      3 * 4 * s.num_layers * s.num_heads * s.head_dim * 96
  assert long["lora"] == short["lora"] > 0
  assert long["vision_adapter"] == pytest.approx(short["vision_adapter"] / 2)
  assert long["post_connector"] == pytest.approx(short["post_connector"] / 2)
  assert short["total"] == pytest.approx(sum(v for k, v in short.items() if k != "total"))
  # The teacher's linears: 2 FLOPs per multiply-add of every kernel (LM head included).
  kernels = sum(x.size for kp, x in jax.tree_util.tree_leaves_with_path(b.teacher["llm"])
                if paths_lib.path_str(kp).endswith("kernel"))
  attn = 4 * t.num_layers * t.num_heads * t.head_dim * 96
  assert short["teacher"] == 2 * kernels + attn


def _compile(mesh):
  return tpu_compile.compile_step(bench.build, "tiny", "v5e:2x2", mesh, batch=2,
                                  micro_batches=2, seq=96, formulation="cdx",
                                  models=MODELS)


@pytest.mark.slow
def test_compiles_for_a_tpu_topology():
  """With libtpu: the tiny step compiles for v5e:2x2 (4 compile-only chips), fits, and
  sharding the params over fsdp holds fewer argument bytes per chip than replicating."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (optional: pip install -r requirements-tpu.txt)")
  fsdp = _compile("fsdp=4")
  data = _compile("data=4")
  for row in (fsdp, data):
    assert row["chips"] == 4 and row["device_kind"].startswith("TPU v5")
    assert row["fits"] and row["hbm_per_chip"] > 0
    assert row["global_batch"] == 8 and row["tokens_per_step"] == 8 * 96
  assert fsdp["memory_per_device"]["argument"] < data["memory_per_device"]["argument"]


def test_v4_mesh_puts_a_chips_two_cores_side_by_side():
  """With libtpu: v4's compile-only topology has a device per TensorCore (two per chip),
  which jax's physical mesh builder refuses; `topology_mesh` pairs a chip's cores on the
  innermost axis instead, and still refuses a mesh of the wrong size."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (optional: pip install -r requirements-tpu.txt)")
  devices = tpu_compile.topology_devices("v4:2x2x1")
  assert len(devices) == 8 and len({tuple(d.coords) for d in devices}) == 4
  mesh = tpu_compile.topology_mesh({"data": 1, "fsdp": 4, "tensor": 2}, devices)
  assert mesh.devices.shape == (1, 4, 2) and set(mesh.devices.flat) == set(devices)
  for pair in mesh.devices.reshape(4, 2):
    assert pair[0].coords == pair[1].coords  # One chip per tensor pair.
  assert len({tuple(p.coords) for p in mesh.devices.reshape(4, 2)[:, 0]}) == 4
  with pytest.raises(ValueError, match="--mesh"):
    tpu_compile.topology_mesh({"data": 1, "fsdp": 4, "tensor": 1}, devices)
