"""Readers that turn local benchmark files into prompt items for `cdx.eval.scoring`.

No downloads: every reader takes paths to files already on disk. Each returns a list of
plain dicts (SugarCrepe: one list per subset) with at least
  "id"      a stable id from the file
  "image"   image path (joined with `image_dir`; not checked for existence)
  "prompt"  the user turn's text, ready for the chat template (SugarCrepe and paired items
            instead carry captions; their prompts are built by the scorer, both orders /
            all four pairs)
  gold      "answer" (str) and/or "answers" (list[str]), or "positive"/"negative", or
            "caption_0"/"caption_1"
  "source"  `file_source(path)`: path, byte size and sha1 prefix of the file read, so a
            result can name the exact dataset version it came from.

Formats read:
  synthetic   eval sets written by `cdx.data.synthetic.export` (vqa.json,
              sugarcrepe_{subset}.json, winoground.json); field names in SYNTHETIC_FIELDS
  SugarCrepe  {subset}.json = {id: {"filename", "caption", "negative_caption"}}
  Winoground  jsonl of {"id", "image_0", "image_1", "caption_0", "caption_1"}
  VQAv2       questions json {"questions": [...]} (+ annotations json {"annotations": [...]})
  TextVQA     {"data": [...]}, optionally with an OCR-token file (recorded per item)
  VizWiz      [{"image", "question", "answers"}]
  GQA         {question_id: {"imageId", "question", "answer", ...}}
  POPE        jsonl of {"question_id", "image", "text", "label"}, split from the file name
  MME         <root>/<subtask>/ with *.txt files of "question<TAB>Yes|No" lines beside
              their images, or in questions_answers_YN/ with the images in images/
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from cdx.eval import scoring

Item = dict[str, Any]

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
_IMAGE_EXTS = (".jpg", ".png", ".jpeg")


def file_source(path: str) -> str:
  """'path (N bytes, sha1 0123456789ab)' for a file; for a directory the size and hash are
  over its .txt/.json/.jsonl files (annotations, not images), in sorted order."""
  h, size = hashlib.sha1(), 0
  if os.path.isdir(path):
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames.sort()
      for name in sorted(filenames):
        if name.endswith((".txt", ".json", ".jsonl")):
          full = os.path.join(dirpath, name)
          h.update(os.path.relpath(full, path).encode())
          size += _hash_file(full, h)
  elif os.path.isfile(path):
    size = _hash_file(path, h)
  else:
    raise ValueError(f"benchmark path {path!r} does not exist.")
  return f"{path} ({size} bytes, sha1 {h.hexdigest()[:12]})"


def _hash_file(path: str, h: Any) -> int:
  size = 0
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
      size += len(chunk)
  return size


def _load(path: str) -> Any:
  """A .json document or the list of records of a .jsonl file."""
  if not os.path.isfile(path):
    raise ValueError(f"benchmark file {path!r} does not exist.")
  with open(path) as f:
    if path.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    return json.load(f)


def _records(doc: Any, path: str) -> list[tuple[str, dict]]:
  """(id, record) pairs from a list of records or an {id: record} mapping."""
  if isinstance(doc, Mapping):
    return [(str(k), v) for k, v in doc.items()]
  if isinstance(doc, list):
    return [(str(n), v) for n, v in enumerate(doc)]
  raise ValueError(f"{path!r}: expected a list or an {{id: record}} object, got "
                   f"{type(doc).__name__}.")


def _field(rec: Mapping[str, Any], name: str, path: str) -> Any:
  if name not in rec:
    raise ValueError(f"{path!r}: a record lacks field {name!r} (has {sorted(rec)}).")
  return rec[name]


# ---------------------------------------------------------------------------------------
# SugarCrepe and paired (Winoground-style) benchmarks
# ---------------------------------------------------------------------------------------


def _subset_from_name(path: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem.removeprefix("sugarcrepe_")


def read_sugarcrepe(path: str, image_dir: str, subset: str | None = None,
                    fields: Mapping[str, str] | None = None) -> list[Item]:
  """One SugarCrepe subset file -> [{"id", "image", "positive", "negative", "subset"}].

  subset defaults to the file name ("swap_obj.json" or "sugarcrepe_swap_obj.json").
  """
  subset = subset or _subset_from_name(path)
  if subset not in scoring.SUGARCREPE_SUBSETS:
    raise ValueError(f"{path!r}: subset {subset!r} is not one of "
                     f"{scoring.SUGARCREPE_SUBSETS}; pass subset=.")
  f = {"image": "filename", "positive": "caption", "negative": "negative_caption",
       **(fields or {})}
  source = file_source(path)
  return [{"id": key, "image": os.path.join(image_dir, _field(rec, f["image"], path)),
           "positive": _field(rec, f["positive"], path),
           "negative": _field(rec, f["negative"], path), "subset": subset,
           "source": source}
          for key, rec in _records(_load(path), path)]


def read_sugarcrepe_dir(data_dir: str, image_dir: str) -> dict[str, list[Item]]:
  """All subsets found in a folder as {subset: items} ({s}.json or sugarcrepe_{s}.json)."""
  out = {}
  for subset in scoring.SUGARCREPE_SUBSETS:
    for name in (f"{subset}.json", f"sugarcrepe_{subset}.json"):
      path = os.path.join(data_dir, name)
      if os.path.isfile(path):
        out[subset] = read_sugarcrepe(path, image_dir, subset)
        break
  if not out:
    raise ValueError(f"no SugarCrepe subset files in {data_dir!r} (expected e.g. "
                     "swap_obj.json).")
  return out


def read_paired(path: str, image_dir: str, image_ext: str = "",
                fields: Mapping[str, str] | None = None) -> list[Item]:
  """Winoground-style 2x2 items -> [{"id", "image_0", "image_1", "caption_0",
  "caption_1"}]. image_ext is appended to image names stored without one (".png" for
  Winoground's jsonl)."""
  f = {**SYNTHETIC_FIELDS["paired"], **(fields or {})}
  source = file_source(path)
  items = []
  for key, rec in _records(_load(path), path):
    item = {"id": rec.get(f["id"], key), "source": source}
    for k in (0, 1):
      item[f"image_{k}"] = os.path.join(image_dir, _field(rec, f[f"image_{k}"], path)
                                        + image_ext)
      item[f"caption_{k}"] = _field(rec, f[f"caption_{k}"], path)
    if f.get("tag") in rec:
      item["tag"] = rec[f["tag"]]
    items.append(item)
  return items


# ---------------------------------------------------------------------------------------
# VQA-style benchmarks
# ---------------------------------------------------------------------------------------


def read_vqav2(questions_path: str, image_dir: str, annotations_path: str | None = None,
               image_name: str = "COCO_{subtype}_{image_id:012d}.jpg") -> list[Item]:
  """VQAv2-format questions (and annotations, when public) -> VQA items.

  Items: {"id" (question_id), "image", "question", "prompt", and with annotations
  "answers" (the 10 human answers), "answer" (the majority answer), "category"
  (answer_type)}. image_name is formatted with the image_id and the questions file's
  data_subtype (e.g. "val2014").
  """
  doc = _load(questions_path)
  questions = _field(doc, "questions", questions_path)
  subtype = doc.get("data_subtype", "")
  source = file_source(questions_path)
  annotations = {}
  if annotations_path is not None:
    adoc = _load(annotations_path)
    annotations = {a["question_id"]: a
                   for a in _field(adoc, "annotations", annotations_path)}
    source += "; " + file_source(annotations_path)
  items = []
  for q in questions:
    qid = _field(q, "question_id", questions_path)
    item = {"id": qid, "question": q["question"], "prompt": scoring.vqa_prompt(q["question"]),
            "image": os.path.join(image_dir, image_name.format(
                subtype=subtype, image_id=_field(q, "image_id", questions_path))),
            "source": source}
    if annotations_path is not None:
      if qid not in annotations:
        raise ValueError(f"{annotations_path!r} has no annotation for question_id {qid}.")
      a = annotations[qid]
      item["answers"] = [x["answer"] for x in a["answers"]]
      item["answer"] = a.get("multiple_choice_answer", item["answers"][0])
      if "answer_type" in a:
        item["category"] = a["answer_type"]
    items.append(item)
  return items


def read_textvqa(path: str, image_dir: str, ocr_path: str | None = None) -> list[Item]:
  """TextVQA json {"data": [{"question_id", "image_id", "question", "answers"}]} -> soft
  VQA items.

  With ocr_path (a json {"data": [{"image_id", "ocr_tokens"}]}, e.g. Rosetta OCR), a line
  "Reference OCR token: t1, t2, ..." follows the question. It moves the score by about 12
  points, so every item records "ocr" (bool) and the OCR file is part of its source.
  """
  source = file_source(path)
  ocr = None
  if ocr_path is not None:
    ocr = {str(r["image_id"]): r.get("ocr_tokens", [])
           for r in _field(_load(ocr_path), "data", ocr_path)}
    source += "; " + file_source(ocr_path)
  items = []
  for rec in _field(_load(path), "data", path):
    question = _field(rec, "question", path)
    image_id = str(_field(rec, "image_id", path))
    text = question
    if ocr is not None:
      text += "\nReference OCR token: " + ", ".join(ocr.get(image_id, []))
    item = {"id": _field(rec, "question_id", path), "question": question,
            "prompt": scoring.vqa_prompt(text), "ocr": ocr is not None,
            "image": os.path.join(image_dir, f"{image_id}.jpg"), "source": source}
    if "answers" in rec:   # the test split has none
      item["answers"] = list(rec["answers"])
    items.append(item)
  return items


def read_vizwiz(path: str, image_dir: str) -> list[Item]:
  """VizWiz json [{"image", "question", "answers": [{"answer", ...}], "answer_type"}] ->
  soft VQA items (id = the image name)."""
  source = file_source(path)
  items = []
  for rec in _load(path):
    question = _field(rec, "question", path)
    image = _field(rec, "image", path)
    item = {"id": image, "question": question, "prompt": scoring.vqa_prompt(question),
            "image": os.path.join(image_dir, image), "source": source}
    if "answers" in rec:
      item["answers"] = [a["answer"] for a in rec["answers"]]
    if "answer_type" in rec:
      item["category"] = rec["answer_type"]
    items.append(item)
  return items


def read_gqa(path: str, image_dir: str) -> list[Item]:
  """GQA questions {qid: {"imageId", "question", "answer"}} -> exact-match VQA items."""
  source = file_source(path)
  items = []
  for qid, rec in _records(_load(path), path):
    question = _field(rec, "question", path)
    items.append({"id": qid, "question": question, "prompt": scoring.vqa_prompt(question),
                  "image": os.path.join(image_dir, f"{_field(rec, 'imageId', path)}.jpg"),
                  "answer": _field(rec, "answer", path), "source": source})
  return items


def read_pope(path: str, image_dir: str, split: str | None = None) -> list[Item]:
  """POPE jsonl -> [{"id", "image", "question", "prompt", "answer" (yes/no), "split"}].

  split defaults to the last "_" part of the file name (coco_pope_adversarial.json ->
  adversarial). The prompt is the question as written (POPE asks yes/no directly).
  """
  split = split or os.path.splitext(os.path.basename(path))[0].rsplit("_", 1)[-1]
  source = file_source(path)
  items = []
  for key, rec in _records(_load_json_lines(path), path):
    label = str(rec.get("label", rec.get("answer", ""))).strip().lower()
    if label not in ("yes", "no"):
      raise ValueError(f"{path!r}: record {key} has label {label!r}; expected yes/no.")
    question = _field(rec, "text", path)
    items.append({"id": rec.get("question_id", key), "question": question,
                  "prompt": question, "answer": label, "split": split, "source": source,
                  "image": os.path.join(image_dir, _field(rec, "image", path))})
  return items


def _load_json_lines(path: str) -> list[Any]:
  """POPE's official files are named .json but hold one object per line; a JSON list
  (one line or pretty-printed) is accepted too."""
  with open(path) as f:
    text = f.read()
  try:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
  except json.JSONDecodeError:
    return json.loads(text)
  if len(records) == 1 and isinstance(records[0], list):
    return records[0]
  return records


def read_mme(root: str) -> list[Item]:
  """MME release folder -> [{"id", "image", "question", "prompt", "answer", "subtask"}].

  Every subtask folder under root that is a known MME subtask is read; the question text
  already ends with "Please answer yes or no." and is used as the prompt unchanged.
  """
  known = scoring.MME_PERCEPTION + scoring.MME_COGNITION
  source = file_source(root)
  items = []
  for subtask in sorted(os.listdir(root)):
    task_dir = os.path.join(root, subtask)
    if subtask not in known or not os.path.isdir(task_dir):
      continue
    qa_dir, image_dir = task_dir, task_dir
    if os.path.isdir(os.path.join(task_dir, "questions_answers_YN")):
      qa_dir, image_dir = (os.path.join(task_dir, "questions_answers_YN"),
                           os.path.join(task_dir, "images"))
    for name in sorted(os.listdir(qa_dir)):
      if not name.endswith(".txt"):
        continue
      stem = name[:-4]
      image = _find_image(image_dir, stem)
      with open(os.path.join(qa_dir, name)) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
      for n, line in enumerate(lines):
        question, sep, answer = line.rpartition("\t")
        if not sep or answer.strip().lower() not in ("yes", "no"):
          raise ValueError(f"{os.path.join(qa_dir, name)!r} line {n + 1}: expected "
                           f"'question<TAB>Yes|No', got {line!r}.")
        items.append({"id": f"{subtask}/{stem}/{n}", "image": image, "question": question,
                      "prompt": question, "answer": answer.strip().lower(),
                      "subtask": subtask, "source": source})
  if not items:
    raise ValueError(f"no MME subtask folders with question files under {root!r}.")
  return items


def _find_image(image_dir: str, stem: str) -> str:
  for ext in _IMAGE_EXTS:
    path = os.path.join(image_dir, stem + ext)
    if os.path.isfile(path):
      return path
  raise ValueError(f"no image for {stem!r} in {image_dir!r} (tried {_IMAGE_EXTS}).")


# ---------------------------------------------------------------------------------------
# The synthetic world's eval sets
# ---------------------------------------------------------------------------------------


def _first_field(path: str, name: str) -> str | None:
  records = _records(_load(path), path)
  return records[0][1].get(name) if records else None


def _synthetic_root(eval_dir: str, first_image: str) -> str:
  """The export dir that image paths are relative to: eval_dir or one of its parents."""
  d = os.path.abspath(eval_dir)
  for _ in range(4):
    if os.path.isfile(os.path.join(d, first_image)):
      return d
    d = os.path.dirname(d)
  raise ValueError(f"cannot find image {first_image!r} under {eval_dir!r} or its parents; "
                   "pass root= (the export directory).")


def read_synthetic(eval_dir: str, root: str | None = None) -> dict[str, Any]:
  """The synthetic world's eval sets found in eval_dir (e.g. DIR/eval or DIR/eval/heldout).

  Returns {"vqa": items, "sugarcrepe": {subset: items}, "paired": items}, each key only
  when its files exist. Image paths in the files are relative to root (the export
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
    records = _records(_load(vqa_path), vqa_path)
    source = file_source(vqa_path)
    items = []
    for key, rec in records:
      text = _field(rec, f["question"], vqa_path)
      question = text.removesuffix(scoring.VQA_SUFFIX)
      image = _field(rec, f["image"], vqa_path)
      item = {"id": rec.get(f["id"], key), "question": question,
              "prompt": scoring.vqa_prompt(question),
              "image": os.path.join(resolve(image), image),
              "answer": str(_field(rec, f["answer"], vqa_path)), "source": source}
      if f["category"] in rec:
        item["category"] = rec[f["category"]]
      items.append(item)
    out["vqa"] = items
  if sc_paths:
    f = SYNTHETIC_FIELDS["sugarcrepe"]
    first = _first_field(next(iter(sc_paths.values())), f["image"])
    out["sugarcrepe"] = {s: read_sugarcrepe(p, resolve(first), s, fields=f)
                         for s, p in sc_paths.items()}
  if os.path.isfile(paired_path):
    f = SYNTHETIC_FIELDS["paired"]
    out["paired"] = read_paired(paired_path, resolve(_first_field(paired_path, f["image_0"])),
                                fields=f)
  if not out:
    raise ValueError(f"no synthetic eval files ({sorted(SYNTHETIC_FILES.values())}) in "
                     f"{eval_dir!r}.")
  return out
