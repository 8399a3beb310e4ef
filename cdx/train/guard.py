"""What keeps a stage directory safe around the training loop: a lock, old logs, signals.

* `lock_stage(stage_dir)`: one run per stage directory. `<stage>/LOCK` is held with
  `fcntl.flock` for the run and records {pid, host, started}; a second run stops at once
  naming the holder. A lock left by a dead process on this host (e.g. held by an orphaned
  data worker) is taken over with a warning; one on another host is reported with how to
  remove it.
* `check_fresh_start(stage_dir, ...)`: a stage that starts at step 0 beside the logs or
  outputs of an earlier run (its checkpoints deleted) must not overwrite them: it stops,
  or with `checkpoint.restart=True` moves them to `<stage>/old-<time>/` first.
* `StopOnSignal`: SIGTERM/SIGINT ask the loop to checkpoint at the next step boundary
  and exit (code 128 + signal number: 143, 130); a second signal aborts at once. On
  several hosts every process stops at the same step.

Multi-host: the lock and the moves are done by process 0; every process learns the outcome.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import time
from typing import Any

import jax

from cdx import checkpoint as ckpt_lib

LOCK_FILE = "LOCK"
# What an earlier run of a stage leaves besides its checkpoints (see cdx/train/loop.py).
RUN_FILES = ("metrics.jsonl", "tb", "summary.json", "final", "model.json", "hf")


class GuardError(RuntimeError):
  """The stage directory is busy or holds an earlier run; printed without a traceback."""


# ------------------------------------------------------------------------------ lock

_HELD: dict[str, "StageLock"] = {}  # This process's locks, by path.


class StageLock:
  """An exclusive `flock` on `<stage_dir>/LOCK` (see `lock_stage`)."""

  def __init__(self, path: str, fd: int):
    self.path, self._fd = path, fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
      _HELD.pop(self.path, None)


def _holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _try_lock(path: str) -> int | None:
  """An fd holding the flock of `path` (which is created), or None if another holds it."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return None
    raise
  return fd


def _write_holder(fd: int) -> None:
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _take(path: str) -> tuple[int | None, str]:
  """(fd, warning) when this process got the lock; (None, reason) when not."""
  fd = _try_lock(path)
  if fd is not None:
    _write_holder(fd)
    return fd, ""
  who = _holder(path)
  pid, host = who.get("pid"), who.get("host", "?")
  since = who.get("started", "?")
  if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
    # The run is gone but a child that inherited the lock (a data worker) still holds
    # it: lock a fresh file and put it in place of the old one.
    tmp = f"{path}.{os.getpid()}"
    fd = _try_lock(tmp)
    _write_holder(fd)
    os.replace(tmp, path)
    return fd, (f"warning: took over {path}: its holder (pid {pid} on {host}, since {since}) "
                "is dead; a leftover child process of it may still be running.")
  return None, (
      f"{os.path.dirname(path)} is in use by another run (pid {pid} on host {host}, since "
      f"{since}; {path}). Wait for it or stop it, or use another --workdir. If that run is "
      f"gone (e.g. its host died), delete {path} and rerun.")


def lock_stage(stage_dir: str) -> StageLock | None:
  """Locks `stage_dir` for this run (process 0 holds it; others get None).

  Raises GuardError naming the holder when another run holds it. A lock this process
  took earlier (a run_stage that failed) is released first.
  """
  path = os.path.join(os.path.abspath(stage_dir), LOCK_FILE)
  fd, note = None, ""
  if jax.process_index() == 0:
    if path in _HELD:
      _HELD[path].release()
    fd, note = _take(path)
  # Process 0's outcome on every process ('' = no error).
  error = ckpt_lib.gather_per_process("" if fd is not None else note)[0]
  if error:
    raise GuardError(error)
  if note:
    print(note, flush=True)
  if fd is None:
    return None
  _HELD[path] = StageLock(path, fd)
  return _HELD[path]


# --------------------------------------------------------------------- earlier runs

def _last_logged_step(path: str) -> int:
  step = 0
  try:
    with open(path) as f:
      for line in f:
        try:
          step = int(json.loads(line).get("step", step))
        except (ValueError, AttributeError, TypeError):
          pass
  except OSError:
    pass
  return step


def check_fresh_start(stage_dir: str, every_steps: int, restart: bool) -> str | None:
  """Keeps an earlier run's files when a stage starts from step 0; returns where they went.

  No earlier files: nothing to do. Files of a run killed before its first checkpoint
  (metrics.jsonl only, below `every_steps`) hold nothing to resume: they are moved to
  `<stage>/old-<time>/`. Otherwise the checkpoints were deleted or lost: GuardError
  names the files and the options, unless `restart` (then they are moved too).
  """
  found = [n for n in RUN_FILES if os.path.exists(os.path.join(stage_dir, n))]
  metrics = os.path.join(stage_dir, "metrics.jsonl")
  if found == ["metrics.jsonl"] and os.path.getsize(metrics) == 0:
    found = []
  if not found:
    return None
  last = _last_logged_step(metrics)
  unfinished = set(found) <= {"metrics.jsonl", "tb"} and last < every_steps
  if not (restart or unfinished):
    raise GuardError(
        f"{stage_dir} holds an earlier run ({', '.join(found)}; last logged step {last}) "
        "but no checkpoint to resume from. Put its checkpoints back in "
        f"{stage_dir}/checkpoints, or use a new --workdir, or pass "
        "--config.checkpoint.restart=True to move the old files to "
        f"{stage_dir}/old-<time>/ and train from step 0.")
  dest = os.path.join(stage_dir, "old-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
  ckpt_lib.sync("cdx_guard_looked")  # Every process has looked before anything moves.
  if jax.process_index() == 0:
    os.makedirs(dest)
    for name in found:
      os.rename(os.path.join(stage_dir, name), os.path.join(dest, name))
    print(f"note: the earlier run's {', '.join(found)} moved to {dest}; training from step 0.",
          flush=True)
  ckpt_lib.sync("cdx_guard_moved")  # Nobody writes new logs before the move.
  return dest


# -------------------------------------------------------------------------- signals

class Interrupted(Exception):
  """Training stopped on a signal after checkpointing; `exit_code` is 128 + signum."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


class StopOnSignal:
  """Turns SIGTERM/SIGINT into a request to stop at the next step boundary.

    stop = StopOnSignal().install()
    for step in ...:
      ...
      if stop.agreed(step):   # every process answers the same
        save; raise stop.interrupted(step, where)
    stop.restore()

  Also a context manager (install/restore). A second signal restores the previous
  handlers and re-delivers itself: Ctrl-C twice raises KeyboardInterrupt at once, a
  second SIGTERM kills the process. Only the main thread can install handlers; elsewhere
  this is a no-op that never asks to stop.

  `check_every`: on several processes, the steps (multiples of it) at which the processes
  agree, by a small all-gather (one process alone checks every step, for free).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, check_every: int = 10):
    self.check_every = max(1, int(check_every))
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def install(self) -> "StopOnSignal":
    import threading  # pylint: disable=g-import-not-at-top
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def __enter__(self) -> "StopOnSignal":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.restore()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:  # The second one: do what it would have done.
      self.restore()
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the next step, then "
          "exiting (send it again to abort now).", flush=True)

  def agreed(self, step: int) -> bool:
    """Whether to stop after `step`: a signal came to any process (collective at
    multiples of `check_every` when there are several processes)."""
    if jax.process_count() == 1:
      return self.signum is not None
    if step % self.check_every:
      return False
    return any(ckpt_lib.gather_per_process(self.signum is not None))

  def interrupted(self, step: int, checkpoint_dir: str) -> Interrupted:
    """The exception that ends the run once `step` is checkpointed in `checkpoint_dir`."""
    signum = self.signum or signal.SIGTERM  # Another process got it.
    name = signal.Signals(signum).name
    return Interrupted(f"stopped by {name} after step {step}; checkpoint "
                       f"{checkpoint_dir}/{step} saved: rerun the same command to resume.",
                       signum)
