"""Tests of cdx.eval.scoring and cdx.eval.vqa_answers (metrics, parsing) and
cdx.eval.benchmarks (local readers).

Expected scores are worked out by hand from the reference scorers' rules
(docs/EVALUATION.md); the comment beside each says how.
"""
import json
import os

import pytest

from cdx.eval import benchmarks
from cdx.eval import scoring
from cdx.eval import vqa_answers


# ---------------------------------------------------------------------------------------
# SugarCrepe
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply,expected", [
    ("A", "A"), ("(B)", "B"), ("The answer is B.", "B"), ("ABSOLUTELY", None),
    ("b", "B"), ("", None), ("C", None), ("AB", None), ("Answer: (A)", "A"),
    ("A or B", "A"), ("B) the second one", "B"), ("option_A", None), ("A1", None),
    ("\n\n  a.", "A"),
    ("a red cube", "A"),          # the article quirk: "A RED CUBE" starts with a lone A
    ("The answer is (b)", "B"),   # "THE" holds no standalone letter; "(B)" does
    ("Ａ", None),                 # full-width Ａ upper-cases to itself, not to A
    ("ÀB", None),                 # À is a word character: no boundary before B
    ("É A", "A"),
])
def test_parse_choice(reply, expected):
  assert scoring.parse_choice(reply) == expected


def test_sugarcrepe_question_text():
  q = scoring.sugarcrepe_question("a red cube", "a blue cube")
  assert q == ("Which caption best describes the image?\n(A) a red cube\n (B) a blue cube\n"
               "Answer with the option's alphabet from the given choices directly.")


def _sc_items(subset, n):
  return [{"id": str(k), "image": f"{subset}_{k}.png", "positive": f"pos {subset} {k}",
           "negative": f"neg {subset} {k}", "subset": subset} for k in range(n)]


def _perfect(prompt_items):
  """Answers the letter of the line holding the positive caption (read from the prompt)."""
  return ["(A)" if "(A) pos " in p["prompt"] else "B, clearly." for p in prompt_items]


def test_sugarcrepe_always_a_is_exactly_half():
  by_subset = {s: _sc_items(s, 3 + i) for i, s in enumerate(scoring.SUGARCREPE_SUBSETS)}
  seen = []

  def always_a(items):
    seen.extend(items)
    return ["A"] * len(items)

  out = scoring.evaluate_sugarcrepe(by_subset, always_a)
  assert out["protocol"] == "sugarcrepe/compodistill"
  assert out["overall"] == 0.5
  assert all(v == 0.5 for v in out["subsets"].values())
  assert out["by_order"] == {"pos_first": 1.0, "pos_second": 0.0}
  assert out["missing_subsets"] == [] and out["unparsed"] == 0
  n_items = sum(len(v) for v in by_subset.values())
  assert len(seen) == 2 * n_items and len(out["records"]) == 2 * n_items
  # Both orders of one pair: the positive is (A) first, then (B).
  first, second = seen[0], seen[1]
  assert first["image"] == second["image"]
  assert first["prompt"] == scoring.sugarcrepe_question("pos swap_obj 0", "neg swap_obj 0")
  assert second["prompt"] == scoring.sugarcrepe_question("neg swap_obj 0", "pos swap_obj 0")


def test_sugarcrepe_article_replies_score_as_a():
  """A model that answers with a caption starting "a ..." picks A in both orders."""
  items = {"swap_att": _sc_items("swap_att", 2)}
  out = scoring.evaluate_sugarcrepe(items, lambda it: ["a photo of pos"] * len(it))
  # pos_first: A is right (2/2); pos_second: A is wrong (0/2) -> (1 + 0) / 2.
  assert out["subsets"] == {"swap_att": 0.5}
  assert all(r["pred"] == "A" for r in out["records"])


def test_sugarcrepe_perfect_and_mean_of_subsets():
  by_subset = {s: _sc_items(s, 4) for s in scoring.SUGARCREPE_SUBSETS}
  assert scoring.evaluate_sugarcrepe(by_subset, _perfect)["overall"] == 1.0

  # Right only on swap_obj (1 item) and wrong on replace_obj (3 items): the overall is the
  # mean of the subsets (0.5), not of the pooled items (0.25).
  by_subset = {"swap_obj": _sc_items("swap_obj", 1), "replace_obj": _sc_items("replace_obj", 3)}

  def half(items):
    good = _perfect(items)
    return [g if it["subset"] == "swap_obj" else "I cannot tell" for it, g in zip(items, good)]

  out = scoring.evaluate_sugarcrepe(by_subset, half)
  assert out["subsets"] == {"swap_obj": 1.0, "replace_obj": 0.0}
  assert out["overall"] == 0.5
  assert out["unparsed"] == 6
  assert "add_att" in out["missing_subsets"]


def test_sugarcrepe_bad_input():
  with pytest.raises(ValueError, match="unknown SugarCrepe subsets"):
    scoring.evaluate_sugarcrepe({"swap_color": _sc_items("swap_obj", 1)}, _perfect)
  with pytest.raises(ValueError, match="exactly one per item"):
    scoring.evaluate_sugarcrepe({"swap_obj": _sc_items("swap_obj", 2)}, lambda it: ["A"])


# ---------------------------------------------------------------------------------------
# Paired benchmarks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("matrix,text,image", [
    ([[0.9, 0.1], [0.2, 0.8]], True, True),
    ([[0.9, 0.8], [0.95, 0.7]], False, False),
    ([[0.9, 0.1], [0.95, 0.96]], True, False),    # image 1 likes both captions more
    ([[0.5, 0.6], [0.1, 0.7]], False, True),      # caption 1 beats caption 0 on image 0
    ([[0.5, 0.5], [0.1, 0.7]], False, True),      # a tie is not a preference
    ([[0.5, 0.1], [0.5, 0.7]], True, False),
])
def test_paired_item_scores(matrix, text, image):
  out = scoring.paired_item_scores(matrix)
  assert out == {"text": text, "image": image, "group": text and image}


def test_paired_scores_mean_and_shape_check():
  ms = [[[0.9, 0.1], [0.2, 0.8]], [[0.9, 0.1], [0.95, 0.96]], [[0.5, 0.6], [0.1, 0.7]],
        [[0, 1], [1, 0]]]
  assert scoring.paired_scores(ms) == {"text": 0.5, "image": 0.5, "group": 0.25}
  with pytest.raises(ValueError, match="2x2"):
    scoring.paired_item_scores([[1, 2, 3], [4, 5, 6]])


def test_evaluate_paired_builds_all_four_pairs():
  items = [{"id": 7, "image_0": "i0.png", "image_1": "i1.png", "caption_0": "c zero",
            "caption_1": "c one", "source": "x (1 bytes, sha1 ab)"}]
  table = {("i0.png", "c zero"): 0.9, ("i0.png", "c one"): 0.1,
           ("i1.png", "c zero"): 0.95, ("i1.png", "c one"): 0.96}
  seen = []

  def score(pairs):
    seen.extend(pairs)
    return [table[(p["image"], p["caption"])] for p in pairs]

  out = scoring.evaluate_paired(items, score)
  assert (out["text"], out["image"], out["group"]) == (1.0, 0.0, 0.0)
  assert out["protocol"] == "paired/winoground"
  assert out["records"][0]["scores"] == [[0.9, 0.1], [0.95, 0.96]]
  assert out["sources"] == ["x (1 bytes, sha1 ab)"]
  assert len(seen) == 4
  assert seen[1]["prompt"] == 'Does this figure show "c one"? Please answer yes or no.'


# ---------------------------------------------------------------------------------------
# VQA answer normalization
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    ("Yes.", "yes"),                 # lower-case; a period not before a digit goes
    ("The dog", "dog"),              # article dropped
    ("two", "2"), ("ONE", "1"),      # number words, after lower-casing
    ("none", "0"),                   # "none" is a number word too
    ("Two Dogs!", "2 dogs"),         # "!" has no space beside it -> a space
    ("dont", "don't"), ("isnt", "isn't"), ("couldnt've", "couldn't've"),   # table
    ("its", "its"),                  # not in the table
    ("it's", "it 's"),               # every "'s" is split off, even in "it's"
    ("The dog's bone", "dog 's bone"),
    ("whats", "what's"),             # the table restores the apostrophe ...
    ("what's", "what 's"),           # ... which the possessive split then breaks
    ("somebody'd", "somebodyd"),     # the table's own backwards entry
    ("Im", "im"),                    # capitalized key, unreachable after lower-casing
    ("1,000", "1000"),               # every comma is deleted first
    ("hello,world", "helloworld"),   # ... even between words
    ("hello, world", "hello world"),
    ("a/b, c", "b c"),               # "a b c" after the marks, then the article goes
    ("t-shirt", "t shirt"),          # a mark inside a word -> a space
    ("left - right", "left right"),  # "- " present -> every "-" deleted
    ("yes -no", "yes no"),           # " -" present -> deleted
    ("(t-shirt)", "t shirt"),
    ("N/A", "n"),                    # "n a", and then "a" is an article
    ("3.5", "3.5"),                  # decimal point survives
    ("e.g.", "eg"),
    ("12:30", "12:30"),              # colons are not marks
    ("Not sure?", "not sure"),       # "?" deleted first
    ("  A \t Cat\n", "cat"),
    ("an apple a day", "apple day"),
    ("Café's", "café 's"),           # unicode letters kept, lower-cased
    ("", ""),
])
def test_normalize_answer_m4c(raw, expected):
  assert vqa_answers.normalize_answer(raw) == expected
  assert vqa_answers.normalize_answer(raw, "m4c") == expected


@pytest.mark.parametrize("raw,rule,expected", [
    ("1,000 t-shirts", "vqa_api", "1000 tshirts"),   # a "d,d" deletes every mark
    ("1,000 t-shirts", "m4c", "1000 t shirts"),      # commas gone first: "-" -> space
    ("hello,world", "vqa_api", "hello world"),
    ("it's", "vqa_api", "it's"),
    ("It's", "cdx", "it's"), ("Im", "cdx", "i'm"), ("whats", "cdx", "what's"),
    ("hello,world", "cdx", "hello world"), ("Two  Dogs!", "cdx", "2 dogs"),
])
def test_normalize_answer_other_rules(raw, rule, expected):
  assert vqa_answers.normalize_answer(raw, rule) == expected


def test_periods_removed_at_most_32_times():
  # The reference passes re.UNICODE (32) as the count of re.sub: 40 "a." -> the first 32
  # periods go, the last 8 stay.
  assert vqa_answers.normalize_answer("a." * 40) == "a" * 32 + "a." * 8


def test_unknown_rule():
  with pytest.raises(ValueError, match="rule='bleu'"):
    vqa_answers.normalize_answer("x", "bleu")
  with pytest.raises(ValueError, match="rule='m4c'"):
    vqa_answers.exact_match("x", "x", "m4c")


# ---------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_match,expected", [
    (0, 0.0),
    (1, 0.3),   # leave the match out: 0; leave another out: 1/3 (9 times) -> 3/10
    (2, 0.6),   # 2 x 1/3 + 8 x 2/3 = 18/3 -> /10
    (3, 0.9),   # 3 x 2/3 + 7 x 1 -> 9/10
    (4, 1.0),
])
def test_vqa_soft_accuracy_by_hand(n_match, expected):
  answers = ["2"] * n_match + ["3"] * (10 - n_match)
  assert vqa_answers.vqa_soft_accuracy("Two.", answers) == pytest.approx(expected)


@pytest.mark.parametrize("pred,answers,rule,expected", [
    ("t shirt", ["T-shirt"] * 10, "m4c", 1.0),        # both sides normalized
    ("1,000", ["1000"] * 2 + ["999"] * 8, "m4c", 0.6),  # "1000": 2 matches
    ("hello,world", ["hello world"] * 10, "m4c", 0.0),  # "helloworld" matches nobody
    ("hello,world", ["hello world"] * 10, "cdx", 1.0),
    ("whats", ["what's"] * 10, "m4c", 0.0),           # "what's" vs "what 's"
    ("whats", ["what's"] * 10, "cdx", 1.0),
    ("The dog's", ["dog's"] * 3 + ["dog"] * 7, "m4c", 0.9),   # "dog 's": 3 matches
    ("Not sure", ["not sure"] * 2 + ["no"] * 8, "m4c", 0.6),
    ("NO.", ["no"] * 1 + ["yes"] * 9, "m4c", 0.3),
    ("", ["yes"] * 10, "m4c", 0.0),
    ("Two", ["Two"] * 10, "m4c", 1.0),
    # VQA API: identical human answers are compared raw, the reply normalized ("2").
    ("Two", ["Two"] * 10, "vqa_api", 0.0),
    # ... and varied ones only lose punctuation: "the dog" keeps its article, the reply not.
    ("the dog", ["the dog"] * 4 + ["cat"] * 6, "vqa_api", 0.0),
    ("the dog", ["the dog"] * 4 + ["cat"] * 6, "m4c", 1.0),
    # Any count: each of the 2 leave-one-out subsets holds 1 match -> 1/3.
    ("dog", ["dog"] * 2, "vqa_api", 1 / 3),
])
def test_vqa_soft_accuracy_rules(pred, answers, rule, expected):
  assert vqa_answers.vqa_soft_accuracy(pred, answers, rule) == pytest.approx(expected)


def test_vqa_soft_accuracy_needs_answers():
  with pytest.raises(ValueError, match="at least one"):
    vqa_answers.vqa_soft_accuracy("yes", [])
  with pytest.raises(ValueError, match="exactly 10 human answers"):
    vqa_answers.vqa_soft_accuracy("yes", ["yes"] * 9)
  assert vqa_answers.vqa_soft_accuracy("yes", ["yes"] * 9, "cdx") == 1.0


@pytest.mark.parametrize("pred,answer,rule,expected", [
    ("Yes.", "yes", "gqa", 1.0),     # trailing period stripped, lower-cased
    ("Yes..", "yes", "gqa", 1.0),    # rstrip takes every trailing period
    (" left ", "left", "gqa", 1.0),  # the answer file holds the stripped reply
    ("yes. ", "yes", "gqa", 1.0),
    ("Left", "Left", "gqa", 0.0),    # only the reply is lower-cased
    ("Left", "Left", "cdx", 1.0),
    ("the left", "left", "gqa", 0.0),
    ("Yes!", "yes", "gqa", 0.0),
    ("red", "blue", "gqa", 0.0),
    ("  Square. ", "square", "cdx", 1.0),
])
def test_exact_match(pred, answer, rule, expected):
  assert vqa_answers.exact_match(pred, answer, rule) == expected


def test_evaluate_vqa_soft_exact_and_categories():
  items = [{"id": 1, "image": "a.png", "prompt": scoring.vqa_prompt("How many?"),
            "answers": ["2"] * 10, "category": "number"},
           {"id": 2, "image": "b.png", "prompt": scoring.vqa_prompt("Color?"),
            "answers": ["red"] * 3 + ["blue"] * 7, "category": "other"}]
  out = scoring.evaluate_vqa(items, lambda it: ["two", "red"])
  assert out["metric"] == "soft" and out["protocol"] == "vqa_soft/m4c"
  assert out["accuracy"] == pytest.approx((1.0 + 0.9) / 2)
  assert out["by_category"] == pytest.approx({"number": 1.0, "other": 0.9})
  assert items[0]["prompt"].endswith("\nAnswer the question using a single word or phrase.")

  exact = [{"id": 1, "image": "a.png", "prompt": "q", "answer": "square"},
           {"id": 2, "image": "b.png", "prompt": "q", "answer": "3"}]
  out = scoring.evaluate_vqa(exact, lambda it: ["Square.", "three"])
  assert out["metric"] == "exact" and out["accuracy"] == 0.5
  assert out["protocol"] == "vqa_exact/gqa"
  capital = [dict(exact[0], answer="Square")]
  assert scoring.evaluate_vqa(capital, lambda it: ["Square"])["accuracy"] == 0.0
  out = scoring.evaluate_vqa(capital, lambda it: ["Square"], rule="cdx")
  assert out["accuracy"] == 1.0 and out["protocol"] == "vqa_exact/cdx"
  with pytest.raises(ValueError, match="needs 'answers'"):
    scoring.evaluate_vqa(exact, lambda it: ["x", "y"], metric="soft")
  with pytest.raises(ValueError, match="metric="):
    scoring.evaluate_vqa(exact, lambda it: ["x", "y"], metric="bleu")
  with pytest.raises(ValueError, match="rule='vqa_api'"):
    scoring.evaluate_vqa(exact, lambda it: ["x", "y"], rule="vqa_api")


def test_evaluate_textvqa_matches_by_image_and_question():
  items = [{"id": 1, "image": "/tv/a.jpg", "question": "What brand?",
            "prompt": "p", "answers": ["nikon"] * 10},
           {"id": 2, "image": "/tv/a.jpg", "question": "what brand?",
            "prompt": "p", "answers": ["canon"] * 10},
           {"id": 3, "image": "/tv/b.jpg", "question": "What brand?",
            "prompt": "p", "answers": ["nikon"] * 10}]
  out = scoring.evaluate_textvqa(items, lambda it: ["Nikon"] * 3)
  # Items 1 and 2 share (image, lower-cased question): both take item 2's answers
  # (canon) -> 0 and 0; item 3 is another image -> 1. Mean 1/3.
  assert out["accuracy"] == pytest.approx(1 / 3)
  assert [r["accuracy"] for r in out["records"]] == [0.0, 0.0, 1.0]
  assert out["protocol"] == "textvqa/m4c"
  with pytest.raises(ValueError, match="need 'image', 'question' and 'answers'"):
    scoring.evaluate_textvqa([{"id": 9, "image": "x", "answers": ["a"] * 10}],
                             lambda it: ["a"])


# ---------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply,expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is not.", "no"),        # "No there is not": "No" is a word
    ("NO", "yes"),                      # upper-case NO is not one of the three words
    ("Not sure", "yes"),                # nor is "Not"
    ("not sure", "no"),
    ("There is not a cat.", "no"),
    ("Nothing suggests otherwise", "yes"),
    ("Yes. No other animals are visible.", "yes"),   # first sentence only
    ("I see no,cat", "yes"),            # commas deleted: "nocat"
    ("no!", "yes"),                     # "no!" is not "no"
    ("No\nthere is none", "yes"),       # split on spaces only: "No\nthere"
    ("  no", "no"),                     # the answer file holds the stripped reply
    ("3.5 no", "yes"),                  # cut at the first period: "3"
    ("Ｎo", "yes"),                     # full-width N
    ("", "yes"),
    ("It is not", "no"), ("Knot", "yes"),
])
def test_pope_parse_llava(reply, expected):
  assert scoring.pope_parse(reply) == expected


@pytest.mark.parametrize("reply,expected", [
    ("NO", "no"), ("Not sure", "no"), ("no!", "no"), ("I see no,cat", "no"),
    ("Knot", "yes"), ("Yes. No other animals.", "yes"),
])
def test_pope_parse_cdx(reply, expected):
  assert scoring.pope_parse(reply, rule="cdx") == expected


def test_pope_metrics_by_hand():
  # TP 2, FN 1, FP 1, TN 1.
  m = scoring.pope_metrics(["yes", "no", "yes", "yes", "no"],
                           ["yes", "yes", "yes", "no", "no"])
  assert m["accuracy"] == pytest.approx(3 / 5)
  assert m["precision"] == pytest.approx(2 / 3)
  assert m["recall"] == pytest.approx(2 / 3)
  assert m["f1"] == pytest.approx(2 / 3)
  assert m["yes_ratio"] == pytest.approx(3 / 5)
  # Never "yes": precision and recall are 0 rather than a division error.
  m = scoring.pope_metrics(["no", "no"], ["yes", "no"])
  assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
  with pytest.raises(ValueError, match="yes' or 'no"):
    scoring.pope_metrics(["maybe"], ["yes"])


def test_evaluate_pope_per_split_and_rules():
  items = [{"id": k, "image": "x.png", "prompt": "Is there a cat?", "answer": a, "split": s}
           for k, (a, s) in enumerate([("yes", "random"), ("no", "random"),
                                       ("yes", "adversarial"), ("no", "adversarial")])]
  out = scoring.evaluate_pope(items, lambda it: ["Yes.", "No.", "Yes, a cat.", "Yes."])
  assert out["protocol"] == "pope/llava"
  assert out["splits"]["random"]["accuracy"] == 1.0
  assert out["splits"]["adversarial"]["accuracy"] == 0.5
  assert out["splits"]["adversarial"]["yes_ratio"] == 1.0
  assert out["splits"]["adversarial"]["precision"] == 0.5

  # Upper-case replies: LLaVA reads "NO" as yes -> random: TP 1, FP 1 -> acc 1/2,
  # yes-ratio 1; cdx reads it as no -> acc 1.
  shout = lambda it: ["YES", "NO", "YES", "NO"]   # noqa: E731
  llava = scoring.evaluate_pope(items, shout)["splits"]["random"]
  assert (llava["accuracy"], llava["yes_ratio"], llava["precision"]) == (0.5, 1.0, 0.5)
  cdx = scoring.evaluate_pope(items, shout, rule="cdx")
  assert cdx["splits"]["random"]["accuracy"] == 1.0 and cdx["protocol"] == "pope/cdx"


# ---------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply,expected", [
    ("Yes", "yes"), ("No.", "no"), ("yes, it is", "yes"), ("no there is none", "no"),
    ("NO", "no"),                    # lower-cased first
    ("Not sure", "no"),              # "not " holds "no"
    ("Know", "no"),                  # "know" holds "no"
    ("None", "no"),
    ("I don't know", "other"),       # "i do" holds neither
    ("The answer is yes", "other"),  # only the first four characters count
    ("y.e.s", "other"),
    ("  yes", "yes"),                # the answer file holds the stripped reply
    ("maybe", "other"), ("", "other"),
])
def test_mme_parse_official(reply, expected):
  assert scoring.mme_parse(reply) == expected


def test_mme_parse_cdx_drops_periods():
  assert scoring.mme_parse("y.e.s", rule="cdx") == "yes"
  assert scoring.mme_parse("Know", rule="cdx") == "no"


def test_mme_acc_plus_and_totals():
  records = [
      # existence: image a both right, image b one right -> acc 3/4, acc+ 1/2 -> 125.
      {"subtask": "existence", "image": "a", "pred": "yes", "answer": "Yes"},
      {"subtask": "existence", "image": "a", "pred": "no", "answer": "No"},
      {"subtask": "existence", "image": "b", "pred": "yes", "answer": "yes"},
      {"subtask": "existence", "image": "b", "pred": "yes", "answer": "no"},
      # OCR: all right -> 200.
      {"subtask": "OCR", "image": "c", "pred": "no", "answer": "no"},
      {"subtask": "OCR", "image": "c", "pred": "yes", "answer": "yes"},
      # code_reasoning: one image, one wrong ("other" never counts) -> acc 1/2, acc+ 0.
      {"subtask": "code_reasoning", "image": "d", "pred": "other", "answer": "yes"},
      {"subtask": "code_reasoning", "image": "d", "pred": "no", "answer": "no"},
  ]
  out = scoring.mme_scores(records)
  assert out["protocol"] == "mme/official"
  assert out["subtasks"]["existence"] == pytest.approx(
      {"acc": 0.75, "acc_plus": 0.5, "score": 125.0})
  assert out["perception"] == pytest.approx(325.0)
  assert out["cognition"] == pytest.approx(50.0)
  assert "count" in out["missing_subtasks"] and "OCR" not in out["missing_subtasks"]
  assert len(scoring.MME_PERCEPTION) * 200 == 2000
  assert len(scoring.MME_COGNITION) * 200 == 800
  with pytest.raises(ValueError, match="unknown MME subtask"):
    scoring.mme_scores([{"subtask": "vibes", "image": "a", "pred": "yes", "answer": "yes"}])


def test_mme_pairs_follow_the_official_order():
  recs = [{"subtask": "color", "image": i, "pred": "yes", "answer": a}
          for i, a in [("a", "yes"), ("b", "yes"), ("a", "no"), ("b", "yes")]]
  # The official scorer pairs lines 1-2 and 3-4: here those pairs mix two images.
  with pytest.raises(ValueError, match="list both questions of an image together"):
    scoring.mme_scores(recs)
  with pytest.raises(ValueError, match="pairs them two by two"):
    scoring.mme_scores(recs[:3])
  # cdx groups by image: a -> one right of two, b -> both right: acc 3/4, acc+ 1/2.
  out = scoring.mme_scores(recs, rule="cdx")
  assert out["subtasks"]["color"]["score"] == pytest.approx(125.0)
  assert out["protocol"] == "mme/cdx"


def test_evaluate_mme_adversarial_replies():
  items = [{"id": k, "subtask": "count", "image": img, "prompt": "q", "answer": ans}
           for k, (img, ans) in enumerate([("1", "Yes"), ("1", "No"), ("2", "Yes"),
                                           ("2", "No")])]
  replies = ["Yes.", "Not really", "The answer is yes", "Know"]
  out = scoring.evaluate_mme(items, lambda it: replies)
  # yes (right), no (right) | other (wrong), no (right) -> acc 3/4, acc+ 1/2 -> 125.
  assert [r["pred"] for r in out["records"]] == ["yes", "no", "other", "no"]
  assert out["subtasks"]["count"]["score"] == pytest.approx(125.0)
  assert out["perception"] == pytest.approx(125.0) and out["cognition"] == 0


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------


def _write(path, obj, lines=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    if lines:
      f.write("\n".join(json.dumps(o) for o in obj) + "\n")
    elif isinstance(obj, str):
      f.write(obj)
    else:
      json.dump(obj, f)


def test_file_source_tracks_content(tmp_path):
  path = str(tmp_path / "a.json")
  _write(path, {"x": 1})
  first = benchmarks.file_source(path)
  assert first.startswith(path) and f"({os.path.getsize(path)} bytes, sha1 " in first
  _write(path, {"x": 2})
  assert benchmarks.file_source(path) != first
  with pytest.raises(ValueError, match="does not exist"):
    benchmarks.file_source(str(tmp_path / "missing.json"))


def test_read_sugarcrepe_dir_end_to_end(tmp_path):
  data = tmp_path / "sugarcrepe"
  _write(str(data / "swap_obj.json"), {"11": {"filename": "0001.jpg", "caption": "a cat on a mat",
                                              "negative_caption": "a mat on a cat"}})
  _write(str(data / "add_att.json"), {"5": {"filename": "0002.jpg", "caption": "a dog",
                                            "negative_caption": "a red dog"},
                                      "6": {"filename": "0003.jpg", "caption": "a cup",
                                            "negative_caption": "a blue cup"}})
  got = benchmarks.read_sugarcrepe_dir(str(data), "/coco/val2017")
  assert sorted(got) == ["add_att", "swap_obj"]
  item = got["swap_obj"][0]
  assert item["id"] == "11" and item["image"] == "/coco/val2017/0001.jpg"
  assert (item["positive"], item["negative"]) == ("a cat on a mat", "a mat on a cat")
  assert "swap_obj.json" in item["source"]
  out = scoring.evaluate_sugarcrepe(
      got, lambda it: ["A" if "(A) a cat on" in p["prompt"] or "(A) a dog" in p["prompt"]
                       or "(A) a cup" in p["prompt"] else "B" for p in it])
  assert out["overall"] == 1.0 and len(out["sources"]) == 2
  with pytest.raises(ValueError, match="no SugarCrepe subset files"):
    benchmarks.read_sugarcrepe_dir(str(tmp_path), "/coco")
  with pytest.raises(ValueError, match="lacks field 'negative_caption'"):
    _write(str(tmp_path / "bad" / "swap_att.json"), {"1": {"filename": "x", "caption": "y"}})
    benchmarks.read_sugarcrepe(str(tmp_path / "bad" / "swap_att.json"), "/coco")


def test_read_vqav2_and_gqa(tmp_path):
  q = {"data_subtype": "val2014", "questions": [
      {"image_id": 42, "question": "What color?", "question_id": 420}]}
  a = {"annotations": [{"question_id": 420, "image_id": 42, "answer_type": "other",
                        "multiple_choice_answer": "red",
                        "answers": [{"answer": "red", "answer_id": k} for k in range(10)]}]}
  _write(str(tmp_path / "q.json"), q)
  _write(str(tmp_path / "a.json"), a)
  items = benchmarks.read_vqav2(str(tmp_path / "q.json"), "/img", str(tmp_path / "a.json"))
  assert items[0]["image"] == "/img/COCO_val2014_000000000042.jpg"
  assert items[0]["prompt"] == "What color?\nAnswer the question using a single word or phrase."
  assert items[0]["answers"] == ["red"] * 10 and items[0]["category"] == "other"
  assert "q.json" in items[0]["source"] and "a.json" in items[0]["source"]
  no_gold = benchmarks.read_vqav2(str(tmp_path / "q.json"), "/img")
  assert "answers" not in no_gold[0]

  _write(str(tmp_path / "gqa.json"), {"201": {"imageId": "n123", "question": "Is it left?",
                                              "answer": "yes"}})
  g = benchmarks.read_gqa(str(tmp_path / "gqa.json"), "/gqa")
  assert g[0]["id"] == "201" and g[0]["image"] == "/gqa/n123.jpg" and g[0]["answer"] == "yes"
  assert scoring.evaluate_vqa(g, lambda it: ["Yes"])["accuracy"] == 1.0


def test_read_textvqa_records_ocr_and_vizwiz(tmp_path):
  _write(str(tmp_path / "textvqa.json"), {"data": [
      {"question_id": 3, "image_id": "abc", "question": "what brand is it?",
       "answers": ["nikon"] * 10}]})
  _write(str(tmp_path / "ocr.json"), {"data": [{"image_id": "abc",
                                                "ocr_tokens": ["nikon", "d90"]}]})
  plain = benchmarks.read_textvqa(str(tmp_path / "textvqa.json"), "/tv")
  assert plain[0]["prompt"] == scoring.vqa_prompt("what brand is it?")
  assert plain[0]["ocr"] is False and plain[0]["image"] == "/tv/abc.jpg"
  with_ocr = benchmarks.read_textvqa(str(tmp_path / "textvqa.json"), "/tv",
                                     str(tmp_path / "ocr.json"))
  assert with_ocr[0]["prompt"] == scoring.vqa_prompt(
      "what brand is it?\nReference OCR token: nikon, d90")
  assert with_ocr[0]["ocr"] is True and "ocr.json" in with_ocr[0]["source"]
  assert scoring.evaluate_vqa(with_ocr, lambda it: ["Nikon"])["accuracy"] == 1.0

  _write(str(tmp_path / "vizwiz.json"), [
      {"image": "VizWiz_val_00000001.jpg", "question": "What is this?",
       "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
       "answer_type": "unanswerable"}])
  vw = benchmarks.read_vizwiz(str(tmp_path / "vizwiz.json"), "/vw")
  assert vw[0]["answers"] == ["unanswerable"] * 10 and vw[0]["category"] == "unanswerable"
  assert vw[0]["image"] == "/vw/VizWiz_val_00000001.jpg"


def test_read_pope(tmp_path):
  recs = [{"question_id": 1, "image": "x.jpg", "text": "Is there a dog in the image?",
           "label": "yes"},
          {"question_id": 2, "image": "y.jpg", "text": "Is there a cat in the image?",
           "label": "no"}]
  path = str(tmp_path / "coco_pope_adversarial.json")   # official files: .json, one per line
  _write(path, recs, lines=True)
  items = benchmarks.read_pope(path, "/coco")
  assert [it["split"] for it in items] == ["adversarial"] * 2
  assert items[1]["answer"] == "no" and items[1]["image"] == "/coco/y.jpg"
  assert items[0]["prompt"] == "Is there a dog in the image?"
  _write(path, json.dumps(recs, indent=1))   # a pretty-printed list reads the same
  assert benchmarks.read_pope(path, "/coco", split="random")[1]["answer"] == "no"
  _write(path, [{**recs[0], "label": "maybe"}], lines=True)
  with pytest.raises(ValueError, match="expected yes/no"):
    benchmarks.read_pope(path, "/coco")


def test_read_mme_both_layouts(tmp_path):
  root = tmp_path / "MME"
  # Flat layout: image and txt side by side.
  _write(str(root / "existence" / "000.txt"),
         "Is there a dog? Please answer yes or no.\tYes\n"
         "Is there a cat? Please answer yes or no.\tNo\n")
  _write(str(root / "existence" / "000.jpg"), "jpg")
  # Split layout: images/ and questions_answers_YN/.
  _write(str(root / "artwork" / "questions_answers_YN" / "10.txt"),
         "Is this by Monet? Please answer yes or no.\tNo\n"
         "Is this by Manet? Please answer yes or no.\tYes\n")
  _write(str(root / "artwork" / "images" / "10.png"), "png")
  _write(str(root / "notes" / "readme.txt"), "not a subtask")
  items = benchmarks.read_mme(str(root))
  assert len(items) == 4
  assert {it["subtask"] for it in items} == {"existence", "artwork"}
  art = [it for it in items if it["subtask"] == "artwork"]
  assert art[0]["image"] == str(root / "artwork" / "images" / "10.png")
  assert [it["answer"] for it in art] == ["no", "yes"]
  out = scoring.evaluate_mme(items, lambda it: ["No" if "Monet" in p["prompt"] else "Yes"
                                                for p in it])
  # artwork all right (200); existence: cat question wrong -> acc 1/2, acc+ 0 -> 50.
  assert out["subtasks"]["artwork"]["score"] == pytest.approx(200.0)
  assert out["subtasks"]["existence"]["score"] == pytest.approx(50.0)
  assert out["perception"] == pytest.approx(250.0)
  _write(str(root / "count" / "1.txt"), "How many? Please answer yes or no.\tTwo\n")
  _write(str(root / "count" / "1.jpg"), "jpg")
  with pytest.raises(ValueError, match="question<TAB>Yes|No"):
    benchmarks.read_mme(str(root))


def test_read_synthetic_export_layout(tmp_path):
  """The layout of cdx.data.synthetic.export: DIR/eval/*.json, image paths relative to DIR."""
  out_dir = tmp_path / "world"
  eval_dir = out_dir / "eval"
  _write(str(eval_dir / "vqa.json"), [
      {"question_id": 0, "image": "images/eval/vqa_000000.png",
       "text": "What shape is red?" + scoring.VQA_SUFFIX, "answer": "cube",
       "category": "shape"}])
  _write(str(eval_dir / "sugarcrepe_swap_att.json"), {"0": {
      "filename": "images/eval/swap_att_000000.png", "caption": "a red cube and a blue ball",
      "negative_caption": "a blue cube and a red ball"}})
  _write(str(eval_dir / "winoground.json"), [
      {"id": 0, "image_0": "images/eval/winoground_000000_0.png",
       "image_1": "images/eval/winoground_000000_1.png", "caption_0": "a cube left of a ball",
       "caption_1": "a ball left of a cube", "tag": "relation"}])
  for name in ("vqa_000000", "swap_att_000000", "winoground_000000_0",
               "winoground_000000_1"):
    _write(str(out_dir / "images" / "eval" / f"{name}.png"), "png")

  got = benchmarks.read_synthetic(str(eval_dir))
  vqa = got["vqa"][0]
  assert vqa["question"] == "What shape is red?"
  assert vqa["prompt"] == "What shape is red?" + scoring.VQA_SUFFIX   # suffix not doubled
  assert os.path.isfile(vqa["image"]) and vqa["answer"] == "cube"
  sc = got["sugarcrepe"]["swap_att"][0]
  assert os.path.isfile(sc["image"]) and sc["negative"] == "a blue cube and a red ball"
  pair = got["paired"][0]
  assert os.path.isfile(pair["image_1"]) and pair["tag"] == "relation"
  assert scoring.evaluate_vqa(got["vqa"], lambda it: ["Cube"])["accuracy"] == 1.0

  # The json without its images: the root cannot be found and must be given.
  bare = tmp_path / "bare" / "eval"
  _write(str(bare / "vqa.json"), [{"question_id": 0, "image": "images/eval/vqa_000000.png",
                                   "text": "Which?", "answer": "cube"}])
  with pytest.raises(ValueError, match="pass root="):
    benchmarks.read_synthetic(str(bare))
  given = benchmarks.read_synthetic(str(bare), root="/data/world")
  assert given["vqa"][0]["image"] == "/data/world/images/eval/vqa_000000.png"
  with pytest.raises(ValueError, match="no synthetic eval files"):
    benchmarks.read_synthetic(str(tmp_path))
