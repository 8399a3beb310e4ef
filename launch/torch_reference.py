"""The DFT train step as the official PyTorch code runs it, on cdx's weights and batch.

What a user of the official CompoDistill code would run instead of cdx (docs/METHOD.md §5,
§8, the "official" column): two transformers LLaVA models in eager attention, both called
with `output_attentions=True` (every layer's [B, H, L, L] map of both models kept), full
[B, L, V] logits for both, the teacher under `torch.no_grad`, PEFT LoRA on every linear of
the student LLM plus the trainable TAF post-connector, and one AdamW step:

  L = L_lm (the model's own loss from `labels`) + L_kd (-sum p_t log p_s on the unshifted
      label mask, teacher cut to the student vocab) + L_attn (head-averaged visual block,
      teacher group mean, sink filter, 1 - cos of column profiles, sum over layer pairs,
      mean over image samples)

Two departures from the official code keep the comparison with cdx like for like: the
visual block is located from the image-token ids (the official code hard-codes positions
31..759 of the Qwen template), and text-only samples add no attention loss (the official
code scores a garbage block for them; with every sample holding an image both agree).

Weights come from cdx through HF exports (`export_inputs`, `export_bench`): the teacher is a
stock LLaVA dir (`cdx.hf.save_llava`); the student dir holds its exported LLaVA (its vision
tower and LLM are used) plus three files this module writes beside it:
  taf_post.safetensors  the post-connector {"weight" [Ds, Dt], "bias" [Ds]}: the torch
                        student sees images through a frozen copy of the teacher's projector
                        followed by this Linear (the exported projector, post folded into
                        fc2, is replaced; docs/EXPORT.md)
  lora.safetensors      the LoRA factors, PEFT layout: "<i>.<self_attn|mlp>.<x>_proj.lora_A"
                        [r, in] and ".lora_B" [out, r] for decoder layer i (absent: PEFT's
                        own init, B = 0)
  distill.json          student_layers, teacher_groups, lora_rank, lora_alpha, kd_mask and
                        the optimizer's lr / weight_decay / clip_norm
The batch is cdx's, as an .npz (input_ids, attention_mask, labels, pixel_values NHWC,
has_image).

Run each side in its own process (torch here, JAX in another), so neither's memory or
threads disturb the other:

  python launch/torch_reference.py --student=DIR --teacher=DIR --batch=FILE.npz \
      --steps=N [--threads=T] [--json]
  run_in_subprocess(student_dir, teacher_dir, batch_path, steps, threads) -> dict
  run_torch_step(student_dir, teacher_dir, batch_path, steps, threads)   -> dict (in process)

The dict: loss_first_step (and loss_terms: lm, kd, attn, of the first step), tokens_per_s
(B * L sequence positions per second, median step time, the first step excluded when
steps > 1), ms_per_step, peak_rss_bytes (whole process), rss_after_build_bytes (models,
PEFT and the optimizer built, batch loaded), step_peak_bytes (peak during the steps minus
rss_after_build), rss_method. Memory is the kernel's RSS high-water mark (VmHWM in
/proc/self/status), reset after the build by writing 5 to /proc/self/clear_refs; where that
is not allowed a thread samples /proc/self/statm every 2 ms instead (rss_method says which).

Threads: the subprocess gets OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS=T in its
environment before torch loads, and torch.set_num_threads(T). Without PASSIVE, idle OpenMP
threads spin and, on a loaded machine, torch runs many times slower than it should.

torch, transformers and peft are test/benchmark dependencies (requirements-test.txt);
nothing under cdx/ imports this file. torch is imported inside the functions that need it,
so that the environment above is set first and JAX processes can import the exporters
without loading torch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

IGNORE = -100
DISTILL_JSON = "distill.json"
POST_FILE = "taf_post.safetensors"
LORA_FILE = "lora.safetensors"
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "has_image")
# cdx decoder-layer linear -> HF Qwen2 module (under layers.<i>.).
_LORA_MODULES = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj",
                 "attn/v": "self_attn.v_proj", "attn/o": "self_attn.o_proj",
                 "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj",
                 "mlp/down": "mlp.down_proj"}
_PEFT_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


# ------------------------------------------------------------------------------ memory

class PeakRss:
  """Resident-set size now and its peak since `reset()`, in bytes (Linux /proc).

  The peak is the kernel's high-water mark (VmHWM), reset by writing 5 to
  /proc/self/clear_refs; if the kernel refuses, a daemon thread samples the RSS every 2 ms
  from `reset()` on (`method` says which is in use).
  """

  def __init__(self):
    self.method = "VmHWM"
    self._sampled = 0
    self._thread = None

  @staticmethod
  def current() -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

  @staticmethod
  def _hwm() -> int:
    with open("/proc/self/status") as f:
      return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024

  def peak(self) -> int:
    return self._hwm() if self.method == "VmHWM" else max(self._sampled, self.current())

  def reset(self) -> None:
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      return
    except OSError:
      self.method = "statm sampled every 2 ms"
    self._sampled = self.current()
    if self._thread is None:
      def sample():
        while True:
          self._sampled = max(self._sampled, self.current())
          time.sleep(0.002)
      self._thread = threading.Thread(target=sample, daemon=True)
      self._thread.start()


def measure(step: Callable[[], float], steps: int, probe: PeakRss, batch: int,
            seq: int) -> dict:
  """Runs `step` (one train step; returns its loss, read on the host) `steps` times, once
  everything is built; `probe` has watched the process since before the build.

  Both sides of `launch/bench.py step --against torch` measure through this, so alike.
  Returns loss_first_step, tokens_per_s, ms_per_step, steps, batch, seq and the memory
  keys, as the module docstring says.
  """
  rss_after_build, build_peak = probe.current(), probe.peak()
  probe.reset()
  times, losses = [], []
  for _ in range(steps):
    t = time.perf_counter()
    losses.append(step())
    times.append(time.perf_counter() - t)
  step_peak = probe.peak()
  ms = 1e3 * statistics.median(times[1:] if steps > 1 else times)
  return {"loss_first_step": losses[0], "tokens_per_s": batch * seq / (ms / 1e3),
          "ms_per_step": ms, "steps": steps, "batch": batch, "seq": seq,
          "peak_rss_bytes": max(build_peak, step_peak),
          "rss_after_build_bytes": rss_after_build,
          "step_peak_bytes": step_peak - rss_after_build, "rss_method": probe.method}


# ------------------------------------------------------------------ export (JAX side)

def _factor_rows(lora_llm: dict) -> dict:
  """cdx LoRA tree under "llm" (either layout) -> {"<i>.<module>.lora_A|B": np array}."""
  from cdx.models import stack  # pylint: disable=import-outside-toplevel
  out = {}
  for name, layer in stack.unstack_layers(lora_llm).items():
    i = int(name.split("_")[1])
    for ours, theirs in _LORA_MODULES.items():
      node = layer
      for key in ours.split("/") + ["kernel"]:
        node = node.get(key) if isinstance(node, dict) else None
      if node is None:
        continue
      out[f"{i}.{theirs}.lora_A"] = np.ascontiguousarray(np.asarray(node["a"], np.float32).T)
      out[f"{i}.{theirs}.lora_B"] = np.ascontiguousarray(np.asarray(node["b"], np.float32).T)
  return out


def export_inputs(out_dir: str, student_cfg, teacher_cfg, objective, params: dict,
                  teacher: dict, batch: dict, lora: dict | None = None,
                  lora_spec=None, optim: dict | None = None) -> dict:
  """Writes <out_dir>/{student,teacher}/ and batch.npz for `run_torch_step`; their paths.

  params: the full TAF student tree (vision, adapter = the teacher's, post, llm); teacher:
  the teacher tree, whose missing vision/adapter are the student's (TAF shares them);
  objective: a `cdx.distill.objective.Objective`; lora / lora_spec: the student's LoRA factors and
  `cdx.train.setup.LoraSpec` (None: rank 8, alpha 16, PEFT init); optim: lr, weight_decay,
  clip_norm of the torch AdamW step (defaults 1e-4, 0, 1.0).
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from cdx import hf  # pylint: disable=import-outside-toplevel
  if student_cfg.post_connector_in is None or "post" not in params:
    raise ValueError("export_inputs needs a TAF student (cfg.post_connector_in and a 'post' "
                     "subtree); the torch reference models the DFT step only.")
  teacher = dict(teacher)
  for part in ("vision", "adapter"):
    teacher.setdefault(part, params[part])
  paths = {k: os.path.join(out_dir, k) for k in ("student", "teacher")}
  paths["batch"] = os.path.join(out_dir, "batch.npz")
  hf.save_llava(teacher_cfg, teacher, paths["teacher"], dtype="float32")
  hf.save_llava(student_cfg, params, paths["student"], dtype="float32")
  post = params["post"]
  save_file({"weight": np.ascontiguousarray(np.asarray(post["kernel"], np.float32).T),
             "bias": np.asarray(post["bias"], np.float32)},
            os.path.join(paths["student"], POST_FILE))
  lora_file = os.path.join(paths["student"], LORA_FILE)
  if lora:
    save_file(_factor_rows(lora["llm"]), lora_file)
  elif os.path.exists(lora_file):
    os.remove(lora_file)
  spec = {"student_layers": list(objective.student_layers),
          "teacher_groups": [list(g) for g in objective.teacher_groups],
          "kd_mask": objective.kd_positions,  # fidelity=official: unshifted
          # The loss weights (the official code's are 1; the tiny preset's attention is not).
          "weights": {"lm": objective.lm, "kd": objective.kd, "attn": objective.attn},
          "lora_rank": lora_spec.rank if lora_spec else 8,
          "lora_alpha": lora_spec.alpha if lora_spec else 16.0,
          **{"lr": 1e-4, "weight_decay": 0.0, "clip_norm": 1.0, **(optim or {})}}
  with open(os.path.join(paths["student"], DISTILL_JSON), "w") as f:
    json.dump(spec, f, indent=2)
  np.savez(paths["batch"], **{k: np.asarray(batch[k]) for k in BATCH_KEYS})
  return paths


def export_bench(bench, out_dir: str) -> dict:
  """`export_inputs` for a launch/bench.py `Bench` (its init state, frozen params, batch)."""
  from cdx import paths as params_lib  # pylint: disable=import-outside-toplevel
  params = params_lib.merge(bench.state["params"], bench.frozen)
  return export_inputs(out_dir, bench.student_cfg, bench.teacher_cfg, bench.objective,
                       params, bench.teacher, bench.batch, lora=bench.state["lora"],
                       lora_spec=bench.lora_spec)


# ------------------------------------------------------------------- models (torch)

def _load_llava(path: str):
  """An exported LLaVA dir (stock or cdx remote code), eager attention, float32."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.AutoModelForImageTextToText.from_pretrained(
      path, trust_remote_code=True, attn_implementation="eager", dtype=torch.float32)


def _read_spec(student_dir: str) -> dict:
  file = os.path.join(student_dir, DISTILL_JSON)
  if not os.path.isfile(file):
    raise ValueError(f"No {DISTILL_JSON} in --student={student_dir!r}: write the student "
                     "with launch/torch_reference.py export_inputs / export_bench.")
  with open(file) as f:
    return json.load(f)


def build(student_dir: str, teacher_dir: str):
  """(PEFT student, teacher, spec): the models as the official code holds them.

  Student: its exported LLaVA whose projector becomes Sequential(frozen copy of the
  teacher's projector, post-connector Linear); PEFT LoRA on every decoder linear of its
  LLM; trainable = LoRA factors + post-connector. Teacher: frozen, eval mode.
  """
  import copy  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  spec = _read_spec(student_dir)
  teacher = _load_llava(teacher_dir).eval().requires_grad_(False)
  student = _load_llava(student_dir)
  post_file = os.path.join(student_dir, POST_FILE)
  if not os.path.isfile(post_file):
    raise ValueError(f"No {POST_FILE} in --student={student_dir!r}: the torch reference "
                     "needs the TAF post-connector (export_inputs writes it).")
  post = load_file(post_file)
  linear = torch.nn.Linear(post["weight"].shape[1], post["weight"].shape[0])
  with torch.no_grad():
    linear.weight.copy_(post["weight"])
    linear.bias.copy_(post["bias"])
  student.model.multi_modal_projector = torch.nn.Sequential(
      copy.deepcopy(teacher.model.multi_modal_projector), linear)

  config = peft.LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"],
                           lora_dropout=0.0, bias="none", target_modules=_PEFT_TARGETS)
  student = peft.get_peft_model(student, config)  # Freezes every base weight.
  _load_lora(student, os.path.join(student_dir, LORA_FILE))
  linear.requires_grad_(True)
  return student.train(), teacher, spec


def _load_lora(student, path: str) -> None:
  """Copies exported factors into the PEFT modules; every adapted linear must get both."""
  if not os.path.isfile(path):
    return
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  factors = load_file(path)
  used = set()
  with torch.no_grad():
    for name, module in student.named_modules():
      m = re.search(r"language_model\.layers\.(\d+\.(self_attn|mlp)\.\w+_proj)$", name)
      if not m or not hasattr(module, "lora_A"):
        continue
      for part in ("lora_A", "lora_B"):
        key = f"{m.group(1)}.{part}"
        if key not in factors:
          raise ValueError(f"{path}: no factor {key!r} for the PEFT module {name}.")
        getattr(module, part)["default"].weight.copy_(factors[key])
        used.add(key)
  if set(factors) - used:
    raise ValueError(f"{path}: factors {sorted(set(factors) - used)[:4]} match no PEFT "
                     "module of the student LLM.")


def load_batch(path: str) -> dict:
  """The cdx batch .npz -> torch tensors (pixels NCHW, only the rows holding an image)."""
  import torch  # pylint: disable=import-outside-toplevel
  with np.load(path) as z:
    missing = [k for k in BATCH_KEYS if k not in z]
    if missing:
      raise ValueError(f"--batch={path!r} lacks {missing}; write it with export_inputs.")
    b = {k: z[k] for k in BATCH_KEYS}
  return {"input_ids": torch.from_numpy(b["input_ids"].astype(np.int64)),
          "attention_mask": torch.from_numpy(b["attention_mask"].astype(np.int64)),
          "labels": torch.from_numpy(b["labels"].astype(np.int64)),
          "pixel_values": torch.from_numpy(b["pixel_values"]).permute(0, 3, 1, 2).contiguous(),
          "has_image": torch.from_numpy(b["has_image"].astype(bool))}


# ------------------------------------------------------------------------ loss (torch)

def visual_positions(input_ids, image_token_id: int):
  """(pos long [B, Nv], has_image bool [B]) of the image tokens; rows hold 0 or Nv of them."""
  import torch  # pylint: disable=import-outside-toplevel
  is_img = input_ids == image_token_id
  counts = is_img.sum(1)
  nv = int(counts.max())
  if bool(((counts != 0) & (counts != nv)).any()):
    raise ValueError(f"image-token counts per row {counts.tolist()}: each row needs 0 or "
                     f"{nv}.")
  pos = torch.zeros(input_ids.shape[0], nv, dtype=torch.long)
  for b in torch.nonzero(counts).flatten().tolist():
    pos[b] = torch.nonzero(is_img[b]).flatten()
  return pos, counts > 0


def kd_loss(s_logits, t_logits, labels, mask: str = "official"):
  """-sum_v softmax(t) log_softmax(s), mean over the mask positions; teacher vocab cut.

  "official": positions whose label is supervised (unshifted); "shifted": those predicting
  a supervised next token (what L_lm uses)."""
  import torch  # pylint: disable=import-outside-toplevel
  vs = s_logits.shape[-1]
  if t_logits.shape[-1] < vs:
    raise ValueError(f"teacher vocab {t_logits.shape[-1]} < student vocab {vs}.")
  if mask == "official":
    use = labels != IGNORE
  elif mask == "shifted":
    use = torch.zeros_like(labels, dtype=torch.bool)
    use[:, :-1] = labels[:, 1:] != IGNORE
  else:
    raise ValueError(f"kd_mask={mask!r}; use 'official' or 'shifted'.")
  s = s_logits[use].float()
  t = t_logits[use][:, :vs].float()
  per_pos = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1)
  return per_pos.mean() if per_pos.numel() else s_logits.sum() * 0.0


def _sink_filtered_cos(s, t):
  """1 - cos of the sink-filtered column profiles of maps [K, B, N, N] -> [K, B]."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    keep = ((s <= s.mean((-2, -1), keepdim=True) + s.std((-2, -1), keepdim=True))
            & (t <= t.mean((-2, -1), keepdim=True) + t.std((-2, -1), keepdim=True)))
  s, t = s * keep, t * keep
  valid = (t != 0).float()  # Also drops the causal zeros.
  count = valid.sum(-2).clamp(min=1)
  s_vec, t_vec = (s * valid).sum(-2) / count, (t * valid).sum(-2) / count
  return 1.0 - torch.nn.functional.cosine_similarity(s_vec, t_vec, dim=-1, eps=1e-8)


def attention_loss(s_maps, t_maps, pos, has_image, student_layers, teacher_groups):
  """L_attn from the per-layer maps [B, H, L, L] (`output_attentions`) of both models.

  Pair k: student layer student_layers[k] vs the mean of the teacher layers in
  teacher_groups[k]; each map head-averaged, cut to the visual rows and columns of its
  sample. Sum over pairs and image samples, divided by the number of image samples.
  """
  import torch  # pylint: disable=import-outside-toplevel
  rows = torch.nonzero(has_image).flatten()
  if rows.numel() == 0:
    return s_maps[0].sum() * 0.0
  p = pos[rows]
  r = torch.arange(rows.numel())[:, None, None]

  def block(m):  # [B, H, L, L] -> [Bi, Nv, Nv]
    return m[rows].mean(1)[r, p[:, :, None], p[:, None, :]]

  s = torch.stack([block(s_maps[l]) for l in student_layers])
  t = torch.stack([torch.stack([block(t_maps[l]) for l in g]).mean(0)
                   for g in teacher_groups])
  return _sink_filtered_cos(s, t).sum() / rows.numel()


def compute_loss(student, teacher, batch: dict, spec: dict):
  """(total loss, {"lm", "kd", "attn"} floats) of one batch, official formulation."""
  import torch  # pylint: disable=import-outside-toplevel
  image_id = student.config.image_token_index
  pos, has_image = visual_positions(batch["input_ids"], image_id)
  has_image = has_image & batch["has_image"]
  # LLaVA takes one image per row holding image tokens, in row order.
  pixels = batch["pixel_values"][(batch["input_ids"] == image_id).any(1)]
  inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=pixels if len(pixels) else None, output_attentions=True)
  with torch.no_grad():
    t_out = teacher(**inputs)
  s_out = student(**inputs, labels=batch["labels"])
  lm = s_out.loss
  kd = kd_loss(s_out.logits, t_out.logits, batch["labels"], spec.get("kd_mask", "official"))
  attn = attention_loss(s_out.attentions, t_out.attentions, pos, has_image,
                        spec["student_layers"], spec["teacher_groups"])
  w = spec.get("weights", {"lm": 1.0, "kd": 1.0, "attn": 1.0})
  total = w["lm"] * lm + w["kd"] * kd + w["attn"] * attn
  return total, {"lm": lm.item(), "kd": kd.item(), "attn": attn.item()}


# ------------------------------------------------------------------------------- step

def run_torch_step(student_dir: str, teacher_dir: str, batch_path: str, steps: int,
                   threads: int | None = None) -> dict:
  """Builds both models, runs `steps` AdamW steps on the batch; loss, speed and memory.

  Call it in a fresh process (`run_in_subprocess` or the CLI) for the memory numbers and
  for OMP_WAIT_POLICY to take effect; in process it still gives the right losses.
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  threads = threads or os.cpu_count()
  import torch  # pylint: disable=import-outside-toplevel
  previous = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    return _run(student_dir, teacher_dir, batch_path, steps, threads)
  finally:  # In process (tests), leave the caller's torch as it was.
    torch.set_num_threads(previous)


def _run(student_dir: str, teacher_dir: str, batch_path: str, steps: int,
         threads: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  probe = PeakRss()
  student, teacher, spec = build(student_dir, teacher_dir)
  trainable = [p for p in student.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=spec["weight_decay"])
  batch = load_batch(batch_path)
  first_terms = []

  def step() -> float:
    loss, terms = compute_loss(student, teacher, batch, spec)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, spec["clip_norm"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    if not first_terms:
      first_terms.append(dict(terms, total=loss.item()))
    return loss.item()

  row = measure(step, steps, probe, *batch["input_ids"].shape)
  return {**row, "loss_terms": first_terms[0], "threads": threads,
          "trainable_params": sum(p.numel() for p in trainable),
          "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def run_in_subprocess(student_dir: str, teacher_dir: str, batch_path: str, steps: int,
                      threads: int | None = None, timeout: float | None = None) -> dict:
  """`run_torch_step` in a fresh Python process (torch threads and env set first)."""
  threads = threads or os.cpu_count()
  env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))
  cmd = [sys.executable, os.path.abspath(__file__), f"--student={student_dir}",
         f"--teacher={teacher_dir}", f"--batch={batch_path}", f"--steps={steps}",
         f"--threads={threads}", "--json"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"torch reference failed (exit {proc.returncode}): "
                       f"{' '.join(cmd)}\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--student", required=True, help="student dir written by export_inputs")
  p.add_argument("--teacher", required=True, help="teacher LLaVA dir")
  p.add_argument("--batch", required=True, help="batch .npz written by export_inputs")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--threads", type=int, default=None, help="default: os.cpu_count()")
  p.add_argument("--json", action="store_true", help="print one JSON line")
  a = p.parse_args(argv)
  threads = a.threads or os.cpu_count()
  # Read by OpenMP when torch loads (below, inside run_torch_step), not later.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  os.environ.setdefault("OMP_NUM_THREADS", str(threads))
  row = run_torch_step(a.student, a.teacher, a.batch, a.steps, threads)
  if a.json:
    print(json.dumps(row))
  else:
    gib = 2**30
    print(f"torch: loss {row['loss_first_step']:.6f} {row['loss_terms']}, "
          f"{row['tokens_per_s']:.0f} tokens/s ({row['ms_per_step']:.1f} ms/step), "
          f"peak {row['peak_rss_bytes'] / gib:.3f} GiB, after build "
          f"{row['rss_after_build_bytes'] / gib:.3f} GiB, step peak "
          f"{row['step_peak_bytes'] / gib:.3f} GiB ({row['rss_method']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
