"""Benchmark scorers: prompts, reply parsing and metrics, in plain Python.

Nothing here runs a model. Every `evaluate_*` function takes prompt items (dicts made by
`cdx.eval.benchmarks`) and a callable:

  generate(items: list[dict]) -> list[str]   greedy reply per item; each item has
      "image" (path) and "prompt" (the user turn's text, without any image placeholder:
      the chat template places the image)
  score(items: list[dict]) -> list[float]    one score per item (same item keys), e.g.
      P("Yes") for `yes_no_prompt(caption)` or the caption's log-likelihood

so they can be tested with fakes and served by any generation loop. Results are plain
dicts of floats in [0, 1] (MME: points), with per-item `records`, the `sources` of the
data (see `benchmarks.file_source`) so a number always travels with its dataset version,
and the `protocol` that produced it.

By default every scorer reproduces the public reference scorer behind the published
numbers, quirks included (docs/EVALUATION.md lists each rule); where cdx has a cleaner
rule it is kept as a named option (rule="cdx"). Replies are taken as LLaVA's answer files
hold them: decoded and stripped.

Benchmarks:
  SugarCrepe  CompoDistill's parse: two-choice question asked in both orders; the first
              standalone A/B of the upper-cased reply ("a cat ..." answers A).
  Paired      Winoground / BiVLC 2x2 score matrices: text, image and group scores.
  VQA         soft accuracy over 10 leave-one-out subsets with LLaVA's m4c (EvalAI)
              normalization (VQAv2, VizWiz, TextVQA); GQA: LLaVA's conversion + exact
              match.
  POPE        LLaVA's eval_pope: "No"/"no"/"not" among the space-split words of the first
              sentence -> no; accuracy, precision, recall, F1, yes-ratio per split.
  MME         calculation.py: per-subtask acc and acc+ (both questions of an image
              right); perception total out of 2000, cognition total out of 800.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# The prompts are the data layer's (the synthetic world teaches them); asked from here.
from cdx.data.prompts import VQA_SUFFIX, sugarcrepe_question, vqa_prompt, yes_no_prompt
from cdx.eval import vqa_answers
from cdx.eval.vqa_answers import check_rule

Item = dict[str, Any]
Generate = Callable[[list[Item]], list[str]]
Score = Callable[[list[Item]], list[float]]


def _call(fn: Callable[[list[Item]], list[Any]], items: list[Item], what: str) -> list[Any]:
  """Calls a generate/score callable and checks it answered every item."""
  out = list(fn(items))
  if len(out) != len(items):
    raise ValueError(f"{what} returned {len(out)} results for {len(items)} items; it must "
                     "return exactly one per item, in order.")
  return out


def _mean(xs: Sequence[float]) -> float:
  return sum(xs) / len(xs) if xs else float("nan")


def _sources(items: Sequence[Item]) -> list[str]:
  return sorted({it["source"] for it in items if it.get("source")})


# ---------------------------------------------------------------------------------------
# SugarCrepe
# ---------------------------------------------------------------------------------------

SUGARCREPE_SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel",
                      "add_obj", "add_att")
_CHOICE = re.compile(r"\b([AB])\b")


def parse_choice(reply: str) -> str | None:
  """CompoDistill's parse: the first standalone A or B of the upper-cased reply.

  "(B)" -> B, "ABSOLUTELY" -> None, "option_A" -> None (underscore is a word character),
  and a reply that starts with the article "a" picks A ("a red cube" -> A).
  """
  m = _CHOICE.search(reply.strip().upper())
  return m.group(1) if m else None


def sugarcrepe_prompts(item: Item) -> list[Item]:
  """Both orders of one pair: positive as (A), then positive as (B)."""
  pos, neg = item["positive"], item["negative"]
  base = {"id": item.get("id"), "image": item["image"], "subset": item.get("subset")}
  return [{**base, "order": "pos_first", "prompt": sugarcrepe_question(pos, neg),
           "answer": "A"},
          {**base, "order": "pos_second", "prompt": sugarcrepe_question(neg, pos),
           "answer": "B"}]


def evaluate_sugarcrepe(items_by_subset: Mapping[str, Sequence[Item]],
                        generate: Generate) -> dict[str, Any]:
  """Subset score = accuracy over both orders; overall = mean of the subsets given.

  items_by_subset: {subset: [{"id", "image", "positive", "negative", ...}]}.
  Returns {"overall", "subsets": {name: acc}, "by_order": {order: acc} (position bias),
  "protocol", "missing_subsets", "unparsed" (replies with no A/B), "records", "sources"}.
  """
  unknown = sorted(set(items_by_subset) - set(SUGARCREPE_SUBSETS))
  if unknown:
    raise ValueError(f"unknown SugarCrepe subsets {unknown}; expected names from "
                     f"{SUGARCREPE_SUBSETS}.")
  prompts = []
  for subset, items in items_by_subset.items():
    for item in items:
      prompts.extend({**p, "subset": subset} for p in sugarcrepe_prompts(item))
  replies = _call(generate, prompts, "generate")
  records = []
  for p, reply in zip(prompts, replies):
    pred = parse_choice(reply)
    records.append({"id": p["id"], "subset": p["subset"], "order": p["order"],
                    "reply": reply, "pred": pred, "correct": pred == p["answer"]})
  # As the reference: per subset the mean of the two orders' accuracies.
  subsets = {}
  for s in SUGARCREPE_SUBSETS:
    if s in items_by_subset:
      subsets[s] = _mean([_mean([r["correct"] for r in records
                                 if r["subset"] == s and r["order"] == o])
                          for o in ("pos_first", "pos_second")])
  by_order = {o: _mean([r["correct"] for r in records if r["order"] == o])
              for o in ("pos_first", "pos_second")}
  all_items = [it for items in items_by_subset.values() for it in items]
  return {"overall": _mean(list(subsets.values())), "subsets": subsets,
          "by_order": by_order, "protocol": "sugarcrepe/compodistill",
          "missing_subsets": [s for s in SUGARCREPE_SUBSETS if s not in items_by_subset],
          "unparsed": sum(r["pred"] is None for r in records), "records": records,
          "sources": _sources(all_items)}


# ---------------------------------------------------------------------------------------
# Paired benchmarks (Winoground, BiVLC)
# ---------------------------------------------------------------------------------------


def paired_item_scores(s: Sequence[Sequence[float]]) -> dict[str, bool]:
  """Text/image/group success of one 2x2 matrix s[i][j] = score(image_i, caption_j).

  Caption k is the true one for image k. Comparisons are strict: a tie is a failure.
  """
  if len(s) != 2 or any(len(row) != 2 for row in s):
    raise ValueError(f"paired score matrix must be 2x2 (s[image][caption]); got {s!r}.")
  text = s[0][0] > s[0][1] and s[1][1] > s[1][0]    # each image prefers its caption
  image = s[0][0] > s[1][0] and s[1][1] > s[0][1]   # each caption prefers its image
  return {"text": text, "image": image, "group": text and image}


def paired_scores(matrices: Sequence[Sequence[Sequence[float]]]) -> dict[str, float]:
  """Mean text, image and group scores over 2x2 matrices."""
  per_item = [paired_item_scores(m) for m in matrices]
  return {k: _mean([p[k] for p in per_item]) for k in ("text", "image", "group")}


def evaluate_paired(items: Sequence[Item], score: Score) -> dict[str, Any]:
  """Scores all four (image, caption) pairs of each item, then text/image/group.

  items: [{"id", "image_0", "image_1", "caption_0", "caption_1", ...}]; score gets items
  {"id", "image", "caption", "prompt" (= yes_no_prompt(caption)), "image_index",
  "caption_index"}.
  """
  pairs = []
  for item in items:
    for i, j in itertools.product((0, 1), (0, 1)):
      caption = item[f"caption_{j}"]
      pairs.append({"id": item.get("id"), "image": item[f"image_{i}"], "caption": caption,
                    "prompt": yes_no_prompt(caption), "image_index": i, "caption_index": j})
  values = [float(v) for v in _call(score, pairs, "score")]
  matrices = [[values[4 * n:4 * n + 2], values[4 * n + 2:4 * n + 4]]
              for n in range(len(items))]
  records = [{"id": item.get("id"), "scores": m, **paired_item_scores(m)}
             for item, m in zip(items, matrices)]
  return {**paired_scores(matrices), "protocol": "paired/winoground", "records": records,
          "sources": _sources(items)}


# ---------------------------------------------------------------------------------------
# VQA (VQAv2, VizWiz, TextVQA, GQA)
# ---------------------------------------------------------------------------------------


def evaluate_vqa(items: Sequence[Item], generate: Generate, metric: str | None = None,
                 rule: str | None = None) -> dict[str, Any]:
  """Accuracy of greedy replies on VQA items.

  items: [{"id", "image", "prompt", and "answers" (list of human answers) or "answer"}].
  metric: "soft" (VQAv2 / VizWiz / TextVQA: `vqa_answers.vqa_soft_accuracy` over
  "answers") or "exact" (GQA / synthetic: `vqa_answers.exact_match` with "answer"); None
  picks "soft" when every item has "answers", else "exact".
  rule: the metric's rule (None: its reference, "m4c" or "gqa"); see
  `vqa_answers.SOFT_RULES` and `vqa_answers.EXACT_RULES`.
  Returns {"accuracy", "metric", "rule", "protocol", "by_category" (if items have
  "category"), "records", "sources"}.
  """
  items = list(items)
  if metric is None:
    metric = "soft" if items and all("answers" in it for it in items) else "exact"
  if metric not in ("soft", "exact"):
    raise ValueError(f"metric={metric!r}; use 'soft' or 'exact'.")
  rules = vqa_answers.SOFT_RULES if metric == "soft" else vqa_answers.EXACT_RULES
  rule = rules[0] if rule is None else rule
  check_rule(rule, rules, f"metric={metric!r}")
  key = "answers" if metric == "soft" else "answer"
  missing = [it.get("id") for it in items if key not in it]
  if missing:
    raise ValueError(f"metric={metric!r} needs {key!r} in every item; missing for ids "
                     f"{missing[:5]}.")
  replies = _call(generate, items, "generate")
  records = []
  for it, reply in zip(items, replies):
    acc = (vqa_answers.vqa_soft_accuracy(reply, it["answers"], rule) if metric == "soft"
           else vqa_answers.exact_match(reply, it["answer"], rule))
    records.append({"id": it.get("id"), "category": it.get("category"), "reply": reply,
                    "accuracy": acc})
  out = {"accuracy": _mean([r["accuracy"] for r in records]), "metric": metric,
         "rule": rule, "protocol": f"vqa_{metric}/{rule}"}
  categories = sorted({r["category"] for r in records if r["category"] is not None})
  if categories:
    out["by_category"] = {c: _mean([r["accuracy"] for r in records if r["category"] == c])
                          for c in categories}
  return {**out, "records": records, "sources": _sources(items)}


def textvqa_reference_answers(items: Sequence[Item]) -> list[Item]:
  """The human answers LLaVA's eval_textvqa scores each item against.

  It looks annotations up by (image, lower-cased question), so when two questions of one
  image read the same the last one's answers serve both. items need "image", "question"
  and "answers"; the result is the items with "answers" replaced accordingly.
  """
  items = list(items)
  bad = [it.get("id") for it in items if not {"image", "question", "answers"} <= set(it)]
  if bad:
    raise ValueError(f"TextVQA items need 'image', 'question' and 'answers'; ids {bad[:5]} "
                     "lack one (use cdx.eval.benchmarks.read_textvqa with the val json).")
  last = {(it["image"], it["question"].lower()): it["answers"] for it in items}
  return [{**it, "answers": last[(it["image"], it["question"].lower())]} for it in items]


def evaluate_textvqa(items: Sequence[Item], generate: Generate,
                     rule: str = "m4c") -> dict[str, Any]:
  """TextVQA as LLaVA's eval_textvqa: `textvqa_reference_answers`, then soft accuracy
  with `rule` ("m4c", the reference). Same result keys as `evaluate_vqa`."""
  out = evaluate_vqa(textvqa_reference_answers(items), generate, "soft", rule)
  return {**out, "protocol": f"textvqa/{rule}"}


# ---------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------

POPE_RULES = ("llava", "cdx")
_WORD = re.compile(r"[a-z']+")


def pope_parse(reply: str, rule: str = "llava") -> str:
  """"yes" or "no" for one reply.

  "llava" (LLaVA's eval_pope, the default): the stripped reply up to its first ".",
  commas deleted, split on single spaces; "no" iff a piece is exactly "No", "no" or
  "not" ("NO", "Not sure", "no!" and "No\\nthere" all count as yes).
  "cdx": the first sentence lower-cased, words as letter runs; "no" iff "no" or "not".
  """
  check_rule(rule, POPE_RULES, "pope_parse")
  first = reply.strip().split(".")[0]
  if rule == "llava":
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"
  return "no" if {"no", "not"} & set(_WORD.findall(first.lower())) else "yes"


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """Binary metrics with "yes" as the positive class, as eval_pope computes them (where
  it would divide by zero, e.g. precision with no "yes" reply, this returns 0.0)."""
  if len(preds) != len(labels):
    raise ValueError(f"{len(preds)} predictions for {len(labels)} labels.")
  bad = sorted({x for x in list(preds) + list(labels) if x not in ("yes", "no")})
  if bad:
    raise ValueError(f"POPE answers must be 'yes' or 'no'; got {bad}.")
  pairs = list(zip(preds, labels))
  tp = sum(p == "yes" and g == "yes" for p, g in pairs)
  fp = sum(p == "yes" and g == "no" for p, g in pairs)
  fn = sum(p == "no" and g == "yes" for p, g in pairs)
  tn = sum(p == "no" and g == "no" for p, g in pairs)
  n = len(pairs)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (tp + tn) / n if n else float("nan"), "precision": precision,
          "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / n if n else float("nan"),
          "count": n}


def evaluate_pope(items: Sequence[Item], generate: Generate,
                  rule: str = "llava") -> dict[str, Any]:
  """Per-split POPE metrics. items: [{"id", "image", "prompt", "answer", "split"}]."""
  check_rule(rule, POPE_RULES, "evaluate_pope")
  items = list(items)
  replies = _call(generate, items, "generate")
  preds = [pope_parse(r, rule) for r in replies]
  labels = [str(it["answer"]).strip().lower() for it in items]
  splits = sorted({it.get("split", "all") for it in items})
  per_split = {}
  for s in splits:
    idx = [n for n, it in enumerate(items) if it.get("split", "all") == s]
    per_split[s] = pope_metrics([preds[n] for n in idx], [labels[n] for n in idx])
  records = [{"id": it.get("id"), "split": it.get("split", "all"), "reply": r, "pred": p,
              "answer": g} for it, r, p, g in zip(items, replies, preds, labels)]
  return {"splits": per_split, "rule": rule, "protocol": f"pope/{rule}",
          "records": records, "sources": _sources(items)}


# ---------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
                  "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")
MME_RULES = ("official", "cdx")


def mme_parse(reply: str, rule: str = "official") -> str:
  """"yes", "no" or "other" (always wrong) for one reply.

  "official" (MME's calculation.py, the default): the stripped, lower-cased reply if it is
  exactly "yes" or "no"; else "yes" if its first four characters hold "yes", else "no" if
  they hold "no" ("Not sure" -> no, "Know" -> no, "None" -> no), else "other".
  "cdx": the same after deleting periods ("y.e.s" -> yes).
  """
  check_rule(rule, MME_RULES, "mme_parse")
  text = reply.strip().lower()
  if rule == "cdx":
    text = text.replace(".", "")
  if text in ("yes", "no"):
    return text
  head = text[:4]
  if "yes" in head:
    return "yes"
  if "no" in head:
    return "no"
  return "other"


def _mme_images(records: Sequence[Item], rule: str) -> list[list[bool]]:
  """Per image, whether each of its questions was answered right.

  "official": consecutive records pair up (calculation.py reads each subtask file two
  lines at a time), so the two questions of an image must be adjacent; "cdx": grouped by
  the "image" field, any number of questions.
  """
  right = [r["pred"] == str(r["answer"]).strip().lower() for r in records]
  if rule == "cdx":
    by_image: dict[str, list[bool]] = {}
    for r, ok in zip(records, right):
      by_image.setdefault(r["image"], []).append(ok)
    return list(by_image.values())
  if len(records) % 2:
    raise ValueError(f"MME subtask {records[0]['subtask']!r} has {len(records)} questions; "
                     "the official scorer pairs them two by two (2 per image).")
  for a, b in zip(records[::2], records[1::2]):
    if a["image"] != b["image"]:
      raise ValueError(f"MME questions pair up in order, but {a['image']!r} is followed by "
                       f"{b['image']!r}; list both questions of an image together.")
  return [right[k:k + 2] for k in range(0, len(right), 2)]


def mme_scores(records: Sequence[Item], rule: str = "official") -> dict[str, Any]:
  """MME totals from records {"subtask", "image", "pred", "answer"} (pred yes/no/other).

  Per subtask: acc = right questions / questions, acc_plus = images with every question
  right / images, score = 100 * (acc + acc_plus), out of 200. Totals sum the subtasks of
  each family that are present (the official script needs all 14).
  """
  check_rule(rule, MME_RULES, "mme_scores")
  known = set(MME_PERCEPTION) | set(MME_COGNITION)
  by_task: dict[str, list[Item]] = {}
  for r in records:
    if r["subtask"] not in known:
      raise ValueError(f"unknown MME subtask {r['subtask']!r}; expected one of "
                       f"{sorted(known)}.")
    by_task.setdefault(r["subtask"], []).append(r)
  per_task = {}
  for name, task_records in by_task.items():
    images = _mme_images(task_records, rule)
    acc = _mean([x for answers in images for x in answers])
    acc_plus = _mean([all(answers) for answers in images])
    # Summed as calculation.py sums them, so the float is the same.
    per_task[name] = {"acc": acc, "acc_plus": acc_plus, "score": acc * 100 + acc_plus * 100}
  return {
      "subtasks": per_task,
      "perception": sum(per_task[t]["score"] for t in MME_PERCEPTION if t in per_task),
      "cognition": sum(per_task[t]["score"] for t in MME_COGNITION if t in per_task),
      "missing_subtasks": [t for t in MME_PERCEPTION + MME_COGNITION if t not in per_task],
      "rule": rule, "protocol": f"mme/{rule}",
  }


def evaluate_mme(items: Sequence[Item], generate: Generate,
                 rule: str = "official") -> dict[str, Any]:
  """MME from items {"id", "image", "prompt", "answer", "subtask"}, in the official files'
  order (both questions of an image adjacent)."""
  check_rule(rule, MME_RULES, "evaluate_mme")
  items = list(items)
  replies = _call(generate, items, "generate")
  records = [{"id": it.get("id"), "subtask": it["subtask"], "image": it["image"],
              "reply": r, "pred": mme_parse(r, rule), "answer": it["answer"]}
             for it, r in zip(items, replies)]
  return {**mme_scores(records, rule), "records": records, "sources": _sources(items)}
