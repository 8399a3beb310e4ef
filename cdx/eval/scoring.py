"""Benchmark scorers (SPEC §9): prompts, reply parsing and metrics, in plain Python.

Nothing here runs a model. Every `evaluate_*` function takes prompt items (dicts made by
`cdx.eval.benchmarks`) and a callable:

  generate(items: list[dict]) -> list[str]   greedy reply per item; each item has
      "image" (path) and "prompt" (the user turn's text, without any image placeholder:
      the chat template places the image)
  score(items: list[dict]) -> list[float]    one score per item (same item keys), e.g.
      P("Yes") for `yes_no_prompt(caption)` or the caption's log-likelihood

so they can be tested with fakes and served by any generation loop. Results are plain
dicts of floats in [0, 1] (MME: points), with per-item `records` and the `sources` of the
data (see `benchmarks.file_source`) so a number always travels with its dataset version.

Benchmarks:
  SugarCrepe  two-choice question asked in both orders; parse the first standalone A/B.
  Paired      Winoground / BiVLC 2x2 score matrices: text, image and group scores.
  VQA         EvalAI answer normalization, soft accuracy over 10 leave-one-out subsets
              (VQAv2, VizWiz, TextVQA); exact match (GQA, the synthetic world).
  POPE        first sentence holding "no"/"not" -> no; accuracy, precision, recall, F1,
              yes-ratio per split.
  MME         per-subtask acc and acc+ (both questions of an image right); perception total
              out of 2000, cognition total out of 800.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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


def sugarcrepe_question(a: str, b: str) -> str:
  """The two-choice question of SPEC §9 (the space before `(B)` is deliberate)."""
  return (f"Which caption best describes the image?\n(A) {a}\n (B) {b}\n"
          "Answer with the option's alphabet from the given choices directly.")


def parse_choice(reply: str) -> str | None:
  """First standalone A or B of the upper-cased reply ("(B)" -> B, "ABSOLUTELY" -> None)."""
  m = _CHOICE.search(reply.upper())
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
  "missing_subsets", "unparsed" (replies with no A/B), "records", "sources"}.
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
  subsets = {s: _mean([r["correct"] for r in records if r["subset"] == s])
             for s in SUGARCREPE_SUBSETS if s in items_by_subset}
  by_order = {o: _mean([r["correct"] for r in records if r["order"] == o])
              for o in ("pos_first", "pos_second")}
  all_items = [it for items in items_by_subset.values() for it in items]
  return {"overall": _mean(list(subsets.values())), "subsets": subsets,
          "by_order": by_order,
          "missing_subsets": [s for s in SUGARCREPE_SUBSETS if s not in items_by_subset],
          "unparsed": sum(r["pred"] is None for r in records), "records": records,
          "sources": _sources(all_items)}


# ---------------------------------------------------------------------------------------
# Paired benchmarks (Winoground, BiVLC)
# ---------------------------------------------------------------------------------------


def yes_no_prompt(caption: str) -> str:
  """The question whose P("Yes") scores an (image, caption) pair."""
  return f'Does this figure show "{caption}"? Please answer yes or no.'


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
  return {**paired_scores(matrices), "records": records, "sources": _sources(items)}


# ---------------------------------------------------------------------------------------
# VQA (VQAv2, VizWiz, TextVQA, GQA)
# ---------------------------------------------------------------------------------------

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."

# EvalAI answer normalization, written from the rules the VQA challenge states.
# Punctuation that becomes a space (or vanishes, see _strip_punctuation); apostrophes and
# colons are kept, periods are handled apart because of decimals.
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA = re.compile(r"(\d),(\d)")
_PERIOD = re.compile(r"\.(?!\d)")   # a period not followed by a digit (decimals survive)
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions; any spelling missing one or more of the apostrophes is restored. Forms
# whose apostrophe-less spelling is an ordinary word (its, ill, well, were, shed, ...) are
# left out on purpose.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't",
    "doesn't", "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've",
    "he's", "how'd", "how'll", "how's", "i'd've", "i'm", "i've", "isn't", "it'd",
    "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "shan't", "she'd've", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've",
    "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've",
    "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's",
    "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll",
    "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll",
    "you're", "you've")


def _contraction_map() -> dict[str, str]:
  """{spelling with some apostrophes missing: full contraction}."""
  out = {}
  for word in _CONTRACTIONS:
    parts = word.split("'")
    for kept in itertools.product((True, False), repeat=len(parts) - 1):
      if all(kept):
        continue
      spelled = parts[0] + "".join(("'" if k else "") + p for k, p in zip(kept, parts[1:]))
      out[spelled] = word
  return out


_CONTRACTION_MAP = _contraction_map()


def _strip_punctuation(text: str) -> str:
  """EvalAI punctuation rule: a mark is deleted when the text shows it used as punctuation
  (next to a space) or holds a thousands comma ("100,978"); otherwise it becomes a space
  ("t-shirt" -> "t shirt"). The rule looks at the whole answer, as the official one does."""
  original = text   # the tests look at the answer as given, not at earlier replacements
  delete = _DIGIT_COMMA.search(original) is not None
  for p in _PUNCTUATION:
    if p not in text:
      continue
    if delete or f"{p} " in original or f" {p}" in original:
      text = text.replace(p, "")
    else:
      text = text.replace(p, " ")
  return _PERIOD.sub("", text)


def normalize_answer(answer: str) -> str:
  """EvalAI normalization: lower-case, punctuation, number words -> digits, no articles,
  restored contractions, single spaces. E.g. "The Two Dogs." -> "2 dogs"."""
  text = " ".join(answer.lower().split())
  text = _strip_punctuation(text)
  words = []
  for w in text.split():
    w = _NUMBERS.get(w, w)
    if w in _ARTICLES:
      continue
    words.append(_CONTRACTION_MAP.get(w, w))
  return " ".join(words)


def vqa_soft_accuracy(pred: str, answers: Sequence[str]) -> float:
  """min(#other humans agreeing / 3, 1) averaged over the leave-one-out subsets.

  With the usual 10 answers: mean over the 10 subsets of 9 answers. Both the prediction and
  the human answers are normalized.
  """
  if not answers:
    raise ValueError("vqa_soft_accuracy needs at least one human answer; got none.")
  pred = normalize_answer(pred)
  gold = [normalize_answer(a) for a in answers]
  hits = sum(g == pred for g in gold)
  # Leaving out a matching answer removes one agreeing human; leaving out another does not.
  return _mean([min((hits - (g == pred)) / 3.0, 1.0) for g in gold])


def exact_match(pred: str, answer: str) -> float:
  """GQA-style: equal after lower-casing, trimming and dropping a final period."""
  def clean(s: str) -> str:
    return " ".join(s.lower().split()).rstrip(".").strip()
  return float(clean(pred) == clean(answer))


def vqa_prompt(question: str) -> str:
  """The question with the short-answer instruction of SPEC §9."""
  return question + VQA_SUFFIX


def evaluate_vqa(items: Sequence[Item], generate: Generate,
                 metric: str | None = None) -> dict[str, Any]:
  """Accuracy of greedy replies on VQA items.

  items: [{"id", "image", "prompt", and "answers" (list of human answers) or "answer"}].
  metric: "soft" (VQAv2 / VizWiz / TextVQA: `vqa_soft_accuracy` over "answers") or
  "exact" (GQA / synthetic: `exact_match` with "answer"); None picks "soft" when every
  item has "answers", else "exact".
  Returns {"accuracy", "metric", "by_category" (if items have "category"), "records",
  "sources"}.
  """
  items = list(items)
  if metric is None:
    metric = "soft" if items and all("answers" in it for it in items) else "exact"
  if metric not in ("soft", "exact"):
    raise ValueError(f"metric={metric!r}; use 'soft' or 'exact'.")
  key = "answers" if metric == "soft" else "answer"
  missing = [it.get("id") for it in items if key not in it]
  if missing:
    raise ValueError(f"metric={metric!r} needs {key!r} in every item; missing for ids "
                     f"{missing[:5]}.")
  replies = _call(generate, items, "generate")
  records = []
  for it, reply in zip(items, replies):
    acc = (vqa_soft_accuracy(reply, it["answers"]) if metric == "soft"
           else exact_match(reply, it["answer"]))
    records.append({"id": it.get("id"), "category": it.get("category"), "reply": reply,
                    "accuracy": acc})
  out = {"accuracy": _mean([r["accuracy"] for r in records]), "metric": metric}
  categories = sorted({r["category"] for r in records if r["category"] is not None})
  if categories:
    out["by_category"] = {c: _mean([r["accuracy"] for r in records if r["category"] == c])
                          for c in categories}
  return {**out, "records": records, "sources": _sources(items)}


# ---------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z']+")


def pope_parse(reply: str) -> str:
  """"no" when the first sentence holds the word "no" or "not", else "yes"."""
  first = reply.split(".")[0].lower()
  words = set(_WORD.findall(first))
  return "no" if words & {"no", "not"} else "yes"


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """Binary metrics with "yes" as the positive class."""
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


def evaluate_pope(items: Sequence[Item], generate: Generate) -> dict[str, Any]:
  """Per-split POPE metrics. items: [{"id", "image", "prompt", "answer", "split"}]."""
  items = list(items)
  replies = _call(generate, items, "generate")
  preds = [pope_parse(r) for r in replies]
  labels = [str(it["answer"]).strip().lower() for it in items]
  splits = sorted({it.get("split", "all") for it in items})
  per_split = {}
  for s in splits:
    idx = [n for n, it in enumerate(items) if it.get("split", "all") == s]
    per_split[s] = pope_metrics([preds[n] for n in idx], [labels[n] for n in idx])
  records = [{"id": it.get("id"), "split": it.get("split", "all"), "reply": r, "pred": p,
              "answer": g} for it, r, p, g in zip(items, replies, preds, labels)]
  return {"splits": per_split, "records": records, "sources": _sources(items)}


# ---------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
                  "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def mme_parse(reply: str) -> str:
  """"yes"/"no" if the reply (periods dropped) is exactly that, else whichever of them
  occurs in its first four characters (the MME tool's rule: "Not sure" -> no), else
  "other" (always wrong)."""
  text = reply.lower().strip().replace(".", "")
  if text in ("yes", "no"):
    return text
  head = text[:4]
  if "yes" in head:
    return "yes"
  if "no" in head:
    return "no"
  return "other"


def mme_scores(records: Sequence[Item]) -> dict[str, Any]:
  """MME totals from records {"subtask", "image", "pred", "answer"} (pred/answer yes/no).

  Per subtask: acc = right questions / questions, acc_plus = images with every question
  right / images, score = 100 * (acc + acc_plus), out of 200. Totals sum the subtasks of
  each family that are present.
  """
  known = set(MME_PERCEPTION) | set(MME_COGNITION)
  subtasks: dict[str, dict[str, list[bool]]] = {}
  for r in records:
    if r["subtask"] not in known:
      raise ValueError(f"unknown MME subtask {r['subtask']!r}; expected one of "
                       f"{sorted(known)}.")
    right = r["pred"] == str(r["answer"]).strip().lower()
    subtasks.setdefault(r["subtask"], {}).setdefault(r["image"], []).append(right)
  per_task = {}
  for name, images in subtasks.items():
    acc = _mean([x for answers in images.values() for x in answers])
    acc_plus = _mean([all(answers) for answers in images.values()])
    per_task[name] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
  return {
      "subtasks": per_task,
      "perception": sum(per_task[t]["score"] for t in MME_PERCEPTION if t in per_task),
      "cognition": sum(per_task[t]["score"] for t in MME_COGNITION if t in per_task),
      "missing_subtasks": [t for t in MME_PERCEPTION + MME_COGNITION if t not in per_task],
  }


def evaluate_mme(items: Sequence[Item], generate: Generate) -> dict[str, Any]:
  """MME from items {"id", "image", "prompt", "answer", "subtask"}."""
  items = list(items)
  replies = _call(generate, items, "generate")
  records = [{"id": it.get("id"), "subtask": it["subtask"], "image": it["image"],
              "reply": r, "pred": mme_parse(r), "answer": it["answer"]}
             for it, r in zip(items, replies)]
  return {**mme_scores(records), "records": records, "sources": _sources(items)}
