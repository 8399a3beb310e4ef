"""Which protocols score which benchmark, and the likelihood protocols themselves.

  tasks = protocols.tasks("sugarcrepe")   # {"generate": Task, "likelihood": Task, ...}
  result = tasks["likelihood"].evaluate(items, logprob)

Every benchmark of `cdx.eval.benchmarks.BENCHMARKS` has one or more protocols:

  generate    greedy replies parsed by the reference scorer (`cdx.eval.scoring`): every
              benchmark with a question to answer
  likelihood  one forward pass per prompt, no decoding:
                SugarCrepe   the two-choice question of the generate protocol, both orders;
                             the answer is the likelier of " A" and " B"
                paired       s(image, caption) = P(" Yes") to `scoring.yes_no_prompt`
  caption     s(image, caption) = log P(caption | image) summed over the caption's tokens,
              the caption being the reply to the fixed CAPTION_PROMPT:
                SugarCrepe   right iff the positive caption scores above the negative one
                SugarCrepe++ right iff both positive captions score above the negative one
                paired       the Winoground text / image / group scores of s

A Task's `evaluate(items, fn)` calls fn exactly once with a list of units (dicts with
"image" and "prompt"; likelihood units also "options", the reply texts to score) and
returns a scorer result with a "protocol" field. fn is the model: `kind` "generate"
(units -> replies) or "logprob" (units -> [log P(option) per option]), see
`cdx.eval.run.make_generate` / `make_logprob`.

`headline(benchmark, result)` is the one number a table shows (percent; MME perception in
points) and `HEADLINE` says what it is.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from cdx.eval import scoring

GENERATE, LIKELIHOOD, CAPTION = "generate", "likelihood", "caption"
PROTOCOLS = (GENERATE, LIKELIHOOD, CAPTION)
LETTERS = (" A", " B")   # replies start after "ASSISTANT:" with a space (docs/METHOD.md §3)
YES = " Yes"
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."

Item = dict[str, Any]
Model = Callable[[list[dict]], list[Any]]


@dataclasses.dataclass(frozen=True)
class Task:
  """One benchmark scored by one protocol."""
  evaluate: Callable[[list[Item], Model], dict[str, Any]]
  kind: str   # "generate" or "logprob": which model callable serves the units


def _by_subset(items):
  out: dict[str, list[Item]] = {}
  for it in items:
    out.setdefault(it["subset"], []).append(it)
  return out


def _call(fn: Model, units: list[dict]) -> list[Any]:
  out = list(fn(units))
  if len(out) != len(units):
    raise ValueError(f"the model returned {len(out)} results for {len(units)} units.")
  return out


# ------------------------------------------------------------------------------- SugarCrepe

def _letter(logps) -> str:
  a, b = logps
  return "A" if a > b else "B" if b > a else ""   # a tie answers nothing (wrong)


def sugarcrepe_option_likelihood(items: list[Item], logprob: Model) -> dict[str, Any]:
  """`scoring.evaluate_sugarcrepe` answered by the likelier option letter."""
  def answer(prompts):
    return [_letter(lp) for lp in _call(logprob, [dict(p, options=list(LETTERS))
                                                  for p in prompts])]
  return {**scoring.evaluate_sugarcrepe(_by_subset(items), answer),
          "protocol": "sugarcrepe/option_likelihood"}


def _caption_units(image: str, captions: list[str]) -> list[dict]:
  return [{"image": image, "prompt": CAPTION_PROMPT, "options": [" " + c]}
          for c in captions]


def caption_likelihood(items: list[Item], logprob: Model) -> dict[str, Any]:
  """SugarCrepe(++) by caption log-likelihood: right iff every positive caption ("positive",
  and "positive2" when present) scores above "negative". Subset score = accuracy; overall
  = mean of the subsets (as the generate protocol)."""
  keys = [["positive", "positive2", "negative"] if "positive2" in it else
          ["positive", "negative"] for it in items]
  units = [u for it, ks in zip(items, keys)
           for u in _caption_units(it["image"], [it[k] for k in ks])]
  logps = [lp[0] for lp in _call(logprob, units)]
  records, at = [], 0
  for it, ks in zip(items, keys):
    s = dict(zip(ks, logps[at:at + len(ks)]))
    at += len(ks)
    correct = all(s[k] > s["negative"] for k in ks if k != "negative")
    records.append({"id": it["id"], "subset": it["subset"], "logp": s, "correct": correct})
  subsets = {name: sum(r["correct"] for r in rs) / len(rs)
             for name, rs in _by_subset(records).items()}
  return {"overall": sum(subsets.values()) / len(subsets), "subsets": subsets,
          "protocol": f"{items[0]['benchmark'].removeprefix('synthetic_')}/caption_likelihood",
          "records": records, "sources": sorted({it["source"] for it in items})}


# ------------------------------------------------------------------------------- paired

def paired_p_yes(items: list[Item], logprob: Model) -> dict[str, Any]:
  """Winoground scores of s = P(" Yes") to the yes/no question (`scoring.evaluate_paired`)."""
  def score(pairs):
    return [math.exp(lp[0]) for lp in _call(logprob, [dict(p, options=[YES])
                                                      for p in pairs])]
  return {**scoring.evaluate_paired(items, score), "protocol": "paired/p_yes"}


def paired_caption(items: list[Item], logprob: Model) -> dict[str, Any]:
  """Winoground scores of s = log P(caption | image) (see CAPTION_PROMPT)."""
  def score(pairs):
    units = [u for p in pairs for u in _caption_units(p["image"], [p["caption"]])]
    return [lp[0] for lp in _call(logprob, units)]
  return {**scoring.evaluate_paired(items, score), "protocol": "paired/caption_likelihood"}


# ------------------------------------------------------------------------------- generate

def _replies_only(items: list[Item], generate: Model) -> dict[str, Any]:
  """Items without gold answers (test splits): replies for a submission, no score."""
  replies = _call(generate, items)
  return {"protocol": "replies/none", "records": [
      {"id": it["id"], "question_id": it["id"], "reply": r} for it, r in zip(items, replies)],
      "sources": sorted({it["source"] for it in items})}


def _vqa(metric: str | None = None, rule: str | None = None):
  def evaluate(items, generate):
    gold = "answers" if metric != "exact" else "answer"
    if not all(gold in it for it in items):
      return _replies_only(items, generate)
    return scoring.evaluate_vqa(items, generate, metric, rule)
  return evaluate


def _textvqa(items, generate):
  if not all("answers" in it for it in items):
    return _replies_only(items, generate)
  return scoring.evaluate_textvqa(items, generate)


def _sugarcrepe_generate(items, generate):
  return scoring.evaluate_sugarcrepe(_by_subset(items), generate)


_SUGARCREPE = {GENERATE: Task(_sugarcrepe_generate, "generate"),
               LIKELIHOOD: Task(sugarcrepe_option_likelihood, "logprob"),
               CAPTION: Task(caption_likelihood, "logprob")}
_PAIRED = {LIKELIHOOD: Task(paired_p_yes, "logprob"),
           CAPTION: Task(paired_caption, "logprob")}
TASKS: dict[str, dict[str, Task]] = {
    "sugarcrepe": _SUGARCREPE,
    "synthetic_sugarcrepe": _SUGARCREPE,
    "sugarcrepe_pp": {CAPTION: Task(caption_likelihood, "logprob")},
    "winoground": _PAIRED,
    "bivlc": _PAIRED,
    "synthetic_paired": _PAIRED,
    "pope": {GENERATE: Task(scoring.evaluate_pope, "generate")},
    "vqav2": {GENERATE: Task(_vqa("soft"), "generate")},
    "vizwiz": {GENERATE: Task(_vqa("soft"), "generate")},
    "gqa": {GENERATE: Task(_vqa("exact"), "generate")},
    "textvqa": {GENERATE: Task(_textvqa, "generate")},
    "textvqa_ocr": {GENERATE: Task(_textvqa, "generate")},
    "mme": {GENERATE: Task(scoring.evaluate_mme, "generate")},
    # The synthetic answers are capitalized ("Yes"), which GQA's reference rule (only
    # the reply lower-cased) never matches: cdx's case-blind rule serves this set.
    "synthetic_vqa": {GENERATE: Task(_vqa("exact", "cdx"), "generate")},
}


def tasks(benchmark: str) -> dict[str, Task]:
  if benchmark not in TASKS:
    raise ValueError(f"no protocols for benchmark {benchmark!r}; expected one of "
                     f"{sorted(TASKS)}.")
  return TASKS[benchmark]


# ------------------------------------------------------------------------------- headline

# What `headline` reports per benchmark (docs/EVALUATION.md, "Results table").
HEADLINE = {
    "sugarcrepe": "overall accuracy (mean of the subsets), %",
    "synthetic_sugarcrepe": "overall accuracy (mean of the subsets), %",
    "sugarcrepe_pp": "overall accuracy (mean of the subsets), %",
    "winoground": "text score, %", "bivlc": "text score, %",
    "synthetic_paired": "text score, %",
    "pope": "F1 averaged over the splits, %",
    "vqav2": "accuracy, %", "vizwiz": "accuracy, %", "gqa": "accuracy, %",
    "textvqa": "accuracy, %", "textvqa_ocr": "accuracy, %", "synthetic_vqa": "accuracy, %",
    "mme": "perception score, points (of 2000)",
}
PAIRED_HEADLINE = "text"   # which Winoground score stands for a paired benchmark


def headline(benchmark: str, result: dict[str, Any]) -> float | None:
  """The number a results table shows for one benchmark result (None: no score)."""
  if "overall" in result:
    return 100 * result["overall"]
  if PAIRED_HEADLINE in result:
    return 100 * result[PAIRED_HEADLINE]
  if "splits" in result:
    f1 = [m["f1"] for m in result["splits"].values()]
    return 100 * sum(f1) / len(f1)
  if "perception" in result:
    return result["perception"]
  if "accuracy" in result:
    return 100 * result["accuracy"]
  return None
