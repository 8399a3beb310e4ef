"""Question benchmarks: VQAv2, GQA, TextVQA, VizWiz, POPE, MME (docs/METHOD.md §9).

Items: "image", "question" (as the file writes it), "prompt" (the user turn the LLaVA-1.5
evaluation asks: the question, any context line, the short-answer instruction), gold
"answers" (human answers, soft accuracy) and/or "answer", and the metadata named below.
"""
from __future__ import annotations

import os
from typing import Any

from cdx.eval import scoring
from cdx.eval.benchmarks import files
from cdx.eval.benchmarks.files import Item

OCR_PREFIX = "\nReference OCR token: "   # LLaVA's TextVQA context line
# LLaVA-1.5's VizWiz instruction, before the short-answer one.
VIZWIZ_INSTRUCTION = ("\nWhen the provided information is insufficient, respond with "
                      "'Unanswerable'.")
POPE_SPLITS = ("random", "popular", "adversarial")
MME_SUBTASKS = scoring.MME_PERCEPTION + scoring.MME_COGNITION
_IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


# ----------------------------------------------------------------------------- VQAv2

def read_vqav2(questions_path: str, image_dir: str, annotations_path: str | None = None,
               image_name: str = "COCO_{subtype}_{image_id:012d}.jpg") -> list[Item]:
  """VQAv2 questions json {"data_subtype", "questions": [{"question_id", "image_id",
  "question"}]} (+ annotations json {"annotations": [{"question_id", "answers": [{"answer",
  ...}], "multiple_choice_answer", "answer_type", "question_type"}]}) -> VQA items.

  With annotations: "answers" (the 10 human answers), "answer" (the majority answer),
  "category" (answer_type), "question_type". image_name is formatted with image_id and
  the image folder's subtype (the file's data_subtype; test-dev2015 images live in
  test2015).
  """
  doc = files.load_json(questions_path)
  if not isinstance(doc, dict):
    raise ValueError(f"{questions_path!r}: expected an object with 'questions', got "
                     f"{type(doc).__name__}.")
  questions = files.field(doc, "questions", questions_path)
  subtype = {"test-dev2015": "test2015"}.get(doc.get("data_subtype", ""),
                                             doc.get("data_subtype", ""))
  source = files.file_source(questions_path)
  annotations = None
  if annotations_path is not None:
    adoc = files.load_json(annotations_path)
    annotations = {}
    for n, a in enumerate(files.field(adoc, "annotations", annotations_path)):
      annotations[files.field(a, "question_id", annotations_path, n)] = a
    source += "; " + files.file_source(annotations_path)
  items = []
  for n, q in enumerate(questions):
    qid = files.field(q, "question_id", questions_path, n)
    question = files.field(q, "question", questions_path, qid)
    image = os.path.join(image_dir, image_name.format(
        subtype=subtype, image_id=files.field(q, "image_id", questions_path, qid)))
    extra: dict[str, Any] = {}
    if annotations is not None:
      if qid not in annotations:
        raise ValueError(f"{annotations_path!r} has no annotation for question_id {qid}.")
      a = annotations[qid]
      answers = files.field(a, "answers", annotations_path, qid)
      extra["answers"] = [files.field(x, "answer", annotations_path, qid) for x in answers]
      extra["answer"] = a.get("multiple_choice_answer", extra["answers"][0])
      if "answer_type" in a:
        extra["category"] = a["answer_type"]
      if "question_type" in a:
        extra["question_type"] = a["question_type"]
    items.append(files.make_item("vqav2", qid, None, source, image=image,
                                 question=question, prompt=scoring.vqa_prompt(question),
                                 **extra))
  return items


# ----------------------------------------------------------------------------- GQA

def read_gqa(path: str, image_dir: str) -> list[Item]:
  """GQA questions {qid: {"imageId", "question", "answer", "fullAnswer", "types", ...}}
  (testdev_balanced_questions.json) -> exact-match items: "answer", "full_answer",
  "category" (types.structural), "types" (the whole types record)."""
  source = files.file_source(path)
  items = []
  for qid, rec in files.records(files.load_json(path), path):
    question = files.field(rec, "question", path, qid)
    types = rec.get("types") or {}
    extra = {"types": types, "category": types["structural"]} if "structural" in types else {}
    if "fullAnswer" in rec:
      extra["full_answer"] = rec["fullAnswer"]
    items.append(files.make_item(
        "gqa", qid, None, source, question=question, prompt=scoring.vqa_prompt(question),
        image=os.path.join(image_dir, f"{files.field(rec, 'imageId', path, qid)}.jpg"),
        answer=files.field(rec, "answer", path, qid), **extra))
  return items


# ----------------------------------------------------------------------------- TextVQA

def _ocr_tokens(ocr_path: str) -> dict[str, list[str]]:
  """{image_id: tokens} from a Rosetta OCR file {"data": [{"image_id", "ocr_tokens"}]}."""
  doc = files.load_json(ocr_path)
  out = {}
  for n, r in enumerate(files.field(doc, "data", ocr_path)):
    out[str(files.field(r, "image_id", ocr_path, n))] = list(
        files.field(r, "ocr_tokens", ocr_path, n))
  return out


def _llava_questions(path: str) -> dict[Any, Item]:
  """{question_id: record} of a LLaVA question file (jsonl of {"question_id", "image",
  "text"}); text is the whole prompt, e.g. "q\\nReference OCR token: a, b\\n<instruction>"."""
  out = {}
  for n, rec in enumerate(files.load_json(path)):
    if not isinstance(rec, dict):
      raise ValueError(f"{path!r} line {n + 1}: expected an object, got "
                       f"{type(rec).__name__}.")
    qid = files.field(rec, "question_id", path, n)
    files.field(rec, "text", path, qid)
    out[qid] = rec
  return out


def read_textvqa(path: str, image_dir: str, ocr_path: str | None = None,
                 questions_path: str | None = None, ocr: bool | None = None) -> list[Item]:
  """TextVQA json {"data": [{"question_id", "image_id", "question", "answers",
  "ocr_tokens"?}]} (TextVQA_0.5.1_val.json) -> soft VQA items, with or without LLaVA's
  OCR line "Reference OCR token: t1, t2, ..." after the question.

  The OCR tokens come from, in order: questions_path (LLaVA's
  llava_textvqa_val_v051_ocr.jsonl, whose "text" is the whole prompt and is used as
  written), ocr_path (a Rosetta OCR json {"data": [{"image_id", "ocr_tokens"}]}), or,
  with ocr=True only, the records' own "ocr_tokens". ocr=False drops the line (the plain
  protocol) whatever the source; ocr=None adds it when one of the two files is given.
  The line changes the score a lot, so the subset is "ocr" or "plain" and every item
  records "ocr" (bool), "ocr_tokens" and its sources. Items: "image"
  (image_dir/{image_id}.jpg), "question", "prompt", "answers".
  """
  source = files.file_source(path)
  tokens = _ocr_tokens(ocr_path) if ocr_path is not None else None
  llava = _llava_questions(questions_path) if questions_path is not None else None
  for extra in (ocr_path, questions_path):
    if extra is not None:
      source += "; " + files.file_source(extra)
  items = []
  data = files.field(files.load_json(path), "data", path)
  for n, rec in enumerate(data):
    qid = files.field(rec, "question_id", path, n)
    question = files.field(rec, "question", path, qid)
    image_id = str(files.field(rec, "image_id", path, qid))
    line_tokens = None
    if llava is not None:
      if qid not in llava:
        raise ValueError(f"{questions_path!r} has no question_id {qid} (from {path!r}).")
      text = llava[qid]["text"]
      if OCR_PREFIX in text:
        line_tokens = text.split(OCR_PREFIX, 1)[1].split("\n", 1)[0].split(", ")
    elif tokens is not None:
      line_tokens = tokens.get(image_id, [])
    elif ocr and "ocr_tokens" in rec:
      line_tokens = list(rec["ocr_tokens"])
    with_line = line_tokens is not None if ocr is None else ocr
    if with_line and line_tokens is None:
      raise ValueError(f"{path!r}: ocr=True but question_id {qid} has no OCR tokens; pass "
                       "the LLaVA question file or a Rosetta OCR file.")
    if llava is not None and with_line == (OCR_PREFIX in llava[qid]["text"]):
      prompt = llava[qid]["text"]   # LLaVA's own prompt, as written
    elif with_line:
      prompt = scoring.vqa_prompt(question + OCR_PREFIX + ", ".join(line_tokens))
    else:
      prompt = scoring.vqa_prompt(question)
    extra = {"answers": list(rec["answers"])} if "answers" in rec else {}  # test: none
    items.append(files.make_item(
        "textvqa", qid, "ocr" if with_line else "plain", source,
        image=os.path.join(image_dir, f"{image_id}.jpg"), question=question,
        prompt=prompt, ocr=bool(with_line),
        ocr_tokens=(line_tokens or []) if with_line else [], **extra))
  return items


# ----------------------------------------------------------------------------- VizWiz

def read_vizwiz(path: str, image_dir: str) -> list[Item]:
  """VizWiz json [{"image", "question", "answers": [{"answer", "answer_confidence"}],
  "answerable", "answer_type"}] (val.json) -> soft VQA items (id = the image name).

  Items: "answers" (strings), "answer_confidence" (per answer), "answerable",
  "category" (answer_type); the prompt carries LLaVA-1.5's "respond with 'Unanswerable'"
  instruction.
  """
  source = files.file_source(path)
  doc = files.load_json(path)
  if not isinstance(doc, list):
    raise ValueError(f"{path!r}: expected a list of questions, got {type(doc).__name__}.")
  items = []
  for n, rec in enumerate(doc):
    image = files.field(rec, "image", path, n)
    question = files.field(rec, "question", path, image)
    extra: dict[str, Any] = {}
    if "answers" in rec:   # the test split has none
      answers = rec["answers"]
      extra["answers"] = [files.field(a, "answer", path, image) for a in answers]
      extra["answer_confidence"] = [a.get("answer_confidence") for a in answers]
    if "answerable" in rec:
      extra["answerable"] = rec["answerable"]
    if "answer_type" in rec:
      extra["category"] = rec["answer_type"]
    items.append(files.make_item(
        "vizwiz", image, None, source, image=os.path.join(image_dir, image),
        question=question, prompt=scoring.vqa_prompt(question + VIZWIZ_INSTRUCTION),
        **extra))
  return items


# ----------------------------------------------------------------------------- POPE

def read_pope(path: str, image_dir: str, split: str | None = None) -> list[Item]:
  """POPE file (coco_pope_{split}.json: one {"question_id", "image", "text", "label"} per
  line) -> yes/no items: "answer" (yes/no), "split" (= "subset").

  split defaults to the last "_" part of the file name. The prompt is the question as
  written (POPE asks yes/no directly).
  """
  split = split or os.path.splitext(os.path.basename(path))[0].rsplit("_", 1)[-1]
  source = files.file_source(path)
  items = []
  for key, rec in files.records(files.load_json_lines(path), path):
    label = str(rec.get("label", rec.get("answer", ""))).strip().lower()
    if label not in ("yes", "no"):
      raise ValueError(f"{path!r}: record {key} field 'label' is {label!r}; expected "
                       "yes/no.")
    question = files.field(rec, "text", path, key)
    items.append(files.make_item(
        "pope", rec.get("question_id", key), split, source, question=question,
        prompt=question, answer=label, split=split,
        image=os.path.join(image_dir, files.field(rec, "image", path, key))))
  return items


def pope_files(data_dir: str) -> dict[str, str]:
  """{split: file} of the three POPE splits in data_dir or data_dir/coco."""
  return {split: files.find_file(data_dir, (f"coco_pope_{split}.json",
                                            os.path.join("coco", f"coco_pope_{split}.json")),
                                 f"POPE {split} file")
          for split in POPE_SPLITS}


def read_pope_dir(data_dir: str, image_dir: str) -> list[Item]:
  """The three POPE splits of a folder (coco_pope_{random,popular,adversarial}.json, at
  data_dir or data_dir/coco), in that order."""
  return [it for split, path in pope_files(data_dir).items()
          for it in read_pope(path, image_dir, split)]


# ----------------------------------------------------------------------------- MME

def mme_root(root: str) -> str:
  """root, or its one sub-folder holding the subtasks (MME_Benchmark_release_version/
  MME_Benchmark)."""
  if any(os.path.isdir(os.path.join(root, t)) for t in MME_SUBTASKS):
    return root
  if os.path.isdir(root):
    for name in sorted(os.listdir(root)):
      sub = os.path.join(root, name)
      if os.path.isdir(sub) and any(os.path.isdir(os.path.join(sub, t))
                                    for t in MME_SUBTASKS):
        return sub
  raise ValueError(f"no MME subtask folders (e.g. 'existence', 'OCR') under {root!r}.")


def read_mme(root: str) -> list[Item]:
  """MME release folder -> yes/no items: "answer" (yes/no), "subtask" (= "subset"),
  "image_name" (the image's file name: acc+ groups an image's two questions).

  Each known subtask folder is read in one of the two official layouts: images/ +
  questions_answers_YN/*.txt, or image and .txt side by side; a .txt holds lines
  "question<TAB>Yes|No" about the image of the same stem. The question already ends
  with "Please answer yes or no." and is the prompt unchanged.
  """
  root = mme_root(root)
  source = files.file_source(root)
  items = []
  for subtask in sorted(os.listdir(root)):
    task_dir = os.path.join(root, subtask)
    if subtask not in MME_SUBTASKS or not os.path.isdir(task_dir):
      continue
    qa_dir, image_dir = task_dir, task_dir
    if os.path.isdir(os.path.join(task_dir, "questions_answers_YN")):
      qa_dir, image_dir = (os.path.join(task_dir, "questions_answers_YN"),
                           os.path.join(task_dir, "images"))
    for name in sorted(os.listdir(qa_dir)):
      if not name.endswith(".txt"):
        continue
      stem, txt = name[:-4], os.path.join(qa_dir, name)
      image = _find_image(image_dir, stem, txt)
      with open(txt, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f if line.strip()]
      for n, line in enumerate(lines):
        question, sep, answer = line.rpartition("\t")
        if not sep or answer.strip().lower() not in ("yes", "no"):
          raise ValueError(f"{txt!r} line {n + 1}: expected 'question<TAB>Yes|No', got "
                           f"{line!r}.")
        items.append(files.make_item(
            "mme", f"{stem}/{n}", subtask, source, image=image, question=question,
            prompt=question, answer=answer.strip().lower(), subtask=subtask,
            image_name=os.path.basename(image)))
  if not items:
    raise ValueError(f"no MME question files under {root!r}.")
  return items


def _find_image(image_dir: str, stem: str, txt: str) -> str:
  for ext in _IMAGE_EXTS:
    path = os.path.join(image_dir, stem + ext)
    if os.path.isfile(path):
      return path
  raise ValueError(f"{txt!r}: no image {stem!r} in {image_dir!r} (tried {_IMAGE_EXTS}).")
