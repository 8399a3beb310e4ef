"""launch/torch_reference.py: the official PyTorch formulation computes cdx's loss.

tests/test_step.py's tiny TAF student + teacher + batch (GQA student with tied embeddings,
MHA teacher with a larger vocab, images at different offsets, two text-only rows; here with
a one-block vision tower and sharpened q/k) are exported with `export_inputs`; LoRA factors
get nonzero B so the PEFT path matters. The
torch first-step loss must equal `cdx.distill.objective.compute_loss` with kd_mask="official"
(the unshifted KD mask of the official code); the other options are the Objective's
defaults (attn_variant "official", forward KD at T = 1).
"""
import dataclasses
import functools
import os

import jax
import numpy as np
import pytest
import torch

import test_step as T
from cdx import paths as paths_lib
from cdx.distill import losses
from cdx.distill import objective as objective_lib
from cdx.distill import reference
from cdx.distill import taf
from cdx.models import mllm
from cdx.train import lora as lora_lib
from cdx.train import setup as setup_lib
from configs.common import LLM_LINEARS
from launch import torch_reference as R

RTOL = 1e-3  # The comparison bench.py needs; the observed gap is < 1e-6.
SHARPEN = 12.0  # q and k kernels scaled by this (see _setup).
# As tests/test_step.py: two student layers against overlapping teacher pairs.
OBJECTIVE = objective_lib.Objective(lm=1.0, kd=1.0, attn=1.0, chunk_size=16,
                               student_layers=(0, 1), teacher_groups=((0, 1), (1, 2)),
                               taf=True)


# test_step's vision tower runs 0 blocks, which HF SigLIP cannot (its hidden_states
# are then empty); one block here.
VISION = dict(T.VISION, num_layers=2)


@functools.lru_cache(maxsize=None)
def _setup() -> T.Setup:
  """T.build_setup with VISION: teacher + TAF student as setup.build makes them."""
  ids = dict(image_token_id=T.IMG, pad_token_id=T.PAD, eos_token_id=T.EOS)
  t_cfg = mllm.make_config(VISION, T.TEACHER, **ids)
  s_cfg = mllm.make_config(VISION, T.STUDENT, **ids)
  rules = {"trainable": (r"post/.*",), "lora_targets": LLM_LINEARS}  # configs/dft.py

  key = T._key  # pylint: disable=protected-access

  @jax.jit
  def trees():
    teacher = mllm.init_params(t_cfg, key(1))
    student = mllm.init_params(s_cfg, key(2))
    student["vision"] = teacher["vision"]
    student = taf.make_taf_student(student, teacher, key(3))
    lora = lora_lib.init_lora(student, rules["lora_targets"], T.RANK, T.ALPHA, key(4))
    return teacher, student, lora

  teacher, student, lora = jax.tree.map(np.asarray, trees())
  for tree in (teacher, student):  # Peaked attention: N(0, 0.02) q/k give near-uniform
    for name, layer in tree["llm"].items():  # maps, whose 1 - cos is ~1e-5 (all rounding).
      if name.startswith("layers_"):
        for p in ("q", "k"):
          layer["attn"][p]["kernel"] = layer["attn"][p]["kernel"] * SHARPEN
  s_cfg = dataclasses.replace(s_cfg, post_connector_in=T.TEACHER["hidden_size"],
                              adapter_depth=t_cfg.adapter_depth)
  mask = paths_lib.select(student, rules["trainable"], strict=True)
  trainable, frozen = paths_lib.partition(student, mask)
  return T.Setup(student_cfg=s_cfg, teacher_cfg=t_cfg, objective=OBJECTIVE,
                 lora_spec=setup_lib.LoraSpec(T.RANK, T.ALPHA), trainable=trainable,
                 frozen=frozen, lora=lora,
                 teacher={k: v for k, v in teacher.items() if k not in ("vision", "adapter")},
                 teacher_full=teacher)


@functools.lru_cache(maxsize=None)
def _inputs():
  """(setup, full student params, LoRA with nonzero B, batch) on the host."""
  s = _setup()
  rng = np.random.default_rng(0)
  lora = jax.tree_util.tree_map_with_path(
      lambda kp, x: (rng.normal(0, 0.05, x.shape).astype(np.float32)
                     if kp[-1].key == "b" else x), s.lora)
  return s, paths_lib.merge(s.trainable, s.frozen), lora, T.make_batch()


def _cdx_metrics() -> dict:
  s, params, lora, batch = _inputs()
  obj = dataclasses.replace(s.objective, kd_mask="official")
  fn = jax.jit(functools.partial(objective_lib.compute_loss, s.student_cfg, s.teacher_cfg,
                                 obj))
  _, m = fn(params, s.teacher, batch, lora=mllm.Lora(lora, s.lora_spec.scale))
  return {k: float(m[k]) for k in ("loss", "lm", "kd", "attn")}


def _export(tmp_path) -> dict:
  s, params, lora, batch = _inputs()
  obj = dataclasses.replace(s.objective, kd_mask="official")
  return R.export_inputs(str(tmp_path), s.student_cfg, s.teacher_cfg, obj, params,
                         s.teacher, batch, lora=lora, lora_spec=s.lora_spec)


@pytest.mark.slow  # jit of compute_loss, HF saves and loads, a torch subprocess.
def test_first_step_loss_equals_cdx_official_kd_mask(tmp_path):
  """Through the CLI in a fresh process (`run_in_subprocess`, which runs `run_torch_step`
  there): the loss terms, the trainable set, and the speed and memory fields."""
  paths = _export(tmp_path)
  assert os.path.isfile(os.path.join(paths["student"], R.LORA_FILE))
  row = R.run_in_subprocess(paths["student"], paths["teacher"], paths["batch"], steps=2,
                            threads=1, timeout=600)
  ours = _cdx_metrics()
  terms = row["loss_terms"]
  np.testing.assert_allclose(row["loss_first_step"], ours["loss"], rtol=RTOL)
  np.testing.assert_allclose(terms["total"], ours["loss"], rtol=RTOL)
  for k in ("lm", "kd", "attn"):  # Each term on its own, so no two errors cancel.
    np.testing.assert_allclose(terms[k], ours[k], rtol=RTOL, err_msg=k)
  assert min(ours["lm"], ours["kd"], ours["attn"]) > 1e-3  # Every term is exercised.
  # Trainable in torch: exactly cdx's post-connector + LoRA factors.
  s = _inputs()[0]
  n_cdx = sum(x.size for x in jax.tree.leaves((s.trainable, s.lora)))
  assert row["trainable_params"] == n_cdx
  # Speed and memory, measured in the fresh process with its own torch settings.
  assert row["omp_wait_policy"] == "PASSIVE" and row["threads"] == 1
  assert (row["batch"], row["seq"]) == (T.B, T.L) and row["steps"] == 2
  assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
  assert 0 < row["rss_after_build_bytes"] <= row["peak_rss_bytes"]
  # The step's high-water mark is part of the process peak.
  assert 0 < row["step_peak_bytes"]
  assert row["rss_after_build_bytes"] + row["step_peak_bytes"] <= row["peak_rss_bytes"]


@pytest.mark.parametrize("mask", ["official", "shifted"])
def test_kd_loss_equals_cdx_per_mask(mask):
  """Sharp random logits (so the mask matters) and a larger teacher vocab (cut)."""
  rng = np.random.default_rng(1)
  s_logits = 4 * rng.normal(size=(3, 10, 16)).astype(np.float32)
  t_logits = 4 * rng.normal(size=(3, 10, 20)).astype(np.float32)
  labels = np.full((3, 10), -100, np.int64)
  labels[0, 2:7], labels[1, 5:10], labels[2, 1:3] = 1, 2, 3
  got = R.kd_loss(torch.from_numpy(s_logits), torch.from_numpy(t_logits),
                  torch.from_numpy(labels), mask).item()
  want = float(losses.kd(s_logits, t_logits, labels, mask=mask))
  other = float(losses.kd(s_logits, t_logits, labels,
                          mask={"official": "shifted", "shifted": "official"}[mask]))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(other - want) > 1e-2 * want  # The two masks are different losses.


def test_attention_loss_equals_cdx_with_text_only_row():
  """Random softmax maps of 3 student / 4 teacher layers, blocks at different offsets."""
  rng = np.random.default_rng(2)
  b, h, l, nv = 3, 2, 14, 5
  causal = np.tril(np.ones((l, l), bool))

  def maps(n):
    x = np.where(causal, 3 * rng.normal(size=(n, b, h, l, l)), -np.inf)
    x = np.exp(x - x.max(-1, keepdims=True))
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)

  s_maps, t_maps = maps(3), maps(4)
  ids = np.zeros((b, l), np.int64)
  ids[0, 2:2 + nv], ids[2, 6:6 + nv] = 9, 9  # Row 1 is text-only.
  layers, groups = (0, 2), ((0, 1), (2, 3))
  pos, has_image = R.visual_positions(torch.from_numpy(ids), 9)
  got = R.attention_loss([torch.from_numpy(m) for m in s_maps],
                         [torch.from_numpy(m) for m in t_maps], pos, has_image, layers,
                         groups).item()
  jpos, jhas = mllm.visual_positions(ids, 9, nv)

  @jax.jit  # One compile instead of one per eager op.
  def cdx_loss(s_maps, t_maps, jpos, jhas):
    s_blk = reference.visual_block(s_maps, jpos)[np.array(layers)]
    t_blk = losses.teacher_group_average(reference.visual_block(t_maps, jpos), groups)
    return losses.attention_alignment_loss(s_blk, t_blk, jhas)

  want = float(cdx_loss(s_maps, t_maps, jpos, jhas))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want > 1e-2
