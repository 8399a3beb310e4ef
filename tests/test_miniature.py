"""The miniature's statistics (cdx/eval/compare.py), the attention term's gradient share
(cdx/analysis/gradients.py) and `launch/miniature.py --quick` end to end."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cdx import paths
from cdx.analysis import gradients
from cdx.eval import compare
from tests import launcher
from tests import test_step


# ------------------------------------------------------------------------------ compare

def test_seed_summary_and_standard_error():
  s = compare.seed_summary([0.6, 0.7, 0.8])
  assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.1) and s["n"] == 3
  assert compare.seed_summary([0.5])["std"] == 0.0
  assert compare.standard_error([0, 1] * 50) == pytest.approx(0.5025 / 10, rel=1e-3)
  with pytest.raises(ValueError, match="no values"):
    compare.seed_summary([])


def test_paired_bootstrap_pairs_items():
  rng = np.random.default_rng(0)
  difficulty = rng.random(400)
  a = (difficulty < 0.7).astype(float)            # the same items right, plus some
  b = (difficulty < 0.6).astype(float)
  r = compare.paired_bootstrap(a, b, rounds=500)
  assert r["diff"] == pytest.approx(0.1, abs=0.05)
  assert 0 < r["lo"] <= r["diff"] <= r["hi"] and r["p_le_0"] == 0.0
  # Unpaired noise of the same size: the interval straddles 0.
  c = rng.permutation(a)
  r0 = compare.paired_bootstrap(a, c, rounds=500)
  assert r0["lo"] < 0 < r0["hi"]
  with pytest.raises(ValueError, match="same items"):
    compare.paired_bootstrap(a, b[:-1])


def test_gap_closure():
  assert compare.gap_closure(0.7, 0.6, 0.8) == pytest.approx(0.5)
  assert np.isnan(compare.gap_closure(0.7, 0.8, 0.8))
  n = 300
  teacher, base = np.ones(n), np.zeros(n)
  method = np.r_[np.ones(n // 3), np.zeros(n - n // 3)]
  g = compare.gap_closure_bootstrap(method, base, teacher, rounds=300)
  assert g["closure"] == pytest.approx(1 / 3) and g["lo"] < 1 / 3 < g["hi"]
  assert g["dropped_rounds"] == 0


# -------------------------------------------------------------------- gradient share

@pytest.mark.slow  # Six gradient compiles: ~2 min on 2 busy cores.
def test_attention_gradient_norm_scales_with_its_weight_alone():
  s = test_step.build_setup()
  params = paths.merge(s.trainable, s.frozen)
  batches = [test_step.make_batch(0), test_step.make_batch(1)]
  trainable = lambda p: p.startswith(("post/", "llm/"))
  one = gradients.term_gradient_norms(s.student_cfg, s.teacher_cfg, s.objective, params,
                                      s.teacher, batches, trainable)
  obj3 = dataclasses.replace(s.objective, attn=3.0)
  three = gradients.term_gradient_norms(s.student_cfg, s.teacher_cfg, obj3, params,
                                        s.teacher, batches, trainable)
  assert one["batches"] == 2 and one["lm_kd"] > 0 and one["attn"] > 0
  assert three["lm_kd"] == pytest.approx(one["lm_kd"], rel=1e-5)
  assert three["attn"] == pytest.approx(3 * one["attn"], rel=1e-4)
  assert three["ratio"] == pytest.approx(3 * one["ratio"], rel=1e-4)
  # Only the post-connector: a smaller norm than post + LLM.
  post = gradients.term_gradient_norms(s.student_cfg, s.teacher_cfg, s.objective, params,
                                       s.teacher, batches[:1],
                                       lambda p: p.startswith("post/"))
  assert 0 < post["lm_kd"] < one["per_batch"][0]["lm_kd"]
  with pytest.raises(ValueError, match="no attention term"):
    gradients.term_gradient_norms(s.student_cfg, s.teacher_cfg,
                                  dataclasses.replace(s.objective, attn=0.0), params,
                                  s.teacher, batches, trainable)
  with pytest.raises(ValueError, match="no trainable leaf"):
    gradients.term_gradient_norms(s.student_cfg, s.teacher_cfg, s.objective, params,
                                  s.teacher, batches, lambda p: False)


# ---------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_quick_miniature_runs_every_row(tmp_path_factory, tmp_path):
  """--quick: every row trains (2 steps) and is scored; the JSON, table and plots exist.
  Checks the pipeline, not the result."""
  from launch import miniature
  work = tmp_path / "mini"
  with launcher.compile_cache_env(tmp_path_factory):
    out = subprocess.run([sys.executable, "launch/miniature.py", "--quick",
                          f"--workdir={work}", "--seeds=0,1"], cwd=launcher.ROOT,
                         capture_output=True, text=True, timeout=2400,
                         env=launcher.subprocess_env())
  assert out.returncode == 0, out.stderr[-4000:]
  with open(work / "miniature.json") as f:
    result = json.load(f)
  rows = result["summary"]["rows"]
  assert set(rows) == set(miniature.ROWS)
  assert all(rows[r]["seeds"] == 2 for r in miniature.STUDENTS) and rows["teacher"]["seeds"] == 1
  for r in rows.values():
    assert 0 <= r["cr"]["mean"] <= 1 and 0 <= r["gen_unparsed"]["mean"] <= 1
  assert set(result["meta"]["gate"]["checks"]) == set(miniature.GATE)
  assert result["meta"]["attention_share"]["batches"] == 4
  assert result["summary"]["gap_closure"] is not None
  assert {"kd - sft", "compodistill - kd"} <= set(result["summary"]["pairs"])
  for path in result["plots"]:
    assert os.path.getsize(path) > 1000
  assert "SMOKE RUN" in (work / "miniature.md").read_text()
  # Seeds differ (their own student folders); the world and the teacher are shared.
  per_seed = [json.load(open(work / f"seed{s}" / "sft" / "config.json"))["seed"]
              for s in (0, 1)]
  assert per_seed == [0, 1]
  assert os.path.realpath(work / "seed1" / "finetune") == str(work / "teacher" / "finetune")
  # Resumable: a second run trains nothing and reuses every score.
  again = subprocess.run([sys.executable, "launch/miniature.py", "--quick",
                          f"--workdir={work}", "--seeds=0,1"], cwd=launcher.ROOT,
                         capture_output=True, text=True, timeout=2400,
                         env=launcher.subprocess_env())
  assert again.returncode == 0, again.stderr[-4000:]
  assert "already finished" in again.stdout


# ------------------------------------------------------------- the tiny preset's tower

@pytest.mark.slow  # Trains the tiny tower for 2 steps (~30 s on 2 busy cores).
def test_tiny_preset_takes_the_pretrained_tower_shared_and_cached(tmp_path):
  import jax
  import ml_collections
  from cdx.models import mllm
  from cdx.train import setup
  from configs import common
  model_cfg = mllm.make_config(common.TINY_VISION, common.TINY_STUDENT, image_token_id=3,
                               pad_token_id=2, eos_token_id=1)
  cfg = ml_collections.ConfigDict(dict(
      seed=5, data=dict(world_seed=0, synthetic=True),
      vision_pretrain=dict(common.vision_pretrain("tiny").to_dict(), steps=2, batch_size=4)))
  pretrained = setup._shared_vision(model_cfg, cfg, str(tmp_path))
  random = mllm.init_params(model_cfg, jax.random.key(0))["vision"]
  assert jax.tree.structure(pretrained) == jax.tree.structure(random)
  assert [a.shape for a in jax.tree.leaves(pretrained)] == [
      a.shape for a in jax.tree.leaves(random)]
  cached = os.listdir(tmp_path / "vision")
  assert any(f.endswith(".msgpack") for f in cached)
  # The teacher's call (another model seed) loads the same tower from the cache.
  cfg.seed = 6
  again = setup._shared_vision(model_cfg, cfg, str(tmp_path))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pretrained),
                                                  jax.tree.leaves(again)))
  # steps=0 or non-synthetic data: the random tower, no training.
  cfg.vision_pretrain.steps = 0
  rand = setup._shared_vision(model_cfg, cfg, str(tmp_path / "other"))
  assert not os.path.exists(tmp_path / "other")
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pretrained),
                                                      jax.tree.leaves(rand)))
