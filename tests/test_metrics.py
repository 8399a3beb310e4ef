"""Tests of cdx.train.metrics: metrics.jsonl, resume truncation, TensorBoard, summary."""
import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from cdx.train import metrics


def _records(stage_dir):
  with open(os.path.join(stage_dir, metrics.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _tb_scalars(stage_dir):
  """{tag: {step: value}} read back from the TFRecord event files under stage_dir/tb."""
  out = {}
  files = sorted(glob.glob(os.path.join(stage_dir, metrics.TB_DIR, "events.out.tfevents.*")))
  assert files, "no TensorBoard event file"
  for path in files:
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def test_jsonl_format(tmp_path):
  with metrics.MetricsWriter(tmp_path, total_steps=4, enabled=True) as w:
    w.log(1, {"loss": jnp.float32(2.5), "lm": np.float64(2.0), "kd": jnp.asarray([0.5]),
              "lr": 1e-3, "nonfinite": jnp.int32(3)}, tokens=100)
    # Flushed per line: readable before close.
    assert _records(tmp_path)[0]["loss"] == 2.5
    w.log(2, {"loss": jnp.float32(float("nan")), "lm": 1.5}, tokens=50)
  lines = open(tmp_path / metrics.METRICS_FILE).read().splitlines()
  assert len(lines) == 2
  first, second = (json.loads(line) for line in lines)
  assert list(first)[:6] == ["step", "loss", "lm", "kd", "lr", "nonfinite"]
  assert first["step"] == 1 and first["lm"] == 2.0 and first["kd"] == 0.5
  assert first["lr"] == 1e-3 and first["nonfinite"] == 3 and isinstance(first["nonfinite"], int)
  assert first["tokens_seen"] == 100 and second["tokens_seen"] == 150
  assert first["tokens_per_s"] > 0 and second["elapsed_s"] >= first["elapsed_s"]
  assert second["loss"] is None  # non-finite -> null: strict JSON
  assert "NaN" not in lines[1]


def test_bad_metrics_raise(tmp_path):
  with metrics.MetricsWriter(tmp_path, enabled=True, console=False) as w:
    with pytest.raises(ValueError, match="'loss'"):
      w.log(1, {"lm": 1.0})
    with pytest.raises(ValueError, match="'kd' has shape"):
      w.log(1, {"loss": 1.0, "kd": jnp.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
      w.log(1, {"loss": 1.0, "tokens_seen": 3})
  assert open(tmp_path / metrics.METRICS_FILE).read() == ""


def test_resume_truncates(tmp_path):
  with metrics.MetricsWriter(tmp_path, enabled=True, console=False) as w:
    for step in range(1, 7):
      w.log(step, {"loss": float(step)})
  with open(tmp_path / metrics.METRICS_FILE, "a") as f:
    f.write('{"step": 7, "lo')  # torn line of a killed run
  # Resume from the checkpoint of step 4: steps 5, 6 (and the torn 7) are redone.
  with metrics.MetricsWriter(tmp_path, resume_step=4, enabled=True, console=False) as w:
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4]
    for step in range(5, 9):
      w.log(step, {"loss": 10.0 * step})
  records = _records(tmp_path)
  assert [r["step"] for r in records] == list(range(1, 9))
  assert [r["loss"] for r in records] == [1, 2, 3, 4, 50, 60, 70, 80]
  # A fresh start (resume_step=0) drops the old run's lines.
  metrics.MetricsWriter(tmp_path, enabled=True, console=False).close()
  assert _records(tmp_path) == []


def test_tensorboard_events(tmp_path):
  with metrics.MetricsWriter(tmp_path, enabled=True, console=False) as w:
    w.log(3, {"loss": 1.25, "attn": jnp.float32(0.5)}, tokens=10)
    w.log(6, {"loss": 0.75, "attn": jnp.float32(0.25)}, tokens=10)
  scalars = _tb_scalars(tmp_path)
  assert scalars["loss"] == {3: 1.25, 6: 0.75}
  assert scalars["attn"] == {3: 0.5, 6: 0.25}
  assert set(scalars["tokens_per_s"]) == {3, 6}


def test_disabled_writes_nothing(tmp_path):
  stage = tmp_path / "stage"
  with metrics.MetricsWriter(stage, enabled=False) as w:
    record = w.log(1, {"loss": 1.0}, tokens=4)
    result = w.summary(outputs={"ckpt": "x"})
  assert record["loss"] == 1.0 and result["tokens_seen"] == 4
  assert not stage.exists()


def test_summary(tmp_path, capsys):
  with metrics.MetricsWriter(tmp_path, total_steps=3, resume_step=1, enabled=True) as w:
    w.log(2, {"loss": 3.0, "kd": 1.0}, tokens=64)
    w.log(3, {"loss": 2.0, "kd": 0.5, "tokens": jnp.int32(40)}, tokens=64)
    result = w.summary(outputs={"checkpoints": str(tmp_path / "ckpt")}, stage="dft")
  on_disk = json.loads((tmp_path / metrics.SUMMARY_FILE).read_text())
  assert on_disk == result
  assert result["final_step"] == 3 and result["resume_step"] == 1
  assert result["tokens_seen"] == 128 and result["stage"] == "dft"
  assert result["final"] == {"loss": 2.0, "kd": 0.5, "tokens": 40}
  assert result["outputs"]["checkpoints"].endswith("ckpt")
  err = capsys.readouterr().err
  assert "128 tokens" in err and "loss=2" in err and str(tmp_path / "ckpt") in err


def test_progress_bar_names_the_stage_and_shows_only_the_essentials(tmp_path, monkeypatch):
  now = [0.0]
  fake = type("Clock", (), {"monotonic": staticmethod(lambda: now[0])})
  monkeypatch.setattr(metrics, "time", fake)  # Only the writer's clock.
  with metrics.MetricsWriter(tmp_path / "dft", total_steps=10, enabled=True) as w:
    m = {"loss": 2.5, "lm": 2.0, "kd": 0.4, "attn": 0.1, "lr": 1e-3, "grad_norm": 3.0,
         "param_norm": 9.0, "tokens": 7, "nonfinite": 0, "nonfinite_run": 0}
    now[0] = 100.0
    w.log(1, m, tokens=1000)  # 100 s: mostly compile.
    first = w.bar_text()
    now[0] = 110.0
    w.log(2, m, tokens=1000)  # 10 s per step from here on.
    second = w.bar_text()
    now[0] = 130.0
    w.log(4, {**m, "nonfinite": 2}, tokens=2000)
    third = w.bar_text()
  assert first.startswith("[dft] 1/10 |") and "ETA ?" in first
  assert second.startswith("[dft] 2/10 |")
  assert "loss=2.5 lm=2 kd=0.4 attn=0.1 tok/s=100 ETA 1:20" in second  # 8 steps x 10 s
  for text in (first, second):
    assert "nonfinite" not in text and "skipped" not in text
    assert not any(f in text for f in ("lr=", "grad_norm", "param_norm", "tokens="))
  assert "ETA 1:00" in third and third.endswith("nonfinite=2")
  assert len(second.split("| ", 1)[1].split()) == 7  # 4 terms, tok/s, "ETA", the time.


def test_stage_done_names_the_stage(tmp_path, capsys):
  with metrics.MetricsWriter(tmp_path / "sft", total_steps=1, enabled=True) as w:
    w.log(1, {"loss": 1.0, "nonfinite": 1}, tokens=4)
    w.summary()
  err = capsys.readouterr().err
  assert "[sft] stage done: steps 0->1" in err and "nonfinite steps (skipped updates): 1" in err
