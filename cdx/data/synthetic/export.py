"""Writes the synthetic world to disk in the layout of the real LLaVA data.

  python -m cdx.data.synthetic.export --out DIR --num-train 20000 --seed 0 [--num-eval 200]
      [--num-cr 500] [--format-frac 0.3]

DIR/
  pretrain.json, instruct.json            LLaVA conversation lists (see text.py)
  eval/vqa.json, eval/winoground.json      seen combinations, --num-eval items each
  eval/sugarcrepe_{subset}.json           seen combinations, --num-cr items each (balanced:
                                          contrast.py)
  eval/heldout/...                        the same sets built around held-out combinations
  images/{pretrain,instruct,eval,eval_heldout}/*.png      uint8 RGB, size x size
  scenes.json                             image path -> objects (shape, colour, size, x, y)
  world.json                              seed, sizes, counts, vocabulary, held-out pairs
Image paths inside the json files are relative to DIR. Output is a pure function of the
arguments: the json files are byte-identical across runs.

Timing on the project's shared 2-core CPU box (`--num-train 20000 --num-eval 200`, 64 px,
40k training images + 5.2k evaluation images):
  texts + scenes + json 10 s, rendering + PNG writing (zlib level 1) 23 s: 34 s wall,
  10 s of it user CPU (43k PNG files, 191 MB; the box was shared with other jobs).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence

import numpy as np
from PIL import Image

from cdx.data.synthetic import text
from cdx.data.synthetic import world

# Bumped whenever the same arguments would export a different world, so `ensure` never
# reuses a folder written by older code (2: larger objects, balanced CR sets, formats;
# 3: 2-6 instruction turns per image; 4: VQA types take turns, yes/no answers balanced).
WORLD_VERSION = 4


def _dump(obj, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def write_images(out: str, scenes: dict[str, world.Scene], size: int, antialias: int,
                 chunk: int = 1024) -> None:
  """Renders scenes (keyed by relative image path) and writes them as PNG files."""
  paths = sorted(scenes)
  for d in sorted({os.path.dirname(p) for p in paths}):
    os.makedirs(os.path.join(out, d), exist_ok=True)
  for start in range(0, len(paths), chunk):
    batch = paths[start:start + chunk]
    images = world.render([scenes[p] for p in batch], size, antialias)
    for p, img in zip(batch, images):
      Image.fromarray(img).save(os.path.join(out, p), compress_level=1)


def eval_sets(num_eval: int, seed: int, pool: text.Pool, image_dir: str,
              num_cr: int | None = None) -> tuple[dict[str, object], dict[str, world.Scene]]:
  """{file name: items} for one pool and the scenes behind their images.

  num_eval VQA and Winoground items, num_cr (default num_eval) items per SugarCrepe subset.
  """
  num_cr = num_eval if num_cr is None else num_cr
  files, scenes = {}, {}
  vqa = []
  for i in range(num_eval):
    item, scene = text.vqa_item(i, seed, pool, image_dir)
    vqa.append(item)
    scenes[item["image"]] = scene
  files["vqa.json"] = vqa
  for subset in text.SUGARCREPE_SUBSETS:
    items = {}
    for i in range(num_cr):
      item, scene = text.sugarcrepe_item(subset, i, seed, pool, image_dir)
      items[str(i)] = item
      scenes[item["filename"]] = scene
    files[f"sugarcrepe_{subset}.json"] = items
  wino = []
  for i in range(num_eval):
    item, pair = text.winoground_item(i, seed, pool, image_dir)
    wino.append(item)
    scenes[item["image_0"]], scenes[item["image_1"]] = pair
  files["winoground.json"] = wino
  return files, scenes


def export(out: str, num_train: int, seed: int, num_eval: int = 200, size: int = 64,
           antialias: int = 1, text_only_frac: float = 0.05, heldout_shift: int = 3,
           images: bool = True, num_cr: int | None = None, format_frac: float = 0.3,
           ) -> dict[str, float]:
  """Writes everything under `out`; returns seconds spent per phase.

  num_cr: items per SugarCrepe subset (None: num_eval; the CLI's default is 500).
  """
  num_cr = num_eval if num_cr is None else num_cr
  if num_train < 1 or num_eval < 1 or num_cr < 1:
    raise ValueError(f"num_train={num_train}, num_eval={num_eval} and num_cr={num_cr} "
                     "must be >= 1.")
  for name, frac in (("text_only_frac", text_only_frac), ("format_frac", format_frac)):
    if not 0.0 <= frac < 1.0:
      raise ValueError(f"{name}={frac} must be in [0, 1).")
  heldout = world.heldout_combos(heldout_shift)
  seen, held = text.Pool.seen(heldout), text.Pool.heldout(heldout)
  times, t0 = {}, time.perf_counter()
  scenes: dict[str, world.Scene] = {}
  pretrain, instruct = [], []
  for i in range(num_train):
    rec, scene = text.pretrain_record(i, seed, seen)
    pretrain.append(rec)
    scenes[rec["image"]] = scene
    rec, scene = text.instruct_record(i, seed, seen, text_only_frac, format_frac)
    instruct.append(rec)
    if scene is not None:
      scenes[rec["image"]] = scene
  _dump(pretrain, os.path.join(out, "pretrain.json"))
  _dump(instruct, os.path.join(out, "instruct.json"))
  for pool, sub, image_dir in ((seen, "eval", "images/eval"),
                               (held, "eval/heldout", "images/eval_heldout")):
    files, eval_scenes = eval_sets(num_eval, seed, pool, image_dir, num_cr)
    for name, items in files.items():
      _dump(items, os.path.join(out, sub, name))
    scenes.update(eval_scenes)
  _dump({p: scenes[p].to_json() for p in sorted(scenes)}, os.path.join(out, "scenes.json"))
  _dump({"seed": seed, "size": size, "antialias": antialias, "num_train": num_train,
         "num_eval": num_eval, "num_cr": num_cr, "format_frac": format_frac,
         "world_version": WORLD_VERSION, "radius": world.RADIUS, "num_images": len(scenes),
         "shapes": list(world.SHAPES), "colors": world.COLORS, "sizes": list(world.SIZES),
         "heldout_combos": sorted(heldout)}, os.path.join(out, "world.json"))
  times["texts"] = time.perf_counter() - t0
  if images:
    t0 = time.perf_counter()
    write_images(out, scenes, size, antialias)
    times["images"] = time.perf_counter() - t0
  return times


def ensure(out: str, num_train: int, seed: int, vocab_size: int, num_eval: int = 100,
           size: int = 64, num_cr: int | None = None, format_frac: float = 0.3) -> str:
  """Exports the world and trains its tokenizer into `out` unless already there.

  Returns the tokenizer dir. `out/READY` (written last, holding the arguments) marks a
  complete export; a different request for the same folder is an error, not a silent reuse.
  """
  from cdx.data import tokenizer as tokenizer_lib  # The tokenizer is data-layer generic.
  num_cr = num_eval if num_cr is None else num_cr
  want = {"num_train": num_train, "seed": seed, "vocab_size": vocab_size,
          "num_eval": num_eval, "size": size, "num_cr": num_cr, "format_frac": format_frac,
          "world_version": WORLD_VERSION}
  marker, tok_dir = os.path.join(out, "READY"), os.path.join(out, "tokenizer")
  if os.path.isfile(marker):
    with open(marker) as f:
      have = json.load(f)
    if have.get("world_version") != WORLD_VERSION:
      raise ValueError(
          f"{out} holds a synthetic world of version {have.get('world_version')}, made by "
          f"older code; this code makes version {WORLD_VERSION} ({__name__}.WORLD_VERSION). "
          "Models trained on it are not comparable with new ones: use another --workdir, "
          "or delete that folder to export the new world.")
    if have != want:
      raise ValueError(f"{out} holds a synthetic export made with {have}, but {want} was "
                       "asked for: use another --workdir or delete that folder.")
    return tok_dir
  export(out, num_train, seed, num_eval=num_eval, size=size, num_cr=num_cr,
         format_frac=format_frac)
  tokenizer_lib.build_tokenizer(text.corpus(), tok_dir, vocab_size=vocab_size)
  _dump(want, marker + ".tmp")
  os.replace(marker + ".tmp", marker)
  return tok_dir


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--num-train", type=int, required=True,
                 help="pretrain samples; also instruct samples")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num-eval", type=int, default=200, help="items per evaluation set")
  p.add_argument("--size", type=int, default=64, help="image side in pixels")
  p.add_argument("--antialias", type=int, default=1, help="supersampling factor, 1 = off")
  p.add_argument("--num-cr", type=int, default=500, help="items per SugarCrepe subset")
  p.add_argument("--text-only-frac", type=float, default=0.05)
  p.add_argument("--format-frac", type=float, default=0.3,
                 help="share of instruct turns in the two-choice / yes-no formats")
  p.add_argument("--heldout-shift", type=int, default=3,
                 help="which colour each shape is held out with (world.heldout_combos)")
  a = p.parse_args(argv)
  times = export(a.out, a.num_train, a.seed, a.num_eval, a.size, a.antialias,
                 a.text_only_frac, a.heldout_shift, num_cr=a.num_cr,
                 format_frac=a.format_frac)
  print(json.dumps({"out": a.out, **{f"{k}_s": round(v, 2) for k, v in times.items()}}))


if __name__ == "__main__":
  main()
