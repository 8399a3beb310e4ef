"""Two processes (2 x 4 fake CPU devices, gloo) train the DFT step like one process does.

Each worker builds the models of tests/test_step.py, feeds only its own rows of the batch
through `parallel.global_batch_array` and runs a few steps on a 2x2x2 mesh spanning both
processes; the losses must equal the single-process, single-device run.
"""
import pickle

import numpy as np
import pytest

import test_step as T
from tests.multiprocess import run_workers

STEPS = 3

_WORKER = f"""
from cdx import parallel
parallel.initialize(cpu_collectives="gloo")
import os, pickle, sys, jax, numpy as np
sys.path.insert(0, "tests")
import test_step as T
with open(os.environ["CDX_TEST_SETUP"], "rb") as f:
  s = pickle.load(f)  # The parent's trees: no init compile per worker.
mesh = parallel.make_mesh(2, 2, 2)
fn, sh = T.make_step(s, mesh)
state = parallel.shard_tree(T.fresh_state(s), sh.state)
frozen = parallel.shard_tree(s.frozen, sh.frozen)
teacher = parallel.shard_tree(s.teacher, sh.teacher)
rows = parallel.process_batch_slice(T.B, mesh)
local = {{k: v[rows] for k, v in T.make_batch().items()}}
batch = parallel.global_batch_array(local, mesh, T.B)
out = []
for _ in range({STEPS}):
  state, m = fn(state, frozen, teacher, batch)
  out.append({{k: float(m[k]) for k in ("loss", "lm", "kd", "attn", "grad_norm")}})
emit({{"rows": [rows.start, rows.stop], "processes": jax.process_count(),
       "devices": jax.device_count(), "metrics": out}})
"""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  _, ref = T.run((1, 1, 1), steps=STEPS)
  path = tmp_path / "setup.pkl"
  path.write_bytes(pickle.dumps(T.build_setup()))
  results = run_workers(_WORKER, local_devices=(4, 4), timeout=300,
                        env={"CDX_TEST_SETUP": str(path)})
  assert [r["rows"] for r in results] == [[0, 4], [4, 8]]
  for r in results:
    assert r["processes"] == 2 and r["devices"] == 8
    for got, want in zip(r["metrics"], ref):
      for key, value in got.items():
        np.testing.assert_allclose(value, want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert ref[-1]["loss"] < ref[0]["loss"]  # The steps did train.
