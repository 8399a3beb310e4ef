"""cdx.train.guard: the stage lock (two processes), earlier runs' files, stop on signals."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from cdx.train import guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ lock

_HOLDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from cdx.train import guard
lock = guard.lock_stage({stage!r})
if {orphan}:  # A child inherits the lock's fd and outlives this process.
  child = os.fork()
  if child == 0:
    time.sleep(60)
    os._exit(0)
  print("forked", child, flush=True)
  os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def _hold(stage, orphan=False):
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOLDER.format(root=ROOT, stage=str(stage), orphan=orphan)],
      stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  line = proc.stdout.readline().split()
  assert line and line[0] in ("locked", "forked"), line
  proc.orphan = int(line[1]) if orphan else None
  return proc


def test_second_run_fails_at_once_naming_the_holder(tmp_path):
  stage = tmp_path / "dft"
  stage.mkdir()
  holder = _hold(stage)
  try:
    t0 = time.time()
    with pytest.raises(guard.GuardError) as e:
      guard.lock_stage(str(stage))
    assert time.time() - t0 < 5
    message = str(e.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message
    assert str(stage) in message and "\n" not in message
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone (the kernel dropped its lock): the next run just takes it.
  lock = guard.lock_stage(str(stage))
  assert json.load(open(stage / "LOCK"))["pid"] == os.getpid()
  lock.release()


def test_lock_of_a_dead_run_held_by_its_orphan_is_taken_over(tmp_path, capsys):
  stage = tmp_path / "dft"
  stage.mkdir()
  parent = _hold(stage, orphan=True)
  parent.wait()
  try:
    dead = json.load(open(stage / "LOCK"))["pid"]
    assert dead == parent.pid
    assert guard._try_lock(str(stage / "LOCK")) is None  # The orphan holds the flock.
    lock = guard.lock_stage(str(stage))
    assert f"took over {stage / 'LOCK'}" in capsys.readouterr().out
    assert json.load(open(stage / "LOCK"))["pid"] == os.getpid()
    lock.release()
  finally:
    os.kill(parent.orphan, signal.SIGKILL)


def test_lock_held_on_another_host_says_how_to_remove_it(tmp_path):
  stage = tmp_path / "dft"
  stage.mkdir()
  holder = _hold(stage)
  try:
    # The holder's record as another host would leave it (a pid dead here).
    with open(stage / "LOCK", "w") as f:
      json.dump({"pid": 999999999, "host": "node-17", "started": "2026-01-01T00:00:00Z"}, f)
    with pytest.raises(guard.GuardError, match=r"pid 999999999 on host node-17.*delete "):
      guard.lock_stage(str(stage))
  finally:
    holder.kill()
    holder.wait()


def test_relocking_in_the_same_process(tmp_path):
  # A run_stage that failed leaves its lock in this process; the next one takes it again.
  first = guard.lock_stage(str(tmp_path))
  second = guard.lock_stage(str(tmp_path))
  assert first._fd is None and second._fd is not None  # pylint: disable=protected-access
  second.release()


# --------------------------------------------------------------------- earlier runs

def _metrics(stage, steps):
  with open(stage / "metrics.jsonl", "w") as f:
    for s in range(1, steps + 1):
      f.write(json.dumps({"step": s, "loss": 1.0}) + "\n")


def test_fresh_stage_has_nothing_to_check(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  assert guard.check_fresh_start(str(tmp_path), 20, restart=False) is None
  assert os.listdir(tmp_path) == ["config.json"]


def test_earlier_run_without_checkpoints_is_refused(tmp_path):
  _metrics(tmp_path, 40)
  (tmp_path / "final").mkdir()
  before = (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(guard.GuardError) as e:
    guard.check_fresh_start(str(tmp_path), 20, restart=False)
  message = str(e.value)
  assert "metrics.jsonl, final" in message and "last logged step 40" in message
  assert "--config.checkpoint.restart=True" in message and "--workdir" in message
  assert (tmp_path / "metrics.jsonl").read_text() == before  # Untouched.


def test_restart_moves_the_earlier_run_aside(tmp_path):
  _metrics(tmp_path, 40)
  (tmp_path / "summary.json").write_text("{}")
  before = (tmp_path / "metrics.jsonl").read_text()
  dest = guard.check_fresh_start(str(tmp_path), 20, restart=True)
  assert os.path.basename(dest).startswith("old-")
  assert sorted(os.listdir(dest)) == ["metrics.jsonl", "summary.json"]
  assert open(os.path.join(dest, "metrics.jsonl")).read() == before
  assert not (tmp_path / "metrics.jsonl").exists()


def test_run_killed_before_its_first_checkpoint_is_moved_aside(tmp_path):
  _metrics(tmp_path, 7)  # every_steps=20: no checkpoint was due.
  dest = guard.check_fresh_start(str(tmp_path), 20, restart=False)
  assert os.listdir(dest) == ["metrics.jsonl"]


# -------------------------------------------------------------------------- signals

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_asks_to_stop_and_handlers_come_back(signum, capsys):
  before = {s: signal.getsignal(s) for s in guard.StopOnSignal.SIGNALS}
  with guard.StopOnSignal() as stop:
    assert not stop.agreed(1)
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # Python runs the handler at the next bytecode.
    assert stop.agreed(2) and stop.signum == signum
    e = stop.interrupted(2, "/w/dft/checkpoints")
    assert e.exit_code == 128 + signum
    assert "/w/dft/checkpoints/2 saved" in str(e) and signal.Signals(signum).name in str(e)
  assert {s: signal.getsignal(s) for s in guard.StopOnSignal.SIGNALS} == before
  assert "saving a checkpoint at the next step" in capsys.readouterr().out


def test_second_ctrl_c_aborts_at_once():
  # Python's own Ctrl-C handler underneath, whatever an earlier test in this worker left.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with guard.StopOnSignal() as stop:
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(500):  # the handler runs at the next bytecode; allow a loaded box
        if stop.agreed(1):
          break
        time.sleep(0.01)
      assert stop.agreed(1)
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)


def test_second_sigterm_kills():
  code = textwrap.dedent(f"""
      import os, signal, sys, time
      sys.path.insert(0, {ROOT!r})
      from cdx.train import guard
      stop = guard.StopOnSignal().install()
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)
      print("first", stop.agreed(1), flush=True)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)
      print("survived", flush=True)
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == -signal.SIGTERM, out.stderr[-2000:]
  assert "first True" in out.stdout and "survived" not in out.stdout


def test_multi_process_stop_agrees_on_the_step():
  # Only process 1 gets the signal; both stop after the same step (a multiple of 3).
  from tests import multiprocess
  code = """
      import os, signal
      from cdx import parallel
      parallel.initialize(cpu_collectives="gloo")
      import jax
      from cdx.train import guard
      stop = guard.StopOnSignal(check_every=3).install()
      stopped = None
      for step in range(1, 10):
        if step == 4 and jax.process_index() == 1:
          os.kill(os.getpid(), signal.SIGTERM)
        if stop.agreed(step):
          stopped = step
          break
      emit({"step": stopped, "code": stop.interrupted(stopped, "d").exit_code})
  """
  got = multiprocess.run_workers(code, local_devices=(1, 1))
  assert got == [{"step": 6, "code": 143}, {"step": 6, "code": 143}]
