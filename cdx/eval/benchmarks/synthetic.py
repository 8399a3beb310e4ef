"""The synthetic world's eval sets, as written by `cdx.data.synthetic.export`."""
from __future__ import annotations

import os
from typing import Any

from cdx.eval import scoring
from cdx.eval.benchmarks import captions
from cdx.eval.benchmarks import files

# Field names of the synthetic world's eval files: {kind: {our name: name in the file}}.
# The exporter is another module's; align here if it changes.
SYNTHETIC_FIELDS = {
    "vqa": {"id": "question_id", "image": "image", "question": "text", "answer": "answer",
            "category": "category"},
    "sugarcrepe": {"image": "filename", "positive": "caption",
                   "negative": "negative_caption"},
    "paired": {"id": "id", "image_0": "image_0", "image_1": "image_1",
               "caption_0": "caption_0", "caption_1": "caption_1", "tag": "tag"},
}
SYNTHETIC_FILES = {"vqa": "vqa.json", "paired": "winoground.json",
                   "sugarcrepe": "sugarcrepe_{subset}.json"}


def _first_field(path: str, name: str) -> str | None:
  pairs = files.records(files.load_json(path), path)
  return pairs[0][1].get(name) if pairs else None


def _synthetic_root(eval_dir: str, first_image: str) -> str:
  """The export dir that image paths are relative to: eval_dir or one of its parents."""
  d = os.path.abspath(eval_dir)
  for _ in range(4):
    if os.path.isfile(os.path.join(d, first_image)):
      return d
    d = os.path.dirname(d)
  raise ValueError(f"cannot find image {first_image!r} under {eval_dir!r} or its parents; "
                   "pass root= (the export directory).")


def synthetic_files(eval_dir: str) -> list[str]:
  """The synthetic eval files present in eval_dir."""
  names = [SYNTHETIC_FILES["vqa"], SYNTHETIC_FILES["paired"]] + [
      SYNTHETIC_FILES["sugarcrepe"].format(subset=s) for s in scoring.SUGARCREPE_SUBSETS]
  return [os.path.join(eval_dir, n) for n in names
          if os.path.isfile(os.path.join(eval_dir, n))]


def read_synthetic(eval_dir: str, root: str | None = None) -> dict[str, Any]:
  """The synthetic world's eval sets found in eval_dir (e.g. DIR/eval or DIR/eval/heldout).

  Returns {"vqa": items, "sugarcrepe": {subset: items}, "paired": items}, each key only
  when its files exist; items carry benchmark "synthetic_vqa", "synthetic_sugarcrepe",
  "synthetic_paired". Image paths in the files are relative to root (the export
  directory; found by looking up from eval_dir when not given). VQA questions carry the
  short-answer instruction already; it is stripped into "question" and re-added in
  "prompt". VQA gold is one "answer" (score with exact match).
  """
  out: dict[str, Any] = {}
  vqa_path = os.path.join(eval_dir, SYNTHETIC_FILES["vqa"])
  sc_paths = {s: os.path.join(eval_dir, SYNTHETIC_FILES["sugarcrepe"].format(subset=s))
              for s in scoring.SUGARCREPE_SUBSETS}
  sc_paths = {s: p for s, p in sc_paths.items() if os.path.isfile(p)}
  paired_path = os.path.join(eval_dir, SYNTHETIC_FILES["paired"])

  def resolve(first_image: str | None) -> str:
    nonlocal root
    if root is None:
      if first_image is None:   # an empty file: nothing to join, nothing learnt
        return eval_dir
      root = _synthetic_root(eval_dir, first_image)
    return root

  if os.path.isfile(vqa_path):
    f = SYNTHETIC_FIELDS["vqa"]
    source = files.file_source(vqa_path)
    items = []
    for key, rec in files.records(files.load_json(vqa_path), vqa_path):
      question = files.field(rec, f["question"], vqa_path, key).removesuffix(
          scoring.VQA_SUFFIX)
      image = files.field(rec, f["image"], vqa_path, key)
      extra = {"category": rec[f["category"]]} if f["category"] in rec else {}
      items.append(files.make_item(
          "synthetic_vqa", rec.get(f["id"], key), None, source, question=question,
          prompt=scoring.vqa_prompt(question), image=os.path.join(resolve(image), image),
          answer=str(files.field(rec, f["answer"], vqa_path, key)), **extra))
    out["vqa"] = items
  if sc_paths:
    f = SYNTHETIC_FIELDS["sugarcrepe"]
    first = _first_field(next(iter(sc_paths.values())), f["image"])
    out["sugarcrepe"] = {
        s: captions.read_sugarcrepe(p, resolve(first), s, fields=f,
                                    benchmark="synthetic_sugarcrepe")
        for s, p in sc_paths.items()}
  if os.path.isfile(paired_path):
    f = SYNTHETIC_FIELDS["paired"]
    out["paired"] = captions.read_paired(
        paired_path, resolve(_first_field(paired_path, f["image_0"])), fields=f,
        benchmark="synthetic_paired")
  if not out:
    raise ValueError(f"no synthetic eval files ({sorted(SYNTHETIC_FILES.values())}) in "
                     f"{eval_dir!r}.")
  return out
