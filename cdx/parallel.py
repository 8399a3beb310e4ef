"""Device mesh, param/batch shardings from logical axes, and multi-host start-up.

Mesh: three axes ("data", "fsdp", "tensor") with Auto axis types, built over all
`jax.devices()` (every process's). Batch rows split over ("data", "fsdp"); params are
sharded by *logical* axes, MaxText style, in two tables:

  logical_axes = ordered (path regex, logical axis per dim), first fullmatch wins; each
                 model file declares its own beside its variants (e.g. cdx/models/qwen.py
                 LOGICAL_AXES: (r"layers(_\\d+)?/mlp/(gate|up)/kernel", ("embed", "mlp"))),
                 cdx/models/mllm.py composes them for the whole tree
  axis_map     = logical axis -> mesh axis / tuple of mesh axes / None: `DEFAULT_AXIS_MAP`,
                 overridden by the config's `mesh.axis_map` (docs/CONFIG.md)

`param_shardings` turns a param tree (arrays or ShapeDtypeStructs) into a tree of
NamedSharding. Rules match below any prefix ("params/", "opt/.../mu/" of a train state).
A dim whose size does not divide by its mesh axes' size, or whose mesh axis is already used
by an earlier dim, is replicated instead (logged, never an error); leaves no rule matches
are replicated. LoRA factors follow their kernel: ``.../kernel/a [in, r]`` shards like the
kernel's input dim, ``.../kernel/b [r, out]`` like its output dim (logical axis "lora" for
r). In a scanned stack (`.../layers/...`, leaves [num_layers, ...]) the same rules apply to
the trailing dims and the leading dim gets the logical axis "layers".

Multi-host: `initialize()` calls `jax.distributed.initialize` when the environment names
several processes (CDX_COORDINATOR/CDX_NUM_PROCESSES/CDX_PROCESS_ID, SLURM with more than
one task, or a multi-host TPU slice) and is a no-op otherwise. Each process loads the rows
`process_batch_slice(global_batch, mesh)` of the global batch and `global_batch_array`
assembles the global jax.Array from them. The same rules shard a whole train state: Adam's
mu/nu have their param's path as a suffix, so they shard like it.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cdx import paths

PyTree = Any
AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes; the config's `mesh.axis_map` replaces it (docs/CONFIG.md).
DEFAULT_AXIS_MAP: dict[str, Any] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "lora": None,
    "norm": None,
    "layers": None,  # the layer axis of a scanned stack: every device holds all layers
}

_LORA_FACTOR = re.compile(r"(.*/kernel)/(a|b)")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh ("data", "fsdp", "tensor") over `devices` (default: all); one size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, tensor]
  for name, size in zip(AXES, shape):
    if size == 0 or size < -1:
      raise ValueError(f"mesh axis {name}={size} must be a positive size or -1 (fill).")
  if shape.count(-1) > 1:
    raise ValueError(f"only one mesh axis may be -1 (fill), got data={data}, fsdp={fsdp}, "
                     f"tensor={tensor}.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"cannot fill mesh axis: {len(devices)} devices are not divisible "
                       f"by the other axes' product {known} (data={data}, fsdp={fsdp}, "
                       f"tensor={tensor}).")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {math.prod(shape)} "
                     f"does not equal the device count {len(devices)}.")
  return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def check_axis_map(axis_map: Mapping[str, Any]) -> dict[str, Any]:
  """`axis_map` as a dict of logical axis -> None / mesh axis / tuple of mesh axes;
  ValueError naming the entry when a value is none of these. Command-line overrides of
  a str field stay strings, so the string "none" means None and "fsdp,tensor" a tuple."""
  out = {}
  for name, mapped in dict(axis_map).items():
    if isinstance(mapped, str) and mapped.lower() == "none":
      mapped = None
    elif isinstance(mapped, str) and "," in mapped:
      mapped = tuple(a.strip() for a in mapped.split(","))
    axes = () if mapped is None else (mapped,) if isinstance(mapped, str) else mapped
    if not isinstance(axes, (tuple, list)) or any(a not in AXES for a in axes):
      raise ValueError(f"mesh.axis_map.{name}={mapped!r}: use None, one of {AXES} or a "
                       "tuple of them.")
    out[name] = mapped if mapped is None or isinstance(mapped, str) else tuple(mapped)
  return out


def _mesh_axes(logical: Any, axis_map: Mapping[str, Any]) -> tuple[str, ...]:
  if logical is None:
    return ()
  if logical not in axis_map:
    raise ValueError(f"logical axis {logical!r} is not in the axis map {sorted(axis_map)}.")
  mapped = axis_map[logical]
  if mapped is None:
    return ()
  return (mapped,) if isinstance(mapped, str) else tuple(mapped)


def logical_to_spec(path: str, shape: Sequence[int], logical: Sequence[Any] | None,
                    mesh: Mesh, axis_map: Mapping[str, Any] = DEFAULT_AXIS_MAP
                    ) -> PartitionSpec:
  """PartitionSpec for one array; non-divisible or repeated mesh axes fall back to None."""
  if logical is None:
    return PartitionSpec()
  if len(logical) != len(shape):
    raise ValueError(f"sharding rule for {path!r} names {len(logical)} logical axes "
                     f"{tuple(logical)} but the array has shape {tuple(shape)}.")
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, logical):
    axes = tuple(a for a in _mesh_axes(name, axis_map) if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and (dim % size or used & set(axes)):
      logging.info("sharding: %s dim %d (%s) not sharded over %s (size %d); replicated.",
                   path, dim, name, axes, size)
      axes = ()
    used |= set(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _logical(path: str, rules: Sequence[tuple[str, Any]]) -> tuple | None:
  """Logical axes of the leaf at `path` (below any prefix), None when replicated."""
  hit = paths.first_match(path, rules)
  if hit is not None:
    return None if hit[1] is None else tuple(hit[1])
  factor = _LORA_FACTOR.fullmatch(path)
  if factor:  # A LoRA factor: one of its kernel's dims, and the rank.
    kernel = _logical(factor[1], rules)
    if kernel is not None and len(kernel) == 2:
      return (kernel[0], "lora") if factor[2] == "a" else ("lora", kernel[1])
  return None


def param_specs(tree: PyTree, mesh: Mesh, logical_axes: Sequence[tuple[str, Any]],
                axis_map: Mapping[str, Any] = DEFAULT_AXIS_MAP) -> PyTree:
  """Tree of PartitionSpec for a tree of arrays / ShapeDtypeStructs."""
  rules = [(f"(?:.*/)?(?:{regex})", axes) for regex, axes in logical_axes]

  def spec(kp, x):
    path = paths.path_str(kp)
    logical = _logical(path, rules)
    if logical is not None and paths.is_stacked(path):  # A scanned stack's layer axis.
      logical = ("layers",) + logical
    return logical_to_spec(path, x.shape, logical, mesh, axis_map)

  return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(tree: PyTree, mesh: Mesh, logical_axes: Sequence[tuple[str, Any]],
                    axis_map: Mapping[str, Any] = DEFAULT_AXIS_MAP) -> PyTree:
  """Tree of NamedSharding mirroring `tree` (see module docstring)."""
  specs = param_specs(tree, mesh, logical_axes, axis_map)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(state: PyTree, param_sh: PyTree, mesh: Mesh) -> PyTree:
  """Shardings for an optimizer state: subtrees shaped like the params (Adam's mu/nu)
  reuse `param_sh`; everything else (step counts, flags) is replicated."""
  pdef = jax.tree_util.tree_structure(param_sh)
  like_params = lambda x: jax.tree_util.tree_structure(x) == pdef
  return jax.tree_util.tree_map(
      lambda x: param_sh if like_params(x) else replicated(mesh), state, is_leaf=like_params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim over ("data", "fsdp"); other dims replicated. Any rank >= 1."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shard_tree(tree: PyTree, shardings: PyTree) -> PyTree:
  """Places a host (or single-process device) tree onto its shardings.

  Multi-process, every process passes the same full values and keeps the shards its
  devices hold (device_put refuses shardings with devices of other processes).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # Shard the key bits.
      return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding),
                                      impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map(put, tree, shardings)


# ------------------------------------------------------------------------ multi-host

def _env_process_setup() -> dict[str, Any] | None:
  """kwargs for jax.distributed.initialize, or None when this is a single process."""
  env = os.environ
  explicit = [k for k in ("CDX_COORDINATOR", "CDX_NUM_PROCESSES", "CDX_PROCESS_ID") if k in env]
  if explicit:
    if len(explicit) != 3:
      raise ValueError(f"set all of CDX_COORDINATOR, CDX_NUM_PROCESSES, CDX_PROCESS_ID "
                       f"(only {explicit} are set).")
    n = int(env["CDX_NUM_PROCESSES"])
    if n <= 1:
      return None
    return dict(coordinator_address=env["CDX_COORDINATOR"], num_processes=n,
                process_id=int(env["CDX_PROCESS_ID"]))
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
    return {}  # jax's SLURM cluster detection fills everything in
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return {}  # multi-host TPU slice: auto-detected
  return None


def initialize(cpu_collectives: str | None = None) -> bool:
  """Starts jax.distributed when the environment names several processes.

  Must run before anything touches JAX devices. `cpu_collectives` (e.g. "gloo") sets
  `jax_cpu_collectives_implementation`, needed for cross-process collectives on CPU.
  Returns True when a multi-process runtime is (now) initialized.
  """
  if jax.distributed.is_initialized():
    return True
  setup = _env_process_setup()
  if setup is None:
    return False
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(**setup)
  return True


def process_batch_slice(global_batch: int, mesh: Mesh | None = None) -> slice:
  """This process's rows of a global batch.

  With a mesh: the rows that `batch_sharding(mesh)` places on this process's devices
  (correct even when a process's devices hold replicated rows, e.g. tensor parallelism
  across hosts). Without: an even contiguous split in process order.
  """
  if mesh is not None:
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if global_batch % shards:
      raise ValueError(f"global batch {global_batch} is not divisible by the mesh's batch "
                       f"shards data*fsdp = {shards}.")
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                   for idx in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    if covered != stop - start:
      raise ValueError(f"this process's batch rows {rows} are not one contiguous block; "
                       "build the mesh with make_mesh (devices ordered by process).")
    return slice(start, stop)
  n, i = jax.process_count(), jax.process_index()
  if global_batch % n:
    raise ValueError(f"global batch {global_batch} is not divisible by the process count {n}.")
  per = global_batch // n
  return slice(i * per, (i + 1) * per)


def global_batch_array(local: PyTree, mesh: Mesh, global_batch: int) -> PyTree:
  """Assembles per-process rows (`process_batch_slice(global_batch, mesh)`) into global
  arrays sharded by `batch_sharding(mesh)`; single-process it is a plain device_put."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(x), (global_batch,) + np.shape(x)[1:]), local)
