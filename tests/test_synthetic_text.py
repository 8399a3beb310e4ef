"""Texts of the synthetic world are true of their scenes; negatives are false.

Captions are checked by a parser written here from the caption strings alone (not the
generator's own meaning structures), against the scene's geometry.
"""
import collections
import itertools
import re

import numpy as np
import pytest

from cdx.data.synthetic import contrast
from cdx.data.synthetic import text
from cdx.data.synthetic import world
from cdx.eval import scoring

SEED = 7
N = 40
RELS = {"to the left of": "left", "to the right of": "right", "above": "above",
        "below": "below"}
HELD = world.heldout_combos()
SEEN, HELDOUT = text.Pool.seen(), text.Pool.heldout()


# ---------------------------------------------------------------------------------------
# An independent reading of captions.

def parse_np(s):
  words = s.split()
  assert words[0] in ("a", "an"), s
  assert words[0] == ("an" if words[1][0] in "aeiou" else "a"), s
  *attrs, shape = words[1:]
  assert shape in world.SHAPES, s
  size = next((w for w in attrs if w in world.SIZES), None)
  color = next((w for w in attrs if w in world.COLORS), None)
  assert len(attrs) == (size is not None) + (color is not None), s
  return shape, color, size


def parse(caption):
  """-> list of (np,) or (np, rel, np) items."""
  items = []
  for part in re.split(r", | and ", caption):
    for words, rel in RELS.items():
      if f" {words} " in part:
        a, b = part.split(f" {words} ")
        items.append((parse_np(a), rel, parse_np(b)))
        break
    else:
      items.append((parse_np(part),))
  return items


def geometric(a, rel, b, margin):
  d = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[rel]
  return d > margin


def nps_of(caption):
  return [n for it in parse(caption) for n in (it[::2] if len(it) == 3 else it)]


def holds(caption, scene, margin):
  """Existential truth; margin 0.05 = clearly true, margin -0.05 = not clearly false."""
  items = parse(caption)
  nps = [n for it in items for n in (it[::2] if len(it) == 3 else it)]
  def fits(n, o):
    shape, color, size = n
    return o.shape == shape and color in (None, o.color) and size in (None, o.size)
  for perm in itertools.permutations(scene.objects, len(nps)):
    if not all(fits(n, o) for n, o in zip(nps, perm)):
      continue
    k, ok = 0, True
    for it in items:
      if len(it) == 3:
        ok = ok and geometric(perm[k], it[1], perm[k + 1], margin)
      k += len(it) - (len(it) == 3)
    if ok:
      return True
  return False


def clearly_true(c, s):
  return holds(c, s, 0.05)


def clearly_false(c, s):
  return not holds(c, s, -0.05)


def content_words(s):
  return [w for w in re.findall(r"[a-z]+", s.lower()) if w not in ("a", "an")]


# ---------------------------------------------------------------------------------------

def test_pretrain_captions_are_true_and_deterministic():
  forms = set()
  for i in range(N):
    rec, scene = text.pretrain_record(i, SEED, SEEN)
    assert rec == text.pretrain_record(i, SEED, SEEN)[0]
    conv = rec["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt"] and conv[0]["value"] == "<image>"
    caption = conv[1]["value"]
    said = re.findall(r"There is an? (\w+)\. It is (\w+) and (\w+)\.", caption)
    forms.add(bool(said))
    if said:  # shape first: every object once, its own size and colour
      assert " ".join(f"There is a {s}. It is {z} and {c}." for s, z, c in said) == caption
      assert sorted(said) == sorted((o.shape, o.size, o.color) for o in scene.objects)
      continue
    assert clearly_true(caption, scene)
    # The caption names every object of the scene.
    assert len(parse(caption)) == len(scene.objects) - (len(scene.objects) > 1)
  assert forms == {True, False}
  assert ([text.pretrain_record(i, SEED, SEEN)[0] for i in range(N)]
          != [text.pretrain_record(i, SEED + 1, SEEN)[0] for i in range(N)])


def answer_of(question, scene):
  """Recomputes a short answer from the question text and the scene."""
  q = question.removeprefix("<image>\n").removesuffix(text.VQA_SUFFIX)
  objs = scene.objects
  def find(desc):
    ws = desc.split()
    hits = [o for o in objs if o.shape == ws[-1]
            and all(w in (o.color, o.size) for w in ws[:-1])]
    assert len(hits) == 1, (q, desc)
    return hits[0]
  if m := re.fullmatch(r"What color is the (.+)\?", q):
    return find(m[1]).color
  if m := re.fullmatch(r"What shape is the (.+) object\?", q):
    hits = [o for o in objs if all(w in (o.color, o.size) for w in m[1].split())]
    assert len(hits) == 1
    return hits[0].shape
  if m := re.fullmatch(r"Is the (.+) small or large\?", q):
    return find(m[1]).size
  if m := re.fullmatch(r"How many (.+) are there\?", q):
    word = m[1]
    if word == "objects":
      return str(len(objs))
    if word.endswith(" objects"):
      return str(sum(o.color == word.split()[0] for o in objs))
    return str(sum(world.PLURALS[o.shape] == word for o in objs))
  if m := re.fullmatch(r"Is there (an? .+) in the image\?", q):
    return "Yes" if clearly_true(m[1], scene) else "No"
  for words, rel in RELS.items():
    if m := re.fullmatch(rf"Is the (.+) {words} the (.+)\?", q):
      a, b = find(m[1]), find(m[2])
      assert geometric(a, rel, b, 0.05) or geometric(b, rel, a, 0.05) or \
          geometric(a, world.OPPOSITE[rel], b, 0.05)  # never borderline
      return "Yes" if geometric(a, rel, b, 0.05) else "No"
    if m := re.fullmatch(rf"Which object is {words} the (.+)\?", q):
      b = find(m[1])
      hits = [o for o in objs if o is not b and geometric(o, rel, b, 0.05)]
      assert len(hits) == 1
      assert all(not geometric(o, rel, b, -0.05) for o in objs if o not in (b, hits[0]))
      return f"{hits[0].color} {hits[0].shape}"
  raise AssertionError(f"unknown question {q!r}")


CHOICE = re.compile(r"Which caption best describes the image\?\n\(A\) (.+)\n \(B\) (.+)\n"
                    r"Answer with the option's alphabet from the given choices directly\.")
YESNO = re.compile(r'Does this figure show "(.+)"\? Please answer yes or no\.')


def format_answer(q, scene):
  """("choice" | "yesno", the right answer) for the evaluation formats, else None."""
  if m := CHOICE.fullmatch(q):
    a, b = m[1], m[2]
    assert {clearly_true(a, scene), clearly_true(b, scene)} == {True, False}, q
    assert clearly_false(b if clearly_true(a, scene) else a, scene), q
    assert not contrast.is_eval_caption(a) and not contrast.is_eval_caption(b)
    return "choice", "A" if clearly_true(a, scene) else "B"
  if m := YESNO.fullmatch(q):
    assert clearly_true(m[1], scene) or clearly_false(m[1], scene), q
    assert not contrast.is_eval_caption(m[1])
    return "yesno", "Yes" if clearly_true(m[1], scene) else "No"
  return None


def test_format_prompts_are_the_evaluation_prompts():
  assert CHOICE.fullmatch(scoring.sugarcrepe_question("a red circle", "a blue star"))
  assert YESNO.fullmatch(scoring.yes_no_prompt("a red circle"))


def test_instruct_answers_are_true():
  kinds = collections.Counter()
  for i in range(150):
    rec, scene = text.instruct_record(i, SEED, SEEN, text_only_frac=0.1)
    conv = rec["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert 1 <= len(conv) // 2 <= text.TURNS[1] - 1
    if scene is None:
      kinds["text_only"] += 1
      assert "image" not in rec and "<image>" not in conv[0]["value"]
      continue
    assert rec["image"].endswith(f"{i:06d}.png")
    assert conv[0]["value"].startswith("<image>\n")
    assert all("<image>" not in t["value"] for t in conv[1:])
    for q, a in zip(conv[::2], conv[1::2]):
      q, a = q["value"].removeprefix("<image>\n"), a["value"]
      if fmt := format_answer(q, scene):
        kinds[fmt[0]] += 1
        assert a == fmt[1], (q, a)
      elif q.endswith(text.VQA_SUFFIX):
        kinds["short"] += 1
        assert a == answer_of(q, scene), q
      elif q.endswith(("Describe the image.", "What objects are in the image?")):
        kinds["describe"] += 1
        assert a.endswith(".") and clearly_true(a[0].lower() + a[1:-1], scene)
      else:
        kinds["long"] += 1
        short = answer_of(q, scene)
        assert short.lower() in a.lower(), (q, a)
  assert min(kinds[k] for k in ("text_only", "short", "describe", "long", "choice",
                                "yesno")) > 0, kinds


@pytest.mark.parametrize("pool", [SEEN, HELDOUT], ids=["seen", "heldout"])
def test_vqa_answers_are_true(pool):
  cats = set()
  for i in range(N):
    item, scene = text.vqa_item(i, SEED, pool, "img")
    assert item["text"].endswith(text.VQA_SUFFIX)
    assert item["answer"] == answer_of(item["text"], scene)
    assert len(item["answer"].split()) <= 2
    cats.add(item["category"])
    if pool is HELDOUT:
      assert scene.objects[0].combo in HELD
  assert len(cats) >= 5


@pytest.mark.parametrize("pool", [SEEN, HELDOUT], ids=["seen", "heldout"])
def test_vqa_sets_balance_types_and_yes_no_answers(pool):
  # The first 4 turns of every type: each type asked 4 times, each yes/no type answered
  # "Yes" twice and "No" twice, so answering "Yes" always is worth 0.5 on those types.
  n = 4 * (len(text.QUESTIONS) - (pool is HELDOUT))
  items = [text.vqa_item(i, SEED, pool, "img")[0] for i in range(n)]
  kinds = collections.Counter(it["category"] for it in items)
  assert set(kinds.values()) == {4}, kinds
  for kind in text.YES_NO:
    answers = collections.Counter(it["answer"] for it in items if it["category"] == kind)
    assert answers == {"Yes": 2, "No": 2}, (kind, answers)


def test_train_vqa_items_ask_about_the_given_training_scene():
  # The check of a model on its own training images: true answers about that scene,
  # question types taking turns, yes/no answers alternating; None where a type does not
  # apply (a relation or "which" question about a one-object scene).
  scenes = [text.instruct_record(i, SEED, SEEN)[1] for i in range(60)]
  scenes = [s for s in scenes if s is not None]
  items = []
  for scene in scenes:
    item = text.train_vqa_item(len(items), scene, "img.png", SEED, SEEN)
    if item is None:
      continue
    assert item["answer"] == answer_of(item["text"], scene), item
    assert item["image"] == "img.png" and item["question_id"] == len(items)
    items.append(item)
  assert len(items) >= 0.7 * len(scenes), (len(items), len(scenes))
  per_turn = len(text.QUESTIONS)
  assert [it["category"] for it in items[:per_turn]] == list(text.QUESTIONS)
  relation = [it["answer"] for it in items if it["category"] == "relation"]
  assert relation[:2] == ["Yes", "No"], relation


def _diff(pos, neg):
  return [(a, b) for a, b in zip(content_words(pos), content_words(neg)) if a != b]


@pytest.mark.parametrize("subset", text.SUGARCREPE_SUBSETS)
@pytest.mark.parametrize("pool", [SEEN, HELDOUT], ids=["seen", "heldout"])
def test_sugarcrepe_negatives_are_false_and_differ_as_intended(subset, pool):
  for i in range(N):
    item, scene = text.sugarcrepe_item(subset, i, SEED, pool, "img")
    pos, neg = item["caption"], item["negative_caption"]
    assert item["filename"] == f"img/{subset}_{i:06d}.png"
    assert clearly_true(pos, scene), (subset, pos)
    assert clearly_false(neg, scene), (subset, neg, scene)
    p, n = content_words(pos), content_words(neg)
    if subset in ("swap_obj", "swap_att"):
      assert sorted(p) == sorted(n) and p != n
    if subset == "swap_obj":
      (a, rel, b), = parse(pos)
      assert parse(neg) == [(b, rel, a)]
    elif subset == "swap_att":
      assert all(x in world.COLORS or x in world.SIZES for d in _diff(pos, neg) for x in d)
    elif subset == "replace_obj":
      (a, b), = _diff(pos, neg)
      assert a in world.SHAPES and b in world.SHAPES and len(p) == len(n)
    elif subset == "replace_att":
      (a, b), = _diff(pos, neg)
      assert len(p) == len(n)
      assert {a, b} <= set(world.COLORS) or {a, b} <= set(world.SIZES)
    elif subset == "replace_rel":
      (a, r, b), = parse(pos)
      assert parse(neg) == [(a, world.OPPOSITE[r], b)]
    elif subset == "add_obj":  # one noun phrase differs: a present vs an absent object
      diffs = [(a, b) for a, b in zip(parse(pos), parse(neg)) if a != b]
      assert len(parse(pos)) == len(parse(neg)) >= 2 and len(diffs) == 1, (pos, neg)
      ((a,), (b,)), = diffs
      assert a[2] is None and b[2] is None or a[2] and b[2]  # same attributes named
      assert not any(o.shape == b[0] and o.color == b[1] for o in scene.objects)
    elif subset == "add_att":  # each adds one attribute (true / false) to a common base
      slots = lambda c: [(k, a, v) for k, np_ in enumerate(nps_of(c))
                         for a, v in (("color", np_[1]), ("size", np_[2])) if v]
      assert [np_[0] for np_ in nps_of(pos)] == [np_[0] for np_ in nps_of(neg)]
      only_pos = {s[:2] for s in slots(pos)} - {s[:2] for s in slots(neg)}
      only_neg = {s[:2] for s in slots(neg)} - {s[:2] for s in slots(pos)}
      assert len(only_pos) == len(only_neg) == 1, (pos, neg)
      assert set(slots(pos)) - set(slots(neg)) == {s for s in slots(pos) if s[:2] in only_pos}
    assert len(p) == len(n)  # every kind: as many words in both captions
    if subset != "swap_obj":  # odd items: the positive is the longer (ties allowed)
      longer, shorter = (pos, neg) if i % 2 else (neg, pos)
      assert len(longer) >= len(shorter)
    assert contrast.is_eval_caption(pos) and contrast.is_eval_caption(neg)
    named = [any(f"{col} {shape}" in c for col, shape in HELD) for c in (pos, neg)]
    if pool is HELDOUT:  # which caption names a held-out pair alternates every 2 items
      assert scene.objects[0].combo in HELD
      if subset in ("swap_obj", "replace_rel"):
        assert named == [True, True]
      else:
        assert named == ([True, False] if i % 4 < 2 else [False, True]), (pos, neg)
    else:
      assert named == [False, False]


@pytest.mark.parametrize("pool", [SEEN, HELDOUT], ids=["seen", "heldout"])
def test_winoground_pairs(pool):
  tags = set()
  for i in range(N):
    item, (s0, s1) = text.winoground_item(i, SEED, pool, "img")
    c0, c1 = item["caption_0"], item["caption_1"]
    tags.add(item["tag"])
    assert c0 != c1 and sorted(content_words(c0)) == sorted(content_words(c1))
    assert clearly_true(c0, s0) and clearly_false(c0, s1)
    assert clearly_true(c1, s1) and clearly_false(c1, s0)
    assert item["image_0"] != item["image_1"]
    if pool is HELDOUT:
      assert s0.objects[0].combo in HELD
  assert tags == {"relation", "attribute"}


def test_training_data_never_shows_heldout_combos():
  held_phrases = [f"{c} {s}" for c, s in HELD]
  for i in range(300):
    for rec, scene in (text.pretrain_record(i, SEED, SEEN),
                       text.instruct_record(i, SEED, SEEN)):
      if scene is not None:
        assert not {o.combo for o in scene.objects} & HELD
      for turn in rec["conversations"]:
        v = turn["value"].lower()
        assert not any(p in v for p in held_phrases), v


def test_corpus_covers_every_word():
  vocab = set()
  for t in text.corpus():
    vocab |= set(re.findall(r"\w+|[^\w\s]", t))
  said = set()
  for i in range(60):
    for rec, _ in (text.pretrain_record(i, SEED, SEEN), text.instruct_record(i, SEED, SEEN)):
      for turn in rec["conversations"]:
        said |= set(re.findall(r"\w+|[^\w\s]", turn["value"]))
    for pool in (SEEN, HELDOUT):
      said |= set(re.findall(r"\w+|[^\w\s]", text.vqa_item(i, SEED, pool, "x")[0]["text"]))
      for subset in text.SUGARCREPE_SUBSETS:
        item = text.sugarcrepe_item(subset, i, SEED, pool, "x")[0]
        said |= set(re.findall(r"\w+|[^\w\s]", item["caption"] + " " + item["negative_caption"]))
  assert said <= vocab, said - vocab
  assert set(world.SHAPES) | set(world.COLORS) | set(world.SIZES) <= vocab


def _format_captions(q):
  if m := CHOICE.fullmatch(q):
    return [m[1], m[2]]
  if m := YESNO.fullmatch(q):
    return [m[1]]
  return []


def test_training_turns_never_ask_about_an_evaluation_caption():
  evaluated = set()
  for pool in (SEEN, HELDOUT):
    for i in range(N):
      for subset in text.SUGARCREPE_SUBSETS:
        item = text.sugarcrepe_item(subset, i, SEED, pool, "x")[0]
        evaluated |= {item["caption"], item["negative_caption"]}
      item = text.winoground_item(i, SEED, pool, "x")[0]
      evaluated |= {item["caption_0"], item["caption_1"]}
  asked = []
  for i in range(300):
    rec, _ = text.instruct_record(i, SEED, SEEN)
    for turn in rec["conversations"][::2]:
      asked += _format_captions(turn["value"].removeprefix("<image>\n"))
  assert len(asked) > 150 and not set(asked) & evaluated
  # The halves split the language, not the kinds of caption: both hold short ones.
  assert any(len(c.split()) <= 3 for c in asked)
  assert any(len(c.split()) <= 3 for c in evaluated)


def test_instruct_records_fill_but_fit_the_tiny_context(tmp_path):
  """2-6 turns per image, never more text than the tiny presets' 256 tokens hold."""
  from cdx.data import templates
  from cdx.data import tokenizer as tok_lib
  from configs import common
  tok_lib.build_tokenizer(text.corpus(), tmp_path / "tok", vocab_size=common.TINY_VOCAB)
  tok, *_ = tok_lib.load_tokenizer(tmp_path / "tok")
  visual_tokens = (common.TINY_VISION["image_size"] // common.TINY_VISION["patch_size"]) ** 2
  turns, lengths = [], []
  for i in range(300):
    rec, scene = text.instruct_record(i, SEED, SEEN)
    if scene is None:
      continue
    conv = rec["conversations"]
    turns.append(len(conv) // 2)
    assert sum(len(t["value"].removeprefix("<image>\n")) for t in conv) <= text.RECORD_CHARS
    example = templates.encode(templates.conversation_from_llava(conv, True), tok,
                               "qwen2_base", visual_tokens)
    lengths.append(len(example["input_ids"]))
  assert max(lengths) <= 256, max(lengths)
  assert np.mean(turns) >= 3, np.mean(turns)  # the old 1-3 turns averaged 2
