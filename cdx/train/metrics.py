"""Run logging of a training stage: metrics.jsonl, TensorBoard, console, summary.

`MetricsWriter(stage_dir)` writes, from process 0 only:

* ``stage_dir/metrics.jsonl``: one JSON object per logged step, e.g.
    {"step": 200, "loss": 2.31, "lm": 2.1, "kd": 0.4, "attn": 0.02, "lr": 2e-05,
     "tokens_seen": 1638400, "tokens_per_s": 8123.4, "elapsed_s": 201.7}
  `step` and `loss` always; every metric given (a step's own "tokens" count included);
  `tokens_seen` (cumulative since this writer started), `tokens_per_s` (since the
  previous line) and `elapsed_s` are added. Values are plain JSON numbers (jax/numpy
  scalars converted; a non-finite float is written as null so the file stays strict
  JSON). Each line is flushed when written, so a kill loses at most that line. On resume from step s, lines with step > s (and a torn last line)
  are dropped first, so the file never holds a step twice.
* ``stage_dir/tb/``: TensorBoard event files (tensorboardX), one scalar per metric.
* a console progress bar (tqdm) per stage, e.g.
    [dft]  120/400 |████▏          | loss=2.31 lm=2.1 kd=0.4 attn=0.02 tok/s=8123 ETA 3:12
  the stage's name, the step, the loss terms (`BAR_TERMS`), tokens/s and an ETA measured
  from the first logged step on (so compile time is not extrapolated); `nonfinite=N`
  (steps skipped for a non-finite loss or gradient in this run) appears only when N > 0.
  Everything else goes to metrics.jsonl and TensorBoard.
* ``stage_dir/summary.json`` from `summary()`: time, tokens, final metrics, outputs.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TB_DIR = "tb"
# Fields the writer adds to every record (never a metric name).
ADDED_FIELDS = ("step", "tokens_seen", "tokens_per_s", "elapsed_s")
BAR_TERMS = ("loss", "lm", "kd", "attn")  # The loss terms the progress bar shows.
NONFINITE = "nonfinite"  # The step metric: 1 when the step was skipped (cdx/train/step.py).
# tqdm prefixes {postfix} with ", ": the progress text goes into {desc}, after the bar.
_BAR_FORMAT = "[{name}] {{n_fmt}}/{{total_fmt}} |{{bar:16}}| {{desc}}"


def _clock(seconds: float) -> str:
  """'1:02:03' / '3:12'."""
  m, sec = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _to_scalar(name: str, value: Any) -> int | float | bool | None:
  """A JSON-ready Python scalar from a Python/numpy/jax scalar; non-finite -> None."""
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"metric {name!r} has shape {arr.shape}; log scalars only "
                     "(reduce it first, e.g. with .mean())")
  if arr.dtype == bool:
    return bool(arr)
  if np.issubdtype(arr.dtype, np.integer):
    return int(arr.reshape(()))
  if not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(f"metric {name!r} has dtype {arr.dtype}; log numbers only")
  x = float(arr.reshape(()))
  return x if math.isfinite(x) else None


def _format_terms(record: Mapping[str, Any]) -> str:
  """'loss=2.31 lm=2.1 ...' for the console (bookkeeping fields left out)."""
  return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in record.items() if k not in ADDED_FIELDS)


def _kept_lines(path: str, resume_step: int) -> list[str]:
  """Whole, parseable lines of `path` whose step is <= `resume_step`."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # torn line of a killed run
      if isinstance(record, dict) and isinstance(record.get("step"), int) \
          and record["step"] <= resume_step and line.endswith("\n"):
        kept.append(line)
  return kept


def _rewrite(path: str, lines: list[str]) -> None:
  """Replaces `path` with `lines` atomically (temp file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricsWriter:
  """Writes a stage's metrics to jsonl, TensorBoard and the console (process 0 only).

  Args:
    stage_dir: the stage's output directory (created if needed).
    total_steps: for the progress bar's ETA; None when unknown.
    resume_step: the step training resumes after (0 for a fresh start); logged lines
      with a larger step, left by an earlier run, are dropped.
    enabled: whether this process writes anything; default: process 0 only.
    console: whether to show the tqdm progress line.
    name: the stage's name, shown on the bar and the summary (default: the dir's name).
  """

  def __init__(self, stage_dir: str | os.PathLike, total_steps: int | None = None,
               resume_step: int = 0, enabled: bool | None = None, console: bool = True,
               name: str | None = None):
    if resume_step < 0:
      raise ValueError(f"resume_step={resume_step}: must be >= 0")
    self.stage_dir = os.path.abspath(os.fspath(stage_dir))
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self.resume_step = int(resume_step)
    self.name = name or os.path.basename(self.stage_dir)
    self.total_steps = total_steps
    self.last: dict[str, Any] | None = None
    self._nonfinite = 0
    self._eta_from: tuple[float, int] | None = None  # (time, step) of the first log
    self._tokens = 0
    self._file = self._tb = None
    self._bar = None
    self._start_clock()
    if not self.enabled:
      return
    os.makedirs(self.stage_dir, exist_ok=True)
    path = os.path.join(self.stage_dir, METRICS_FILE)
    if os.path.exists(path):
      _rewrite(path, _kept_lines(path, self.resume_step))
    self._file = open(path, "a")
    import tensorboardX  # pylint: disable=g-import-not-at-top
    # purge_step hides TB events of the steps being redone after a resume.
    self._tb = tensorboardX.SummaryWriter(
        logdir=os.path.join(self.stage_dir, TB_DIR),
        purge_step=self.resume_step + 1 if self.resume_step else None)
    if console:
      self._bar = tqdm.tqdm(total=total_steps, initial=self.resume_step, unit="step",
                            bar_format=_BAR_FORMAT.format(
                                name=self.name.replace("{", "{{").replace("}", "}}")),
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    self._start_clock()  # set-up time is not training time

  def _start_clock(self) -> None:
    self._start = self._last_time = time.monotonic()

  def log(self, step: int, metrics: Mapping[str, Any], tokens: int = 0) -> dict[str, Any]:
    """Logs the metrics of `step`; returns the record written to metrics.jsonl.

    `metrics` must hold "loss" and scalar values (jax arrays are fetched here, so call
    this only every few steps). `tokens`: tokens processed since the previous `log`.
    Every process may call it; only an enabled writer writes.
    """
    if "loss" not in metrics:
      raise ValueError(f"metrics must contain 'loss'; got keys {sorted(metrics)}")
    clash = sorted(set(metrics) & set(ADDED_FIELDS))
    if clash:
      raise ValueError(f"metric names {clash} are reserved (added by MetricsWriter)")
    now = time.monotonic()
    host = jax.device_get(dict(metrics))
    record: dict[str, Any] = {"step": int(step)}
    record["loss"] = _to_scalar("loss", host["loss"])
    for name in metrics:  # caller's order (device_get sorts dict keys)
      record[name] = _to_scalar(name, host[name])
    self._tokens += int(tokens)
    window = max(now - self._last_time, 1e-9)
    record["tokens_seen"] = self._tokens
    record["tokens_per_s"] = round(int(tokens) / window, 3)
    record["elapsed_s"] = round(now - self._start, 3)
    self._last_time = now
    self.last = record
    self._nonfinite += int(record.get(NONFINITE) or 0)
    if self._eta_from is None:  # The first step's time is mostly compilation.
      self._eta_from = (now, int(step))
    if self.enabled:
      self._file.write(json.dumps(record, allow_nan=False) + "\n")
      self._file.flush()
      for name in metrics:
        self._tb.add_scalar(name, float(np.asarray(host[name]).reshape(())), int(step))
      self._tb.add_scalar("tokens_per_s", record["tokens_per_s"], int(step))
      self._tb.flush()
      if self._bar is not None:
        # The text first: update() renders the bar.
        self._bar.set_description_str(self.progress(record, now), refresh=False)
        self._bar.update(max(int(step) - self._bar.n, 0))
    return record

  def progress(self, record: Mapping[str, Any], now: float | None = None) -> str:
    """The bar's text after the step count: loss terms, tok/s, ETA, non-finite steps."""
    now = time.monotonic() if now is None else now
    terms = " ".join(f"{k}={record[k]:.4g}" if isinstance(record[k], float)
                     else f"{k}={record[k]}" for k in BAR_TERMS if k in record)
    text = f"{terms} tok/s={record['tokens_per_s']:.0f}"
    if self.total_steps:
      t0, s0 = self._eta_from or (now, record["step"])
      done = record["step"] - s0
      eta = (now - t0) / done * (self.total_steps - record["step"]) if done > 0 else None
      text += " ETA " + ("?" if eta is None else _clock(eta))
    if self._nonfinite:
      text += f" {NONFINITE}={self._nonfinite}"
    return text

  def bar_text(self) -> str:
    """The progress bar as rendered now ("" without a console bar)."""
    return "" if self._bar is None else str(self._bar)

  def summary(self, outputs: Mapping[str, str] | None = None,
              **extra: Any) -> dict[str, Any]:
    """End-of-run summary: printed, written to summary.json, and returned.

    `outputs`: where the stage's results are (e.g. {"checkpoints": ..., "params": ...});
    `extra`: anything else small and JSON-able.
    """
    wall = time.monotonic() - self._start
    result: dict[str, Any] = {
        "stage_dir": self.stage_dir,
        "resume_step": self.resume_step,
        "final_step": None if self.last is None else self.last["step"],
        "wall_time_s": round(wall, 3),
        "tokens_seen": self._tokens,
        "tokens_per_s": round(self._tokens / max(wall, 1e-9), 3),
        "final": {k: v for k, v in (self.last or {}).items() if k not in ADDED_FIELDS},
        "outputs": dict(outputs or {}),
        **extra,
    }
    if self.enabled:
      if self._bar is not None:  # its last line goes before the summary
        self._bar.close()
        self._bar = None
      text = json.dumps(result, indent=1, sort_keys=True, allow_nan=False)
      path = os.path.join(self.stage_dir, SUMMARY_FILE)
      with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
      os.replace(path + ".tmp", path)
      lines = [f"[{self.name}] stage done: steps {self.resume_step}->{result['final_step']} in "
               f"{wall / 60:.1f} min, {self._tokens:,} tokens "
               f"({result['tokens_per_s']:.0f} tok/s)",
               "final: " + _format_terms({k: v for k, v in result["final"].items()
                                          if not (k.startswith(NONFINITE) and not v)}),
               *(f"{name}: {where}" for name, where in result["outputs"].items()),
               *([f"{NONFINITE} steps (skipped updates): {self._nonfinite}"]
                 if self._nonfinite else []),
               f"summary: {path}"]
      tqdm.tqdm.write("\n".join(lines), file=sys.stderr)
    return result

  def close(self) -> None:
    """Flushes and closes the files and the progress bar."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
