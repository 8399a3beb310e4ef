"""Checkpoints of a training stage and the hand-off between stages.

A stage directory holds everything one stage writes. This module owns three kinds of
files in it:

* step checkpoints (``StageCheckpointer``, an orbax ``CheckpointManager``), one
  sub-directory per saved step with three items:
    ``state``  pytree of jax/numpy arrays and Python scalars (trainable params, optimizer
               state, step, rng; typed PRNG keys are fine), any dtype, possibly sharded;
    ``data``   the data iterator's JSON-able state (dict, or None) of every process:
               {"process_states": [state of process 0, state of process 1, ...]}, as
               each host reads its own shard of the data;
    ``meta``   small JSON: config dict, stage name, ...
  Orbax writes a step into a temporary directory and renames it when complete, so a save
  killed part-way leaves the previous steps intact and the partial one is never listed
  (and is deleted when the directory is opened again).
  Each save also records a fingerprint of every array (``meta``); a restore checks it, as
  orbax reads flipped bits in array files back silently. ``restore_latest_intact`` falls
  back past damaged steps, which it moves aside to ``damaged-<step>-<time>/`` (kept, never
  deleted). A failed save (e.g. a full disk; async ones surface at the next ``save`` call)
  raises ``CheckpointError`` with what to do.
* standalone param trees (``save_params`` / ``load_params``): a finished stage's outputs,
  e.g. merged weights, read by the next stage. Written the same atomic way.
* small JSON markers: ``manifest.json`` (where the frozen inputs of the stage came from;
  frozen weights are referenced, never copied) and ``DONE`` (written last, via rename, so
  that a launcher can skip finished stages).

Multi-host: every process calls ``save``/``restore``/``save_params``/``load_params``
(they are collective); orbax lets the primary process write the shared files. The JSON
markers are written by process 0 only; all processes may read them.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

MANIFEST_FILE = "manifest.json"
DONE_FILE = "DONE"
_ITEMS = ("state", "data", "meta")
# Files of every step orbax writes (format of orbax 0.12, OCDBT arrays).
_REQUIRED = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")
_INTEGRITY = "_cdx_fingerprints"  # Saved `meta` item: {_INTEGRITY: {path: hash}, "meta": meta}.


class CheckpointError(RuntimeError):
  """A checkpoint the user must act on (damaged, disk full); printed without a traceback."""


# ----------------------------------------------------------------------------- helpers


def _check_json(name: str, value: Any) -> None:
  """Fails early (not in orbax's background thread) on values JSON cannot hold."""
  try:
    json.dumps(value, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{name} must be JSON-serializable (dicts, lists, str, int, finite float, bool, "
        f"None); convert it first (e.g. ConfigDict.to_dict()): {e}") from e


def _as_abstract(tree: Any) -> Any:
  """Arrays -> ShapeDtypeStructs keeping their sharding; other leaves unchanged."""

  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x

  return jax.tree.map(leaf, tree)


class _NoOrbaxTracebacks(logging.Filter):
  """Orbax logs a failed background save with its traceback, then raises the error again
  where StageCheckpointer turns it into a one-line CheckpointError: keep the log line,
  drop the traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and "orbax" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


_ORBAX_LOG_FILTER = _NoOrbaxTracebacks()


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32 hash of the bits of `x`: sum of bits * an odd weight per position (mod 2**32).

  Any single flipped bit changes it (odd * 2**b is never 0 mod 2**32). Built from iotas,
  not a reshape, so that a sharded `x` stays sharded.
  """
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 8:
    x = jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  elif size in (1, 2, 4):
    x = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size])
  else:
    raise ValueError(f"cannot fingerprint dtype {x.dtype}")
  x = x.astype(jnp.uint32)
  index, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for d in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
    stride = stride * x.shape[d] % 2**32
  weight = (index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
  return jnp.sum(x * weight, dtype=jnp.uint32)


_fingerprint_leaves = jax.jit(lambda leaves: [_leaf_fingerprint(x) for x in leaves])


def fingerprints(tree: Any) -> dict[str, int]:
  """{leaf path: uint32 hash of its bits} of the array leaves of `tree` (collective)."""
  paths, leaves = [], []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, (jax.Array, np.ndarray)):
      paths.append(jax.tree_util.keystr(path))
      leaves.append(x)
  # Each hash is a replicated scalar: every process reads its own copy.
  hashes = _fingerprint_leaves(leaves)
  return {p: int(np.asarray(h.addressable_data(0))) for p, h in zip(paths, hashes)}


def _is_primary() -> bool:
  return jax.process_index() == 0


# Multi-host helpers (no-ops on one process), the one home of cdx's host collectives:
# the checkpointer, the loop, the stage guard and the experiment builder use them.

def sync(name: str) -> None:
  """Barrier: no host goes on before every host got here (e.g. reads what process 0
  wrote); `name` must be the same on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def gather_per_process(value: Any) -> list[Any]:
  """[value of process 0, value of process 1, ...] on every process (JSON values)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(raw.size)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(everyone, lengths)]


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines() or [""]
  return f"{type(e).__name__}: {lines[0][:200]}"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as JSON to `path` via a temp file + rename: readers see all or nothing."""
  path = os.fspath(path)
  _check_json(os.path.basename(path), obj)
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                             dir=directory)
  try:
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------ step checkpoints


class StageCheckpointer:
  """Periodic, atomic, optionally async checkpoints of one stage (orbax manager).

  Usage:
    ckpt = StageCheckpointer(os.path.join(stage_dir, "ckpt"), keep=3)
    if ckpt.latest_step() is not None:
      state, data_state, meta = ckpt.restore(abstract_state=jax.eval_shape(init))
    ...
    ckpt.save(step, state, data_state=it.get_state(), meta={"stage": "dft"})
    ...
    ckpt.save(last_step, state, ..., force=True); ckpt.close()

  Async saves copy device arrays to host before `save` returns, so the caller may
  donate or overwrite `state` right after.
  """

  def __init__(self, directory: str | os.PathLike, keep: int | None = 3,
               async_save: bool = True, save_interval_steps: int = 1):
    if keep is not None and keep < 1:
      raise ValueError(f"keep={keep}: must be >= 1 (or None to keep every step)")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps={save_interval_steps}: must be >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_interval_steps = save_interval_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        # Partial (killed) saves are left as tmp dirs; remove them on open.
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=_ITEMS)
    logging.getLogger("absl").addFilter(_ORBAX_LOG_FILTER)  # Idempotent.
    self._async = async_save
    self._pending = None  # Step of the last save, until it is known to be written.
    self._failed = False  # A save failed and was reported: close() stays quiet.

  def save(self, step: int, state: Any, data_state: Mapping[str, Any] | None = None,
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `step` if `step % save_interval_steps == 0` or `force`; returns whether it did.

    A step already saved is not saved again (returns False). Call it every step: it also
    reports a failed earlier async save (`CheckpointError`) as soon as it is known.

    Collective: every process calls it with its shards of `state` and its own
    `data_state` (gathered so that each process gets its own back on restore).
    """
    self._check_errors()
    # The interval is decided here, not by orbax, whose policy also saves the first step
    # it sees (an expensive and useless save right after a start or resume).
    if not force and step % self.save_interval_steps:
      return False
    # A final forced save often lands on a step the interval already saved.
    if step in self._manager.all_steps():
      return False
    _check_json("data_state", data_state)
    _check_json("meta", meta)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"process_states": gather_per_process(data_state)}),
        meta=ocp.args.JsonSave({_INTEGRITY: fingerprints(state), "meta": meta}),
    )
    if self._pending is not None:  # Orbax would wait for it anyway; errors name its step.
      self.wait()
    self._pending = int(step)
    try:
      saved = bool(self._manager.save(int(step), args=args, force=True))
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from None
    if not self._async:
      self._pending = None
    return saved

  def _check_errors(self) -> None:
    """Raises the error of a finished async save, if any."""
    if self._pending is None or self._manager.is_saving_in_progress():
      return
    try:
      # Finished: this returns at once, raising what the commit thread hit.
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from None
    self._pending = None

  def _save_error(self, error: BaseException) -> CheckpointError:
    """One-line CheckpointError for a failed save of step `self._pending`."""
    self._failed = True
    cause = error
    while cause is not None and not isinstance(cause, OSError):
      cause = cause.__cause__ or cause.__context__
    try:
      free = f"{shutil.disk_usage(self.directory).free / 2**30:.2f} GiB free"
    except OSError:
      free = "free space unknown"
    # From disk: orbax's own list may already have dropped the step `keep` would prune.
    intact = [int(n) for n in os.listdir(self.directory)
              if n.isdigit() and int(n) != self._pending]
    previous = (f"step {max(intact)} is the newest intact checkpoint; rerun the same command "
                "to resume from it" if intact else "there is no earlier checkpoint")
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
      return CheckpointError(
          f"saving checkpoint step {self._pending} to {self.directory} failed: no space left "
          f"on the device ({free}). Free space (or lower checkpoint.keep); {previous}.")
    what = str(cause if cause is not None else error).strip().splitlines() or [""]
    return CheckpointError(
        f"saving checkpoint step {self._pending} to {self.directory} failed: "
        f"{type(cause or error).__name__}: {what[0][:300]} ({free}); {previous}.")

  def latest_step(self) -> int | None:
    """Newest fully written step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Fully written steps, ascending."""
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None = None, abstract_state: Any = None
              ) -> tuple[Any, Any, Any]:
    """Returns (state, data_state, meta) of `step` (default: the latest).

    `data_state` is this process's own; restoring with another number of processes
    than saved is an error for it (the data shards differ), unless it was None.

    `abstract_state`: a pytree like the saved state whose leaves are
    `jax.ShapeDtypeStruct`s (with `sharding` to place the restored arrays) or arrays
    (their shape/dtype/sharding are used). It fixes the tree structure (e.g. optax
    namedtuples) and the placement; without it orbax rebuilds plain containers and uses
    the saved shardings. With several devices or processes give every array leaf a
    `sharding` (orbax refuses to guess across a changed topology).

    Raises CheckpointError when the arrays differ from their fingerprints at save time.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}: nothing to restore")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"step={step} not in {self.directory} (available: {self.all_steps()})")
    out = self._restore_items(step, abstract_state)
    bad = self._mismatched(out)
    if bad:
      raise CheckpointError(f"{self.directory}/{step} is damaged: {bad}")
    return out["state"], self._own_data_state(out["data"], step), out["meta"]

  def _restore_items(self, step: int, abstract_state: Any) -> dict:
    """The raw items of `step` (this process's reads only; no collective)."""
    # Orbax may restore without these (depending on the target) but a step lacking them
    # was not written whole: treat it as damaged either way.
    for name in _REQUIRED:
      if not os.path.exists(os.path.join(self.directory, str(step), name)):
        raise FileNotFoundError(f"{name} is missing")
    target = None if abstract_state is None else _as_abstract(abstract_state)
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    )
    out = dict(self._manager.restore(int(step), args=args))
    saved = out["meta"]
    if isinstance(saved, dict) and _INTEGRITY in saved:
      out["meta"], out["sums"] = saved["meta"], saved[_INTEGRITY]
    return out  # Steps saved before fingerprints existed have no "sums".

  def _mismatched(self, out: dict) -> str:
    """'' when the restored arrays match their saved fingerprints, else what differs
    (collective: every process gets the same answer)."""
    if "sums" not in out:
      return ""
    got = fingerprints(out["state"])
    # Restored without a target, containers may differ (e.g. namedtuples): check the
    # paths both trees share.
    bad = sorted(k for k, v in out["sums"].items() if k in got and got[k] != v)
    return (f"{len(bad)} array(s) differ from their checksum at save time, e.g. {bad[0]}"
            if bad else "")

  def restore_latest_intact(self, abstract_state: Any = None
                            ) -> tuple[int, Any, Any, Any] | None:
    """(step, state, data_state, meta) of the newest step that restores and matches its
    fingerprints; None when there is no step at all.

    Newer steps that fail while an older one restores are damaged: each is moved aside to
    `<directory>/damaged-<step>-<time>/` (kept for inspection, never deleted) with a
    one-line warning. When no step restores, nothing is moved and CheckpointError names
    the newest step, its error and the way out. Collective: every process restores the
    same step (a step fails if it fails on any process).
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        out, error = self._restore_items(step, abstract_state), ""
      except Exception as e:  # pylint: disable=broad-except  # Any damage: try older.
        out, error = None, _first_line(e)
      errors = [x for x in gather_per_process(error) if x]
      if not errors:
        errors = [x for x in [self._mismatched(out)] if x]
      if errors:
        failures.append((step, errors[0]))
        continue
      for bad, why in failures:
        self._move_aside(bad, why)
      return step, out["state"], self._own_data_state(out["data"], step), out["meta"]
    if not failures:
      return None
    newest, why = failures[0]
    raise CheckpointError(
        f"no checkpoint in {self.directory} restores (newest: step {newest}: {why}). If the "
        "config changed since they were written, rerun with the old config; if they are "
        "damaged, move them out of that directory (or restore them from a backup) to train "
        "the stage from scratch.")

  def _move_aside(self, step: int, why: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = os.path.join(self.directory, f"damaged-{step}-{stamp}")
    if _is_primary():
      os.rename(os.path.join(self.directory, str(step)), dest)
      print(f"warning: checkpoint step {step} is damaged ({why}); moved to {dest}, falling "
            "back to the previous one.", flush=True)
    sync(f"cdx_damaged_{step}")
    self._manager.reload()

  def _own_data_state(self, saved: Mapping[str, Any], step: int) -> Any:
    states = saved["process_states"]
    if all(x is None for x in states):
      return None
    if len(states) != jax.process_count():
      raise ValueError(
          f"step {step} in {self.directory} holds data iterator states of {len(states)} "
          f"processes but {jax.process_count()} are running; restart the data pipeline "
          "from scratch or run with the saved number of processes")
    return states[jax.process_index()]

  def wait(self) -> None:
    """Blocks until pending async saves are written and committed (CheckpointError if
    one failed)."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from None
    self._check_errors()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources. A failure already
    reported by `save`/`wait` is not raised again."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise

  def __enter__(self) -> "StageCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------- standalone params


def save_params(path: str | os.PathLike, params: Any, overwrite: bool = False) -> None:
  """Writes a param pytree to the new directory `path` (atomically; collective).

  An existing `path` is an error unless `overwrite` (which first deletes it, so only the
  new tree's write, not the replacement, is atomic).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"path={path} already exists; pass overwrite=True to replace it")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=overwrite)
    ckptr.wait_until_finished()


def load_params(path: str | os.PathLike, abstract: Any = None) -> Any:
  """Reads a param pytree written by `save_params`.

  `abstract`: like `StageCheckpointer.restore`'s `abstract_state` (shapes, dtypes and
  shardings to restore into); None restores as saved.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no param checkpoint at path={path}")
  target = None if abstract is None else _as_abstract(abstract)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


# ------------------------------------------------------------------ stage markers


def write_manifest(stage_dir: str | os.PathLike, info: Mapping[str, Any]) -> None:
  """Records where the stage's frozen inputs come from (paths, upstream stage + step).

  Frozen weights are referenced by path here rather than copied into checkpoints.
  """
  if _is_primary():
    write_json_atomic(os.path.join(os.fspath(stage_dir), MANIFEST_FILE), dict(info))
  sync("cdx_write_manifest")


def read_manifest(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The stage's manifest, or None when it has none yet."""
  path = os.path.join(os.fspath(stage_dir), MANIFEST_FILE)
  return _read_json(path) if os.path.exists(path) else None


def mark_done(stage_dir: str | os.PathLike, info: Mapping[str, Any] | None = None) -> None:
  """Marks the stage finished; call it last, after every output is written."""
  if _is_primary():
    write_json_atomic(os.path.join(os.fspath(stage_dir), DONE_FILE), dict(info or {}))
  sync("cdx_mark_done")


def read_done(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The info given to `mark_done`, or None when the stage is not finished."""
  path = os.path.join(os.fspath(stage_dir), DONE_FILE)
  return _read_json(path) if os.path.exists(path) else None


def is_done(stage_dir: str | os.PathLike) -> bool:
  """Whether `mark_done` completed for this stage."""
  return os.path.isfile(os.path.join(os.fspath(stage_dir), DONE_FILE))


# ------------------------------------------------------------------- stage model output

MODEL_FILE = "model.json"
FINAL_DIR = "final"


def save_model(stage_dir: str | os.PathLike, params: Any, info: Mapping[str, Any]) -> str:
  """A finished stage's model: params under `final/`, `info` (its architecture config and
  provenance, JSON) as `model.json`. Collective; returns the params path."""
  final = os.path.join(stage_dir, FINAL_DIR)
  save_params(final, params, overwrite=True)
  _check_json("model info", info)
  if _is_primary():
    write_json_atomic(os.path.join(stage_dir, MODEL_FILE), info)
  return final


def read_model_info(stage_dir: str | os.PathLike) -> dict:
  """`model.json` of a finished stage (cheap: no weights are read)."""
  path = os.path.join(stage_dir, MODEL_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{stage_dir} holds no {MODEL_FILE}: not a finished cdx stage.")
  return _read_json(path)


def load_model(stage_dir: str | os.PathLike, abstract: Any = None) -> tuple[Any, dict]:
  """(params, info) written by `save_model`."""
  info = read_model_info(stage_dir)
  return load_params(os.path.join(stage_dir, FINAL_DIR), abstract), info
