"""Texts about synthetic scenes: LLaVA-format training data and evaluation sets.

Every builder here is a pure function of (seed, index): sample `i` of a split draws from
`np.random.default_rng([seed, stream, i])`, so any slice can be rebuilt alone. Builders
return records plus the scenes to render, keyed by image path; `export.py` writes them.

Training records (LLaVA json):
  {"id": str, "image": "images/<split>/000123.png",
   "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}
  - pretrain: one turn, human value "<image>", answer = a caption of the whole scene, in
    the caption language (`scene_caption`) or, half of the time, shape first
    (`shape_first_caption`).
  - instruct: 2-6 turns (as many as fit `RECORD_CHARS`) of recognition / relation Q&A
    (short answers carry the VQA suffix), "describe" requests, the evaluation's two-choice
    and yes/no questions (`FORMATS`, about caption pairs from contrast.py: seen pairs,
    training half of the language), and text-only samples (no "image" key).
Evaluation items:
  - vqa:        {"question_id", "image", "text" (question + VQA suffix), "answer", "category"};
                question types take turns, yes/no types alternate their answer (vqa_item)
  - sugarcrepe: {"filename", "caption", "negative_caption"} per subset (the real files' keys)
  - winoground: {"id", "image_0", "image_1", "caption_0", "caption_1", "tag"}
Held-out split: training scenes never contain a `world.heldout_combos()` pair and no
training text names one; held-out evaluation scenes always contain one (object 0, the
"focus") and each question / Winoground caption mentions it (except "no" existence
questions, which ask about another held-out pair, and the second image of a Winoground
attribute pair, where the focus's colour is swapped away). SugarCrepe-style items name a
held-out pair in the positive only (half of them, the focus) or in the negative only (the
other half), so naming one is no cue (contrast.py; swap_obj / replace_rel: in both).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np

from cdx.data import prompts  # The evaluation prompts, taught verbatim.
from cdx.data.synthetic import contrast
from cdx.data.synthetic import grammar
from cdx.data.synthetic import world
from cdx.data.synthetic.grammar import NP, Rel

VQA_SUFFIX = prompts.VQA_SUFFIX
SUGARCREPE_SUBSETS = contrast.SUBSETS
# Turns per instruction record, as many as fit RECORD_CHARS characters of text: with the
# 64 image tokens every record stays within the tiny presets' 256 tokens.
TURNS = (2, 7)
RECORD_CHARS = 500
NUMBERS = ("0", "1", "2", "3", "4")
# The world's words by what they name: per-class diagnostics (cdx.analysis.grounding).
WORD_CLASSES = {"color": tuple(world.COLORS),
                "shape": world.SHAPES + tuple(world.PLURALS.values()),
                "size": world.SIZES, "relation": world.RELATIONS, "count": NUMBERS}
_STREAMS = {"pretrain": 1, "instruct": 2, "vqa": 3, "winoground": 4, "train_vqa": 5,
            **{f"sugarcrepe_{s}": 10 + i for i, s in enumerate(SUGARCREPE_SUBSETS)}}


@dataclasses.dataclass(frozen=True)
class Pool:
  """Which (colour, shape) pairs scenes and texts may use, and which must be mentioned.

  `combos`: pairs any scene object / text may use. `focus`: when non-empty, object 0 of
  every scene is one of these pairs and every evaluation text mentions that object.
  """
  combos: tuple[tuple[str, str], ...]
  focus: tuple[tuple[str, str], ...] = ()

  @classmethod
  def seen(cls, heldout=None) -> "Pool":
    heldout = world.heldout_combos() if heldout is None else heldout
    return cls(world.seen_combos(heldout))

  @classmethod
  def heldout(cls, heldout=None) -> "Pool":
    heldout = world.heldout_combos() if heldout is None else heldout
    return cls(world.ALL_COMBOS, tuple(sorted(heldout)))

  def scene(self, rng: np.random.Generator, num_objects: int | None = None) -> world.Scene:
    return world.sample_scene(rng, num_objects, self.combos, self.focus)

  def allows(self, caption: grammar.Caption) -> bool:
    return grammar.mentioned_combos(caption) <= set(self.combos)


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _STREAMS[stream], index])


def _pick(rng: np.random.Generator, seq: Sequence):
  return seq[int(rng.integers(len(seq)))]


def _cap(s: str) -> str:
  return s[0].upper() + s[1:]


# ---------------------------------------------------------------------------------------
# Captions.

full_np = grammar.full_np  # (kept importable from here)
relation_item = grammar.relation_item


def scene_caption(scene: world.Scene, rng: np.random.Generator) -> grammar.Caption:
  """All objects, fully described; for 2+ objects one pair is joined by its relation."""
  order = list(rng.permutation(len(scene.objects)))
  if len(order) == 1:
    return (full_np(scene.objects[order[0]]),)
  i, j = order[:2]
  a, b = scene.objects[i], scene.objects[j]
  items = [Rel(full_np(a), world.primary_relation(a, b), full_np(b))]
  items += [full_np(scene.objects[k]) for k in order[2:]]
  return tuple(items)


def shape_first_caption(scene: world.Scene, rng: np.random.Generator) -> str:
  """Every object in turn, its shape named before its size and colour: "There is a cross.
  It is small and green. There is a circle. It is large and red."

  The caption language puts the shape last ("a small green cross"), so captions never ask
  for an object's attributes given its shape; questions do ("What color is the cross?"),
  and a teacher trained on them alone answered with another object's colour
  (docs/RESULTS.md 12.). Only words of the caption language and its questions are used.
  """
  return " ".join(f"There is {NP(o.shape).indefinite()}. It is {o.size} and {o.color}."
                  for o in (scene.objects[k] for k in rng.permutation(len(scene.objects))))


# ---------------------------------------------------------------------------------------
# Questions. Each returns (question, short answer, long answer) or None if it does not
# apply to the scene. `focus` = index of an object the question must be about, or None.

QA = tuple[str, str, str]


def _subject(scene: world.Scene, rng: np.random.Generator, focus: int | None) -> int:
  return focus if focus is not None else int(rng.integers(len(scene.objects)))


def q_color(scene, rng, pool, focus) -> QA | None:
  i = _subject(scene, rng, focus)
  o = scene.objects[i]
  phrase = grammar.unique_phrase(scene, i, [NP(o.shape), NP(o.shape, size=o.size)])
  if phrase is None:
    return None
  return (f"What color is {phrase.definite()}?", o.color,
          f"{_cap(phrase.definite())} is {o.color}.")


def q_shape(scene, rng, pool, focus) -> QA | None:
  i = _subject(scene, rng, focus)
  o = scene.objects[i]
  for words in ([o.color], [o.size, o.color]):
    same = [p for p in scene.objects
            if p.color == o.color and (len(words) == 1 or p.size == o.size)]
    if len(same) == 1:
      thing = "the " + " ".join(words) + " object"
      return (f"What shape is {thing}?", o.shape, f"{_cap(thing)} is a {o.shape}.")
  return None


def q_size(scene, rng, pool, focus) -> QA | None:
  o = scene.objects[_subject(scene, rng, focus)]
  the = NP(o.shape, o.color).definite()
  return f"Is {the} small or large?", o.size, f"{_cap(the)} is {o.size}."


def q_count(scene, rng, pool, focus) -> QA | None:
  if focus is not None:
    return None
  kind = int(rng.integers(3))
  if kind == 0:
    n, noun, nouns = len(scene.objects), "object", "objects"
  elif kind == 1:
    color = _pick(rng, list(world.COLORS))
    n = sum(o.color == color for o in scene.objects)
    noun, nouns = f"{color} object", f"{color} objects"
  else:
    shape = _pick(rng, world.SHAPES)
    n = sum(o.shape == shape for o in scene.objects)
    noun, nouns = shape, world.PLURALS[shape]
  long = f"There is 1 {noun}." if n == 1 else f"There are {n} {nouns}."
  return f"How many {nouns} are there?", str(n), long


def q_exist(scene, rng, pool, focus) -> QA | None:
  present = {o.combo for o in scene.objects}
  if rng.integers(2):
    o = scene.objects[_subject(scene, rng, focus)]
    color, shape, answer = o.color, o.shape, "Yes"
  else:
    absent = [c for c in (pool.focus or pool.combos) if c not in present]
    if not absent:
      return None
    (color, shape), answer = _pick(rng, absent), "No"
  a = NP(shape, color).indefinite()
  long = f"Yes, there is {a}." if answer == "Yes" else f"No, there is no {color} {shape}."
  return f"Is there {a} in the image?", answer, long


def _pair(scene, rng, focus) -> tuple[int, int] | None:
  if len(scene.objects) < 2:
    return None
  i, j = (int(k) for k in rng.permutation(len(scene.objects))[:2])
  if focus is not None and focus not in (i, j):
    i = focus if rng.integers(2) else i
    j = focus if i != focus else j
  return i, j


def q_relation(scene, rng, pool, focus) -> QA | None:
  pair = _pair(scene, rng, focus)
  if pair is None:
    return None
  a, b = (scene.objects[k] for k in pair)
  rel = _pick(rng, world.RELATIONS)
  if not world.relation_is_clear(a, rel, b):
    return None
  the_a, the_b = NP(a.shape, a.color).definite(), NP(b.shape, b.color).definite()
  words = grammar.REL_WORDS[rel]
  if world.relation_holds(a, rel, b):
    return f"Is {the_a} {words} {the_b}?", "Yes", f"Yes, {the_a} is {words} {the_b}."
  return f"Is {the_a} {words} {the_b}?", "No", f"No, {the_a} is not {words} {the_b}."


def q_which(scene, rng, pool, focus) -> QA | None:
  pair = _pair(scene, rng, focus)
  if pair is None:
    return None
  i, j = pair
  a, b = scene.objects[i], scene.objects[j]
  rel = world.primary_relation(a, b)
  others = [o for k, o in enumerate(scene.objects) if k not in (i, j)]
  # The answer must be the only object in that relation, and clearly so for the rest.
  if any(world.relation_holds(o, rel, b) or not world.relation_is_clear(o, rel, b)
         for o in others):
    return None
  the_a, the_b = NP(a.shape, a.color).definite(), NP(b.shape, b.color).definite()
  words = grammar.REL_WORDS[rel]
  return (f"Which object is {words} {the_b}?", the_a[4:],
          f"{_cap(the_a)} is {words} {the_b}.")


QUESTIONS: dict[str, Callable] = {
    "color": q_color, "shape": q_shape, "size": q_size, "count": q_count,
    "exist": q_exist, "relation": q_relation, "which": q_which,
}
YES_NO = ("exist", "relation")  # the question types answered "Yes" or "No"


def ask(kind: str, scene: world.Scene, rng: np.random.Generator, pool: Pool,
        focus: int | None = None, tries: int = 8) -> QA | None:
  for _ in range(tries):  # some draws do not apply (e.g. ambiguous referents)
    qa = QUESTIONS[kind](scene, rng, pool, focus)
    if qa is not None:
      return qa
  return None


# ---------------------------------------------------------------------------------------
# Training records.

def _conv(turns: Sequence[tuple[str, str]], with_image: bool) -> list[dict]:
  out = []
  for k, (q, a) in enumerate(turns):
    if k == 0 and with_image:
      q = "<image>\n" + q
    out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  return out


def pretrain_record(index: int, seed: int, pool: Pool) -> tuple[dict, world.Scene]:
  rng = _rng(seed, "pretrain", index)
  scene = pool.scene(rng)
  image = f"images/pretrain/{index:06d}.png"
  caption = grammar.text(scene_caption(scene, rng))
  if rng.integers(2):  # drawn after the caption: the other half keep theirs
    caption = shape_first_caption(scene, rng)
  conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]
  return {"id": f"pretrain-{index:06d}", "image": image, "conversations": conv}, scene


def _text_only_turn(rng: np.random.Generator) -> tuple[str, str]:
  kind = int(rng.integers(3))
  if kind == 0:
    word = _pick(rng, list(world.COLORS) + list(world.SHAPES))
    what = "color" if word in world.COLORS else "shape"
    return f"Is {word} a color or a shape?", f"{_cap(word)} is a {what}."
  if kind == 1:
    word = _pick(rng, list(world.OPPOSITE))
    return f"What is the opposite of {word}?", world.OPPOSITE[word]
  shape = _pick(rng, world.SHAPES)
  return f"What is the plural of {shape}?", world.PLURALS[shape]


def _train_pair(scene: world.Scene, rng: np.random.Generator, pool: Pool,
                tries: int = 8) -> tuple[str, str] | None:
  """A (true, false) caption pair of a random SugarCrepe kind, from the training half of
  the caption language, either caption the longer."""
  spec = contrast.Spec(frozenset(pool.combos), half="train",
                       longer=_pick(rng, ("pos", "neg")))
  for _ in range(tries):
    captions = contrast.pair(_pick(rng, SUGARCREPE_SUBSETS), scene, rng, spec)
    if captions is not None:
      return captions
  return None


def choice_turn(scene: world.Scene, rng: np.random.Generator, pool: Pool,
                ) -> tuple[str, str] | None:
  """The evaluation's two-choice question (prompts.sugarcrepe_question), answer "A"/"B"."""
  captions = _train_pair(scene, rng, pool)
  if captions is None:
    return None
  pos, neg = captions
  if rng.integers(2):
    return prompts.sugarcrepe_question(pos, neg), "A"
  return prompts.sugarcrepe_question(neg, pos), "B"


def yesno_turn(scene: world.Scene, rng: np.random.Generator, pool: Pool,
               ) -> tuple[str, str] | None:
  """The evaluation's yes/no question (prompts.yes_no_prompt), answer "Yes"/"No"."""
  captions = _train_pair(scene, rng, pool)
  if captions is None:
    return None
  k = int(rng.integers(2))
  return prompts.yes_no_prompt(captions[k]), ("Yes", "No")[k]


FORMATS: dict[str, Callable] = {"choice": choice_turn, "yesno": yesno_turn}


def instruct_record(index: int, seed: int, pool: Pool, text_only_frac: float = 0.05,
                    format_frac: float = 0.3) -> tuple[dict, world.Scene | None]:
  """2-6 turns about one scene (fewer when RECORD_CHARS is reached), or (with probability
  text_only_frac) a text-only chat.

  Each turn is, with probability format_frac, a two-choice or a yes/no question in the
  evaluation's exact wording (`FORMATS`, captions from the training half of the caption
  language, contrast.py), else a VQA-style or long-answer question or a description.
  """
  rng = _rng(seed, "instruct", index)
  rid = f"instruct-{index:06d}"
  num_turns = int(rng.integers(*TURNS))
  if rng.uniform() < text_only_frac:
    turns = [_text_only_turn(rng) for _ in range(num_turns)]
    return {"id": rid, "conversations": _conv(turns, with_image=False)}, None
  scene = pool.scene(rng)
  short = bool(rng.integers(2))  # VQA-style conversation (suffix, one-word answers)
  turns: list[tuple[str, str]] = []
  for _ in range(num_turns):
    if rng.uniform() < format_frac:
      qa = FORMATS[_pick(rng, list(FORMATS))](scene, rng, pool)
    else:
      kind = _pick(rng, list(QUESTIONS) + ([] if short else ["describe"]))
      if kind == "describe":
        q = _pick(rng, ("Describe the image.", "What objects are in the image?"))
        qa = (q, "", _cap(grammar.text(scene_caption(scene, rng))) + ".")
      else:
        qa = ask(kind, scene, rng, pool)
      if qa is not None:
        qa = (qa[0] + VQA_SUFFIX, qa[1]) if short else (qa[0], qa[2])
    chars = sum(len(q) + len(a) for q, a in turns)
    if (qa is not None and qa[0] not in (q for q, _ in turns)
        and chars + len(qa[0]) + len(qa[1]) <= RECORD_CHARS):
      turns.append(qa)
  if not turns:
    qa = q_size(scene, rng, pool, None)  # always applies
    turns.append((qa[0] + VQA_SUFFIX, qa[1]) if short else (qa[0], qa[2]))
  image = f"images/instruct/{index:06d}.png"
  return {"id": rid, "image": image, "conversations": _conv(turns, True)}, scene


# ---------------------------------------------------------------------------------------
# Evaluation sets.

def _vqa_kind(index: int, focus: int | None) -> tuple[str, str | None]:
  """Item `index`'s question type and, for a yes/no type, the answer it must have: types
  take turns, and a yes/no type's answer alternates with each of its turns."""
  kinds = [k for k in QUESTIONS if not (focus is not None and k == "count")]
  kind = kinds[index % len(kinds)]
  return kind, ("Yes", "No")[(index // len(kinds)) % 2] if kind in YES_NO else None


def _vqa_record(index: int, image: str, qa: QA, kind: str) -> dict:
  return {"question_id": index, "image": image, "text": qa[0] + VQA_SUFFIX,
          "answer": qa[1], "category": kind}


def vqa_item(index: int, seed: int, pool: Pool, image_dir: str) -> tuple[dict, world.Scene]:
  """Item `index` of a VQA set, balanced by construction.

  Question types take turns (item i asks type i mod #types), and a yes/no type's answer
  alternates with each of its turns, so any prefix of the set asks every type about as
  often and answers each yes/no type "Yes" about half the time: a model that always says
  "Yes" scores 0.5 on those types, not whatever share the draws happened to give.
  """
  rng = _rng(seed, "vqa", index)
  focus = 0 if pool.focus else None
  kind, want = _vqa_kind(index, focus)
  while True:
    scene = pool.scene(rng)
    qa = ask(kind, scene, rng, pool, focus)
    if qa is not None and want in (None, qa[1]):
      break
  return _vqa_record(index, f"{image_dir}/vqa_{index:06d}.png", qa, kind), scene


def train_vqa_item(index: int, scene: world.Scene, image: str, seed: int, pool: Pool,
                   tries: int = 16) -> dict | None:
  """A VQA item of `vqa_item`'s balanced kind about a given scene (a training image's:
  does a model answer about the images it was trained on?), or None where that kind
  cannot be asked of it (e.g. a relation in a one-object scene)."""
  rng = _rng(seed, "train_vqa", index)
  kind, want = _vqa_kind(index, None)
  for _ in range(tries):
    qa = ask(kind, scene, rng, pool)
    if qa is not None and want in (None, qa[1]):
      return _vqa_record(index, image, qa, kind)
  return None


def _cue(subset: str, index: int, pool: Pool) -> str | None:
  """Which caption of held-out item `index` names a held-out pair (contrast.Spec.cue)."""
  if not pool.focus:
    return None
  if subset in contrast.SAME_PAIRS:
    return "both"
  return ("pos", "neg")[(index // 2) % 2]


def sugarcrepe_item(subset: str, index: int, seed: int, pool: Pool, image_dir: str,
                    ) -> tuple[dict, world.Scene]:
  """An image with a true caption and a false one that differs in the subset's way.

  Balanced by design (contrast.py): odd items have the longer positive, even items the
  longer negative; in a held-out pool, items 0, 1 (mod 4) name a held-out pair in the
  positive only (the scene's object 0), items 2, 3 in the negative only (swap_obj and
  replace_rel: in both). Captions come from the eval half of the language.
  """
  if subset not in SUGARCREPE_SUBSETS:
    raise ValueError(f"subset={subset!r} is not one of {SUGARCREPE_SUBSETS}.")
  rng = _rng(seed, f"sugarcrepe_{subset}", index)
  cue = _cue(subset, index, pool)
  spec = contrast.Spec(frozenset(pool.combos), frozenset(pool.focus), "eval",
                       longer=None if subset == "swap_obj"
                       else ("neg", "pos")[index % 2], cue=cue)
  # With cue "neg" the positive leaves the focus (object 0) out, so one more object.
  min_objects = (2 if subset in contrast.NEEDS_TWO else 1) + (cue == "neg")
  focus = 0 if cue in ("pos", "both") else None
  avoid = 0 if cue == "neg" else None
  while True:
    scene = pool.scene(rng, int(rng.integers(min_objects, 5)))
    for _ in range(4):  # a few positives per scene: most are rejected (contrast.pair)
      captions = contrast.pair(subset, scene, rng, spec, focus, avoid)
      if captions is not None:
        image = f"{image_dir}/{subset}_{index:06d}.png"
        return {"filename": image, "caption": captions[0],
                "negative_caption": captions[1]}, scene


def winoground_item(index: int, seed: int, pool: Pool, image_dir: str,
                    ) -> tuple[dict, list[world.Scene]]:
  """Two scenes, two captions with the same words; caption k is true only of scene k."""
  rng = _rng(seed, "winoground", index)
  while True:
    scene0 = pool.scene(rng, int(rng.integers(2, 4)))
    a, b = scene0.objects[0], scene0.objects[1]
    tag = "relation" if rng.integers(2) else "attribute"
    if tag == "relation":
      cap0 = (Rel(NP(a.shape, a.color), world.primary_relation(a, b), NP(b.shape, b.color)),)
      cap1 = (Rel(cap0[0].obj, cap0[0].rel, cap0[0].subj),)
      moved = (dataclasses.replace(a, x=b.x, y=b.y), dataclasses.replace(b, x=a.x, y=a.y))
    else:
      if a.color == b.color:
        continue
      cap0 = (NP(a.shape, a.color), NP(b.shape, b.color))
      cap1 = (NP(a.shape, b.color), NP(b.shape, a.color))
      moved = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
    scene1 = world.Scene(moved + scene0.objects[2:])
    if not _valid(scene1, pool):
      continue
    if not all(contrast.is_eval_caption(grammar.text(c)) for c in (cap0, cap1)):
      continue
    strict = [[grammar.is_true(c, s) for s in (scene0, scene1)] for c in (cap0, cap1)]
    lenient = [[grammar.is_true(c, s, True) for s in (scene0, scene1)] for c in (cap0, cap1)]
    if strict != [[True, False], [False, True]] or lenient != strict:
      continue
    images = [f"{image_dir}/winoground_{index:06d}_{k}.png" for k in (0, 1)]
    item = {"id": index, "image_0": images[0], "image_1": images[1],
            "caption_0": grammar.text(cap0), "caption_1": grammar.text(cap1), "tag": tag}
    return item, [scene0, scene1]


def _valid(scene: world.Scene, pool: Pool) -> bool:
  """Distinct allowed combos and legal placement (after an edit of a sampled scene)."""
  combos = [o.combo for o in scene.objects]
  if len(set(combos)) != len(combos) or not set(combos) <= set(pool.combos):
    return False
  for k, o in enumerate(scene.objects):
    if not world.fits(o.x, o.y, world.RADIUS[o.size], scene.objects[:k]):
      return False
  return True


# ---------------------------------------------------------------------------------------
# Vocabulary.

def corpus() -> Iterator[str]:
  """Representative texts using every word the world can say (for tokenizer training)."""
  rng = np.random.default_rng(0)
  for shape in world.SHAPES:
    for color in world.COLORS:
      for size in world.SIZES:
        np_ = NP(shape, color, size)
        yield grammar.text((np_,))
        yield f"Is there {NP(shape, color).indefinite()} in the image?"
        yield f"No, there is no {color} {shape}."
        yield f"Yes, there is {np_.indefinite()}."
        yield f"What shape is the {size} {color} object?"
        yield f"The {color} object is a {shape}."
        yield f"What color is {NP(shape, size=size).definite()}?"
        yield f"{_cap(np_.definite())} is {color}."
        yield f"Is {NP(shape, color).definite()} small or large?"
        yield f"{_cap(NP(shape, color).definite())} is {size}."
    yield f"How many {world.PLURALS[shape]} are there?"
    yield f"What is the plural of {shape}?"
    yield f"{_cap(shape)} is a shape. Is {shape} a color or a shape?"
  for color in world.COLORS:
    yield f"How many {color} objects are there? There is 1 {color} object."
    yield f"{_cap(color)} is a color. Is {color} a color or a shape?"
  for rel, words in grammar.REL_WORDS.items():
    yield f"Is the red circle {words} the blue square? Yes, the red circle is {words} the " \
          "blue square. No, the red circle is not " + words + " the blue square."
    yield f"Which object is {words} the green star? The orange triangle is {words} it."
    yield f"What is the opposite of {rel}? {world.OPPOSITE[rel]}"
  for size in world.SIZES:
    yield f"What is the opposite of {size}? {world.OPPOSITE[size]}"
  for n in NUMBERS:
    yield f"How many objects are there? There are {n} objects. {n}"
  yield "Yes No yes no"
  yield "Describe the image. What objects are in the image?"
  for _ in range(200):  # whole-scene captions, with commas and "and"
    scene = world.sample_scene(rng)
    yield _cap(grammar.text(scene_caption(scene, rng))) + "."
    yield shape_first_caption(scene, rng)
  yield "<image>\n" + VQA_SUFFIX.strip()
  # Evaluation prompts of docs/METHOD.md §9.
  yield prompts.sugarcrepe_question("a red circle", "a blue square")
  yield prompts.yes_no_prompt("a red circle")
