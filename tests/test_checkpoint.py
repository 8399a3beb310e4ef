"""Tests of cdx.checkpoint: step checkpoints, param files, stage markers."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cdx import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed=0):
  """A train-state-like pytree: params of several dtypes, optax state, step, rng."""
  rng = np.random.default_rng(seed)
  params = {
      "llm": {"layers_0": {"q": {"kernel": jnp.asarray(rng.standard_normal((8, 16)),
                                                       jnp.float32),
                                 "bias": jnp.asarray(rng.standard_normal(16), jnp.bfloat16)}},
              "embed": {"embedding": jnp.asarray(rng.standard_normal((32, 8)),
                                                 jnp.float16)}},
      "count": jnp.asarray(rng.integers(0, 100, (3,)), jnp.int32),
  }
  opt_state = optax.adamw(1e-3).init(params)
  return {"params": params, "opt": opt_state, "step": jnp.asarray(seed * 10 + 7, jnp.int32),
          "rng": jax.random.key(seed)}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_data_meta(tmp_path):
  state = _state(1)
  data_state = {"epoch": 2, "pos": [3, 5], "shard": "train-00001"}
  meta = {"stage": "dft", "config": {"lr": 2e-5, "layers": [1, 2]}}
  with checkpoint.StageCheckpointer(tmp_path / "ckpt", keep=2) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(5, state, data_state=data_state, meta=meta)
  ckpt = checkpoint.StageCheckpointer(tmp_path / "ckpt")
  assert ckpt.latest_step() == 5
  abstract = jax.eval_shape(lambda: _state(0))
  got, got_data, got_meta = ckpt.restore(abstract_state=abstract)
  _assert_trees_equal(got, state)  # dtypes, optax namedtuples and the typed key survive
  assert got_data == data_state
  assert got_meta == meta
  # Without a target the values still come back (plain containers).
  raw, _, _ = ckpt.restore(5)
  np.testing.assert_array_equal(np.asarray(raw["params"]["count"]),
                                np.asarray(state["params"]["count"]))
  ckpt.close()


def test_keep_prunes_and_interval(tmp_path):
  with checkpoint.StageCheckpointer(tmp_path, keep=2, save_interval_steps=2,
                                    async_save=False) as ckpt:
    saved = [ckpt.save(s, {"x": jnp.full((2,), s)}) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.save(7, {"x": jnp.full((2,), 7)}, force=True)
    assert not ckpt.save(7, {"x": jnp.full((2,), -1)}, force=True)  # already saved
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    state, data_state, meta = ckpt.restore(6)
    np.testing.assert_array_equal(np.asarray(state["x"]), [6, 6])
    # Concrete arrays work as the target too (their shape/dtype/sharding are used).
    latest, _, _ = ckpt.restore(abstract_state={"x": jnp.zeros((2,), jnp.int32)})
    np.testing.assert_array_equal(np.asarray(latest["x"]), [7, 7])
    assert data_state is None and meta is None
    with pytest.raises(FileNotFoundError, match="step=2"):
      ckpt.restore(2)


def test_async_save_survives_donation(tmp_path):
  # The train step donates its state right after `save` returns.
  x = jnp.arange(1 << 20, dtype=jnp.float32)
  expected = np.asarray(x)
  with checkpoint.StageCheckpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(1, {"x": x})
    x.delete()
  with checkpoint.StageCheckpointer(tmp_path) as ckpt:
    np.testing.assert_array_equal(np.asarray(ckpt.restore()[0]["x"]), expected)


def test_restore_into_sharding(tmp_path):
  devices = np.array(jax.devices()[:8]).reshape(2, 4)
  mesh = Mesh(devices, ("data", "model"))
  x = jnp.arange(8 * 12, dtype=jnp.float32).reshape(8, 12)
  y = jnp.arange(4, dtype=jnp.bfloat16)
  # Saved sharded one way ...
  saved = {"w": jax.device_put(x, NamedSharding(mesh, P("model", "data"))), "b": y}
  with checkpoint.StageCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, saved)
  # ... restored into another layout.
  target = {"w": NamedSharding(mesh, P("data", "model")),
            "b": NamedSharding(mesh, P("model"))}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          saved, target)
  with checkpoint.StageCheckpointer(tmp_path) as ckpt:
    got, _, _ = ckpt.restore(abstract_state=abstract)
  for k in saved:
    assert got[k].sharding == target[k], k
    assert got[k].dtype == saved[k].dtype
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(saved[k]))
  assert got["w"].addressable_shards[0].data.shape == (4, 3)


def test_bad_inputs_raise(tmp_path):
  with checkpoint.StageCheckpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="nothing to restore"):
      ckpt.restore()
    with pytest.raises(ValueError, match="meta"):
      ckpt.save(1, {"x": jnp.zeros(2)}, meta={"dtype": jnp.float32})
    with pytest.raises(ValueError, match="data_state"):
      ckpt.save(1, {"x": jnp.zeros(2)}, data_state={"v": float("nan")})
  with pytest.raises(ValueError, match="keep"):
    checkpoint.StageCheckpointer(tmp_path, keep=0)


_CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from cdx import checkpoint
ckpt = checkpoint.StageCheckpointer({directory!r}, keep=3)
ckpt.save(1, {{"w": np.ones((4,), np.float32)}}, data_state={{"pos": 1}}, force=True)
ckpt.wait()
print("SAVED1", flush=True)
# Large and incompressible, so writing it takes a while (~1 s): the parent kills us then.
big = {{f"w{{i}}": np.random.default_rng(i).standard_normal((1024, 8192), np.float32)
       for i in range(4)}}
ckpt.save(2, big, data_state={{"pos": 2}}, force=True)
ckpt.wait()
print("SAVED2", flush=True)
time.sleep(60)
"""


def test_sigkill_during_save_keeps_previous(tmp_path):
  directory = str(tmp_path / "ckpt")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  child = subprocess.Popen(
      [sys.executable, "-c", _CHILD.format(root=ROOT, directory=directory)],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
  try:
    assert child.stdout.readline().strip() == "SAVED1"
    # Kill as soon as step 2's temporary directory appears.
    deadline = time.monotonic() + 60
    partial = []
    while not partial and time.monotonic() < deadline and child.poll() is None:
      partial = [n for n in os.listdir(directory) if n.startswith("2") and n != "2"]
      time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  assert child.returncode == -signal.SIGKILL
  assert partial, "step 2 never started"
  # It died mid-save: the partial dir is still there and no finished step 2 exists.
  left = os.listdir(directory)
  assert partial[0] in left and "2" not in left, left

  with checkpoint.StageCheckpointer(directory) as ckpt:
    assert ckpt.latest_step() == 1
    state, data_state, _ = ckpt.restore()
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert data_state == {"pos": 1}
    # The partial save neither lingers nor blocks saving step 2 again.
    assert partial[0] not in os.listdir(directory)
    ckpt.save(2, {"w": np.zeros((4,), np.float32)}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]


def test_save_load_params(tmp_path):
  params = _state(2)["params"]
  path = tmp_path / "merged"
  checkpoint.save_params(path, params)
  _assert_trees_equal(checkpoint.load_params(path, jax.eval_shape(lambda: params)), params)
  with pytest.raises(ValueError, match="overwrite"):
    checkpoint.save_params(path, params)
  other = jax.tree.map(lambda x: x + 1, params)
  checkpoint.save_params(path, other, overwrite=True)
  _assert_trees_equal(checkpoint.load_params(path), other)
  # Only the final directory is left behind (written elsewhere, then renamed).
  assert os.listdir(tmp_path) == ["merged"]
  with pytest.raises(FileNotFoundError, match="path="):
    checkpoint.load_params(tmp_path / "missing")


def test_load_params_into_sharding(tmp_path):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  params = {"kernel": jnp.arange(32.0).reshape(4, 8)}
  checkpoint.save_params(tmp_path / "p", params)
  sharding = NamedSharding(mesh, P("data", "model"))
  abstract = {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=sharding)}
  got = checkpoint.load_params(tmp_path / "p", abstract)
  assert got["kernel"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(got["kernel"]), np.asarray(params["kernel"]))


def test_manifest_round_trip(tmp_path):
  assert checkpoint.read_manifest(tmp_path) is None
  info = {"teacher": "/models/llava-qwen-7b", "upstream": {"stage": "dpt", "step": 1200}}
  checkpoint.write_manifest(tmp_path / "dft", info)
  assert checkpoint.read_manifest(tmp_path / "dft") == info
  assert json.loads((tmp_path / "dft" / checkpoint.MANIFEST_FILE).read_text()) == info


def test_done_marker_is_atomic(tmp_path, monkeypatch):
  stage = tmp_path / "sft"
  assert not checkpoint.is_done(stage) and checkpoint.read_done(stage) is None

  # A crash between writing the contents and the rename leaves no marker and no litter.
  def crash(src, dst):
    raise KeyboardInterrupt("killed before rename")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.mark_done(stage, {"final_step": 10})
  monkeypatch.undo()
  assert not checkpoint.is_done(stage)
  assert os.listdir(stage) == []

  # A complete call leaves a whole marker.
  checkpoint.mark_done(stage, {"final_step": 10})
  assert checkpoint.is_done(stage)
  assert checkpoint.read_done(stage) == {"final_step": 10}
  with pytest.raises(ValueError, match="DONE"):
    checkpoint.mark_done(stage, {"bad": object()})
  assert checkpoint.read_done(stage) == {"final_step": 10}  # old marker untouched


_WORKER = r"""
import os, sys
process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{{port}}", num_processes=2, process_id=process_id)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cdx import checkpoint
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
w = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data", "model")),
                                 lambda idx: x[idx])
with checkpoint.StageCheckpointer(directory) as ckpt:  # collective: both processes save
  ckpt.save(3, {{"w": w}}, data_state={{"pos": 10 * process_id + 1}}, meta={{"stage": "t"}})
checkpoint.mark_done(os.path.dirname(directory), {{"final_step": 3}})
assert checkpoint.is_done(os.path.dirname(directory))
target = NamedSharding(mesh, P("model", "data"))
with checkpoint.StageCheckpointer(directory) as ckpt:
  got, data_state, meta = ckpt.restore(
      abstract_state={{"w": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target)}})
assert got["w"].sharding == target
for shard in got["w"].addressable_shards:
  np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
assert data_state == {{"pos": 10 * process_id + 1}}, data_state
assert meta == {{"stage": "t"}}
print("OK", flush=True)
"""


def test_multi_process_save_restore(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  directory = str(tmp_path / "stage" / "ckpt")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "-c", _WORKER.format(root=ROOT), str(i), str(port), directory],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0 and out.rstrip().endswith("OK"), out[-3000:]
  # One copy on disk, with both processes' data iterator states.
  with checkpoint.StageCheckpointer(directory) as ckpt:
    assert ckpt.all_steps() == [3]
    with pytest.raises(ValueError, match="2 processes but 1"):
      ckpt.restore(abstract_state={"w": jax.ShapeDtypeStruct(
          (8, 16), jnp.float32,
          sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))})
