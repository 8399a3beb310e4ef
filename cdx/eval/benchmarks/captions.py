"""Caption benchmarks: SugarCrepe, SugarCrepe++, Winoground, BiVLC (docs/METHOD.md §9).

Two-choice items (SugarCrepe, SugarCrepe++): {"image", "positive", "negative"} (+
"positive2" for SugarCrepe++); the scorer builds the questions (both orders).
Paired items (Winoground, BiVLC): {"image_0", "image_1", "caption_0", "caption_1"},
caption k true for image k; the scorer scores all four (image, caption) pairs.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from cdx.eval import scoring
from cdx.eval.benchmarks import files
from cdx.eval.benchmarks.files import Item

SUGARCREPE_SUBSETS = scoring.SUGARCREPE_SUBSETS
# SugarCrepe++ subsets as its Hugging Face configs name them ("swap_atribute" is theirs),
# with the file names of its GitHub data/ folder (and their spelled-out forms) as aliases.
SUGARCREPE_PP_SUBSETS = {
    "swap_object": ("swap_object", "swap_obj"),
    "swap_atribute": ("swap_atribute", "swap_attribute", "swap_att"),
    "replace_object": ("replace_object", "replace_obj"),
    "replace_attribute": ("replace_attribute", "replace_att"),
    "replace_relation": ("replace_relation", "replace_rel"),
}
_COCO_VAL2017 = ("val2017", os.path.join("coco", "val2017"), "images")


def _subset_from_name(path: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem.removeprefix("sugarcrepe_")


def _subset_in_path(path: str, names) -> str | None:
  """The subset named by a parquet path (".../SugarCrepe_swap_obj/data/test-0.parquet")."""
  parts = os.path.normpath(path).split(os.sep)
  for part in reversed(parts):
    stem = os.path.splitext(part)[0]
    for name in names:
      if stem == name or stem.endswith("_" + name) or stem.startswith(name + "-"):
        return name
  return None


# ----------------------------------------------------------------------------- SugarCrepe

def read_sugarcrepe(path: str, image_dir: str, subset: str | None = None,
                    fields: Mapping[str, str] | None = None,
                    benchmark: str = "sugarcrepe") -> list[Item]:
  """One SugarCrepe subset file of the GitHub layout -> two-choice items.

  The file is {id: {"filename", "caption", "negative_caption"}}; images are
  image_dir/filename (COCO val2017). subset defaults to the file name ("swap_obj.json"
  or "sugarcrepe_swap_obj.json"). Items: "image", "positive", "negative", "filename".
  """
  subset = subset or _subset_from_name(path)
  if subset not in SUGARCREPE_SUBSETS:
    raise ValueError(f"{path!r}: subset {subset!r} is not one of {SUGARCREPE_SUBSETS}; "
                     "pass subset=.")
  f = {"image": "filename", "positive": "caption", "negative": "negative_caption",
       **(fields or {})}
  source = files.file_source(path)
  items = []
  for key, rec in files.records(files.load_json(path), path):
    name = files.field(rec, f["image"], path, key)
    items.append(files.make_item(
        benchmark, key, subset, source, image=os.path.join(image_dir, name),
        filename=name, positive=files.field(rec, f["positive"], path, key),
        negative=files.field(rec, f["negative"], path, key)))
  return items


def read_sugarcrepe_parquet(path: str, subset: str | None = None,
                            cache_dir: str | None = None) -> list[Item]:
  """One SugarCrepe subset in a Hugging Face parquet file -> two-choice items.

  Two public column layouts are read:
    HuggingFaceM4/SugarCrepe_{subset}: "image" (embedded), "tested_labels" = [caption,
        negative_caption], "true_label" (a ClassLabel; its name must be tested_labels[0])
    flat copies: "image" or "images" (embedded), "caption", "negative_caption"
  Embedded images are written once to cache_dir (see `files.image_cache`); "filename" is
  the stored image name when there is one. The id is the row number, which follows the
  GitHub file's order. subset defaults to the subset named in the path (e.g. the
  "SugarCrepe_swap_obj" folder).
  """
  subset = subset or _subset_in_path(path, SUGARCREPE_SUBSETS)
  if subset not in SUGARCREPE_SUBSETS:
    raise ValueError(f"{path!r}: cannot tell the SugarCrepe subset from the path; pass "
                     f"subset= (one of {SUGARCREPE_SUBSETS}).")
  rows, features = files.read_parquet(path)
  source = files.file_source(path)
  cache = files.image_cache(path, cache_dir)
  names = features.get("true_label", {}).get("names")
  items = []
  for n, row in enumerate(rows):
    if "tested_labels" in row:
      labels = row["tested_labels"]
      labels = labels.tolist() if hasattr(labels, "tolist") else labels   # pandas: array
      if not isinstance(labels, list) or len(labels) != 2:
        raise ValueError(f"{path!r}: row {n} field 'tested_labels' must be [caption, "
                         f"negative_caption], got {labels!r}.")
      positive, negative = labels
      label = row.get("true_label")
      named = names[label] if names and label is not None and 0 <= label < len(names) else (
          positive if label is None or not names else None)
      if named != positive:
        raise ValueError(f"{path!r}: row {n} field 'true_label' ({label}) names {named!r}, "
                         f"not tested_labels[0] {positive!r}.")
    else:
      positive = files.field(row, "caption", path, n)
      negative = files.field(row, "negative_caption", path, n)
    column = "image" if "image" in row else "images"
    value = files.field(row, column, path, n)
    if isinstance(value, list) and len(value) == 1:
      value = value[0]
    image = files.save_image(value, cache, f"{subset}_{n:06d}", path, column)
    extra = {}
    if isinstance(value, Mapping) and value.get("path"):
      extra["filename"] = os.path.basename(value["path"])   # the COCO file name
    items.append(files.make_item("sugarcrepe", n, subset, source, image=image,
                                 positive=positive, negative=negative, **extra))
  return items


def sugarcrepe_files(data_dir: str) -> dict[str, list[str]]:
  """{subset: [annotation files]} found in a folder, JSON ({s}.json, sugarcrepe_{s}.json)
  before parquet (any *.parquet whose path names the subset)."""
  out: dict[str, list[str]] = {}
  for subset in SUGARCREPE_SUBSETS:
    for name in (f"{subset}.json", f"sugarcrepe_{subset}.json"):
      if os.path.isfile(os.path.join(data_dir, name)):
        out[subset] = [os.path.join(data_dir, name)]
        break
  for path in files.parquet_files(data_dir) if os.path.isdir(data_dir) else []:
    subset = _subset_in_path(os.path.relpath(path, data_dir), SUGARCREPE_SUBSETS)
    if subset is not None and not (out.get(subset, [""])[0]).endswith(".json"):
      out.setdefault(subset, []).append(path)
  return out


def read_sugarcrepe_dir(data_dir: str, image_dir: str | None = None,
                        cache_dir: str | None = None) -> dict[str, list[Item]]:
  """All subsets found in a folder as {subset: items}: GitHub JSON files (images from
  image_dir, default data_dir/val2017) or HF parquet files (images embedded)."""
  found = sugarcrepe_files(data_dir)
  if not found:
    raise ValueError(f"no SugarCrepe subset files in {data_dir!r} (expected e.g. "
                     "swap_obj.json, or SugarCrepe_swap_obj/data/*.parquet).")
  out = {}
  for subset, paths in found.items():
    if paths[0].endswith(".json"):
      images = image_dir or files.find_dir(data_dir, _COCO_VAL2017)
      if images is None:
        raise ValueError(f"{paths[0]!r} names COCO val2017 images: pass the image folder "
                         f"(looked for {list(_COCO_VAL2017)} in {data_dir!r}).")
      out[subset] = read_sugarcrepe(paths[0], images, subset)
    else:
      items = [it for p in paths for it in read_sugarcrepe_parquet(p, subset, cache_dir)]
      if len(paths) > 1:   # shards: ids continue across files
        items = [{**it, "id": str(n), "uid": f"sugarcrepe/{subset}/{n}"}
                 for n, it in enumerate(items)]
      out[subset] = items
  return out


# ----------------------------------------------------------------------------- SugarCrepe++

def _pp_subset(name: str) -> str | None:
  for subset, aliases in SUGARCREPE_PP_SUBSETS.items():
    if name in aliases:
      return subset
  return None


def read_sugarcrepe_pp(path: str, image_dir: str, subset: str | None = None) -> list[Item]:
  """One SugarCrepe++ file -> two-choice items with a second positive caption.

  The file is a list (or {id: record}) of {"id", "filename", "caption", "caption2",
  "negative_caption"}; images image_dir/filename (COCO val2017). Items: "image",
  "positive" (caption), "positive2" (caption2), "negative", "filename"; the subset is
  the HF config name (see SUGARCREPE_PP_SUBSETS), from the file name by default.
  """
  name = subset or _subset_from_name(path)
  subset = _pp_subset(name)
  if subset is None:
    raise ValueError(f"{path!r}: {name!r} is not a SugarCrepe++ subset (one of "
                     f"{sorted(a for v in SUGARCREPE_PP_SUBSETS.values() for a in v)}); "
                     "pass subset=.")
  source = files.file_source(path)
  items = []
  for key, rec in files.records(files.load_json(path), path):
    filename = files.field(rec, "filename", path, key)
    items.append(files.make_item(
        "sugarcrepe_pp", rec.get("id", key), subset, source,
        image=os.path.join(image_dir, filename), filename=filename,
        positive=files.field(rec, "caption", path, key),
        positive2=files.field(rec, "caption2", path, key),
        negative=files.field(rec, "negative_caption", path, key)))
  files.check_unique(items, path)
  return items


def sugarcrepe_pp_files(data_dir: str) -> dict[str, str]:
  """{subset: file} of the SugarCrepe++ files in data_dir or data_dir/data."""
  out = {}
  for folder in (data_dir, os.path.join(data_dir, "data")):
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      subset = _pp_subset(os.path.splitext(name)[0]) if name.endswith(".json") else None
      if subset is not None and subset not in out:
        out[subset] = os.path.join(folder, name)
  return out


def read_sugarcrepe_pp_dir(data_dir: str, image_dir: str) -> dict[str, list[Item]]:
  """Every SugarCrepe++ subset file in data_dir (or data_dir/data) as {subset: items}."""
  found = sugarcrepe_pp_files(data_dir)
  if not found:
    raise ValueError(f"no SugarCrepe++ files in {data_dir!r} (expected e.g. "
                     "replace_rel.json or swap_object.json).")
  return {s: read_sugarcrepe_pp(p, image_dir, s) for s, p in found.items()}


# ----------------------------------------------------------------------------- paired

PAIRED_FIELDS = {"id": "id", "image_0": "image_0", "image_1": "image_1",
                 "caption_0": "caption_0", "caption_1": "caption_1", "tag": "tag"}


def read_paired(path: str, image_dir: str, image_ext: str = "",
                fields: Mapping[str, str] | None = None,
                benchmark: str = "winoground") -> list[Item]:
  """Winoground-style 2x2 items -> [{"image_0", "image_1", "caption_0", "caption_1",
  "tag"?, "secondary_tag"?}]. image_ext is appended to image names given without an
  extension (Winoground's examples.jsonl: "ex_0_img_0" -> ".png")."""
  f = {**PAIRED_FIELDS, **(fields or {})}
  source = files.file_source(path)
  items = []
  for key, rec in files.records(files.load_json(path), path):
    parts: dict[str, Any] = {}
    for k in (0, 1):
      name = str(files.field(rec, f[f"image_{k}"], path, key))
      if image_ext and not os.path.splitext(name)[1]:
        name += image_ext
      parts[f"image_{k}"] = os.path.join(image_dir, name)
      parts[f"caption_{k}"] = files.field(rec, f[f"caption_{k}"], path, key)
    for k in ("tag", "secondary_tag", "collapsed_tag"):
      if f.get(k, k) in rec:
        parts[k] = rec[f.get(k, k)]
    items.append(files.make_item(benchmark, rec.get(f["id"], key), None, source, **parts))
  files.check_unique(items, path)
  return items


def winoground_file(root: str) -> str:
  """examples.jsonl at root or root/data (or root itself when it is the file)."""
  if os.path.isfile(root):
    return root
  return files.find_file(root, ("examples.jsonl", os.path.join("data", "examples.jsonl")),
                         "Winoground examples.jsonl")


def read_winoground(root: str, image_dir: str | None = None) -> list[Item]:
  """The Winoground release: examples.jsonl (at root or root/data) of {"id", "image_0",
  "image_1", "caption_0", "caption_1", "tag", "secondary_tag", ...} and images/ (beside
  it or one folder up) holding ex_{id}_img_{k}.png. root may be the jsonl itself."""
  path = winoground_file(root)
  base = os.path.dirname(path)
  images = image_dir or files.find_dir(base, ("images",)) or files.find_dir(
      os.path.dirname(base), ("images",))
  if images is None:
    raise ValueError(f"no Winoground images/ folder beside {path!r}; pass the image "
                     "folder (--data=winoground_images=DIR).")
  return read_paired(path, images, image_ext=".png")


def read_bivlc(path: str, cache_dir: str | None = None) -> list[Item]:
  """BiVLC from its Hugging Face parquet file(s) -> paired items.

  Columns: "image", "caption", "negative_image", "negative_caption" (images embedded),
  "type", "subtype". Item: image_0/caption_0 = image/caption, image_1/caption_1 =
  negative_image/negative_caption, "type", "subtype". path: a parquet file or a folder
  of shards (data/test-*.parquet); ids are row numbers across the shards in order.
  """
  shards = files.parquet_files(path)
  if not shards:
    raise ValueError(f"no BiVLC parquet files in {path!r} (expected data/test-*.parquet).")
  items = []
  for shard in shards:
    rows, _ = files.read_parquet(shard)
    source = files.file_source(shard)
    cache = files.image_cache(shard, cache_dir)
    for row in rows:
      n = len(items)
      parts: dict[str, Any] = {}
      for k, (image_col, caption_col) in enumerate((("image", "caption"),
                                                    ("negative_image", "negative_caption"))):
        parts[f"image_{k}"] = files.save_image(files.field(row, image_col, shard, n), cache,
                                               f"{n:06d}_{k}", shard, image_col)
        parts[f"caption_{k}"] = files.field(row, caption_col, shard, n)
      for k in ("type", "subtype"):
        if k in row:
          parts[k] = row[k]
      items.append(files.make_item("bivlc", n, None, source, **parts))
  return items
