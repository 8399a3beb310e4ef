"""Scanned layer stacks (`scan_layers`): same maths as the unrolled layers, other layout.

  * qwen.Decoder scanned == unrolled on the same (stacked) weights: logits, captured visual
    attention in the asked order, full maps, KV cache, gradients, with and without remat,
    with LoRA factors; siglip.Encoder likewise;
  * stack/unstack are inverses; layouts convert at the file boundaries (HF export is the
    same file from either layout);
  * LoRA init/merge and the sharding rules work on stacked leaves;
  * the DFT step on a scanned student and teacher gives the unrolled step's losses and
    updates, on 1 device and sharded on 2x2x2;
  * compiled for CPU, a scanned, rematerialized step's temp memory does not grow with
    depth the way the unrolled one does (what docs/PERFORMANCE.md §1 relies on).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import test_step as T
from cdx import hf
from cdx import parallel
from cdx.models import mllm
from cdx.models import qwen
from cdx.models import siglip
from cdx.models import stack
from cdx.train import lora as lora_lib
from cdx import paths as params_lib
from configs.common import LLM_LINEARS
from launch import bench

CFG = qwen.QwenConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=48, rope_theta=10000.0)


def _close(a, b, rtol=1e-5, atol=1e-5):
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and la
  for (path, x), y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@functools.lru_cache(maxsize=None)
def _unrolled_params():
  ids = jnp.zeros((1, 4), jnp.int32)
  return jax.device_get(qwen.Decoder(CFG).init(T._key(0), ids,
                                               method=qwen.Decoder.init_all)["params"])


def test_stack_and_unstack_are_inverses():
  p = _unrolled_params()
  stacked = stack.stack_layers(p)
  assert "layers" in stacked and not any(k.startswith("layers_") for k in stacked)
  assert stacked["layers"]["mlp"]["gate"]["kernel"].shape == (4, 32, 48)
  np.testing.assert_array_equal(stacked["layers"]["attn"]["q"]["kernel"][2],
                                p["layers_2"]["attn"]["q"]["kernel"])
  _close(stack.unstack_layers(stacked), p, rtol=0, atol=0)
  assert stack.stack_layers(stacked) is stacked  # Already stacked: unchanged.
  assert stack.unstack_layers(p) is p
  partial = {k: v for k, v in p.items() if k != "layers_1"}
  with pytest.raises(ValueError, match="layers_0..layers_2"):
    stack.stack_layers(partial)


def test_scanned_init_has_the_stacked_layout():
  ids = jnp.zeros((1, 4), jnp.int32)
  p = qwen.Decoder(CFG, scan_layers=True).init(T._key(0), ids,
                                               method=qwen.Decoder.init_all)["params"]
  want = jax.tree.map(lambda x: x.shape, stack.stack_layers(_unrolled_params()))
  assert jax.tree.map(lambda x: x.shape, p) == want
  q = np.asarray(p["layers"]["attn"]["q"]["kernel"])
  assert not np.allclose(q[0], q[1])  # Every layer drew its own init.


@pytest.mark.parametrize("remat", [None, "nothing_saveable"])
def test_scanned_decoder_equals_unrolled(remat):
  p = _unrolled_params()
  stacked = stack.stack_layers(p)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
  mask = jnp.asarray([[1] * 12, [1] * 9 + [0] * 3], jnp.int32)
  visual_pos = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
  # LoRA with non-zero b, so the factored branch contributes.
  lora = lora_lib.init_lora({"llm": p}, LLM_LINEARS, 2, 4.0, T._key(1))
  lora = jax.tree.map(lambda x: x + 0.05, lora)
  attn_layers = (3, 0, 2)  # Unsorted: inter keeps this order.

  def loss(params, factors, scan):
    dec = qwen.Decoder(CFG, qwen.Capture(attn_layers, full_attn=True), remat=remat,
                       lora_scale=2.0, scan_layers=scan)
    emb = dec.apply({"params": params}, ids, method=qwen.Decoder.embed_tokens)
    hidden, inter = dec.apply({"params": params, "lora": factors}, emb, mask, visual_pos)
    value = (jnp.sum(hidden ** 2) + 3 * jnp.sum(inter["visual_attn"] ** 2)
             + jnp.sum(inter["full_attn"] ** 2))
    return value, (hidden, inter)

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (v0, (h0, i0)), g0 = jax.jit(grad, static_argnums=2)(p, lora["llm"], False)
  (v1, (h1, i1)), g1 = jax.jit(grad, static_argnums=2)(stacked, stack.stack_layers(lora["llm"]),
                                                       True)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  _close(h1, h0)
  assert i1["visual_attn"].shape == (3, 2, 3, 3)
  _close(i1, i0)
  _close(jax.tree.map(stack.unstack_layers, g1, is_leaf=lambda x: "layers" in x), g0,
         rtol=1e-4, atol=1e-4)


def test_scanned_kv_cache_equals_unrolled():
  p = _unrolled_params()
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 7)), jnp.int32)
  cache = qwen.init_cache(CFG, 2, 10)
  outs = []
  for scan, params in ((False, p), (True, stack.stack_layers(p))):
    dec = qwen.Decoder(CFG, scan_layers=scan)
    logits, inter = dec.apply({"params": params}, ids, None, cache, method=qwen.Decoder.lm)
    step = jnp.asarray([[5], [9]], jnp.int32)
    logits2, inter2 = dec.apply({"params": params}, step, jnp.ones((2, 1), jnp.int32),
                                inter["cache"], method=qwen.Decoder.lm)
    outs.append((logits, logits2, inter2["cache"]))
  _close(outs[1], outs[0])


def test_scanned_siglip_equals_unrolled():
  cfg = siglip.SiglipConfig(**dict(T.VISION, num_layers=4))
  pixels = jnp.asarray(np.random.default_rng(2).normal(size=(2, 24, 24, 3)), jnp.float32)
  enc = siglip.Encoder(cfg, feature_layer=-2)
  p = enc.init(T._key(5), pixels)["params"]
  assert sorted(k for k in p if k.startswith("layers_")) == ["layers_0", "layers_1",
                                                             "layers_2"]
  scanned = siglip.Encoder(cfg, feature_layer=-2, scan_layers=True)
  init_shapes = jax.tree.map(lambda x: x.shape, scanned.init(T._key(5), pixels)["params"])
  assert init_shapes == jax.tree.map(lambda x: x.shape, stack.stack_layers(p))
  _close(scanned.apply({"params": stack.stack_layers(p)}, pixels), enc.apply({"params": p},
                                                                            pixels))
  # feature_layer 0 runs no layer: the scanned tower then holds no "layers" at all.
  none = siglip.Encoder(cfg, feature_layer=0, scan_layers=True).init(T._key(5), pixels)
  assert "layers" not in none["params"]


def test_layout_conversion_and_hf_export_of_either_layout(tmp_path):
  vision = dict(T.VISION, num_layers=3)  # Two layers run (feature_layer -2).
  cfg = mllm.make_config(vision, T.STUDENT, image_token_id=T.IMG, pad_token_id=T.PAD,
                         eos_token_id=T.EOS)
  scfg = dataclasses.replace(cfg, scan_layers=True)
  params = jax.device_get(jax.jit(lambda: mllm.init_params(cfg, T._key(0)))())
  stacked = mllm.to_layout(scfg, params)
  assert "layers" in stacked["llm"] and "layers" in stacked["vision"]
  assert stacked["vision"]["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 64)
  assert stacked["adapter"] is params["adapter"]
  assert mllm.to_layout(scfg, stacked)["llm"] is stacked["llm"]
  back_cfg, back = mllm.unscanned(scfg, stacked)
  assert back_cfg == cfg
  _close(back, params, rtol=0, atol=0)
  hf.save_llava(cfg, params, str(tmp_path / "a"))
  hf.save_llava(scfg, stacked, str(tmp_path / "b"))
  files = [safetensors.numpy.load_file(str(tmp_path / d / "model.safetensors"))
           for d in ("a", "b")]
  assert sorted(files[0]) == sorted(files[1]) and files[0]
  for k in files[0]:
    np.testing.assert_array_equal(files[0][k], files[1][k], err_msg=k)
  # The forward of the scanned config on stacked params equals the unrolled one.
  batch = T.make_batch()
  fwd = lambda c, q: mllm.forward(c, q, batch["input_ids"], batch["pixel_values"],
                                  batch["attention_mask"], attn_layers=(1,))
  _close(jax.jit(fwd, static_argnums=0)(scfg, stacked), jax.jit(fwd, static_argnums=0)(cfg, params))


def test_lora_and_sharding_rules_on_stacked_leaves():
  p = {"llm": stack.stack_layers(_unrolled_params())}
  lora = lora_lib.init_lora(p, LLM_LINEARS, 3, 6.0, T._key(2))
  f = lora["llm"]["layers"]["mlp"]["down"]["kernel"]
  assert f["a"].shape == (4, 48, 3) and f["b"].shape == (4, 3, 32)
  assert not np.allclose(f["a"][0], f["a"][1])
  lora = jax.tree.map(lambda x: x + 0.01, lora)
  merged = lora_lib.merge_lora(p, lora, 6.0, 3)
  merged_each = lora_lib.merge_lora({"llm": stack.unstack_layers(p["llm"])},
                                    {"llm": stack.unstack_layers(lora["llm"])}, 6.0, 3)
  _close(stack.unstack_layers(merged["llm"]), merged_each["llm"], rtol=1e-6, atol=1e-7)

  mesh = parallel.make_mesh(2, 2, 2)
  specs = parallel.param_specs({"llm": p["llm"], "lora": lora}, mesh, mllm.LOGICAL_AXES)
  P = jax.sharding.PartitionSpec
  assert specs["llm"]["layers"]["mlp"]["gate"]["kernel"] == P(None, "fsdp", "tensor")
  assert specs["llm"]["layers"]["attn"]["o"]["kernel"] == P(None, "tensor", "fsdp")
  assert specs["llm"]["layers"]["input_norm"]["scale"] == P()
  q = specs["lora"]["llm"]["layers"]["attn"]["q"]["kernel"]
  assert q["a"] == P(None, "fsdp", None) and q["b"] == P(None, None, "tensor")


# ------------------------------------------------------------------------- train step

_UNROLLED_SETUP = T.build_setup


def _scanned_setup() -> T.Setup:
  """test_step's setup with every tree converted to the stacked layout."""
  s = _UNROLLED_SETUP()
  scan = lambda c: dataclasses.replace(c, scan_layers=True)
  s_cfg, t_cfg = scan(s.student_cfg), scan(s.teacher_cfg)
  return dataclasses.replace(
      s, student_cfg=s_cfg, teacher_cfg=t_cfg,
      trainable=mllm.to_layout(s_cfg, s.trainable), frozen=mllm.to_layout(s_cfg, s.frozen),
      lora=mllm.to_layout(s_cfg, s.lora), teacher=mllm.to_layout(t_cfg, s.teacher))


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_scanned_step_matches_unrolled(shape, monkeypatch):
  ref_state, ref_history = T.reference()
  monkeypatch.setattr(T, "build_setup", _scanned_setup)
  mesh = T.one_device_mesh() if shape == (1, 1, 1) else parallel.make_mesh(*shape)
  monkeypatch.setattr(T, "_compiled", lambda shape, micro_batches=1: (
      *T.make_step(_scanned_setup(), mesh, micro_batches), mesh))
  state, history = T.run(shape)
  for m, r in zip(history, ref_history):
    for key in ("loss", "lm", "kd", "attn", "attn_cos", "grad_norm", "param_norm", "tokens"):
      np.testing.assert_allclose(m[key], r[key], err_msg=key, rtol=2e-5, atol=1e-5)
  host = T._diff_host(state)
  unstacked = lambda tree: mllm.unscanned(_UNROLLED_SETUP().student_cfg, tree)[1]
  _close(unstacked(host["params"]), ref_state["params"], rtol=2e-5)
  _close(unstacked(host["lora"]), ref_state["lora"], rtol=2e-5)
  if shape == (2, 2, 2):
    q = state["lora"]["llm"]["layers"]["attn"]["q"]["kernel"]
    assert q["a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)


def _step_temp(num_layers: int, scan: bool) -> int:
  """CPU temp bytes of a DFT-like step (f32, remat) with a student of `num_layers`."""
  text = dict(T.STUDENT, hidden_size=128, mlp_dim=512, num_layers=num_layers)
  teacher = dict(T.TEACHER, num_layers=num_layers)
  b = bench.build("tiny", seq=512, batch=1, abstract=True, scan_layers=scan,
                  models=(T.VISION, text, teacher))
  cfg = dataclasses.replace(b.student_cfg, remat="nothing_saveable")
  b = dataclasses.replace(b, student_cfg=cfg)
  return bench.compiled_memory(b.step_fn("cdx"), *b.args(), donate=(0,))["temp"]


@pytest.mark.slow
def test_scanned_remat_keeps_temp_flat_in_depth():
  unrolled = [_step_temp(n, False) for n in (2, 6)]
  scanned = [_step_temp(n, True) for n in (2, 6)]
  # Unrolled on XLA:CPU: remat is undone, every layer's activations stay (grows with depth).
  # Scanned: one layer's recomputation at a time, + one carried input per layer.
  assert scanned[1] - scanned[0] < 0.5 * (unrolled[1] - unrolled[0]), (scanned, unrolled)
  assert scanned[1] < unrolled[1], (scanned, unrolled)
