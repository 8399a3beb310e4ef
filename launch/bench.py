"""Memory and speed evidence for the cdx train step vs the official formulation.

  python launch/bench.py memory --preset paper [--seq 1536[,1024,...]] [--batch 1]
                                [--compute-dtype float32] [--formulations cdx]
                                [--scan-layers config|on|off] [--out F]
  python launch/bench.py step   --preset tiny|mid|bench [--seq L[,L...]] [--batch B] [--steps N]
                                [--against official|torch] [--sweep] [--json] [--out F]
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
`step` times the real compiled step of both formulations in one process, same inputs
(`--against official`, the default). `--against torch` compares cdx with the official
PyTorch code instead (launch/torch_reference.py: transformers LLaVA eager with
output_attentions, full logits, PEFT LoRA, AdamW): the preset's random weights and batch
are exported once, then each side runs in its own fresh process -- cdx's jitted step here
(`_jax_side`), torch with set_num_threads = cores and OMP_WAIT_POLICY=PASSIVE. Both
measure the same way (`torch_reference.PeakRss`): RSS after construction (models,
optimizer, batch; for JAX also the compiled step), the peak during the steps minus that
("step memory"), and the process's total peak. The cdx side uses the official
(unshifted) KD mask so that both compute the same loss; the first-step losses must agree
to 1e-3 relative or the command fails. Tokens/s = B * L / median step time (first step
excluded). `--sweep` runs L = 384 ... 2048 at the preset's Nv and batch; `--json` prints
one JSON line per length with jax_/torch_tokens_per_s, jax_/torch_peak_bytes (step
memory) and their ratios.
`loader` measures samples/s of the tiny data pipeline (synthetic world) against the tiny
step's samples/s, to tell whether training is input-bound. Each prints a table and, with
--out, writes the rows as JSON.

Presets (the DFT stage: LoRA + post-connector, LM + KD + attention, TAF student):
  tiny   configs/common.py tiny models (f32, no remat), L 192, B 16
  mid    a CPU-timeable middle size (below), f32, no remat, L 1024, B 2
  bench  the torch comparison's shape: Nv 255, student 8 x 256 (GQA 8/4 heads), teacher
         14 x 320, vocab 16k, f32, no remat, L 512, B 2
  paper  SigLIP so400m + Qwen1.5-1.8B student (LoRA r128) + Qwen1.5-4B teacher, bf16
         compute, remat as configs/common.py says, L 1536, B 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
LOSS_RTOL = 1e-3  # `step --against torch`: first-step losses of the two sides

# The models of `mid` and `bench` are bench's own, not taken from configs/common.py, on
# purpose: docs/PERFORMANCE.md records numbers measured on them, so they must not move when
# a training preset does (the tiny and paper presets do come from configs/common.py).
# mid: twice the tiny hidden and MLP widths, deeper teacher, 255 visual tokens, 8k vocab.
MID_VISION = dict(image_size=128, patch_size=8, hidden_size=128, num_layers=2, num_heads=4,
                  mlp_dim=256)
MID_TEACHER = dict(vocab_size=8192, hidden_size=256, num_layers=12, num_heads=8,
                   num_kv_heads=8, head_dim=32, mlp_dim=512, rope_theta=10000.0,
                   tie_embeddings=False)
MID_STUDENT = dict(vocab_size=8192, hidden_size=128, num_layers=8, num_heads=4,
                   num_kv_heads=2, head_dim=32, mlp_dim=256, rope_theta=10000.0,
                   tie_embeddings=True)
# bench: the shape of the PyTorch comparison (`step --against torch`): mid's models (MHA
# untied teacher, GQA tied student, head dim 32) wider, the teacher deeper, a 16k vocab.
BENCH_TEACHER = dict(MID_TEACHER, vocab_size=16384, hidden_size=320, num_layers=14,
                     num_heads=10, num_kv_heads=10, mlp_dim=864)
BENCH_STUDENT = dict(MID_STUDENT, vocab_size=16384, hidden_size=256, num_heads=8,
                     num_kv_heads=4, mlp_dim=704)
DEFAULTS = {"tiny": (192, 16), "mid": (1024, 2), "bench": (512, 2),
            "paper": (1536, 1)}  # (seq, batch)
SWEEP = (384, 512, 768, 1024, 1536, 2048)  # `step --sweep` lengths (Nv fixed)


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
  if preset == "bench":
    models = models or (MID_VISION, BENCH_STUDENT, BENCH_TEACHER)
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
  if a.side == "jax":
    row = _jax_side(a.preset, a.seq[0], a.batch, a.steps)
    print(json.dumps(row))
    return [row]
  if a.against == "torch":
    return [_against_torch(a, seq) for seq in a.seq]
  return [_against_official(a, seq) for seq in a.seq]


def _official_kd(b: Bench) -> Bench:
  """The bench with the official (unshifted) KD mask: the loss the torch code computes."""
  return dataclasses.replace(b, objective=dataclasses.replace(b.objective,
                                                              kd_mask="official"))


def _jax_side(preset: str, seq: int, batch: int | None, steps: int) -> dict:
  """cdx's step, measured by `torch_reference.measure` as the torch side is."""
  from launch import torch_reference  # pylint: disable=import-outside-toplevel
  probe = torch_reference.PeakRss()
  b = _official_kd(build(preset, seq, batch))
  jitted = jax.jit(b.step_fn("cdx"), donate_argnums=(0,),
                   compiler_options=step_lib.compiler_options(jax.default_backend()))
  state, frozen, teacher, data = jax.device_put(b.args())
  t0 = time.perf_counter()
  compiled = jitted.lower(state, frozen, teacher, data).compile()
  compile_s = time.perf_counter() - t0
  del b  # Only the device copies stay alive, as torch holds only its models.

  def step() -> float:
    nonlocal state
    state, metrics = compiled(state, frozen, teacher, data)
    return float(metrics["loss"])  # The host sync torch's loss.item() also does.

  row = torch_reference.measure(step, steps, probe, *data["input_ids"].shape)
  return {**row, "compile_s": round(compile_s, 1), "backend": jax.default_backend(),
          "jax": jax.__version__}


def _run_jax_subprocess(preset: str, seq: int, batch: int | None, steps: int,
                        timeout: float | None) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "step", f"--preset={preset}",
         f"--seq={seq}", f"--steps={steps}", "--side=jax"]
  if batch:
    cmd.append(f"--batch={batch}")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"cdx side failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                       f"{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _against_torch(a, seq: int) -> dict:
  """One length: export weights + batch, run each side in its own process, compare."""
  from launch import torch_reference  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix="cdx_bench_") as tmp:
    b = _official_kd(build(a.preset, seq, a.batch))
    paths = torch_reference.export_bench(b, tmp)
    del b
    threads = os.cpu_count()
    load = os.getloadavg()
    jx = _run_jax_subprocess(a.preset, seq, a.batch, a.steps, a.timeout)
    tc = torch_reference.run_in_subprocess(paths["student"], paths["teacher"],
                                           paths["batch"], a.steps, threads, a.timeout)
  rel = abs(jx["loss_first_step"] - tc["loss_first_step"]) / abs(tc["loss_first_step"])
  row = {"preset": a.preset, "seq": seq, "batch": jx["batch"], "steps": a.steps,
         "threads": threads, "loadavg_1m": load[0],
         "jax_loss_first_step": jx["loss_first_step"],
         "torch_loss_first_step": tc["loss_first_step"], "loss_rel_diff": rel,
         "loss_match": rel <= LOSS_RTOL,
         "jax_tokens_per_s": jx["tokens_per_s"], "torch_tokens_per_s": tc["tokens_per_s"],
         "tokens_per_s_ratio": jx["tokens_per_s"] / tc["tokens_per_s"],
         "jax_peak_bytes": jx["step_peak_bytes"], "torch_peak_bytes": tc["step_peak_bytes"],
         "peak_bytes_ratio": jx["step_peak_bytes"] / max(tc["step_peak_bytes"], 1),
         "jax_total_peak_bytes": jx["peak_rss_bytes"],
         "torch_total_peak_bytes": tc["peak_rss_bytes"],
         "total_peak_bytes_ratio": jx["peak_rss_bytes"] / tc["peak_rss_bytes"],
         "jax": jx, "torch": tc}
  if a.json:
    print(json.dumps(row), flush=True)
  else:
    mib = 2**20
    print(f"\n{a.preset} L={seq} B={row['batch']} (threads {threads}, load {load[0]:.1f}): "
          f"first-step loss cdx {jx['loss_first_step']:.6f} torch "
          f"{tc['loss_first_step']:.6f} (rel {rel:.1e})")
    print(f"{'side':6} {'tokens/s':>9} {'ms/step':>9} {'step MiB':>9} {'after build':>11} "
          f"{'total peak':>10}")
    for name, r in (("cdx", jx), ("torch", tc)):
      print(f"{name:6} {r['tokens_per_s']:9.0f} {r['ms_per_step']:9.1f} "
            f"{r['step_peak_bytes'] / mib:9.0f} {r['rss_after_build_bytes'] / mib:11.0f} "
            f"{r['peak_rss_bytes'] / mib:10.0f}")
    print(f"cdx/torch: tokens/s {row['tokens_per_s_ratio']:.2f}x, step memory "
          f"{row['peak_bytes_ratio']:.2f}, total peak {row['total_peak_bytes_ratio']:.2f}",
          flush=True)
  if not row["loss_match"]:
    raise SystemExit(f"first-step losses differ: cdx {jx['loss_first_step']} vs torch "
                     f"{tc['loss_first_step']} (rel {rel:.2e} > {LOSS_RTOL}); the sides do "
                     "not compute the same step.")
  return row


def _against_official(a, seq: int) -> dict:
  b = build(a.preset, seq, a.batch)
  batch, seq = b.batch["input_ids"].shape
  row = {"preset": b.preset, "seq": seq, "batch": batch, "backend": jax.default_backend(),
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
    print(f"{b.preset:6} {seq:5d} {batch:3d} {form:8} {m['ms_median']:9.1f} "
          f"{m['ms_min']:9.1f} {m['samples_s']:9.2f} {m['compile_s']:9.1f} "
          f"{m['last_loss']:8.4f}")
  print(f"{'':16} official/cdx time: {row['speedup']:.2f}x")
  return row


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
  s.add_argument("--preset", default="tiny", choices=("tiny", "mid", "bench"))
  s.add_argument("--seq", default=None, help="sequence length(s), comma-separated")
  s.add_argument("--batch", type=int, default=None)
  s.add_argument("--steps", type=int, default=5)
  s.add_argument("--against", default="official", choices=("official", "torch"),
                 help="official: the JAX official formulation in process; torch: the "
                      "PyTorch reference, each side in its own process")
  s.add_argument("--sweep", action="store_true",
                 help=f"lengths {','.join(map(str, SWEEP))} (Nv and batch fixed)")
  s.add_argument("--json", action="store_true", help="one JSON line per length")
  s.add_argument("--timeout", type=float, default=None, help="seconds per side and length")
  s.add_argument("--side", default=None, choices=("jax",), help=argparse.SUPPRESS)
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
  if a.cmd == "step":
    if a.sweep and a.seq:
      raise SystemExit("--sweep and --seq together: --sweep sets the lengths.")
    if a.against != "torch" and (a.sweep or a.json):
      raise SystemExit("--sweep and --json go with --against torch.")
    seqs = SWEEP if a.sweep else str(a.seq or DEFAULTS[a.preset][0]).split(",")
    a.seq = [int(s) for s in seqs]
  return a


def main(argv=None) -> int:
  a = parse(argv)
  rows = {"memory": cmd_memory, "step": cmd_step, "loader": cmd_loader,
          "compile": lambda a: tpu_compile.cmd_compile(a, build)}[a.cmd](a)
  if a.cmd == "compile" and a.json:  # `step --json` prints each row as it is measured.
    print(json.dumps(rows, indent=2))
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
    print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
