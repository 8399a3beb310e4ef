"""Memory and speed evidence for the cdx train step vs the official formulation.

  python launch/bench.py memory --preset paper [--seq 1536[,1024,...]] [--batch 1]
                                [--compute-dtype float32] [--formulations cdx]
                                [--scan-layers config|on|off] [--out F]
  python launch/bench.py step   --preset tiny|mid [--seq L] [--batch B] [--steps N] [--out F]
  python launch/bench.py loader [--batches N] [--workdir DIR] [--out F]
  python launch/bench.py compile --preset paper --topology v5e:2x4 --mesh fsdp=8 [--json]
                                (launch/tpu_compile.py: the step compiled for a TPU topology)

`memory` builds the DFT step abstractly (jax.eval_shape: no weights, ShapeDtypeStruct inputs
only), lowers and compiles it for this backend and prints XLA's `memory_analysis()` for the
cdx formulation (`cdx.distill.objective.compute_loss`) and the official one
(`cdx.distill.reference.compute_loss`): argument, output, temp and total bytes, and the ratio.
`--compute-dtype` overrides the preset's compute dtype (teacher weights follow it);
`--formulations` compiles only the named ones (no ratio without both); `--scan-layers`
sets the decoder layout (qwen.Decoder `scan_layers`) of both, default the preset's.
`step` times the real compiled step of both formulations in one process, same inputs.
`loader` measures samples/s of the tiny data pipeline (synthetic world) against the tiny
step's samples/s, to tell whether training is input-bound. Each prints a table and, with
--out, writes the rows as JSON.

Presets (the DFT stage: LoRA + post-connector, LM + KD + attention, TAF student):
  tiny   configs/common.py tiny models (f32, no remat), L 192, B 16
  mid    a CPU-timeable middle size (below), f32, no remat, L 1024, B 2
  paper  SigLIP so400m + Qwen1.5-1.8B student (LoRA r128) + Qwen1.5-4B teacher, bf16
         compute, remat as configs/common.py says, L 1536, B 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import dft  # noqa: E402
from cdx.data import tokenizer as tokenizer_lib  # noqa: E402
from cdx.distill import losses  # noqa: E402
from cdx.distill import objective as objective_lib  # noqa: E402
from cdx.distill import reference  # noqa: E402
from cdx.models import mllm  # noqa: E402
from cdx.train import setup as setup_lib  # noqa: E402
from cdx.train import step as step_lib  # noqa: E402
from launch import tpu_compile  # noqa: E402

# The loss of each formulation (same value, different memory layout).
LOSSES = {"cdx": objective_lib.compute_loss, "official": reference.compute_loss}
FORMULATIONS = tuple(LOSSES)
GiB = 2**30

# mid: 4x the tiny widths, deeper teacher, 255 visual tokens, an 8k vocab.
MID_VISION = dict(image_size=128, patch_size=8, hidden_size=128, num_layers=2, num_heads=4,
                  mlp_dim=256)
MID_TEACHER = dict(vocab_size=8192, hidden_size=256, num_layers=12, num_heads=8,
                   num_kv_heads=8, head_dim=32, mlp_dim=512, rope_theta=10000.0,
                   tie_embeddings=False)
MID_STUDENT = dict(vocab_size=8192, hidden_size=128, num_layers=8, num_heads=4,
                   num_kv_heads=2, head_dim=32, mlp_dim=256, rope_theta=10000.0,
                   tie_embeddings=True)
DEFAULTS = {"tiny": (192, 16), "mid": (1024, 2), "paper": (1536, 1)}  # (seq, batch)


@dataclasses.dataclass
class Bench:
  """One DFT step and its inputs (arrays, or ShapeDtypeStructs when abstract)."""
  preset: str
  student_cfg: mllm.MllmConfig
  teacher_cfg: mllm.MllmConfig
  objective: objective_lib.Objective
  lora_spec: setup_lib.LoraSpec | None
  tx: Any
  schedule: Any
  state: dict
  frozen: dict
  teacher: dict
  batch: dict

  def loss_fn(self, formulation: str):
    """`loss_fn(diff, frozen, teacher, batch)` of one formulation (setup.make_loss_fn)."""
    if formulation not in LOSSES:
      raise ValueError(f"formulation={formulation!r}; use one of {FORMULATIONS}.")
    return setup_lib.make_loss_fn(self.student_cfg, self.teacher_cfg, self.objective,
                                  self.lora_spec, LOSSES[formulation])

  def step_fn(self, formulation: str):
    """The un-jitted train step of one formulation."""
    return step_lib.make_train_step(self.loss_fn(formulation), self.tx, self.schedule)

  def args(self):
    return self.state, self.frozen, self.teacher, self.batch


def stage_config(preset: str, models: tuple[dict, dict, dict] | None = None,
                 compute_dtype: str | None = None, scan_layers: bool | None = None):
  """configs/dft.py of a preset; `mid` is the tiny config with the MID_* models.

  `models` = (vision, student text, teacher text) dicts replaces the preset's models;
  `compute_dtype` the preset's compute dtype; `scan_layers` its decoder layout.
  """
  if preset not in DEFAULTS:
    raise ValueError(f"--preset={preset!r}; use one of {sorted(DEFAULTS)}.")
  cfg = dft.get_config("paper" if preset == "paper" else "tiny")
  cfg.lora.full_finetune = False  # Every preset trains the paper's way: LoRA + post.
  if preset == "mid":
    models = models or (MID_VISION, MID_STUDENT, MID_TEACHER)
  if models is not None:
    cfg.model.vision = dict(models[0])
    cfg.teacher.vision = dict(models[0])
    cfg.model.text, cfg.teacher.text = dict(models[1]), dict(models[2])
  if compute_dtype is not None:
    jnp.dtype(compute_dtype)  # A clear TypeError for a bad name.
    cfg.compute_dtype = compute_dtype
  if scan_layers is not None:
    cfg.scan_layers = scan_layers
  return cfg


def _token_ids(preset: str) -> tokenizer_lib.TokenIds:
  if preset == "paper":  # The Qwen tokenizer's ids (docs/METHOD.md §3).
    return tokenizer_lib.TokenIds(image=151646, pad=151647, eos=151643)
  return tokenizer_lib.TokenIds(image=3, pad=2, eos=1)


def _shapes(tree, dtype=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)


def _cast(tree, dtype, abstract):
  if abstract:
    return _shapes(tree, jnp.dtype(dtype))
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def make_batch(cfg: mllm.MllmConfig, batch: int, seq: int, abstract: bool = False,
               seed: int = 0) -> dict:
  """A DFT-like batch: 31 prompt tokens, the Nv image tokens, a question, then answers.

  Rows are right-padded to different lengths; the answer (last ~third of each row) is
  supervised. Token ids avoid the special ids; pixel values are N(0, 1).
  """
  nv = mllm.num_visual_tokens(cfg)
  prefix, question = 31, 16
  if seq < prefix + nv + question + 8:
    raise ValueError(f"--seq={seq} is too short for {nv} visual tokens; use at least "
                     f"{prefix + nv + question + 8}.")
  size = cfg.vision.image_size
  if abstract:
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    return dict(input_ids=spec((batch, seq), jnp.int32), labels=spec((batch, seq), jnp.int32),
                attention_mask=spec((batch, seq), jnp.int32),
                pixel_values=spec((batch, size, size, 3), jnp.float32),
                has_image=spec((batch,), jnp.bool_))
  rng = np.random.default_rng(seed)
  hi = min(cfg.text.vocab_size, 151643)
  ids = rng.integers(8, hi, (batch, seq)).astype(np.int32)
  ids[ids == cfg.image_token_id] = 8
  ids[:, prefix:prefix + nv] = cfg.image_token_id
  labels = np.full((batch, seq), losses.IGNORE, np.int32)
  mask = np.zeros((batch, seq), np.int32)
  start = prefix + nv + question
  for b in range(batch):
    length = seq - (b * (seq - start) // (2 * batch))  # Row 0 full, later rows shorter.
    mask[b, :length] = 1
    labels[b, start:length] = ids[b, start:length]
    ids[b, length:] = cfg.pad_token_id or 0
  return dict(input_ids=ids, labels=labels, attention_mask=mask,
              pixel_values=rng.standard_normal((batch, size, size, 3)).astype(np.float32),
              has_image=np.ones((batch,), bool))


def build(preset: str, seq: int | None = None, batch: int | None = None,
          abstract: bool = False, seed: int = 0,
          models: tuple[dict, dict, dict] | None = None,
          compute_dtype: str | None = None, scan_layers: bool | None = None) -> Bench:
  """The DFT step of a preset, as `setup.build` makes it, with random (or abstract) weights.

  `models`, `compute_dtype`, `scan_layers`: see `stage_config` (tests use smaller models).
  """
  cfg = stage_config(preset, models, compute_dtype, scan_layers)
  cfg.seed = seed  # LoRA factors and the state rng (setup.make_training).
  seq = seq or DEFAULTS[preset][0]
  batch = batch or DEFAULTS[preset][1]
  ids = _token_ids(preset)
  teacher_cfg = setup_lib.spec_config(cfg.teacher, cfg, ids)
  student_cfg = setup_lib.spec_config(cfg.model, cfg, ids,
                                      post_connector_in=teacher_cfg.text.hidden_size)
  # TAF: the student holds the teacher's adapter (as setup.build does).
  inherit = {k: getattr(teacher_cfg, k) for k in ("adapter_depth", "adapter_hidden")
             if hasattr(teacher_cfg, k)}
  student_cfg = dataclasses.replace(student_cfg, **inherit)

  def init(cfg_, key):
    fn = lambda: mllm.init_params(cfg_, jax.random.key(key))
    return jax.eval_shape(fn) if abstract else fn()

  params = _cast(init(student_cfg, seed + 1), cfg.param_dtype, abstract)
  teacher = init(teacher_cfg, seed + 2)
  teacher = _cast({k: v for k, v in teacher.items() if k not in ("vision", "adapter")},
                  cfg.compute_dtype, abstract)
  s_layers, groups = setup_lib.match_layers(cfg, student_cfg, teacher_cfg)
  objective = setup_lib.make_objective(cfg, s_layers, groups, with_teacher=True)
  t = setup_lib.make_training(cfg, params, total_steps=1000, abstract=abstract)
  return Bench(preset, student_cfg, teacher_cfg, objective, t.lora_spec, t.tx, t.schedule,
               t.state, t.frozen, teacher, make_batch(student_cfg, batch, seq, abstract, seed))


# ------------------------------------------------------------------------------- memory

def compiled_memory(fn, *args, donate: tuple = ()) -> dict:
  """Compiles fn for ShapeDtypeStruct (or array) args; XLA's memory analysis in bytes."""
  t0 = time.time()
  options = step_lib.compiler_options(jax.default_backend())  # As jit_train_step does.
  compiled = jax.jit(fn, donate_argnums=donate, compiler_options=options).lower(*args).compile()
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp",
                                                               "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  out["compile_s"] = round(time.time() - t0, 1)
  return out


_SCAN = {"config": None, "on": True, "off": False}


def cmd_memory(a) -> list[dict]:
  rows = []
  forms = [f for f in a.formulations.split(",") if f]
  bad = [f for f in forms if f not in FORMULATIONS]
  if bad or not forms:
    raise SystemExit(f"--formulations={a.formulations!r}; use a comma list of {FORMULATIONS}.")
  for seq in [int(s) for s in str(a.seq).split(",")]:
    b = build(a.preset, seq, a.batch, abstract=True, compute_dtype=a.compute_dtype,
              scan_layers=_SCAN[a.scan_layers])
    row = {"preset": a.preset, "seq": seq, "batch": a.batch or DEFAULTS[a.preset][1],
           "compute_dtype": b.student_cfg.dtype, "scan_layers": b.student_cfg.scan_layers,
           "nv": mllm.num_visual_tokens(b.student_cfg), "backend": jax.default_backend()}
    for form in forms:
      row[form] = compiled_memory(b.step_fn(form), *b.args(), donate=(0,))
      print(f"  [{a.preset} L={seq}] {form}: compiled in {row[form]['compile_s']} s",
            flush=True)
    if len(forms) == 2:
      row["temp_ratio"] = row["cdx"]["temp"] / row["official"]["temp"]
      row["total_ratio"] = row["cdx"]["total"] / row["official"]["total"]
    rows.append(row)
  print(f"\n{'preset':6} {'L':>5} {'B':>2} {'form':8} {'argument':>9} {'output':>9} "
        f"{'temp':>9} {'total':>9}   (GiB)")
  for r in rows:
    for form in forms:
      m = r[form]
      print(f"{r['preset']:6} {r['seq']:5d} {r['batch']:2d} {form:8} " +
            " ".join(f"{m[k] / GiB:9.3f}" for k in ("argument", "output", "temp", "total")))
    if "temp_ratio" in r:
      print(f"{'':15} cdx/official: temp {r['temp_ratio']:.3f}, "
            f"total {r['total_ratio']:.3f}")
    print(f"{'':15} compute dtype {r['compute_dtype']}, scan_layers {r['scan_layers']}")
  return rows


# --------------------------------------------------------------------------------- step

def time_step(fn, args, steps: int, warmup: int = 2) -> dict:
  """Compiles fn (state donated), runs warmup + timed steps; ms per step."""
  jitted = jax.jit(fn, donate_argnums=(0,),
                   compiler_options=step_lib.compiler_options(jax.default_backend()))
  state, rest = args[0], args[1:]
  state = jax.tree.map(jnp.copy, state)  # Donated: each formulation gets its own copy.
  t0 = time.time()
  compiled = jitted.lower(state, *rest).compile()
  compile_s = time.time() - t0
  times, loss = [], None
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, metrics = compiled(state, *rest)
    loss = float(jax.block_until_ready(metrics["loss"]))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return {"ms_median": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
          "compile_s": round(compile_s, 1), "steps": steps, "last_loss": loss}


def cmd_step(a) -> list[dict]:
  b = build(a.preset, a.seq, a.batch)
  batch, seq = b.batch["input_ids"].shape
  row = {"preset": a.preset, "seq": seq, "batch": batch, "backend": jax.default_backend(),
         "devices": jax.device_count(), "cpu_count": os.cpu_count()}
  args = (b.state, b.frozen, b.teacher, jax.device_put(b.batch))
  for form in FORMULATIONS:
    row[form] = time_step(b.step_fn(form), args, a.steps)
    row[form]["samples_s"] = batch / (row[form]["ms_median"] / 1e3)
  row["speedup"] = row["official"]["ms_median"] / row["cdx"]["ms_median"]
  print(f"\n{'preset':6} {'L':>5} {'B':>3} {'form':8} {'ms/step':>9} {'min':>9} "
        f"{'samples/s':>9} {'compile s':>9} {'loss':>8}")
  for form in FORMULATIONS:
    m = row[form]
    print(f"{a.preset:6} {seq:5d} {batch:3d} {form:8} {m['ms_median']:9.1f} "
          f"{m['ms_min']:9.1f} {m['samples_s']:9.2f} {m['compile_s']:9.1f} "
          f"{m['last_loss']:8.4f}")
  print(f"{'':16} official/cdx time: {row['speedup']:.2f}x")
  return [row]


# ------------------------------------------------------------------------------- loader

def cmd_loader(a) -> list[dict]:
  from cdx.data import pipeline as pipeline_lib  # Only the loader bench needs grain.
  from cdx.data import sources
  cfg = stage_config("tiny")
  _, ids, files, root = setup_lib.prepare_data(cfg, a.workdir)
  tokenizer, _ = tokenizer_lib.load_tokenizer(os.path.join(root, "tokenizer"))
  source = sources.LlavaSource([f for f, _ in files], image_root=root,
                               weights=[w for _, w in files], seed=cfg.seed)
  b = build("tiny")
  pipe_cfg = pipeline_lib.PipelineConfig(
      batch_size=cfg.batch_size, max_length=cfg.max_length,
      num_visual_tokens=mllm.num_visual_tokens(b.student_cfg), template=cfg.data.template,
      image_size=b.student_cfg.vision.image_size, image_mode=cfg.data.image_mode,
      seed=cfg.seed, worker_count=cfg.data.worker_count)
  data = pipeline_lib.make_pipeline(source, tokenizer, pipe_cfg, pad_id=ids.pad)
  next(data)  # First batch: thread start-up, file opening.
  t0 = time.perf_counter()
  for _ in range(a.batches):
    batch = next(data)
  loader_s = (time.perf_counter() - t0) / a.batches
  step = time_step(b.step_fn("cdx"), (b.state, b.frozen, b.teacher, jax.device_put(batch)),
                   a.steps)
  row = {"preset": "tiny", "batch": cfg.batch_size, "seq": cfg.max_length,
         "cpu_count": os.cpu_count(), "worker_count": cfg.data.worker_count,
         "loader_samples_s": cfg.batch_size / loader_s,
         "step_samples_s": cfg.batch_size / (step["ms_median"] / 1e3), "step": step}
  row["input_bound"] = row["loader_samples_s"] < row["step_samples_s"]
  print(f"\n{'what':22} {'samples/s':>10} {'ms/batch':>9}")
  print(f"{'data pipeline':22} {row['loader_samples_s']:10.1f} {1e3 * loader_s:9.1f}")
  print(f"{'tiny DFT step (cdx)':22} {row['step_samples_s']:10.1f} {step['ms_median']:9.1f}")
  print(f"input-bound: {row['input_bound']} (pipeline and step share the same cores)")
  return [row]


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  m = sub.add_parser("memory", help="compile-only memory analysis, cdx vs official")
  m.add_argument("--preset", default="paper", choices=("tiny", "mid", "paper"))
  m.add_argument("--seq", default=None, help="sequence length(s), comma-separated")
  m.add_argument("--batch", type=int, default=None)
  m.add_argument("--compute-dtype", default=None,
                 help="override the preset's compute dtype, e.g. float32")
  m.add_argument("--formulations", default=",".join(FORMULATIONS),
                 help="comma list of formulations to compile")
  m.add_argument("--scan-layers", default="config", choices=sorted(_SCAN),
                 help="decoder layout of both formulations (default: the preset's config)")
  s = sub.add_parser("step", help="time the compiled step, cdx vs official")
  s.add_argument("--preset", default="tiny", choices=("tiny", "mid"))
  s.add_argument("--seq", type=int, default=None)
  s.add_argument("--batch", type=int, default=None)
  s.add_argument("--steps", type=int, default=5)
  ld = sub.add_parser("loader", help="data pipeline samples/s vs the tiny step")
  ld.add_argument("--batches", type=int, default=20)
  ld.add_argument("--steps", type=int, default=10)
  ld.add_argument("--workdir", default="/tmp/cdx_bench")
  tpu_compile.add_parser(sub)
  for q in (m, s, ld, sub.choices["compile"]):
    q.add_argument("--out", default=None, help="write the rows as JSON here")
  a = p.parse_args(argv)
  if a.cmd == "memory" and a.seq is None:
    a.seq = str(DEFAULTS[a.preset][0])
  return a


def main(argv=None) -> int:
  a = parse(argv)
  rows = {"memory": cmd_memory, "step": cmd_step, "loader": cmd_loader,
          "compile": lambda a: tpu_compile.cmd_compile(a, build)}[a.cmd](a)
  if getattr(a, "json", False):
    print(json.dumps(rows, indent=2))
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
    print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
