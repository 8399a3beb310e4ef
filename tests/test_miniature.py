"""The miniature's statistics (cdx/eval/compare.py), the attention term's gradient share
(cdx/analysis/gradients.py) and `launch/miniature.py --quick` end to end."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cdx import paths
from cdx.analysis import gradients
from cdx.data.synthetic import text
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


def _fake_eval(items: dict, vqa: float) -> dict:
  """A record as `miniature.evaluate` writes it, from per-item CR scores."""
  split = lambda s: {"overall": float(np.mean([v for k, v in items.items()
                                               if k.startswith(s)])),
                     "by_order": {"pos_first": 0.5, "pos_second": 0.5}}
  gen = {"cr": 0.5, "unparsed_rate": 0.25, "by_order": {"pos_first": 0.5, "pos_second": 0.5},
         "vqa": vqa}
  cr = {"seen": split("seen"), "heldout": split("heldout")}
  return {"items": items, "cr": cr, "items_option": {k: 0.5 for k in items}, "cr_option": cr,
          "generate": {"seen": dict(gen), "heldout": dict(gen)}}


def test_summarize_over_seeds_pairs_items_and_gives_the_gap_closure():
  """launch/miniature.py's statistics over two student seeds (the end-to-end --quick test
  below scores one)."""
  from launch import miniature
  keys = [f"{s}/att/{i}" for s in ("seen", "heldout") for i in range(40)]
  rng = np.random.default_rng(0)
  level = {"teacher": 0.9, "sft": 0.5, "kd": 0.6, "compodistill": 0.8}
  evals = {row: [_fake_eval({k: float(rng.random() < p) for k in keys}, p)
                 for _ in range(1 if row == "teacher" else 2)] for row, p in level.items()}
  blind = _fake_eval({k: 0.5 for k in keys}, 0.1)
  s = miniature.summarize(evals, {}, blind, rounds=200)
  assert s["items"] == len(keys) and set(s["rows"]) == set(level)
  for row, runs in evals.items():
    r = s["rows"][row]
    per_seed = [np.mean(list(e["items"].values())) for e in runs]
    assert r["seeds"] == len(runs) and r["per_seed_cr"] == pytest.approx(per_seed)
    assert r["cr"]["mean"] == pytest.approx(np.mean(per_seed))
    assert r["cr"]["std"] == pytest.approx(np.std(per_seed, ddof=1) if len(runs) > 1 else 0)
    assert r["vqa_seen"]["mean"] == pytest.approx(level[row])
  # Pairs over items, the scores averaged over seeds; only rows that were run.
  assert set(s["pairs"]) == {"teacher - sft", "kd - sft", "compodistill - kd",
                             "compodistill - sft"}
  mean = lambda row: np.mean([[e["items"][k] for k in keys] for e in evals[row]], axis=0)
  assert s["pairs"]["kd - sft"]["diff"] == pytest.approx(np.mean(mean("kd") - mean("sft")))
  g = s["gap_closure"]
  assert len(g["per_seed"]) == 2 and g["seed_summary"]["n"] == 2
  assert g["per_seed"][1] == pytest.approx(compare.gap_closure(
      *(np.mean(list(evals[r][i]["items"].values())) for r, i in
        (("compodistill", 1), ("kd", 1), ("teacher", 0)))))
  assert g["lo"] <= g["closure"] <= g["hi"]
  assert s["blind"]["cr"] == 0.5 and s["blind"]["vqa_seen"] == 0.1
  gate = {"checks": {"teacher_vqa": 0.9}, "thresholds": miniature.GATE, "passed": True}
  text = miniature.markdown(s, {"quick": False, "command": "c", "wall_s": 1.0,
                                "seeds": [0, 1], "gate": gate})
  kd = s["rows"]["kd"]["cr"]
  assert f"| kd | 2 | {kd['mean']:.3f} ± {kd['std']:.3f} |" in text
  assert s["rows"]["kd"]["cr_option"]["mean"] == 0.5  # the two-choice column, beside it
  assert "SMOKE" not in text and f"{g['closure']:.3f}" in text and "anyway" not in text
  ignored = dict(gate, passed=False, ignored=True)  # rows trained past a failed gate
  text = miniature.markdown(s, {"quick": False, "command": "c", "wall_s": 1.0,
                                "seeds": [0, 1], "gate": ignored})
  assert "Gate: FAILED" in text and "trained anyway (--ignore_gate)" in text
  # A row scored on other items than the teacher's is refused.
  evals["kd"][1] = _fake_eval({k: 1.0 for k in keys[:-1]}, 0.6)
  with pytest.raises(SystemExit, match="row kd: scored other items"):
    miniature.summarize(evals, {}, blind, rounds=10)


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

def _seed_from_chain(tmp_path_factory, work) -> int:
  """Copies the shared tiny chain's stages into `work` as the miniature's own: its world and
  teacher (data, pretrain, finetune) and one student seed's first stages (pretrain_student,
  dpt, dft: the CompoDistill row then trains only its sft; the chain's dft matches layers
  adaptively, which the SFT after it does not use). The chain is trained with --quick's
  flags and the configs' seed; returns that seed. Copies, not links: the miniature writes
  beside them, the chain stays unchanged."""
  from launch import miniature
  chain = launcher.tiny_chain(tmp_path_factory)
  quiet = {"--config.log.progress=False", "--upstream.log.progress=False"}
  assert set(miniature.QUICK) == set(launcher.SHORT) - quiet  # The same stages.
  seed = json.load(open(os.path.join(chain, "dpt", "config.json")))["seed"]
  copy = lambda name, to: shutil.copytree(os.path.join(chain, name), work / to / name,
                                          ignore=shutil.ignore_patterns("LOCK"))
  for name in ("data", "pretrain", "finetune"):
    copy(name, "teacher")
  for name in ("pretrain_student", "dpt", "dft"):
    copy(name, f"seed{seed}")
  return seed


def _miniature(work, tmp_path_factory, *flags):
  with launcher.compile_cache_env(tmp_path_factory):
    out = subprocess.run([sys.executable, "launch/miniature.py", "--quick",
                          f"--workdir={work}", *flags], cwd=launcher.ROOT,
                         capture_output=True, text=True, timeout=2400,
                         env=launcher.subprocess_env())
  assert out.returncode == 0, out.stderr[-4000:]
  with open(work / "miniature.json") as f:
    return out, json.load(f)


def _finished(work) -> dict:
  """mtime of every DONE and cached score under work (links to shared folders not followed)."""
  return {os.path.join(d, n): os.path.getmtime(os.path.join(d, n))
          for d, _, files in os.walk(work) for n in files
          if n == "DONE" or n.startswith("miniature_eval")}


@pytest.mark.slow
def test_quick_miniature_runs_every_row(tmp_path_factory, tmp_path):
  """--quick: every row trains (2 steps) and is scored; the JSON, table and plots exist.
  Checks the pipeline, not the result. The stages the shared tiny chain already trained
  are taken from it; every row with one student seed, then a second run on the same
  workdir, which reuses everything the first made. (The statistics over several seeds of
  every row: test_summarize_over_seeds_pairs_items_and_gives_the_gap_closure.)
  """
  from launch import miniature
  work = tmp_path / "mini"
  seed = _seed_from_chain(tmp_path_factory, work)
  _, result = _miniature(work, tmp_path_factory, f"--seeds={seed}")
  rows = result["summary"]["rows"]
  assert set(rows) == set(miniature.ROWS)
  assert all(r["seeds"] == 1 for r in rows.values())
  for r in rows.values():
    assert 0 <= r["cr"]["mean"] <= 1 and 0 <= r["gen_unparsed"]["mean"] <= 1
    assert 0 <= r["cr_option"]["mean"] <= 1  # the two-choice question, beside the headline
  assert set(result["meta"]["gate"]["checks"]) == set(miniature.GATE)
  grounding = result["meta"]["gate"]["teacher_grounding"]
  assert set(grounding) == {"pretrain", "instruct", "pretrain_2obj"}
  assert grounding["pretrain_2obj"]["classes"]["relation"]["tokens"] > 0
  assert "Relation word in two-object captions" in (work / "miniature.md").read_text()
  train_vqa = result["meta"]["gate"]["teacher_train_vqa"]  # About the teacher's own images.
  assert train_vqa["n"] == 14 and set(train_vqa["by_category"]) == set(text.QUESTIONS)
  assert set(result["meta"]["gate"]["teacher_vqa_types"]) <= set(text.QUESTIONS)
  assert "questions about its own training images" in (work / "miniature.md").read_text()
  assert result["meta"]["attention_share"]["batches"] == 4
  assert result["summary"]["gap_closure"] is not None
  assert {"kd - sft", "compodistill - kd"} <= set(result["summary"]["pairs"])
  assert set(result["similarity"]) == {"sft", "kd", "compodistill"}
  assert {os.path.basename(p) for p in result["plots"]} == {
      "cr_bars.png", "similarity_by_layer.png", "heatmaps.png"}
  for path in result["plots"]:
    assert os.path.getsize(path) > 1000
  assert "SMOKE RUN" in (work / "miniature.md").read_text()
  for stage in ("finetune_student", "sft_kd", "sft_novat", "sft_vat", "sft"):  # Trained here.
    assert json.load(open(work / f"seed{seed}" / stage / "DONE"))["steps"] == 2, stage

  # Resumable: a second run retrains and rescores nothing it has (the gate's report on the
  # teacher included). (A new seed's own folders and seed: the stubbed full run below.)
  before = _finished(work)
  assert str(work / "teacher" / "finetune" / "miniature_eval_gate.json") in before
  again, result = _miniature(work, tmp_path_factory, f"--seeds={seed}", "--rows=teacher,sft")
  assert "already finished" in again.stdout
  assert _finished(work) == before
  assert set(result["summary"]["rows"]) == {"teacher", "sft"}
  assert json.load(open(work / f"seed{seed}" / "finetune_student" / "config.json"))[
      "seed"] == seed


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
      vision_pretrain=dict(common.vision_pretrain("tiny").to_dict(), steps=2, batch_size=4,
                           position_weight=0.5)))
  pretrained = setup._shared_vision(model_cfg, cfg, str(tmp_path))
  random = mllm.init_params(model_cfg, jax.random.key(0))["vision"]
  assert jax.tree.structure(pretrained) == jax.tree.structure(random)
  assert [a.shape for a in jax.tree.leaves(pretrained)] == [
      a.shape for a in jax.tree.leaves(random)]
  cached = os.listdir(tmp_path / "vision")
  assert any(f.endswith(".msgpack") for f in cached)
  info, = [json.load(open(tmp_path / "vision" / f)) for f in cached if f.endswith(".json")]
  assert info["settings"]["position_weight"] == 0.5  # The config's setting reaches the tower.
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


def test_full_run_gives_the_tower_stage0_and_teacher_their_steps(tmp_path, monkeypatch):
  """Without --quick: the tower's steps and the world's size reach every stage (one shared
  cached tower, one world), stage 0 of every seed's student gets STAGE0_STEPS, the
  teacher's TEACHER_STAGE0_STEPS, its instruction stage TEACHER_STEPS, every seed's DPTs
  DPT_STEPS, every DFT and SFT stage STUDENT_STEPS and the SFT row their sum, so every
  row gets the same instruction steps; only the teacher's stage 0 changes the learning
  rate (TEACHER_STAGE0_LR). Training and scoring are stubbed; the run stops at
  compodistill's last stage. It runs from another directory than the repository's."""
  from launch import miniature
  calls = []

  class Stop(Exception):
    pass

  def train(stage, workdir, args):
    calls.append((stage, os.path.basename(workdir), args))
    if stage == "sft":  # compodistill's last stage, the last row's
      raise Stop
    os.makedirs(os.path.join(workdir, stage), exist_ok=True)
    return os.path.join(workdir, stage)

  monkeypatch.setattr(miniature, "train", train)
  monkeypatch.chdir(tmp_path)  # The stage configs are found from anywhere.
  monkeypatch.setattr(miniature, "attention_share", lambda *a: {"share": 0.2})
  monkeypatch.setattr(miniature, "evaluate", lambda *a, **k: {"cr": {}})
  monkeypatch.setattr(miniature, "check_gate", lambda *a: {"passed": True, "checks": {}})
  monkeypatch.setattr(miniature, "teacher_diagnostics", lambda *a: {
      "teacher_grounding": {}, "teacher_train_vqa": {"accuracy": 0.5}})
  from cdx.eval import baselines
  monkeypatch.setattr(baselines, "blind_export", lambda d, out: out)
  monkeypatch.setattr(baselines, "synthetic_text_baselines", lambda d: {})
  rows = ["--rows=teacher,sft,kd,compodistill"]
  with pytest.raises(Stop):
    miniature.main([f"--workdir={tmp_path}", *rows, "--seeds=0,1"])
  shared = {f"--{s}.{k}={v}" for s in ("config", "upstream") for k, v in (  # One world.
      ("vision_pretrain.steps", miniature.TOWER_STEPS),
      ("data.synthetic_train", miniature.WORLD_IMAGES))}
  assert all(shared <= set(args) for _, _, args in calls)
  # Each seed's stages in its own folder with its seed; the world and teacher are links.
  assert all({f"--config.seed={where[4:]}", f"--upstream.seed={where[4:]}"} <= set(args)
             for _, where, args in calls if where != "teacher")
  assert os.path.realpath(tmp_path / "seed1" / "finetune") == str(tmp_path / "teacher" /
                                                                   "finetune")
  steps = [(stage, where, [a for a in args if a.startswith("--config.total_steps")])
           for stage, where, args in calls[:11]]
  flag = lambda n: [f"--config.total_steps={n}"]
  stage0, dpt = flag(miniature.STAGE0_STEPS), flag(miniature.DPT_STEPS)  # Both DPTs alike.
  dft, sft = flag(miniature.STUDENT_STEPS["dft"]), flag(miniature.STUDENT_STEPS["sft"])
  sft_row = flag(miniature.STUDENT_STEPS["dft"] + miniature.STUDENT_STEPS["sft"])
  assert steps == [
      ("pretrain", "teacher", flag(miniature.TEACHER_STAGE0_STEPS)),
      ("finetune", "teacher", flag(miniature.TEACHER_STEPS)),
      ("pretrain_student", "seed0", stage0), ("finetune_student", "seed0", sft_row),  # gate
      *[(stage, f"seed{s}", stage0 if stage == "pretrain_student" else dpt)
        for s in (0, 1) for stage in ("pretrain_student", "dpt", "dpt_kd")],
      ("finetune_student", "seed0", sft_row)]
  rows_steps = [(stage, where, [a for a in args if a.startswith("--config.total_steps")])
                for stage, where, args in calls[11:]]
  assert rows_steps == [
      ("finetune_student", "seed1", sft_row),
      *[(stage, f"seed{s}", n) for s in (0, 1)
        for stage, n in (("dpt_kd", dpt), ("dft_kd", dft), ("sft_kd", sft))],
      ("dpt", "seed0", dpt), ("dft", "seed0", dft), ("sft", "seed0", sft)]
  lrs = [(stage, [a for a in args if a.startswith("--config.optim.lr")])
         for stage, _, args in calls]
  assert lrs[0] == ("pretrain", [f"--config.optim.lr={miniature.TEACHER_STAGE0_LR}"])
  assert all(not lr for _, lr in lrs[1:])
  # The attention weight goes to the stages with the attention term, and only there.
  attn = f"--config.loss.attn={miniature.ATTN_WEIGHT}"
  assert [stage for stage, _, args in calls if attn in args] == ["dft"]
  calls[:] = calls[:11]
  width = set(miniature.student_size_flags())  # Every student stage, never the teacher.
  assert [width <= set(args) for _, where, args in calls] == [
      where != "teacher" for _, where, _ in calls]
  # The run recorded its recipe; the same workdir with another recipe is refused.
  assert json.load(open(tmp_path / "recipe.json"))["student_text"] == miniature.STUDENT_TEXT
  monkeypatch.setattr(miniature, "STUDENT_TEXT", dict(miniature.STUDENT_TEXT, hidden_size=48))
  with pytest.raises(SystemExit, match="student_text.*Use another --workdir"):
    miniature.main([f"--workdir={tmp_path}", *rows, "--seeds=0,1"])
  assert len(calls) == 11  # Refused before anything trains.


def test_failed_gate_stops_before_the_rows_unless_ignored(tmp_path, monkeypatch, capsys):
  """A failed gate ends the run with exit 3 after the gate's two student stages, naming
  the failed check; with --ignore_gate the rows are trained, and the run says so."""
  from launch import miniature
  calls = []

  class Stop(Exception):
    pass

  def train(stage, workdir, args):
    calls.append(stage)
    if stage == "dpt_kd":  # the first stage past the gate
      raise Stop
    return os.path.join(workdir, stage)

  failed = {"checks": {"teacher_vqa": 0.7}, "thresholds": miniature.GATE, "passed": False,
            "failed": ["teacher_vqa = 0.700 < 0.85"]}
  monkeypatch.setattr(miniature, "train", train)
  monkeypatch.setattr(miniature, "evaluate", lambda *a, **k: {"cr": {}})
  monkeypatch.setattr(miniature, "check_gate", lambda *a: dict(failed))
  monkeypatch.setattr(miniature, "teacher_diagnostics", lambda *a: {
      "teacher_grounding": {}, "teacher_train_vqa": {"accuracy": 0.5}})
  from cdx.eval import baselines
  monkeypatch.setattr(baselines, "blind_export", lambda d, out: out)
  monkeypatch.setattr(baselines, "synthetic_text_baselines", lambda d: {})
  argv = [f"--workdir={tmp_path}", "--rows=teacher,sft,kd", "--seeds=0"]
  assert miniature.main(argv) == 3
  assert calls == ["pretrain", "finetune", "pretrain_student", "finetune_student"]
  assert "GATE FAILED, no student row was trained: teacher_vqa = 0.700" in (
      capsys.readouterr().err)
  meta = json.load(open(tmp_path / "miniature.json"))["meta"]
  assert meta["gate"]["passed"] is False and meta["gate"]["ignored"] is False
  with pytest.raises(Stop):
    miniature.main(argv + ["--ignore_gate"])
  assert calls[-1] == "dpt_kd"
  assert "trained anyway (--ignore_gate): teacher_vqa" in capsys.readouterr().err


def test_recipe_student_width_gives_valid_student_configs():
  """The recipe's width overrides load into every stage of every student row's chain,
  pass the launcher's checks, and build a model of that width."""
  import jax
  from cdx import config as config_lib
  from cdx.models import mllm
  from cdx.train import setup
  from configs import registry
  from launch import miniature
  flags = [f for f in miniature.student_size_flags() if f.startswith("--config.")]
  for row in miniature.STUDENTS:
    folder = miniature.ROWS[row]
    while folder:
      cfg = config_lib.load(registry.config_spec(folder, "tiny"), flags)
      setup.validate(cfg)
      assert {k: cfg.model.text[k] for k in miniature.STUDENT_TEXT} == miniature.STUDENT_TEXT
      folder = cfg.inputs.init
  model_cfg = mllm.make_config(cfg.model.vision.to_dict(), cfg.model.text.to_dict(),
                               image_token_id=3, pad_token_id=2, eos_token_id=1)
  shapes = jax.eval_shape(lambda: mllm.init_params(model_cfg, jax.random.key(0)))
  width = miniature.STUDENT_TEXT["hidden_size"]
  assert shapes["llm"]["embed"]["embedding"].shape == (cfg.model.text.vocab_size, width)
  assert shapes["adapter"]["fc2"]["kernel"].shape[-1] == width  # The adapter follows.


def test_cached_reuses_same_settings_and_recomputes_changed_ones(tmp_path):
  """The scores, the gate's report and the attention share are kept by cached(): a rerun
  with the same settings must not recompute, one with other settings (e.g. another
  attention weight) must not read the stale result."""
  from launch import miniature
  path, calls = str(tmp_path / "share.json"), []
  compute = lambda v: lambda: calls.append(v) or {"share": v}
  assert miniature.cached(path, {"attn": 15.0}, compute(0.2))["share"] == 0.2
  assert miniature.cached(path, {"attn": 15.0}, compute(0.9))["share"] == 0.2
  assert miniature.cached(path, {"attn": 1.0}, compute(0.01))["share"] == 0.01
  assert calls == [0.2, 0.01]
  assert json.load(open(path))["settings"] == {"attn": 1.0}
