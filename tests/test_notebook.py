"""The quickstart notebook runs top to bottom (every code cell but the Colab set-up).

It is pointed at the shared tiny chain (tests/launcher.py), so its training cell finds
every stage finished and the test spends its time on the notebook's own cells.
"""
import json
import os
import pathlib

import pytest

from tests import launcher


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path_factory, monkeypatch, capsys):
  workdir = launcher.tiny_chain(tmp_path_factory)
  with open(os.path.join(launcher.ROOT, "notebooks", "quickstart.ipynb")) as f:
    nb = json.load(f)
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  assert "git clone" in cells[0]  # The Colab set-up cell; the checkout is already here.
  monkeypatch.chdir(launcher.ROOT)
  monkeypatch.setenv("CDX_NOTEBOOK_WORKDIR", workdir)
  monkeypatch.setenv("CDX_NOTEBOOK_ARGS", " ".join(launcher.SHORT))
  monkeypatch.setenv("CDX_NOTEBOOK_EVAL_LIMIT", "1")
  scope = {"__name__": "__notebook__"}
  for i, source in enumerate(cells[1:], start=1):
    try:
      exec(compile(source, f"quickstart.ipynb[cell {i}]", "exec"), scope)
    except Exception as e:  # Name the failing cell.
      raise AssertionError(f"notebook code cell {i} failed: {e!r}") from e
  out = capsys.readouterr().out
  assert "already finished" in out  # The chain was reused, not retrained.
  assert "cosine" in out and "A:" in out
  assert scope["results"]["seen"]["sugarcrepe"]["overall"] >= 0.0


@pytest.mark.slow
def test_diagnostics_notebook_runs(tmp_path_factory, tmp_path, monkeypatch, capsys):
  """notebooks/diagnostics.ipynb on the shared tiny chain (teacher finetune, students dft
  and pretrain_student, finished): the analysis cells write and show every file, with the
  contents tests/test_analyze.py's `check_results` asks of launch/analyze.py (this is the
  suite's run of it on trained stages, several students side by side)."""
  from tests import test_analyze
  workdir = launcher.tiny_chain(tmp_path_factory)
  with open(os.path.join(launcher.ROOT, "notebooks", "diagnostics.ipynb")) as f:
    nb = json.load(f)
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  assert "git clone" in cells[0] and 'REPO_URL = "<your fork URL>"' in cells[0]
  # The chain is shared and must stay unchanged: the notebook's workdir is a folder of
  # links to the chain's stages, so the analysis writes beside them, not into them.
  view = tmp_path / "work"
  view.mkdir()
  for name in os.listdir(workdir):
    (view / name).symlink_to(os.path.join(workdir, name))
  monkeypatch.chdir(launcher.ROOT)
  monkeypatch.setenv("CDX_NOTEBOOK_WORKDIR", str(view))
  monkeypatch.setenv("CDX_NOTEBOOK_STUDENTS", "dft,pretrain_student")
  monkeypatch.setenv("CDX_NOTEBOOK_LIMIT", "4")
  scope = {"__name__": "__notebook__"}
  for i, source in enumerate(cells[1:], start=1):
    try:
      exec(compile(source, f"diagnostics.ipynb[cell {i}]", "exec"), scope)
    except Exception as e:  # Name the failing cell.
      raise AssertionError(f"notebook code cell {i} failed: {e!r}") from e
  out = capsys.readouterr().out
  assert "already trained" in out and "student \\ teacher" in out and "delta average" in out
  for name in ("similarity.png", "bins.png", "heatmaps.png"):
    assert os.path.join(scope["RESULTS"], name) in out
  # 4 items: the default 5 bins are cut to 4.
  test_analyze.check_results(pathlib.Path(scope["RESULTS"]), ("dft", "pretrain_student"),
                             items=4, bins=4)
