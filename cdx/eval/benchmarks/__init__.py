"""Readers that turn local benchmark files, in their public layouts, into items for
`cdx.eval.scoring`. No downloads: every reader takes paths already on disk.

  ds = benchmarks.load("sugarcrepe", "/data/sugarcrepe")          # --data=sugarcrepe=PATH
  ds.items          [Item]: one dict per question / caption pair (see `files.Item`)
  ds.by_subset()    {subset: [Item]} (SugarCrepe subsets, POPE splits, MME subtasks)
  ds.fingerprint    {"sha1", "files", "bytes", "items", "skipped"} for the results record
  ds.skipped        uids dropped because an image file is missing (missing="skip")

`BENCHMARKS` names every benchmark, the `--data` key its files come under and where in
PATH its files and images are looked for; docs/EVALUATION.md has the same table with the
public layouts. `parse_data(["NAME=PATH", ...])` and `load_from_data(name, data)` serve
the --data flags (NAME_images=DIR gives an image folder kept outside PATH). Per-format
readers (read_sugarcrepe, read_pope, ...) are exported too; they parse files and do not
look at images, `load` checks the images afterwards.

Formats read:
  SugarCrepe    GitHub {subset}.json = {id: {"filename", "caption", "negative_caption"}}
                + COCO val2017; or HF parquet (HuggingFaceM4/SugarCrepe_{subset})
  SugarCrepe++  {subset}.json = [{"id", "filename", "caption", "caption2",
                "negative_caption"}] + COCO val2017
  Winoground    examples.jsonl of {"id", "image_0", "image_1", "caption_0", "caption_1",
                "tag", ...} + images/ex_{id}_img_{k}.png
  BiVLC         HF parquet: "image", "caption", "negative_image", "negative_caption",
                "type", "subtype"
  POPE          coco_pope_{random,popular,adversarial}.json, one {"question_id", "image",
                "text", "label"} per line, + COCO val2014
  VQAv2         v2_OpenEnded_mscoco_{sub}_questions.json (+ v2_mscoco_{sub}_annotations.json)
  GQA           testdev_balanced_questions.json = {qid: {"imageId", "question", "answer"}}
  TextVQA       TextVQA_0.5.1_val.json, with LLaVA's llava_textvqa_val_v051_ocr.jsonl or a
                Rosetta OCR json for the OCR line, + train_images/
  VizWiz        val.json = [{"image", "question", "answers", "answerable", "answer_type"}]
  MME           <root>/<subtask>/ with "question<TAB>Yes|No" .txt files beside their
                images, or in questions_answers_YN/ with the images in images/
  synthetic     eval sets of `cdx.data.synthetic.export`
"""
from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cdx.eval.benchmarks import captions
from cdx.eval.benchmarks import files
from cdx.eval.benchmarks import synthetic
from cdx.eval.benchmarks import vqa
from cdx.eval.benchmarks.captions import (PAIRED_FIELDS, SUGARCREPE_PP_SUBSETS,
                                          SUGARCREPE_SUBSETS, read_bivlc, read_paired,
                                          read_sugarcrepe, read_sugarcrepe_dir,
                                          read_sugarcrepe_parquet, read_sugarcrepe_pp,
                                          read_sugarcrepe_pp_dir, read_winoground)
from cdx.eval.benchmarks.files import (MISSING, Item, check_images, file_source,
                                       fingerprint)
from cdx.eval.benchmarks.synthetic import (SYNTHETIC_FIELDS, SYNTHETIC_FILES,
                                           read_synthetic)
from cdx.eval.benchmarks.vqa import (MME_SUBTASKS, POPE_SPLITS, read_gqa, read_mme,
                                     read_pope, read_pope_dir, read_textvqa, read_vizwiz,
                                     read_vqav2)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One benchmark read from local files (see the module docstring)."""
  name: str
  items: list[Item]
  fingerprint: dict[str, Any]
  skipped: list[str]

  def by_subset(self) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {}
    for item in self.items:
      out.setdefault(item["subset"], []).append(item)
    return out


# A reader of the registry: (PATH, image folder or None, options) -> (items, files read).
Reader = Callable[[str, str | None, dict], tuple[list[Item], list[str]]]


@dataclasses.dataclass(frozen=True)
class Spec:
  """How `load` reads one benchmark."""
  data: str                       # the NAME of --data=NAME=PATH holding its files
  read: Reader
  image_dirs: tuple[str, ...]     # image folders looked for in PATH; () = in the layout
  layout: str                     # one line for help texts
  options: tuple[str, ...] = ()   # keyword options `load` passes on


def _find_images(path: str, spec: Spec) -> str | None:
  """The first of spec.image_dirs found in PATH (or beside it, when PATH is a file)."""
  base = path if os.path.isdir(path) else os.path.dirname(path)
  return files.find_dir(base, spec.image_dirs) if spec.image_dirs else None


def _need(images: str | None, key: str, path: str) -> str:
  if images is None:
    raise ValueError(f"{key}: no image folder found in {path!r}; pass "
                     f"--data={key}_images=DIR (load(..., images=DIR)).")
  return images


def _sugarcrepe(path, images, opts):
  if path.endswith(".parquet"):
    return captions.read_sugarcrepe_parquet(path, opts.get("subset"),
                                            opts.get("cache_dir")), [path]
  if os.path.isfile(path):
    return captions.read_sugarcrepe(path, _need(images, "sugarcrepe", path),
                                    opts.get("subset")), [path]
  found = captions.sugarcrepe_files(path)
  needs_images = any(ps[0].endswith(".json") for ps in found.values())
  by_subset = captions.read_sugarcrepe_dir(
      path, _need(images, "sugarcrepe", path) if needs_images else images,
      opts.get("cache_dir"))
  return ([it for s in SUGARCREPE_SUBSETS for it in by_subset.get(s, [])],
          [p for ps in found.values() for p in ps])


def _sugarcrepe_pp(path, images, opts):
  images = _need(images, "sugarcrepe_pp", path)
  if os.path.isfile(path):
    return captions.read_sugarcrepe_pp(path, images, opts.get("subset")), [path]
  by_subset = captions.read_sugarcrepe_pp_dir(path, images)
  return ([it for s in SUGARCREPE_PP_SUBSETS for it in by_subset.get(s, [])],
          list(captions.sugarcrepe_pp_files(path).values()))


def _winoground(path, images, opts):
  return captions.read_winoground(path, images), [captions.winoground_file(path)]


def _bivlc(path, images, opts):
  return captions.read_bivlc(path, opts.get("cache_dir")), files.parquet_files(path)


def _pope(path, images, opts):
  images = _need(images, "pope", path)
  if os.path.isfile(path):
    return vqa.read_pope(path, images, opts.get("split")), [path]
  return vqa.read_pope_dir(path, images), list(vqa.pope_files(path).values())


def _vqav2(path, images, opts):
  if os.path.isfile(path):
    return vqa.read_vqav2(path, _need(images, "vqav2", path),
                         opts.get("annotations")), [path]
  prefix, suffix = "v2_OpenEnded_mscoco_", "_questions.json"
  found = {os.path.basename(p)[len(prefix):-len(suffix)]: p
           for p in sorted(glob.glob(os.path.join(path, prefix + "*" + suffix)))}
  split = opts.get("split") or (next(iter(found)) if len(found) == 1 else None)
  if split not in found:
    raise ValueError(f"vqav2: {'which' if found else 'no'} questions file in {path!r}? "
                     f"(found splits {sorted(found)}); pass split=.")
  annotations = os.path.join(path, f"v2_mscoco_{split}_annotations.json")
  annotations = annotations if os.path.isfile(annotations) else None
  image_dir = images or files.find_dir(
      path, ({"test-dev2015": "test2015"}.get(split, split), "images"))
  used = [found[split]] + ([annotations] if annotations else [])
  return vqa.read_vqav2(found[split], _need(image_dir, "vqav2", path), annotations), used


def _one_file(key, names, read):
  def reader(path, images, opts):
    f = path if os.path.isfile(path) else files.find_file(path, names, names[0])
    return read(f, _need(images, key, path)), [f]
  return reader


def _textvqa(ocr: bool):
  def reader(path, images, opts):
    base = path if os.path.isdir(path) else os.path.dirname(path)
    main = path if os.path.isfile(path) else files.find_file(
        path, ("TextVQA_0.5.1_val.json",), "TextVQA_0.5.1_val.json")
    llava = os.path.join(base, "llava_textvqa_val_v051_ocr.jsonl")
    rosetta = os.path.join(base, "TextVQA_Rosetta_OCR_v0.2_val.json")
    questions = opts.get("questions") or (llava if os.path.isfile(llava) else None)
    ocr_path = opts.get("ocr_path") or (
        rosetta if ocr and questions is None and os.path.isfile(rosetta) else None)
    used = [main] + [p for p in (questions, ocr_path) if p]
    return vqa.read_textvqa(main, _need(images, "textvqa", path), ocr_path, questions,
                            ocr=ocr), used
  return reader


def _mme(path, images, opts):
  return vqa.read_mme(path), [vqa.mme_root(path)]


def _synthetic(kind: str):
  def reader(path, images, opts):
    sets = synthetic.read_synthetic(path, opts.get("root"))
    if kind not in sets:
      raise ValueError(f"no synthetic {kind} files in {path!r}.")
    got = sets[kind]
    items = ([it for s in SUGARCREPE_SUBSETS for it in got.get(s, [])]
             if isinstance(got, dict) else got)
    return items, synthetic.synthetic_files(path)
  return reader


BENCHMARKS: dict[str, Spec] = {
    "sugarcrepe": Spec("sugarcrepe", _sugarcrepe, ("val2017", "coco/val2017", "images"),
                       "{subset}.json + val2017/, or SugarCrepe_{subset}/data/*.parquet",
                       ("subset", "cache_dir")),
    "sugarcrepe_pp": Spec("sugarcrepe_pp", _sugarcrepe_pp,
                          ("val2017", "coco/val2017", "images"),
                          "[data/]{subset}.json + val2017/", ("subset",)),
    "winoground": Spec("winoground", _winoground, (),
                       "[data/]examples.jsonl + [data/]images/"),
    "bivlc": Spec("bivlc", _bivlc, (), "[data/]test-*.parquet (images embedded)",
                  ("cache_dir",)),
    "pope": Spec("pope", _pope, ("val2014", "coco/val2014", "images"),
                 "[coco/]coco_pope_{random,popular,adversarial}.json + val2014/", ("split",)),
    "vqav2": Spec("vqav2", _vqav2, (),
                  "v2_OpenEnded_mscoco_{split}_questions.json [+ annotations] + {split}/",
                  ("split", "annotations")),
    "gqa": Spec("gqa", _one_file("gqa", ("testdev_balanced_questions.json",
                                         "questions/testdev_balanced_questions.json"),
                                 vqa.read_gqa),
                ("images", "allImages/images"), "testdev_balanced_questions.json + images/"),
    "textvqa": Spec("textvqa", _textvqa(False), ("train_images", "images"),
                    "TextVQA_0.5.1_val.json + train_images/ (no OCR line)",
                    ("questions", "ocr_path")),
    "textvqa_ocr": Spec("textvqa", _textvqa(True), ("train_images", "images"),
                        "TextVQA_0.5.1_val.json + llava_textvqa_val_v051_ocr.jsonl or "
                        "TextVQA_Rosetta_OCR_v0.2_val.json + train_images/",
                        ("questions", "ocr_path")),
    "vizwiz": Spec("vizwiz", _one_file("vizwiz", ("val.json", "Annotations/val.json"),
                                       vqa.read_vizwiz),
                   ("val", "images"), "[Annotations/]val.json + val/"),
    "mme": Spec("mme", _mme, (), "MME_Benchmark_release_version/{subtask}/..."),
    "synthetic_vqa": Spec("synthetic", _synthetic("vqa"), (), "DIR/eval/vqa.json",
                          ("root",)),
    "synthetic_sugarcrepe": Spec("synthetic", _synthetic("sugarcrepe"), (),
                                 "DIR/eval/sugarcrepe_{subset}.json", ("root",)),
    "synthetic_paired": Spec("synthetic", _synthetic("paired"), (),
                             "DIR/eval/winoground.json", ("root",)),
}


def load(name: str, path: str, images: str | None = None, missing: str = "error",
         **options: Any) -> Dataset:
  """Reads benchmark `name` from PATH (see BENCHMARKS) and checks its images.

  images: the image folder when it is not in PATH (--data={data}_images=DIR).
  missing: "error" (default) or "skip" items whose image file is absent.
  options (Spec.options names those each benchmark takes): subset= (one SugarCrepe(++)
  file), split= (VQAv2 split, one POPE file), annotations= (VQAv2 file), questions= /
  ocr_path= (TextVQA), cache_dir= (where parquet images are written), root= (synthetic
  export dir).
  """
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}.")
  if missing not in MISSING:
    raise ValueError(f"missing={missing!r}; use one of {MISSING}.")
  if not os.path.exists(path):
    raise ValueError(f"{name}: data path {path!r} does not exist (--data="
                     f"{BENCHMARKS[name].data}=PATH).")
  spec = BENCHMARKS[name]
  unknown = sorted(set(options) - set(spec.options))
  if unknown:
    raise ValueError(f"{name}: unknown option(s) {unknown}; it takes {list(spec.options)}.")
  items, used = spec.read(path, images or _find_images(path, spec), options)
  files.check_unique(items, path)
  items, skipped = check_images(items, missing)
  if not items:
    raise ValueError(f"{name}: no items read from {path!r}"
                     + (f" ({len(skipped)} skipped for missing images)." if skipped else "."))
  return Dataset(name, items, fingerprint(used, len(items), len(skipped)), skipped)


def load_from_data(name: str, data: Mapping[str, str], missing: str = "error",
                   **options: Any) -> Dataset:
  """`load` with the paths of --data=NAME=PATH flags: data[Spec.data] is PATH and
  data[Spec.data + "_images"], when given, the image folder."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}.")
  key = BENCHMARKS[name].data
  if key not in data:
    raise ValueError(f"benchmark {name!r} reads its files from --data={key}=PATH; it is "
                     f"missing (given: {sorted(data)}).")
  return load(name, data[key], data.get(key + "_images"), missing, **options)


def parse_data(flags: Sequence[str]) -> dict[str, str]:
  """["NAME=PATH", ...] (the --data flags) -> {NAME: PATH}; NAME is a data key of
  BENCHMARKS, optionally with "_images"."""
  keys = {spec.data for spec in BENCHMARKS.values()}
  out = {}
  for flag in flags:
    name, sep, path = flag.partition("=")
    if not sep or not path:
      raise ValueError(f"--data={flag!r}: expected NAME=PATH.")
    if name.removesuffix("_images") not in keys:
      raise ValueError(f"--data={flag!r}: unknown NAME {name!r}; expected one of "
                       f"{sorted(keys)} (or NAME_images).")
    if name in out:
      raise ValueError(f"--data: {name!r} given twice.")
    out[name] = os.path.expanduser(path)
  return out


__all__ = [
    "BENCHMARKS", "Dataset", "Item", "MISSING", "MME_SUBTASKS", "PAIRED_FIELDS",
    "POPE_SPLITS", "SUGARCREPE_PP_SUBSETS", "SUGARCREPE_SUBSETS", "SYNTHETIC_FIELDS",
    "SYNTHETIC_FILES", "Spec", "check_images", "file_source", "fingerprint", "load",
    "load_from_data", "parse_data", "read_bivlc", "read_gqa", "read_mme", "read_paired",
    "read_pope", "read_pope_dir", "read_sugarcrepe", "read_sugarcrepe_dir",
    "read_sugarcrepe_parquet", "read_sugarcrepe_pp", "read_sugarcrepe_pp_dir",
    "read_synthetic", "read_textvqa", "read_vizwiz", "read_vqav2", "read_winoground"]
