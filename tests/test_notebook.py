"""The quickstart notebook runs top to bottom (every code cell but the Colab set-up)."""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch, capsys):
  with open(os.path.join(ROOT, "notebooks", "quickstart.ipynb")) as f:
    nb = json.load(f)
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  assert "git clone" in cells[0]  # The Colab set-up cell; the checkout is already here.
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("CDX_NOTEBOOK_WORKDIR", str(tmp_path / "wd"))
  monkeypatch.setenv("CDX_NOTEBOOK_STEPS", "2")
  monkeypatch.setenv("CDX_NOTEBOOK_EVAL_LIMIT", "1")
  scope = {"__name__": "__notebook__"}
  for i, source in enumerate(cells[1:], start=1):
    try:
      exec(compile(source, f"quickstart.ipynb[cell {i}]", "exec"), scope)
    except Exception as e:  # Name the failing cell.
      raise AssertionError(f"notebook code cell {i} failed: {e!r}") from e
  out = capsys.readouterr().out
  assert "cosine" in out and "A:" in out
  assert os.path.isfile(tmp_path / "wd" / "dft" / "DONE")
