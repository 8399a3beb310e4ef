"""Resume after SIGKILL: the rerun's losses equal an uninterrupted run's, bit for bit.

Every run is `launch/run.py` in a subprocess (one CPU device: tests/launcher.py) on one
tiny pretrain stage: 8 steps, batch 8, a checkpoint every
3 steps (3, 6 and the final 8), on a 64-sample synthetic export made once for the module.
The subprocesses share a persistent XLA compilation cache, so only the first compiles
(a resumed run thus also checks that a cached executable computes the same losses).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 8, 3
# Wall-clock fields legitimately differ between runs; tokens_seen counts from the
# writer's start, i.e. from the resume point.
_TIMING = ("tokens_per_s", "elapsed_s", "tokens_seen")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  from cdx.data.synthetic import export
  with launcher.shared_dir(tmp_path_factory, "resume_data") as root:
    tok = export.ensure(root, 64, 42, vocab_size=1024)
  return root, tok


def _argv(data, workdir):
  root, tok = data
  return ["--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
          f"--config.total_steps={STEPS}", "--config.batch_size=8",
          f"--config.checkpoint.every_steps={EVERY}", "--config.log.progress=False",
          "--config.export_hf=False", "--config.data.synthetic=False",
          f"--config.data.train={root}/pretrain.json", f"--config.data.image_root={root}",
          f"--config.data.tokenizer={tok}"]


def _cmd(argv, prelude=""):
  """python running launch.run.main(argv), after `prelude` (a hook) when given."""
  code = (f"import sys; sys.path.insert(0, {ROOT!r})\n{prelude}\n"
          "from launch import run\nsys.exit(run.main(sys.argv[1:]))")
  return [sys.executable, "-c", code, *argv]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
  with launcher.compile_cache_env(tmp_path_factory) as path:
    yield path


def _run(argv, prelude="", check=True):
  out = subprocess.run(_cmd(argv, prelude), cwd=ROOT, env=launcher.subprocess_env(),
                       capture_output=True, text=True,
                       timeout=300)
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def _metrics(workdir):
  with open(os.path.join(workdir, "pretrain", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: {k: v for k, v in r.items() if k not in _TIMING} for r in rows}


def _steps(workdir):
  d = os.path.join(workdir, "pretrain", "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """(workdir, metrics by step) of the uninterrupted run; tests change only copies."""
  with launcher.shared_dir(tmp_path_factory, "uninterrupted") as workdir:
    if not os.path.isfile(os.path.join(workdir, "pretrain", "DONE")):
      _run(_argv(data, workdir))
  rows = _metrics(workdir)
  assert sorted(rows) == list(range(1, STEPS + 1))
  return workdir, rows


def _copy(reference, tmp_path):
  shutil.copytree(os.path.join(reference[0], "pretrain"), tmp_path / "pretrain")
  return str(tmp_path)


# Holds the run still once its first checkpoint is committed, so that the test's SIGKILL
# lands after a checkpoint and before the end however loaded the machine is.
_PAUSE_AFTER_FIRST_CHECKPOINT = """
import time
from cdx import checkpoint
_save = checkpoint.StageCheckpointer.save
def _save_then_pause(self, step, *a, **k):
  saved = _save(self, step, *a, **k)
  if saved:
    self.wait()
    time.sleep(3600)
  return saved
checkpoint.StageCheckpointer.save = _save_then_pause
"""


def test_sigkill_after_checkpoint_resumes_bitwise(data, reference, tmp_path):
  reference = reference[1]
  workdir = str(tmp_path)
  proc = subprocess.Popen(_cmd(_argv(data, workdir), prelude=_PAUSE_AFTER_FIRST_CHECKPOINT),
                          cwd=ROOT, env=launcher.subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while not _steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  saved = _steps(workdir)
  assert saved and max(saved) < STEPS
  assert not os.path.exists(os.path.join(workdir, "pretrain", "DONE"))

  out = _run(_argv(data, workdir))
  resumed_at = int(out.stdout.split("resumed from step ")[1].split(" ")[0])
  assert resumed_at == max(saved)
  rows = _metrics(workdir)
  assert sorted(rows) == list(range(1, STEPS + 1))  # No step logged twice or lost.
  after = [s for s in rows if s > resumed_at]
  assert after and all(rows[s] == reference[s] for s in after), \
      [(s, rows[s]["loss"], reference[s]["loss"]) for s in after]
  summary = json.load(open(os.path.join(workdir, "pretrain", "summary.json")))
  assert summary["resume_step"] == resumed_at and summary["final_step"] == STEPS
  assert summary["final"]["loss"] == reference[STEPS]["loss"]


# Kills the process when orbax commits (renames into place) the step-6 checkpoint: every
# array is written, the step is not. The previous checkpoint (3) must still restore.
_KILL_ON_COMMIT = """
import os, signal
_rename = os.rename
def _rename_or_die(src, dst, *a, **k):
  if os.path.basename(str(dst)) == "6" and "checkpoints" in str(dst):
    os.kill(os.getpid(), signal.SIGKILL)
  return _rename(src, dst, *a, **k)
os.rename = _rename_or_die
"""


def test_sigkill_during_save_keeps_previous_checkpoint(data, reference, tmp_path):
  reference = reference[1]
  workdir = str(tmp_path)
  argv = _argv(data, workdir) + ["--config.checkpoint.async_save=False"]
  out = _run(argv, prelude=_KILL_ON_COMMIT, check=False)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert _steps(workdir) == [3]  # The torn step 6 is not listed.
  assert any("tmp" in n for n in os.listdir(os.path.join(workdir, "pretrain", "checkpoints")))

  out = _run(argv)
  assert "resumed from step 3 " in out.stdout
  assert os.path.isfile(os.path.join(workdir, "pretrain", "DONE"))
  assert _steps(workdir) == [6, 8]  # keep=2
  rows = _metrics(workdir)
  assert all(rows[s] == reference[s] for s in range(4, STEPS + 1))


def test_rerun_of_a_finished_stage_is_skipped(data, reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  done = os.path.join(workdir, "pretrain", "DONE")
  before = os.path.getmtime(done)
  out = _run(_argv(data, workdir))
  assert "already finished" in out.stdout
  assert os.path.getmtime(done) == before


def test_resume_with_nothing_left_reports_the_final_step(data, reference, tmp_path):
  # Killed after the final checkpoint but before DONE: the rerun only exports.
  workdir, reference = _copy(reference, tmp_path), reference[1]
  for name in ("DONE", "summary.json"):
    os.remove(os.path.join(workdir, "pretrain", name))
  # A shorter run cannot take over a longer run's checkpoints.
  out = _run(_argv(data, workdir) + ["--config.total_steps=4"], check=False)
  assert out.returncode == 2 and f"holds step {STEPS}, past total_steps=4" in out.stderr
  out = _run(_argv(data, workdir))
  assert f"resumed from step {STEPS} " in out.stdout
  summary = json.load(open(os.path.join(workdir, "pretrain", "summary.json")))
  assert summary["final_step"] == STEPS and summary["resume_step"] == STEPS
  assert summary["final"]["loss"] == reference[STEPS]["loss"]
  assert json.load(open(os.path.join(workdir, "pretrain", "DONE")))["final_loss"] == \
      reference[STEPS]["loss"]
  assert sorted(_metrics(workdir)) == list(range(1, STEPS + 1))
