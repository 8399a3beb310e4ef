"""The launcher end to end: the tiny chain, reruns, tokenizer mismatch, bad data.

One tiny chain (pretrain -> finetune -> pretrain_student -> dpt -> dft, 2 steps each, 64
synthetic samples, dft with `layers.strategy=adaptive`) is made once per test run (shared
by xdist workers) by `launch/run.py` in a subprocess; the tests read its outputs (never
change them) or run small stages beside it.
"""
import glob
import json
import os
import shutil

import pytest

from cdx import checkpoint as ckpt_lib
from launch import run
from tests import launcher

CHAIN = ("pretrain", "finetune", "pretrain_student", "dpt", "dft")
SHORT = launcher.SHORT
# Loss terms each stage logs (its objective's nonzero weights).
TERMS = {"pretrain": {"lm"}, "finetune": {"lm"}, "pretrain_student": {"lm"},
         "dpt": {"lm", "kd"}, "dft": {"lm", "kd", "attn"}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
  with launcher.compile_cache_env(tmp_path_factory) as path:
    yield path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  return launcher.tiny_chain(tmp_path_factory)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("stage", CHAIN)
def test_chain_leaves_every_output(chain, stage):
  d = os.path.join(chain, stage)
  for name in ("DONE", "model.json", "summary.json", "manifest.json", "config.json"):
    assert os.path.isfile(os.path.join(d, name)), name
  assert os.path.isdir(os.path.join(d, "final")) and os.listdir(os.path.join(d, "final"))
  assert os.path.isdir(os.path.join(d, "checkpoints", "2"))
  assert glob.glob(os.path.join(d, "tb", "events.out.tfevents.*"))

  rows = _jsonl(os.path.join(d, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]  # One line per logged step (log.every_steps=1).
  for r in rows:
    assert TERMS[stage] <= set(r) and isinstance(r["loss"], float)
    weights = json.load(open(os.path.join(d, "config.json")))["loss"]  # The stage's own.
    assert r["loss"] == pytest.approx(sum(weights[t] * r[t] for t in TERMS[stage]), rel=1e-5)
    assert r["tokens_seen"] >= r["tokens"] > 0  # Input tokens >= supervised tokens.
  assert not {"kd", "attn"} & set(rows[0]) - TERMS[stage]

  summary = json.load(open(os.path.join(d, "summary.json")))
  done = json.load(open(os.path.join(d, "DONE")))
  assert summary["final_step"] == done["steps"] == 2
  assert summary["final"]["loss"] == done["final_loss"] == rows[-1]["loss"]
  assert summary["tokens_seen"] == sum(r["tokens_seen"] - p for r, p in
                                       zip(rows, [0] + [r["tokens_seen"] for r in rows]))
  assert summary["data"]["ok"] == summary["data"]["total"] >= 2 * 16  # Two full batches.
  info = json.load(open(os.path.join(d, "model.json")))
  assert info["tokenizer"] == json.load(open(os.path.join(chain, "pretrain", "model.json"))
                                        )["tokenizer"]


def test_adaptive_matching_is_calibrated_and_recorded(chain):
  manifest = json.load(open(os.path.join(chain, "dft", "manifest.json")))
  layers = manifest["layers"]
  from cdx.distill import layers as layers_lib
  assert layers["strategy"] == "adaptive"
  assert layers["student_layers"] == layers_lib.student_band(6)  # TINY_STUDENT depth.
  band = layers_lib.teacher_band(8)
  assert len(layers["teacher_groups"]) == len(layers["student_layers"])
  assert all(len(g) == 1 and g[0] in band for g in layers["teacher_groups"])
  rows = _jsonl(os.path.join(chain, "dft", "metrics.jsonl"))
  assert {f"attn_cos_{i}" for i in range(len(layers["student_layers"]))} <= set(rows[-1])


def test_rerun_skips_finished_stages(chain, capsys):
  stamps = {s: os.path.getmtime(os.path.join(chain, s, "DONE")) for s in CHAIN}
  assert run.main(launcher.dft_argv(chain)) == 0
  assert "already finished" in capsys.readouterr().out
  assert stamps == {s: os.path.getmtime(os.path.join(chain, s, "DONE")) for s in CHAIN}


def test_teacher_with_another_tokenizer_is_refused(chain, tmp_path, capsys):
  for name in ("data", "finetune", "pretrain_student"):
    shutil.copytree(os.path.join(chain, name), tmp_path / name)
  info_path = tmp_path / "finetune" / "model.json"
  info = json.load(open(info_path))
  info["tokenizer"] = "0" * 16
  json.dump(info, open(info_path, "w"))
  status = run.main(["--config=configs/dpt.py", f"--workdir={tmp_path}", *SHORT])
  err = capsys.readouterr().err
  assert status == 2
  assert "stage 'finetune'" in err and "another tokenizer (0000000000000000)" in err
  assert not (tmp_path / "dpt" / "DONE").exists()


def _bad_file(chain, root):
  """One of each bad-input kind (cf. tests/test_data_pipeline.py), then 7 good samples.

  8 samples are usable: the 7 and one truncated with a warning.
  """
  with open(os.path.join(chain, "data", "pretrain.json")) as f:
    good = json.load(f)[:7]
  for s in good:
    os.makedirs(os.path.dirname(os.path.join(root, s["image"])), exist_ok=True)
    shutil.copy(os.path.join(chain, "data", s["image"]), os.path.join(root, s["image"]))
  with open(os.path.join(root, "corrupt.png"), "wb") as f:
    f.write(b"not a png at all")
  img = good[0]["image"]
  conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  bad = [
      '{"id": "broken", "conversations": [',                                  # bad_json
      '["not", "an", "object"]',                                              # bad_record
      {"id": "r", "conversations": conv("a", "b")[::-1]},                     # bad_roles
      {"id": "e", "image": img, "conversations": conv("<image>", "")},        # empty_answer
      {"id": "m", "image": img, "conversations": conv("<image> <image>", "x")},
      {"id": "mi", "image": "missing.png", "conversations": conv("<image>", "x")},
      {"id": "c", "image": "corrupt.png", "conversations": conv("<image>", "x")},
      {"id": "w", "conversations": conv("<image> q", "a")},                   # no image
      {"id": "l", "image": [img, img], "conversations": conv("<image>", "a")},
      {"id": "long", "image": img, "conversations": conv("<image>", "word " * 400)},
  ]
  path = os.path.join(root, "bad.jsonl")
  with open(path, "w") as f:
    for x in bad + good:
      f.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
  return path


def test_bad_data_run_reports_the_checkers_counts(chain, tmp_path, capsys):
  root = str(tmp_path / "bad")
  path = _bad_file(chain, root)
  tok = os.path.join(chain, "data", "tokenizer")
  # One batch of 8 with shuffling off reads the file exactly once: bad lines first.
  out = launcher.launch(
          "--config=configs/pretrain.py", f"--workdir={tmp_path}", "--config.name=bad",
          "--config.total_steps=1", "--config.batch_size=8", "--config.data.shuffle=False",
          "--config.data.synthetic=False", f"--config.data.train={path}",
          f"--config.data.image_root={root}", f"--config.data.tokenizer={tok}",
          "--config.log.progress=False", "--config.export_hf=False")
  summary = json.load(open(tmp_path / "bad" / "summary.json"))
  # The console's skip counts, and the warning (more than 5 % skipped).
  assert f"[bad] data: {summary['data']['total']} samples, 8 ok" in out.stderr
  assert "[bad] WARNING: " in out.stderr and "skipped (> 5%)" in out.stderr

  from cdx.data import check
  assert check.main([path, "--image-root", root, "--tokenizer", tok, "--max-length", "192",
                     "--num-visual-tokens", "64", "--template", "pretrain", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["bad"] >= 8 and report["ok"] == 8 and report["warnings"]  # Sanity.
  assert summary["data"] == report


def test_scanned_stage_writes_unstacked_files_and_refuses_a_layout_change(chain, tmp_path,
                                                                          capsys):
  """dft with scan_layers: trains on stacked params, hands off the usual unstacked files;
  resuming its checkpoints without scan_layers is a one-line error."""
  for name in ("data", "finetune", "dpt"):
    shutil.copytree(os.path.join(chain, name), tmp_path / name)
  argv = ["--config=configs/dft.py", f"--workdir={tmp_path}", *SHORT]
  launcher.launch(*argv, "--config.scan_layers=True")
  info = json.load(open(tmp_path / "dft" / "model.json"))
  assert info["config"]["scan_layers"] is False
  assert json.load(open(tmp_path / "dft" / "hf" / "config.json"))["text_config"]
  params, _ = ckpt_lib.load_model(str(tmp_path / "dft"))
  assert "layers_0" in params["llm"] and "layers" not in params["llm"]
  assert (tmp_path / "dft" / "checkpoints").is_dir()
  os.remove(tmp_path / "dft" / "DONE")
  status = run.main(argv + ["--config.total_steps=4", "--config.scan_layers=False"])
  err = capsys.readouterr().err
  assert status == 2
  assert "written with scan_layers=True" in err and "--config.scan_layers=True" in err
