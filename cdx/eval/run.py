"""Evaluation driver: a trained model on the synthetic world's eval sets (seen + held-out).

  model = load_model("DIR/dft", data_dir="DIR/data")    # or an HF LLaVA dir
  results = evaluate_synthetic(model, "DIR/data", limit=20)
  write_results(results, "DIR/dft/eval.json")

Serves the callables of `cdx.eval.scoring` with one model:
  generate(items) -> replies  prompts `qwen2_base` (`encode_prompt`, image first), greedy
                              <= 32 new tokens (SPEC §9) in fixed-shape batches, decoded
                              with the tokenizer (special tokens dropped, stripped)
  score(items) -> P(" Yes")   the probability of the answer " Yes" (its tokens, as the
                              template supervises answers) after the yes/no question
Images: `cdx.data.images` preprocessing at the vision tower's size, cached per path.

Results (JSON-ready; every metric a float in [0, 1]):
  {"seen": {"sugarcrepe": {"overall", "subsets": {subset: acc}}, "vqa": {"accuracy"},
            "winoground": {"text", "image", "group"}},
   "heldout": {same},
   "details": {split: {"sugarcrepe": {"by_order", "unparsed"}, "vqa": {"by_category"}}},
   "sources": [dataset file descriptions], "settings": {...},
   "records": {split: {benchmark: per-item records}}   (only with records=True)}
A split or benchmark whose files are missing is left out.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from cdx.data import images as images_lib
from cdx.data import templates
from cdx.data import tokenizer as tokenizer_lib
from cdx.eval import benchmarks
from cdx.eval import generate as gen
from cdx.eval import scoring
from cdx.models import mllm

MAX_NEW_TOKENS = 32  # SPEC §9
SPLITS = {"seen": "eval", "heldout": os.path.join("eval", "heldout")}
YES = " Yes"  # answers follow "ASSISTANT:" after a space in qwen2_base
LENGTH_BUCKET = 32  # prompts are padded to a multiple: few compiled shapes


@dataclasses.dataclass(frozen=True)
class Model:
  """Everything needed to run a model on prompts."""
  cfg: mllm.MllmConfig
  params: Any
  tokenizer: Any
  ids: tokenizer_lib.TokenIds
  template: str = "qwen2_base"
  image_mode: str = "square"
  name: str = ""


# ----------------------------------------------------------------------------- loading

def _tokenizer_dir(model_path: str, data_dir: str | None, tokenizer: str | None) -> str:
  candidates = [tokenizer] if tokenizer else [
      os.path.join(model_path, "hf"), model_path,
      *([os.path.join(data_dir, "tokenizer")] if data_dir else [])]
  for path in candidates:
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
      return path
  raise ValueError(f"no tokenizer found in {candidates}; pass --tokenizer=DIR (an HF "
                   "tokenizer dir, e.g. DIR/data/tokenizer of a tiny run).")


def load_model(model_path: str, data_dir: str | None = None, tokenizer: str | None = None,
               image_mode: str = "square", template: str = "qwen2_base") -> Model:
  """A stage dir (`final/` + `model.json`) or an HF LLaVA dir (`setup.load_trained`).

  The tokenizer comes from `tokenizer`, else the stage's hf/ export, the model dir
  itself, or `data_dir`/tokenizer; it must be the one the model was trained with.
  """
  from cdx.train import setup  # The one place trained models are read.
  tok, ids = tokenizer_lib.load_tokenizer(_tokenizer_dir(model_path, data_dir, tokenizer))

  def check(info):
    want, have = info.get("tokenizer"), tokenizer_lib.fingerprint(tok)
    if want not in (None, have):
      raise ValueError(f"{model_path} was trained with tokenizer {want}, but the tokenizer "
                       f"found has fingerprint {have}; pass the right --tokenizer.")
  cfg, params, _ = setup.load_trained(model_path, check=check)
  if cfg.image_token_id != ids.image:
    raise ValueError(f"the model's image_token_id {cfg.image_token_id} != the tokenizer's "
                     f"<image> id {ids.image}: model and tokenizer do not belong together.")
  if len(tok) > cfg.text.vocab_size:
    raise ValueError(f"tokenizer has {len(tok)} tokens, more than the model's vocab_size "
                     f"{cfg.text.vocab_size}.")
  return Model(cfg, params, tok, ids, template, image_mode, os.path.abspath(model_path))


# ----------------------------------------------------------------------------- batching

def _pixels_loader(model: Model):
  cache: dict[str, np.ndarray] = {}

  def load(path: str) -> np.ndarray:
    if path not in cache:
      try:
        image = images_lib.load_image(path)
      except OSError as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e
      cache[path] = images_lib.preprocess(image, model.cfg.vision.image_size,
                                          model.image_mode)
    return cache[path]
  return load


def _batches(model: Model, items: list[dict], batch_size: int, load):
  """Yields (ids [B, L], mask [B, L], pixels [B, H, W, 3], n_real) in fixed shapes.

  The last batch is filled with copies of its last row (dropped by the caller) and L is a
  multiple of LENGTH_BUCKET, so jit compiles few shapes.
  """
  nv = mllm.num_visual_tokens(model.cfg)
  for start in range(0, len(items), batch_size):
    chunk = items[start:start + batch_size]
    encoded = [templates.encode_prompt(it["prompt"], model.tokenizer, model.template, nv)
               ["input_ids"] for it in chunk]
    length = -(-max(map(len, encoded)) // LENGTH_BUCKET) * LENGTH_BUCKET
    ids = np.full((batch_size, length), model.ids.pad, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    pixels = []
    for b in range(batch_size):
      row = min(b, len(chunk) - 1)
      ids[b, :len(encoded[row])], mask[b, :len(encoded[row])] = encoded[row], 1
      pixels.append(load(chunk[row]["image"]))
    yield ids, mask, np.stack(pixels), len(chunk)


def make_generate(model: Model, batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS):
  """generate(items) -> greedy replies (see the module docstring)."""
  load = _pixels_loader(model)

  def generate(items: list[dict]) -> list[str]:
    replies = []
    for ids, mask, pixels, n in _batches(model, items, batch_size, load):
      tokens, lengths = gen.generate(model.cfg, model.params, ids, mask, pixels,
                                     max_new_tokens, model.ids.eos, model.ids.pad)
      tokens, lengths = np.asarray(tokens), np.asarray(lengths)
      for b in range(n):
        replies.append(model.tokenizer.decode(tokens[b, :lengths[b]].tolist(),
                                              skip_special_tokens=True).strip())
    return replies
  return generate


def make_score(model: Model, batch_size: int = 8, answer: str = YES):
  """score(items) -> P(answer | prompt, image) per item."""
  load = _pixels_loader(model)
  option = model.tokenizer(answer, add_special_tokens=False)["input_ids"]

  def score(items: list[dict]) -> list[float]:
    out = []
    for ids, mask, pixels, n in _batches(model, items, batch_size, load):
      logp = gen.score_options(model.cfg, model.params, ids, mask, pixels, [option],
                               pad_id=model.ids.pad)
      out.extend(np.exp(np.asarray(logp[:n, 0], np.float64)).tolist())
    return out
  return score


# ----------------------------------------------------------------------------- driver

def _take(items, limit):
  return list(items) if limit is None else list(items)[:limit]


def evaluate_split(model: Model, eval_dir: str, limit: int | None = None,
                   batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS
                   ) -> tuple[dict, dict, dict, list[str]]:
  """(metrics, details, records, sources) of one eval dir (see the module docstring)."""
  sets = benchmarks.read_synthetic(eval_dir)
  generate = make_generate(model, batch_size, max_new_tokens)
  score = make_score(model, batch_size)
  metrics, details, records, sources = {}, {}, {}, []
  if "sugarcrepe" in sets:
    r = scoring.evaluate_sugarcrepe({s: _take(v, limit) for s, v in sets["sugarcrepe"].items()},
                                    generate)
    metrics["sugarcrepe"] = {"overall": r["overall"], "subsets": r["subsets"]}
    details["sugarcrepe"] = {"by_order": r["by_order"], "unparsed": r["unparsed"],
                             "missing_subsets": r["missing_subsets"]}
    records["sugarcrepe"], sources = r["records"], sources + r["sources"]
  if "vqa" in sets:
    r = scoring.evaluate_vqa(_take(sets["vqa"], limit), generate)
    metrics["vqa"] = {"accuracy": r["accuracy"]}
    details["vqa"] = {"metric": r["metric"], "by_category": r.get("by_category", {})}
    records["vqa"], sources = r["records"], sources + r["sources"]
  if "paired" in sets:
    r = scoring.evaluate_paired(_take(sets["paired"], limit), score)
    metrics["winoground"] = {k: r[k] for k in ("text", "image", "group")}
    records["winoground"], sources = r["records"], sources + r["sources"]
  return metrics, details, records, sources


def evaluate_synthetic(model: Model, data_dir: str, limit: int | None = None,
                       batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS,
                       records: bool = False) -> dict[str, Any]:
  """Seen and held-out results of `model` on the synthetic export in data_dir."""
  if limit is not None and limit < 1:
    raise ValueError(f"limit={limit} must be >= 1 (or None for every item).")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  found = {split: os.path.join(data_dir, sub) for split, sub in SPLITS.items()
           if os.path.isdir(os.path.join(data_dir, sub))}
  if not found:
    raise ValueError(f"{data_dir!r} has no eval/ folder; point --data at a synthetic "
                     "export (cdx.data.synthetic.export, e.g. WORKDIR/data).")
  out: dict[str, Any] = {}
  details, all_records, sources = {}, {}, []
  for split, eval_dir in found.items():
    out[split], details[split], all_records[split], src = evaluate_split(
        model, eval_dir, limit, batch_size, max_new_tokens)
    sources += src
  out["details"] = details
  out["sources"] = sorted(set(sources))
  out["settings"] = {"model": model.name, "data": os.path.abspath(data_dir), "limit": limit,
                     "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "template": model.template, "image_mode": model.image_mode,
                     "paired_score": f"P({YES!r})", "decoding": "greedy",
                     "backend": jax.default_backend()}
  if records:
    out["records"] = all_records
  return out


def summary_lines(results: dict[str, Any]) -> list[str]:
  """One line per split and benchmark, for printing."""
  lines = []
  for split in SPLITS:
    for bench, metrics in results.get(split, {}).items():
      flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
      lines.append(f"{split:8s} {bench:11s} " +
                   " ".join(f"{k}={v:.4f}" for k, v in flat.items()))
  return lines


def write_results(results: dict[str, Any], path: str) -> None:
  """Writes results as JSON (atomically: a reader never sees half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
