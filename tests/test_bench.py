"""launch/bench.py step --against torch: both sides run, agree on the loss, report JSON."""
import json
import os
import subprocess
import sys

import pytest

from cdx.models import mllm
from launch import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("jax_tokens_per_s", "torch_tokens_per_s", "jax_peak_bytes", "torch_peak_bytes",
        "tokens_per_s_ratio", "peak_bytes_ratio", "jax_total_peak_bytes",
        "torch_total_peak_bytes", "loss_rel_diff")


@pytest.mark.slow
def test_step_against_torch_prints_the_json_keys():
  cmd = [sys.executable, os.path.join(ROOT, "launch", "bench.py"), "step", "--preset=tiny",
         "--seq=128", "--batch=2", "--steps=1", "--against=torch", "--json"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in KEYS:
    assert key in row and row[key] > 0, key
  assert row["loss_match"] and row["loss_rel_diff"] <= bench.LOSS_RTOL
  assert row["seq"] == 128 and row["batch"] == 2
  assert row["tokens_per_s_ratio"] == pytest.approx(
      row["jax_tokens_per_s"] / row["torch_tokens_per_s"])


def test_step_flags():
  a = bench.parse(["step", "--preset=bench", "--against=torch", "--sweep"])
  assert a.seq == list(bench.SWEEP) and a.preset == "bench"
  assert bench.parse(["step", "--preset=bench"]).seq == [bench.DEFAULTS["bench"][0]]
  assert bench.parse(["step", "--seq=384,512", "--against=torch"]).seq == [384, 512]
  with pytest.raises(SystemExit):
    bench.parse(["step", "--sweep"])  # The sweep is a torch comparison.
  with pytest.raises(SystemExit):
    bench.parse(["step", "--sweep", "--seq=512", "--against=torch"])


def test_bench_preset_shape():
  b = bench.build("bench", abstract=True)
  assert b.batch["input_ids"].shape == (2, 512)
  s, t = b.student_cfg.text, b.teacher_cfg.text
  assert (s.num_layers, s.hidden_size, t.num_layers, t.hidden_size) == (8, 256, 14, 320)
  assert s.vocab_size == t.vocab_size == 16384
  assert mllm.num_visual_tokens(b.student_cfg) == 255
