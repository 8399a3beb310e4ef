"""The paper's §3 diagnostics on a benchmark: does the student look where the teacher looks,
does that go with being right, and does making it look there help?

  sim = layer_similarity(teacher, student, units)         # run.Model each; units below
  sim["matrix"]      [Ls, Lt] mean over samples of the cosine of the two models' visual
                     attention maps, student layer x teacher layer
  sim["per_sample"]  [N] per sample: mean over the matched pairs (docs/METHOD.md §6,
                     `layers.match_layers` "group") of cos(student map, teacher group mean)
  bins = similarity_bins(sim["per_sample"], correct, num_bins=5)   # quantile bins
  out = intervention(benchmark, items, teacher, student, layers)  # CR accuracy deltas
  grids = question_heatmaps(model, units)             # [N, side, side] over the image

Units are dicts {"id", "image", "prompt"} (`units_of` makes one per benchmark item). A
visual attention map is the head-averaged attention of the Nv visual queries over the Nv
visual keys ([Nv, Nv], cdx/models/attention.py); with the image-first template it
depends on the system prompt and the image only. Each model runs its own full pipeline
(vision tower, adapter, decoder) with its own tokenizer; both need the same Nv.

The intervention (mode "average" or "teacher") replaces, in the chosen student layers,
the student's visual attention block by 0.5 * (student + teacher) or by the teacher's
(the teacher map of a student layer = mean over its matched teacher group; outside the
band, the teacher layer at the same relative depth). The student maps mixed in are those
of the student's un-intervened pass. Rows are renormalized as `attention.override_visual`
says (non-visual keys keep their relative weights, each row sums to 1); the layers then
continue as usual (Capture.override, no copy of the model). CR accuracy is measured with
the benchmark's likelihood protocol (`cdx.eval.protocols`) under each mode.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cdx.analysis import attention as attention_lib
from cdx.data import images as images_lib
from cdx.data import templates
from cdx.distill import layers as layers_lib
from cdx.eval import batching
from cdx.eval import protocols
from cdx.eval import run
from cdx.eval import scoring
from cdx.models import mllm

MODES = ("none", "average", "teacher")


# ----------------------------------------------------------------------------- inputs

def units_of(items: list[dict]) -> list[dict]:
  """One {"id", "uid", "image", "prompt"} per benchmark item: its prompt (VQA-style items), else
  the yes/no question of its (first) true caption (SugarCrepe, paired items)."""
  out = []
  for it in items:
    if "prompt" in it:
      image, prompt = it["image"], it["prompt"]
    elif "positive" in it:
      image, prompt = it["image"], scoring.yes_no_prompt(it["positive"])
    elif "image_0" in it:
      image, prompt = it["image_0"], scoring.yes_no_prompt(it["caption_0"])
    else:
      raise ValueError(f"item {it.get('id')!r} has no prompt, caption or image to analyze.")
    out.append({"id": it.get("id"), "uid": it.get("uid"), "image": image, "prompt": prompt})
  return out


def check_pair(teacher: run.Model, student: run.Model) -> None:
  nt, ns = mllm.num_visual_tokens(teacher.cfg), mllm.num_visual_tokens(student.cfg)
  if nt != ns:
    raise ValueError(f"teacher {teacher.name} has {nt} visual tokens per image, student "
                     f"{student.name} {ns}: their attention maps cannot be compared.")


def _tokens(model: run.Model, units: list[dict], options: bool = False) -> list[list[int]]:
  """Prompt ids per unit (image block expanded), + one row per option when asked."""
  nv = mllm.num_visual_tokens(model.cfg)
  rows = []
  for u in units:
    ids = templates.encode_prompt(u["prompt"], model.tokenizer, model.template,
                                  nv)["input_ids"].tolist()
    if not options:
      rows.append(ids)
      continue
    for o in u["options"]:
      rows.append(ids + model.tokenizer(o, add_special_tokens=False)["input_ids"])
  return rows


def _padded(rows: list[list[int]], index: list[int], batch_size: int, pad_id: int):
  """ids, mask int32 [batch_size, L] (L a multiple of batching.LENGTH_BUCKET)."""
  picked = [rows[i] for i in index] + [rows[index[-1]]] * (batch_size - len(index))
  length = -(-max(map(len, picked)) // batching.LENGTH_BUCKET) * batching.LENGTH_BUCKET
  ids = np.full((batch_size, length), pad_id, np.int32)
  mask = np.zeros((batch_size, length), np.int32)
  for b, row in enumerate(picked):
    ids[b, :len(row)], mask[b, :len(row)] = row, 1
  return ids, mask


@functools.lru_cache(maxsize=run.PIXEL_CACHE)
def _image(path: str, size: int, mode: str) -> np.ndarray:
  try:
    return images_lib.preprocess(images_lib.load_image(path), size, mode)
  except OSError as e:
    raise ValueError(f"cannot read image {path!r}: {e}") from e


def _pixels(model: run.Model, images: list[str], index: list[int], batch_size: int):
  """float32 [batch_size, H, W, 3] of images[index] (the last repeated to fill)."""
  picked = [images[i] for i in index] + [images[index[-1]]] * (batch_size - len(index))
  return np.stack([_image(p, model.cfg.vision.image_size, model.image_mode)
                   for p in picked])


@functools.partial(jax.jit, static_argnums=(0, 5))
def _decode(cfg, params, ids, mask, pixels, capture, override=None):
  pos, _ = mllm.visual_positions(ids, cfg.image_token_id, mllm.num_visual_tokens(cfg))
  embeds = mllm.embed(cfg, params, ids, mllm.image_embeds(cfg, params, pixels))
  return mllm.decode(cfg, params, embeds, mask, capture, pos, attn_override=override)


def _all_layers(model: run.Model) -> tuple[int, ...]:
  return tuple(range(model.cfg.text.num_layers))


# ----------------------------------------------------------------------------- 1 + 2

def matched_pairs(student: run.Model, teacher: run.Model) -> tuple[list, list]:
  """(student band layers, teacher groups): the official "group" matching."""
  return layers_lib.match_layers(student.cfg.text.num_layers, teacher.cfg.text.num_layers,
                                 "group")


def _unit(x):
  x = x.reshape(x.shape[:-2] + (-1,))
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


@jax.jit
def _pair_cosines(s_maps, t_maps):
  """[Ls, B, N, N] x [Lt, B, N, N] -> [B, Ls, Lt] per-sample cosines."""
  return jnp.einsum("sbx,tbx->bst", _unit(s_maps), _unit(t_maps))


def layer_similarity(teacher: run.Model, student: run.Model, units: list[dict],
                     batch_size: int = 8) -> dict[str, Any]:
  """Teacher-student visual-attention cosines (see the module docstring)."""
  check_pair(teacher, student)
  band, groups = matched_pairs(student, teacher)
  s_rows, t_rows = _tokens(student, units), _tokens(teacher, units)
  images = [u["image"] for u in units]
  cosines = np.zeros((len(units), student.cfg.text.num_layers,
                      teacher.cfg.text.num_layers), np.float32)
  per_sample = np.zeros(len(units), np.float32)
  for index in batching.length_batches([len(r) for r in s_rows], batch_size):
    maps = {}
    for name, model, rows in (("s", student, s_rows), ("t", teacher, t_rows)):
      ids, mask = _padded(rows, index, batch_size, model.ids.pad)
      _, inter = _decode(model.cfg, model.params, ids, mask,
                         _pixels(model, images, index, batch_size),
                         mllm.Capture(_all_layers(model)))
      maps[name] = inter["visual_attn"]
    n = len(index)
    cosines[index] = np.asarray(_pair_cosines(maps["s"], maps["t"]))[:n]
    t_group = jnp.stack([maps["t"][jnp.asarray(g)].mean(0) for g in groups])
    band_cos = jnp.einsum("kbx,kbx->bk", _unit(maps["s"][jnp.asarray(band)]), _unit(t_group))
    per_sample[index] = np.asarray(band_cos.mean(-1))[:n]
  return {"matrix": cosines.mean(0), "per_sample": per_sample, "student_layers": band,
          "teacher_groups": groups, "ids": [u["id"] for u in units]}


def per_item_correct(benchmark: str, items: list[dict], model: run.Model,
                     batch_size: int = 8) -> tuple[list[float], str]:
  """(correctness in [0, 1] per item, protocol) under the benchmark's likelihood protocol
  when it has one, else its generate protocol. Correctness of an item: the mean of its
  records' "correct" (SugarCrepe: both orders), "accuracy" (VQA) or "text" (paired)
  values; records are matched to items by (subset, id) where they name a subset (ids
  repeat across SugarCrepe subsets), else by id."""
  tasks = protocols.tasks(benchmark)
  name = next(p for p in (protocols.LIKELIHOOD, protocols.GENERATE, protocols.CAPTION)
              if p in tasks)
  task = tasks[name]
  fn = (run.make_logprob(model, batch_size) if task.kind == "logprob"
        else run.make_generate(model, batch_size))
  result = task.evaluate(items, fn)
  values: dict[tuple, list[float]] = {}
  for r in result["records"]:
    key = (r["subset"], r["id"]) if "subset" in r else (None, r["id"])
    value = next(r[k] for k in ("correct", "accuracy", "text") if k in r)
    values.setdefault(key, []).append(float(value))
  out = []
  for it in items:
    v = values.get((it.get("subset"), it.get("id"))) or values.get((None, it.get("id")))
    if not v:
      raise ValueError(f"no {result['protocol']} record for item {it.get('id')!r}.")
    out.append(sum(v) / len(v))
  return out, result["protocol"]


def similarity_bins(similarity, correct, num_bins: int = 5) -> list[dict[str, float]]:
  """Samples cut into `num_bins` quantile bins of similarity (lowest first): per bin
  {"lo", "hi" (similarity range), "count", "similarity" (mean), "accuracy" (mean)}."""
  sim, ok = np.asarray(similarity, np.float64), np.asarray(correct, np.float64)
  if sim.shape != ok.shape or sim.ndim != 1 or sim.size < num_bins or num_bins < 1:
    raise ValueError(f"need matching 1-d similarity {sim.shape} and correctness "
                     f"{ok.shape} with at least num_bins={num_bins} samples.")
  order = np.argsort(sim, kind="stable")
  out = []
  for part in np.array_split(order, num_bins):
    out.append({"lo": float(sim[part].min()), "hi": float(sim[part].max()),
                "count": int(part.size), "similarity": float(sim[part].mean()),
                "accuracy": float(ok[part].mean())})
  return out


# ----------------------------------------------------------------------------- 3

def teacher_groups_for(student: run.Model, teacher: run.Model,
                       layers: list[int]) -> list[list[int]]:
  """The teacher layers whose mean map stands for each student layer: its matched group
  inside the band, else the teacher layer at the same relative depth."""
  band, groups = matched_pairs(student, teacher)
  ls, lt = student.cfg.text.num_layers, teacher.cfg.text.num_layers
  out = []
  for l in layers:
    if not 0 <= l < ls:
      raise ValueError(f"intervention layer {l} is outside the student's {ls} layers.")
    out.append(groups[band.index(l)] if l in band else
               [int(round(l * (lt - 1) / max(ls - 1, 1)))])
  return out


def make_intervened_logprob(teacher: run.Model, student: run.Model, layers: list[int],
                            mode: str, batch_size: int = 8):
  """logprob(units) -> [[log P(option)]] of the student with its visual attention in
  `layers` replaced as `mode` says (MODES; "none": the plain student)."""
  if mode not in MODES:
    raise ValueError(f"intervention mode {mode!r}; use one of {MODES}.")
  check_pair(teacher, student)
  cfg, params = mllm.unscanned(student.cfg, student.params)  # the override needs unrolled
  student = dataclasses.replace(student, cfg=cfg, params=params)
  groups = teacher_groups_for(student, teacher, layers)
  t_layers = tuple(sorted({l for g in groups for l in g}))
  head = functools.partial(_option_logprobs, student.cfg)

  def logprob(units: list[dict]) -> list[list[float]]:
    k = len(units[0]["options"])
    s_rows = _tokens(student, units, options=True)
    t_rows = _tokens(teacher, units, options=True)
    prompt_len = [len(r) for r in _tokens(student, units)]
    images = [u["image"] for u in units for _ in range(k)]
    out = np.zeros(len(s_rows))
    for index in batching.length_batches([len(r) for r in s_rows], batch_size):
      ids, mask = _padded(s_rows, index, batch_size, student.ids.pad)
      pixels = _pixels(student, images, index, batch_size)
      capture, override = mllm.Capture(), None
      if mode != "none":
        t_ids, t_mask = _padded(t_rows, index, batch_size, teacher.ids.pad)
        _, t_inter = _decode(teacher.cfg, teacher.params, t_ids, t_mask,
                             _pixels(teacher, images, index, batch_size),
                             mllm.Capture(t_layers))
        t_maps = t_inter["visual_attn"]
        override = jnp.stack([t_maps[jnp.asarray([t_layers.index(l) for l in g])].mean(0)
                              for g in groups])
        if mode == "average":
          _, s_inter = _decode(student.cfg, student.params, ids, mask, pixels,
                               mllm.Capture(tuple(layers)))
          override = 0.5 * (override + s_inter["visual_attn"])
        capture = mllm.Capture(override=tuple(layers))
      hidden, _ = _decode(student.cfg, student.params, ids, mask, pixels, capture, override)
      starts = np.asarray([prompt_len[i // k] for i in index] +
                          [prompt_len[index[-1] // k]] * (batch_size - len(index)))
      out[index] = np.asarray(head(student.params, hidden, jnp.asarray(ids),
                                   jnp.asarray(mask), jnp.asarray(starts)))[:len(index)]
    return out.reshape(-1, k).tolist()
  return logprob


@functools.partial(jax.jit, static_argnums=0)
def _option_logprobs(cfg, params, hidden, ids, mask, starts):
  """Sum over the option tokens (positions >= starts[b] of row b) of their log P."""
  logits = jnp.einsum("bld,dv->blv", hidden[:, :-1],
                      mllm.lm_head_kernel(cfg, params).astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  pos = jnp.arange(1, ids.shape[1])[None]
  keep = (pos >= starts[:, None]) & (mask[:, 1:] > 0)
  return jnp.where(keep, token, 0.0).sum(-1)


def intervention(benchmark: str, items: list[dict], teacher: run.Model,
                 student: run.Model, layers: list[int] | None = None,
                 batch_size: int = 8) -> dict[str, Any]:
  """CR accuracy (the benchmark's headline, %) of the student under every MODES entry.

  layers: student layers to intervene in (default: its matched band). Returns
  {"layers", "teacher_groups", "protocol", "accuracy": {mode: %},
   "delta": {mode: % points vs "none"}}.
  """
  tasks = protocols.tasks(benchmark)
  name = next((p for p in (protocols.LIKELIHOOD, protocols.CAPTION) if p in tasks), None)
  if name is None:
    raise ValueError(f"the intervention scores CR benchmarks by likelihood; {benchmark!r} "
                     "has no likelihood protocol (use e.g. sugarcrepe, winoground, "
                     "synthetic_sugarcrepe).")
  layers = list(matched_pairs(student, teacher)[0] if layers is None else layers)
  accuracy, protocol = {}, None
  for mode in MODES:
    fn = make_intervened_logprob(teacher, student, layers, mode, batch_size)
    result = tasks[name].evaluate(items, fn)
    accuracy[mode], protocol = protocols.headline(benchmark, result), result["protocol"]
  return {"layers": layers, "teacher_groups": teacher_groups_for(student, teacher, layers),
          "protocol": protocol, "accuracy": accuracy,
          "delta": {m: accuracy[m] - accuracy["none"] for m in MODES}}


# ----------------------------------------------------------------------------- 4

def question_heatmaps(model: run.Model, units: list[dict],
                      layers: list[int] | None = None) -> np.ndarray:
  """f32 [N, side, side]: attention of each prompt's last token over the image patches
  (heads and `layers` averaged; default the middle 30-70 % band), on the patch grid
  (`attention.patch_heatmap`: a dropped first patch shows as 0)."""
  layers = tuple(layers_lib.student_band(model.cfg.text.num_layers)
                 if layers is None else layers)
  rows = _tokens(model, units)
  nv = mllm.num_visual_tokens(model.cfg)
  grids = []
  for i, row in enumerate(rows):
    ids, mask = _padded(rows, [i], 1, model.ids.pad)
    _, inter = _decode(model.cfg, model.params, ids, mask,
                       _pixels(model, [u["image"] for u in units], [i], 1),
                       mllm.Capture(layers, full_attn=True))
    pos, _ = mllm.visual_positions(ids, model.cfg.image_token_id, nv)
    last = np.asarray(inter["full_attn"])[:, 0, :, len(row) - 1]   # [K, H, L]
    vec = last.mean((0, 1))[np.asarray(pos[0])]
    grids.append(attention_lib.patch_heatmap(vec[None],
                                             model.cfg.feature_select == "default"))
  return np.stack(grids)
