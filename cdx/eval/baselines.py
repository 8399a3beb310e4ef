"""What a two-choice (SugarCrepe-style) set is worth without the image.

Two references for every results table, so a reader sees what the image adds:
  text heuristics  pick one of the two captions from their words alone: the shorter or
                   longer one, the one with fewer or more words, the one naming (or not) a
                   held-out (colour, shape) pair, the one a bigram language model fitted on
                   the training texts finds more (or less) likely. A set free of text-only
                   shortcuts leaves every heuristic near 0.5 (binomial SE sqrt(0.25 / n):
                   0.022 at n = 500); the best of them is the "text-only" row.
  VQA prior        each eval question answered with the commonest training answer to
                   its template (`vqa_prior`): what a model that ignores the image gets.
  blind            the model itself on grey images: `blind_export` writes a copy of an
                   export's eval sets whose every image is one blank canvas (the world's
                   background, i.e. an empty scene); run `cdx.eval.run.evaluate_synthetic`
                   on that copy for the "grey image" row.

  rows = synthetic_text_baselines("WORKDIR/data")   # {split: {heuristic: {...}}, "best"}
  prior = vqa_prior("WORKDIR/data")                 # VQA: commonest answer per template
  blind_dir = blind_export("WORKDIR/data", "WORKDIR/data_blind")

A heuristic scores an item 1 if it prefers the true caption, 0 if the false one, 0.5 on a
tie (the expected score of a coin flip), so a heuristic that cannot tell scores 0.5.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from cdx.data.synthetic import world
from cdx.eval import benchmarks
from cdx.eval import scoring

Scorer = Callable[[str], float]
_WORD = re.compile(r"[a-z]+")


def words(caption: str) -> list[str]:
  return _WORD.findall(caption.lower())


class BigramLM:
  """Add-k smoothed word bigram model of a list of training texts."""

  def __init__(self, texts: Iterable[str], k: float = 0.1):
    self.k = k
    self.unigrams: collections.Counter = collections.Counter()
    self.bigrams: collections.Counter = collections.Counter()
    for t in texts:
      ws = ["<s>"] + words(t) + ["</s>"]
      self.unigrams.update(ws[:-1])
      self.bigrams.update(zip(ws[:-1], ws[1:]))
    self.vocab = len(set(self.unigrams) | {"</s>"}) + 1  # + unknown

  def logprob(self, caption: str) -> float:
    ws = ["<s>"] + words(caption) + ["</s>"]
    return sum(math.log((self.bigrams[(a, b)] + self.k)
                        / (self.unigrams[a] + self.k * self.vocab))
               for a, b in zip(ws[:-1], ws[1:]))


def make_heuristics(train_texts: Sequence[str] = (), heldout_phrases: Sequence[str] = (),
                    ) -> dict[str, Scorer]:
  """{name: caption -> score}; a heuristic picks the caption with the higher score."""
  out: dict[str, Scorer] = {
      "shorter": lambda c: -len(c), "longer": lambda c: len(c),
      "fewer_words": lambda c: -len(words(c)), "more_words": lambda c: len(words(c)),
  }
  if heldout_phrases:
    phrases = [p.lower() for p in heldout_phrases]
    names = lambda c: sum(p in c.lower() for p in phrases)
    out["names_heldout"] = names
    out["avoids_heldout"] = lambda c: -names(c)
  if train_texts:
    lm = BigramLM(train_texts)
    out["lm_likelier"] = lm.logprob
    out["lm_unlikelier"] = lambda c: -lm.logprob(c)
    out["lm_likelier_per_word"] = lambda c: lm.logprob(c) / (len(words(c)) + 1)
    out["lm_unlikelier_per_word"] = lambda c: -lm.logprob(c) / (len(words(c)) + 1)
  return out


def item_scores(items: Sequence[Mapping], scorer: Scorer) -> np.ndarray:
  """float [n]: 1 = prefers the positive, 0 = the negative, 0.5 = tie."""
  pos = np.array([scorer(it["positive"]) for it in items], np.float64)
  neg = np.array([scorer(it["negative"]) for it in items], np.float64)
  return np.where(pos > neg, 1.0, np.where(pos < neg, 0.0, 0.5))


def text_baselines(items_by_subset: Mapping[str, Sequence[Mapping]],
                   heuristics: Mapping[str, Scorer]) -> dict:
  """{"heuristics": {name: {"overall", "subsets": {subset: acc}}}, "best": {"name",
  "overall"}, "n": {subset: items}}; overall = mean of the subsets (as the model's)."""
  table = {}
  for name, scorer in heuristics.items():
    subsets = {s: float(item_scores(items, scorer).mean())
               for s, items in items_by_subset.items() if items}
    table[name] = {"overall": float(np.mean(list(subsets.values()))), "subsets": subsets}
  best = max(table, key=lambda n: table[n]["overall"])
  return {"heuristics": table, "best": {"name": best, "overall": table[best]["overall"]},
          "n": {s: len(v) for s, v in items_by_subset.items()}}


def _training_texts(data_dir: str) -> list[str]:
  texts = []
  for name in ("pretrain.json", "instruct.json"):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      with open(path) as f:
        texts += [t["value"] for rec in json.load(f) for t in rec["conversations"]
                  if t["from"] == "gpt"]
  return texts


def synthetic_text_baselines(data_dir: str) -> dict:
  """Text heuristics on the seen and held-out CR sets of a synthetic export.

  The language model is fitted on the export's training answers (pretrain captions and
  instruct replies); held-out phrases are "colour shape" of world.json's held-out pairs.
  Returns {split: text_baselines(...)} for the splits present.
  """
  meta_path = os.path.join(data_dir, "world.json")
  if not os.path.isfile(meta_path):
    raise ValueError(f"{data_dir!r} has no world.json; point it at a synthetic export "
                     "(cdx.data.synthetic.export).")
  with open(meta_path) as f:
    held = [f"{c} {s}" for c, s in json.load(f)["heldout_combos"]]
  heuristics = make_heuristics(_training_texts(data_dir), held)
  out = {}
  for split, sub in (("seen", "eval"), ("heldout", os.path.join("eval", "heldout"))):
    eval_dir = os.path.join(data_dir, sub)
    if os.path.isdir(eval_dir):
      sets = benchmarks.read_synthetic(eval_dir, root=data_dir)
      if "sugarcrepe" in sets:
        out[split] = text_baselines(sets["sugarcrepe"], heuristics)
  return out


# ---------------------------------------------------------------------------------------
# VQA answer prior.

def question_template(question: str) -> str:
  """The question with every colour, shape and size word replaced by its kind."""
  kinds = {**{c: "<color>" for c in world.COLORS}, **{s: "<size>" for s in world.SIZES},
           **{s: "<shape>" for s in world.SHAPES},
           **{p: "<shapes>" for p in world.PLURALS.values()}}
  return " ".join(kinds.get(w, w) for w in words(question.split("\n")[0]))


def vqa_prior(data_dir: str) -> dict:
  """The most frequent training answer of each question template, scored on the VQA sets.

  Answers the eval questions without the image: per `question_template`, the commonest
  short answer of the export's VQA-style training turns (the overall commonest for an
  unseen template). Returns {split: {"accuracy", "by_category": {category: acc}}} (exact
  match, case-insensitive, as the synthetic VQA is scored).
  """
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  with open(os.path.join(data_dir, "instruct.json")) as f:
    for rec in json.load(f):
      conv = rec["conversations"]
      for q, a in zip(conv[::2], conv[1::2]):
        if q["value"].endswith(scoring.VQA_SUFFIX):
          counts[question_template(q["value"].removeprefix("<image>\n"))][a["value"]] += 1
  overall = sum(counts.values(), collections.Counter())
  out = {}
  for split, sub in (("seen", "eval"), ("heldout", os.path.join("eval", "heldout"))):
    path = os.path.join(data_dir, sub, "vqa.json")
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      items = json.load(f)
    hits = collections.defaultdict(list)
    for it in items:
      prior = counts.get(question_template(it["text"])) or overall
      hits[it["category"]].append(prior.most_common(1)[0][0].lower() == it["answer"].lower())
    every = [h for v in hits.values() for h in v]
    out[split] = {"accuracy": float(np.mean(every)),
                  "by_category": {k: float(np.mean(v)) for k, v in sorted(hits.items())}}
  return out


# ---------------------------------------------------------------------------------------
# Blind (grey image) copies.

BLIND_IMAGE = "images/blind.png"
_IMAGE_KEYS = ("image", "filename", "image_0", "image_1")


def _blind(obj):
  if isinstance(obj, list):
    return [_blind(x) for x in obj]
  if isinstance(obj, dict):
    return {k: BLIND_IMAGE if k in _IMAGE_KEYS and isinstance(v, str) else _blind(v)
            for k, v in obj.items()}
  return obj


def blind_export(data_dir: str, out_dir: str, color: Sequence[int] = world.BACKGROUND,
                 ) -> str:
  """Copies data_dir's eval sets into out_dir with every image path -> one blank image.

  The image (out_dir/images/blind.png) has the export's size and `color` (default: the
  world's background, an empty scene). world.json is copied too. Returns out_dir, ready for
  `cdx.eval.run.evaluate_synthetic(model, out_dir)`.
  """
  src = os.path.join(data_dir, "eval")
  if not os.path.isdir(src):
    raise ValueError(f"{data_dir!r} has no eval/ folder; point it at a synthetic export.")
  with open(os.path.join(data_dir, "world.json")) as f:
    size = int(json.load(f)["size"])
  for dirpath, _, names in os.walk(src):
    for name in sorted(n for n in names if n.endswith(".json")):
      rel = os.path.relpath(os.path.join(dirpath, name), data_dir)
      with open(os.path.join(data_dir, rel)) as f:
        items = json.load(f)
      os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
      with open(os.path.join(out_dir, rel), "w") as f:
        json.dump(_blind(items), f)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  canvas = np.empty((size, size, 3), np.uint8)
  canvas[:] = np.asarray(color, np.uint8)
  Image.fromarray(canvas).save(os.path.join(out_dir, BLIND_IMAGE))
  shutil.copy(os.path.join(data_dir, "world.json"), os.path.join(out_dir, "world.json"))
  return out_dir
