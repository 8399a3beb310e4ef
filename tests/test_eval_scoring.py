"""Tests of cdx.eval.scoring and cdx.eval.vqa_answers (metrics, parsing).

Expected scores are worked out by hand from the reference scorers' rules
(docs/EVALUATION.md); the comment beside each says how.
"""
import pytest

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
