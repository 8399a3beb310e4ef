"""The DFT step compiled for a TPU topology on a machine without a TPU (`bench.py compile`).

  python launch/bench.py compile --preset paper --topology v5e:2x4 --mesh fsdp=8 \
      [--batch 16] [--micro-batches 8] [--seq 1536] [--formulation cdx|official] [--json]

libtpu (an optional extra: requirements-tpu.txt) compiles for a topology it is only told
about: `jax.experimental.topologies.get_topology_desc` gives compile-only devices, the step
is built abstractly (`bench.build(..., abstract=True)`: ShapeDtypeStructs, no weights),
jitted with the train step's own shardings on a mesh of those devices
(`step.jit_train_step`) and compiled. Reported per chip: HBM (XLA's memory_analysis,
argument + output + temp - alias, summed over the chip's devices) against the chip's HBM,
and model FLOPs per token with the MFU formula

  MFU = model FLOPs per token x tokens/s / (chips x peak bf16 FLOP/s per chip).

Model FLOPs are counted from the models' shapes (`model_flops_per_token`), not from XLA's
cost_analysis: that counts a while-loop body once, and the paper step scans its layers
(the raw number is kept in the JSON as `xla_flops_per_device`). Without a TPU there is no
measured tokens/s; the table gives the tokens/s per chip that MFU 1 would mean and MFU for a
tokens/s given with --tokens-per-s.

`--batch` is rows per data-parallel shard (device along data x fsdp) per optimizer step:
the paper's global 128 over 8 devices is 16; `--micro-batches` splits them (gradient
accumulation in the step, `step.make_train_step`), so one pass holds batch/micro rows.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from cdx import parallel
from cdx import paths as paths_lib
from cdx.models import mllm
from cdx.train import step as step_lib

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip specs of a TPU generation (docs/PERFORMANCE.md §7 cites them)."""
  peak_bf16_flops: float  # FLOP/s, dense bf16
  hbm_bytes: int


# Keyed by the topology name's prefix, as libtpu accepts it ("v5e:2x4").
CHIPS = {
    "v4": Chip(275e12, 32 * GiB),
    "v5e": Chip(197e12, 16 * GiB),
    "v5p": Chip(459e12, 95 * GiB),
    "v6e": Chip(918e12, 32 * GiB),
}


def chip_of(topology: str) -> Chip:
  gen = topology.split(":")[0]
  if gen not in CHIPS:
    raise ValueError(f"--topology={topology!r}: use <generation>:<shape> with generation "
                     f"one of {sorted(CHIPS)}, e.g. v5e:2x4 or v5p:2x2x1.")
  return CHIPS[gen]


def parse_mesh(spec: str) -> dict:
  """"fsdp=4,tensor=2" -> {"data": 1, "fsdp": 4, "tensor": 2} (unnamed axes are 1)."""
  sizes = dict.fromkeys(parallel.AXES, 1)
  for item in filter(None, spec.split(",")):
    name, _, size = item.partition("=")
    if name not in sizes or not size.isdigit() or int(size) < 1:
      raise ValueError(f"--mesh={spec!r}: use a comma list of axis=size with axes "
                       f"{parallel.AXES}, e.g. fsdp=4,tensor=2.")
    sizes[name] = int(size)
  return sizes


# ------------------------------------------------------------------- report arithmetic

def hbm_bytes(memory: dict) -> int:
  """Bytes one device holds while the step runs: argument + output + temp - alias."""
  return memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]


def mfu(flops_per_token: float, tokens_per_s: float, chips: int, peak: float) -> float:
  """Model FLOPs utilization: achieved model FLOP/s over the chips' peak."""
  return flops_per_token * tokens_per_s / (chips * peak)


def tokens_per_s_at(utilization: float, flops_per_token: float, chips: int,
                    peak: float) -> float:
  """Tokens/s that `utilization` (MFU) means: the inverse of `mfu`."""
  return utilization * chips * peak / flops_per_token


def _kernel_size(tree) -> int:
  """Multiply-adds per row of all `kernel` leaves (stacked layers included)."""
  total = 0
  for kp, x in jax.tree_util.tree_leaves_with_path(tree):
    if str(getattr(kp[-1], "key", "")) == "kernel":
      total += x.size
  return total


def model_flops_per_token(student_cfg: mllm.MllmConfig, teacher_cfg: mllm.MllmConfig,
                          params: dict, lora: dict, teacher: dict, seq: int) -> dict:
  """Model FLOPs of one DFT step per sequence token (no rematerialization counted).

  Per token, 2 FLOPs per multiply-add; an LLM forward is 2 x its linear kernels (LM head
  included, embeddings are gathers) + 4 x layers x heads x head_dim x seq of attention
  (scores and values, the usual count without a causal discount). The student also runs
  the backward: its frozen linears need only input gradients (1 x forward), attention 2 x,
  LoRA factors and the post-connector 2 x (input and weight gradients). The teacher runs
  forward only. The (frozen) vision tower and adapter run once per image, spread over the
  seq tokens of its row. `params` is the student tree (vision, adapter, post, llm).
  """
  def llm_forward(cfg, llm):
    t = cfg.text
    return 2 * _kernel_size(llm) + 4 * t.num_layers * t.num_heads * t.head_dim * seq

  nv = mllm.num_visual_tokens(student_cfg)
  v = student_cfg.vision
  student_attn = 4 * student_cfg.text.num_layers * student_cfg.text.num_heads * \
      student_cfg.text.head_dim * seq
  student = llm_forward(student_cfg, params["llm"])
  student = 2 * student + student_attn  # Forward, input grads, attention's 2x backward.
  lora_fl = 3 * 2 * _kernel_size_factors(lora)
  post = 3 * 2 * _kernel_size(params.get("post", {})) * nv / seq
  patches = v.num_patches
  vision = (2 * _kernel_size(params["vision"]) * patches
            + 4 * _num_layers(params["vision"]) * v.hidden_size * patches**2) / seq
  adapter = 2 * _kernel_size(params["adapter"]) * nv / seq
  teacher_fl = llm_forward(teacher_cfg, teacher["llm"])
  parts = {"student": student, "lora": lora_fl, "post_connector": post,
           "teacher": teacher_fl, "vision_adapter": vision + adapter}
  parts["total"] = sum(parts.values())
  return parts


def _kernel_size_factors(lora: dict) -> int:
  """Multiply-adds per row of all LoRA factors (`.../kernel/a`, `.../kernel/b`)."""
  return sum(x.size for x in jax.tree_util.tree_leaves(lora))


def _num_layers(vision: dict) -> int:
  """Vision layers the step runs: the stacked leading dim (or the count of unrolled ones)."""
  layers = vision.get("layers")
  if layers is not None:
    return jax.tree_util.tree_leaves(layers)[0].shape[0]
  return sum(1 for k in vision if k.startswith("layers_"))


# ----------------------------------------------------------------------------- compile

def topology_devices(topology: str):
  """Compile-only devices of a TPU topology (libtpu needed, no TPU)."""
  # Another process (any jax started without JAX_PLATFORMS=cpu) may hold libtpu's
  # lockfile; compiling needs no exclusive use of a chip.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except RuntimeError as e:
    raise SystemExit(f"--topology={topology!r}: {e} (compiling for TPU needs libtpu: "
                     "pip install -r requirements-tpu.txt).") from None


def topology_mesh(sizes: dict, devices) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh of `sizes` over a topology's devices.

  The compile-only v4 topology lists each of a chip's two TensorCores as a device, and
  jax's physical mesh builder refuses that ("requires one device per chip"). There the
  devices are laid out by (chip coords, core): a chip's two cores are neighbours on the
  innermost mesh axis of size > 1."""
  if len({tuple(d.coords) for d in devices}) == len(devices):
    return parallel.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
  shape = tuple(sizes[a] for a in parallel.AXES)
  if math.prod(shape) != len(devices):
    raise ValueError(f"--mesh data*fsdp*tensor = {math.prod(shape)} does not equal the "
                     f"topology's {len(devices)} devices (one per TensorCore here).")
  ordered = sorted(devices, key=lambda d: (tuple(d.coords), d.core_on_chip))
  return Mesh(np.array(ordered).reshape(shape), parallel.AXES,
              axis_types=(AxisType.Auto,) * len(shape))


def compile_step(build, preset: str, topology: str, mesh_spec: str, batch: int,
                 micro_batches: int, seq: int | None, formulation: str,
                 models=None) -> dict:
  """Compiles the DFT step of `preset` for `topology`; one report row (dict).

  `build` is `launch/bench.py`'s (abstract models of a preset; `models` replaces them)."""
  chip = chip_of(topology)
  devices = topology_devices(topology)
  sizes = parse_mesh(mesh_spec)
  mesh = topology_mesh(sizes, devices)
  shards = sizes["data"] * sizes["fsdp"]
  if batch % micro_batches:
    raise ValueError(f"--batch={batch} is not divisible by --micro-batches={micro_batches}.")
  b = build(preset, seq, batch * shards, abstract=True, models=models)
  seq = b.batch["input_ids"].shape[1]
  train_step = step_lib.make_train_step(b.loss_fn(formulation), b.tx, b.schedule,
                                        micro_batches)
  fn, _ = step_lib.jit_train_step(train_step, mesh, b.state, b.frozen, b.teacher)
  params = paths_lib.merge(b.state["params"], b.frozen)
  flops = model_flops_per_token(b.student_cfg, b.teacher_cfg, params, b.state["lora"],
                                b.teacher, seq)
  chips = len({tuple(d.coords) for d in devices})
  t0 = time.time()
  try:
    compiled = fn.lower(*b.args()).compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program whose buffers exceed the chip's HBM.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled, error = None, str(e).splitlines()[0]
  compile_s = time.time() - t0
  memory, per_chip, cost = None, None, None
  if compiled is not None:
    m = compiled.memory_analysis()
    memory = {k: int(getattr(m, f"{k}_size_in_bytes"))
              for k in ("argument", "output", "temp", "alias")}
    per_chip = hbm_bytes(memory) * len(devices) // chips
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    error = None
  return {
      "preset": preset, "topology": topology, "device_kind": devices[0].device_kind,
      "devices": len(devices), "chips": chips, "mesh": sizes, "formulation": formulation,
      "seq": seq, "batch_per_shard": batch, "micro_batches": micro_batches,
      "global_batch": batch * shards, "tokens_per_step": batch * shards * seq,
      "memory_per_device": memory, "hbm_per_chip": per_chip,
      "chip_hbm": chip.hbm_bytes,
      "fits": per_chip is not None and per_chip <= chip.hbm_bytes, "error": error,
      "model_flops_per_token": flops, "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
      "tokens_per_s_per_chip_at_mfu_1": tokens_per_s_at(1.0, flops["total"], 1,
                                                        chip.peak_bf16_flops),
      "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
      "compile_s": round(compile_s, 1),
  }


def print_table(rows: list[dict], tokens_per_s: float | None = None) -> None:
  print(f"\n{'topology':10} {'chips':>5} {'mesh (d,f,t)':>12} {'form':8} {'B/shard':>7} "
        f"{'micro':>5} {'HBM/chip GiB':>12} {'of':>4} {'fits':>4} {'GFLOP/tok':>9} "
        f"{'tok/s/chip@MFU1':>15}" + ("  MFU" if tokens_per_s else ""))
  for r in rows:
    mesh = ",".join(str(r["mesh"][a]) for a in parallel.AXES)
    line = (f"{r['topology']:10} {r['chips']:5d} {mesh:>12} {r['formulation']:8} "
            f"{r['batch_per_shard']:7d} {r['micro_batches']:5d} "
            f"{r['hbm_per_chip'] / GiB if r['hbm_per_chip'] else float('nan'):12.2f} "
            f"{r['chip_hbm'] / GiB:4.0f} "
            f"{'yes' if r['fits'] else 'NO':>4} "
            f"{r['model_flops_per_token']['total'] / 1e9:9.2f} "
            f"{r['tokens_per_s_per_chip_at_mfu_1']:15.0f}")
    if tokens_per_s:
      line += f"  {mfu(r['model_flops_per_token']['total'], tokens_per_s, r['chips'], r['peak_bf16_flops_per_chip']):.3f}"
    print(line + (f"\n{'':10} {r['error']}" if r["error"] else ""))


def cmd_compile(a, build) -> list[dict]:
  """`bench.py compile`: one row per (topology, mesh, formulation) of the comma lists."""
  rows = []
  for topology in a.topology.split(","):
    for mesh_spec in a.mesh.split(";"):
      for form in a.formulation.split(","):
        row = compile_step(build, a.preset, topology, mesh_spec, a.batch, a.micro_batches,
                           a.seq, form)
        print(f"  [{topology} {mesh_spec} {form}] compiled in {row['compile_s']} s: "
              f"{row['error'] or row['memory_per_device']}", flush=True)
        rows.append(row)
  print_table(rows, a.tokens_per_s)
  return rows


def add_parser(sub) -> None:
  c = sub.add_parser("compile", help="compile the DFT step for a TPU topology (libtpu)")
  c.add_argument("--preset", default="paper", choices=("tiny", "mid", "paper"))
  c.add_argument("--topology", default="v5e:2x4",
                 help="comma list of libtpu topology names, e.g. v4:2x2x1,v5e:2x4,v6e:2x4")
  c.add_argument("--mesh", default="fsdp=8",
                 help="axis=size list, e.g. fsdp=4,tensor=2; several meshes split by ';'")
  c.add_argument("--batch", type=int, default=16,
                 help="rows per data*fsdp shard per optimizer step (paper: 128 / 8 = 16)")
  c.add_argument("--micro-batches", type=int, default=8)
  c.add_argument("--seq", type=int, default=None)
  c.add_argument("--formulation", default="cdx", help="comma list of cdx, official")
  c.add_argument("--tokens-per-s", type=float, default=None,
                 help="a measured global tokens/s: the table adds its MFU")
  c.add_argument("--json", action="store_true", help="print the rows as JSON")
