"""launch/analyze.py: its outputs (`check_results`, applied to the diagnostics notebook's
run on the tiny chain in tests/test_notebook.py: teacher `finetune`, students `dft` and
`pretrain_student`), its command line, the intervention on the chain's models, and the
pure pieces of cdx/eval/diagnostics.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cdx.eval import diagnostics
from tests import launcher


def check_png(path, min_size=(200, 150)):
  """The PNG opens, is at least min_size and is not blank (varies, > 1 colour)."""
  with Image.open(path) as im:
    assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)
    pixels = np.asarray(im.convert("RGB"), np.float32)
  assert pixels.std() > 0, path
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, path


def test_similarity_bins_are_quantiles_with_their_accuracy():
  sim = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2]
  ok = [1, 0, 1, 0, 1, 1]
  bins = diagnostics.similarity_bins(sim, ok, num_bins=3)
  assert [b["count"] for b in bins] == [2, 2, 2]
  assert [(b["lo"], b["hi"]) for b in bins] == [(0.1, 0.2), (0.3, 0.5), (0.7, 0.9)]
  assert [b["accuracy"] for b in bins] == [0.5, 0.5, 1.0]
  assert bins[0]["similarity"] == pytest.approx(0.15)
  with pytest.raises(ValueError, match="num_bins"):
    diagnostics.similarity_bins(sim[:2], ok[:2], num_bins=3)


def test_units_of_every_item_kind():
  items = [{"id": "q", "image": "a.png", "prompt": "What?"},
           {"id": "s", "image": "b.png", "positive": "a red cube", "negative": "x"},
           {"id": "p", "image_0": "c.png", "image_1": "d.png", "caption_0": "two dogs",
            "caption_1": "y"}]
  units = diagnostics.units_of(items)
  assert [(u["image"], u["id"]) for u in units] == [("a.png", "q"), ("b.png", "s"),
                                                     ("c.png", "p")]
  assert units[0]["prompt"] == "What?" and "a red cube" in units[1]["prompt"]
  assert "two dogs" in units[2]["prompt"]
  with pytest.raises(ValueError, match="no prompt"):
    diagnostics.units_of([{"id": 1}])


def check_results(d, students, items, bins):
  """launch/analyze.py's files in d (one benchmark, a likelihood protocol): the similarity
  table of every student, the bins, the intervention result and the PNGs. (The run with
  two students: tests/test_notebook.py's diagnostics notebook, on the shared tiny chain.)"""
  sim = json.loads((d / "similarity.json").read_text())
  assert set(sim["students"]) == set(students)
  for s in sim["students"].values():
    m = np.asarray(s["matrix"])
    assert m.shape == (6, 8)  # tiny student 6 layers x tiny teacher 8 layers
    assert np.all(np.abs(m) <= 1 + 1e-5) and np.isfinite(m).all()
    assert len(s["student_layers"]) == len(s["teacher_groups"]) > 0
  assert "| student \\ teacher |" in (d / "similarity.md").read_text()
  got = json.loads((d / "bins.json").read_text())
  for b in got["students"].values():
    assert sum(x["count"] for x in b["bins"]) == items and len(b["bins"]) == bins
    assert all(0 <= x["accuracy"] <= 1 for x in b["bins"])
  assert all(len(got["samples"][s]) == items for s in students)
  inter = json.loads((d / "intervention.json").read_text())
  assert set(inter["students"]) == set(students)
  for r in inter["students"].values():
    assert set(r["accuracy"]) == {"none", "average", "teacher"}
    assert r["delta"]["none"] == 0 and r["protocol"] == "sugarcrepe/option_likelihood"
    assert all(0 <= v <= 100 for v in r["accuracy"].values())
  assert "delta average" in (d / "intervention.md").read_text()
  for name in ("similarity.png", "bins.png", "heatmaps.png"):
    check_png(d / name)


def test_cli_reports_bad_data_in_one_line(tmp_path):
  """The command line up to loading the data; a missing folder is the user's to fix."""
  run = subprocess.run(
      [sys.executable, "launch/analyze.py", "--teacher=t", "--student=s",
       "--benchmark=synthetic_sugarcrepe", f"--data=synthetic={tmp_path}/missing",
       "--limit=4", "--bins=2", "--heatmaps=2", f"--out={tmp_path}/out"],
      cwd=launcher.ROOT, capture_output=True, text=True, timeout=300,
      env=launcher.subprocess_env())
  assert run.returncode == 2, run.stderr[-4000:]
  errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-4000:]
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_intervention_none_is_the_plain_student_and_teacher_mode_changes_it(
    tmp_path_factory):
  from cdx.eval import benchmarks
  from cdx.eval import run
  workdir = launcher.tiny_chain(tmp_path_factory)
  teacher = run.load_model(os.path.join(workdir, "finetune"))
  student = run.load_model(os.path.join(workdir, "dft"))
  items = benchmarks.load("synthetic_sugarcrepe", os.path.join(workdir, "data", "eval")).items
  units = [dict(u, options=[" A", " B"]) for u in diagnostics.units_of(items[:3])]
  plain = run.make_logprob(student, 4)(units)
  layers = [2, 3]
  none = diagnostics.make_intervened_logprob(teacher, student, layers, "none", 4)(units)
  np.testing.assert_allclose(none, plain, atol=1e-5)
  moved = diagnostics.make_intervened_logprob(teacher, student, layers, "teacher", 4)(units)
  assert np.abs(np.asarray(moved) - np.asarray(plain)).max() > 1e-6
  with pytest.raises(ValueError, match="mode"):
    diagnostics.make_intervened_logprob(teacher, student, layers, "half", 4)
