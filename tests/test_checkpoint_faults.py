"""Damaged checkpoints and failed saves (cdx.checkpoint): fall back, or stop with a message.

Each damage kind is made on the newest of three steps the way a crash, a full disk or bad
storage leaves it; the restore must fall back to the previous step with a warning and keep
the damaged files (moved aside), never delete them.
"""
import errno
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdx import checkpoint


def _state(step):
  return {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * step,
          "b": jnp.full((8,), step, jnp.bfloat16), "n": jnp.asarray(step, jnp.int32)}


def _abstract():
  """Shapes, dtypes and shardings, as the training loop restores into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      _state(0))


def _save(directory, steps=(1, 2, 3), async_save=False):
  with checkpoint.StageCheckpointer(directory, keep=None, async_save=async_save) as c:
    for s in steps:
      assert c.save(s, _state(s), data_state={"pos": s}, meta={"step": s})


def _array_files(step_dir):
  return sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True),
                key=os.path.getsize)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


def _no_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _no_manifest(step_dir):
  found = glob.glob(os.path.join(step_dir, "state", "**", "manifest.ocdbt"), recursive=True)
  assert found
  for p in found:
    os.remove(p)


def _truncated(step_dir):
  for p in _array_files(step_dir):
    with open(p, "r+b") as f:
      f.truncate(os.path.getsize(p) // 2)


def _flipped(step_dir):
  # One bit in the middle of the largest array file: orbax reads it back without an error
  # (checked below), only the fingerprint catches it.
  p = _array_files(step_dir)[-1]
  data = bytearray(open(p, "rb").read())
  data[len(data) // 2] ^= 0x04
  open(p, "wb").write(bytes(data))


DAMAGE = {"empty": _empty, "no_metadata": _no_metadata, "no_manifest": _no_manifest,
          "truncated": _truncated, "flipped": _flipped}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_falls_back_and_keeps_it(tmp_path, kind, capsys):
  directory = str(tmp_path / "ckpt")
  _save(directory)
  DAMAGE[kind](os.path.join(directory, "3"))
  with checkpoint.StageCheckpointer(directory) as c:
    assert c.all_steps() == [1, 2, 3]  # Orbax still lists the damaged step.
    step, state, data_state, meta = c.restore_latest_intact(_abstract())
    assert step == 2 and data_state == {"pos": 2} and meta == {"step": 2}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(2)["w"]))
    assert c.all_steps() == [1, 2]
    # Training goes on: step 3 is written anew next to the kept damaged copy.
    assert c.save(3, _state(3))
  warning = [l for l in capsys.readouterr().out.splitlines() if "damaged" in l]
  assert len(warning) == 1 and "step 3" in warning[0], warning
  kept = [n for n in os.listdir(directory) if n.startswith("damaged-3-")]
  assert len(kept) == 1 and kept[0] in warning[0]
  with checkpoint.StageCheckpointer(directory) as c:
    assert c.all_steps() == [1, 2, 3]  # The moved-aside copy is not taken for a step.
    assert c.restore_latest_intact(_abstract())[0] == 3


def test_flipped_bit_is_silent_for_orbax_but_caught(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save(directory, steps=(1,))
  _flipped(os.path.join(directory, "1"))
  with checkpoint.StageCheckpointer(directory) as c:
    raw = c._restore_items(1, _abstract())  # pylint: disable=protected-access
    # What orbax gives back differs from what was saved, without an error.
    assert not np.array_equal(np.asarray(raw["state"]["w"]), np.asarray(_state(1)["w"]))
    with pytest.raises(checkpoint.CheckpointError, match=r"1 array\(s\) differ.*\['w'\]"):
      c.restore(1, _abstract())


def test_fingerprint_sees_every_single_bit():
  x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  base = checkpoint.fingerprints({"x": x})["['x']"]
  bits = np.asarray(x).view(np.uint32).copy()
  for i in range(bits.size):
    for b in (0, 17, 31):
      flipped = bits.copy().reshape(-1)
      flipped[i] ^= np.uint32(1 << b)
      got = checkpoint.fingerprints({"x": jnp.asarray(flipped.view(np.float32).reshape(3, 4))})
      assert got["['x']"] != base, (i, b)
  # Position matters too: a permutation of the values is a different fingerprint.
  assert checkpoint.fingerprints({"x": x.T.reshape(3, 4)})["['x']"] != base


def test_nothing_intact_stops_without_moving(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save(directory, steps=(1, 2))
  _truncated(os.path.join(directory, "1"))
  _no_manifest(os.path.join(directory, "2"))
  with checkpoint.StageCheckpointer(directory) as c:
    with pytest.raises(checkpoint.CheckpointError) as e:
      c.restore_latest_intact(_abstract())
    assert c.all_steps() == [1, 2]
  message = str(e.value)
  assert "\n" not in message and "newest: step 2" in message and directory in message
  assert "move them out" in message
  assert sorted(os.listdir(directory)) == ["1", "2"]  # Nothing moved, nothing deleted.


def test_restore_latest_intact_of_nothing(tmp_path):
  with checkpoint.StageCheckpointer(tmp_path / "ckpt") as c:
    assert c.restore_latest_intact(_abstract()) is None


# ------------------------------------------------------------------------- disk full

def _disk_full_on_commit(monkeypatch, step):
  """os.rename of the step's commit (orbax's last write) fails with ENOSPC."""
  rename = os.rename

  def full(src, dst, *a, **k):
    if os.path.basename(str(dst)) == str(step):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    return rename(src, dst, *a, **k)

  monkeypatch.setattr(os, "rename", full)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_stops_at_the_failed_save(tmp_path, monkeypatch, async_save):
  directory = str(tmp_path / "ckpt")
  c = checkpoint.StageCheckpointer(directory, keep=1, async_save=async_save)
  assert c.save(1, _state(1))
  c.wait()
  _disk_full_on_commit(monkeypatch, 2)
  with pytest.raises(checkpoint.CheckpointError) as e:
    c.save(2, _state(2))
    # Async: the error surfaces at the next call (every step calls save) or at wait.
    c.save(3, _state(3))
    c.wait()
  c.close()  # Quiet: the failure was reported once.
  message = str(e.value)
  assert "\n" not in message
  assert "step 2" in message and directory in message and "no space left" in message
  assert "GiB free" in message and "step 1 is the newest intact checkpoint" in message
  monkeypatch.undo()
  with checkpoint.StageCheckpointer(directory) as c:
    assert c.all_steps() == [1]  # keep=1 did not prune the intact step for the torn one.
    step, state, _, _ = c.restore_latest_intact(_abstract())
    assert step == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(1)["w"]))


def test_other_save_errors_name_the_cause(tmp_path, monkeypatch):
  c = checkpoint.StageCheckpointer(tmp_path / "ckpt", async_save=False)
  rename = os.rename

  def denied(src, dst, *a, **k):
    if os.path.basename(str(dst)) == "1":
      raise PermissionError(errno.EACCES, "Permission denied", str(dst))
    return rename(src, dst, *a, **k)

  monkeypatch.setattr(os, "rename", denied)
  with pytest.raises(checkpoint.CheckpointError,
                     match="step 1 .* PermissionError.*no earlier checkpoint"):
    c.save(1, _state(1))
  c.close()


# ------------------------------------------------------------------------ two processes

_TWO_PROCESS_WORKER = """
import os
from cdx import parallel
parallel.initialize(cpu_collectives="gloo")
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cdx import checkpoint
directory = os.environ["CKPT_DIR"]
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x"))
value = lambda s: np.arange(32, dtype=np.float32).reshape(8, 4) * s
make = lambda s: jax.make_array_from_callback((8, 4), sharding, lambda i: value(s)[i])
fingerprints = checkpoint.fingerprints
with checkpoint.StageCheckpointer(directory, keep=None, async_save=False) as c:
  c.save(1, {"w": make(1)}, data_state={"p": jax.process_index()})
  # Step 2's arrays then differ from their recorded fingerprints, as after bit rot.
  checkpoint.fingerprints = lambda t: {k: v ^ 1 for k, v in fingerprints(t).items()}
  c.save(2, {"w": make(2)}, data_state={"p": jax.process_index()})
  checkpoint.fingerprints = fingerprints
abstract = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding)}
with checkpoint.StageCheckpointer(directory) as c:
  step, state, data_state, _ = c.restore_latest_intact(abstract)
  got = multihost_utils.process_allgather(state["w"], tiled=True)
  emit({"step": step, "ok": bool(np.array_equal(np.asarray(got), value(step))),
        "data": data_state, "steps": c.all_steps()})
"""


def test_two_processes_fall_back_to_the_same_step(tmp_path):
  from tests import multiprocess
  directory = str(tmp_path / "ckpt")
  got = multiprocess.run_workers(_TWO_PROCESS_WORKER, local_devices=(2, 2), timeout=240,
                                 env={"CKPT_DIR": directory})
  # Both detect it (a collective check) and fall back; process 0 moves step 2 aside once.
  assert got == [{"step": 1, "ok": True, "data": {"p": i}, "steps": [1]} for i in (0, 1)]
  assert [n for n in os.listdir(directory) if n.startswith("damaged-2-")]
