"""Caption pairs: a true caption of a scene and a minimally different false one.

The seven SugarCrepe kinds of hard negative (docs/METHOD.md §9) built on the world's
structured captions (grammar.py): swap_obj, swap_att, replace_obj, replace_att,
replace_rel, add_obj, add_att. The evaluation sets (text.sugarcrepe_item) and the
two-choice / yes-no training turns (text.instruct_record) both draw their pairs here.

Text-only shortcuts are designed out, so that a model which ignores the image scores 0.5
(`cdx/eval/baselines.py` measures it):
  - length. The real add_obj / add_att negatives extend the positive, so "pick the shorter
    caption" is always right. Here both kinds are symmetric: both captions extend one true
    base caption by one object (add_obj) or one attribute (add_att), true in the positive,
    false in the negative, so they have the same number of words. On top, the caller says
    which caption must be the longer in characters (`Spec.longer`, ties allowed) and the
    evaluation sets alternate it item by item.
  - held-out pairs. Training never names a held-out (colour, shape) pair; if the true
    caption of a held-out item always named one, "pick the unfamiliar pair" would win.
    The caller says which caption names a held-out pair (`Spec.cue`): exactly the positive,
    exactly the negative, or both (swap_obj and replace_rel edit no pair); held-out sets
    alternate "pos" and "neg".
  - no caption names one (colour, shape) pair twice: scenes hold each pair once, so such a
    caption would be false on its face.
Caption halves: `is_eval_caption` splits the caption language into two fixed halves by a
hash of the text. Evaluation sets use eval-half captions only and training turns the other
half, so no training question is ever asked about an evaluation caption.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Iterator, Sequence

import numpy as np

from cdx.data.synthetic import grammar
from cdx.data.synthetic import world
from cdx.data.synthetic.grammar import NP, Rel

SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel",
           "add_obj", "add_att")
NEEDS_TWO = ("swap_obj", "swap_att", "replace_rel", "add_obj")  # objects in the scene
SAME_PAIRS = ("swap_obj", "replace_rel")  # both captions name the same (colour, shape)s
ATTRS = ("color", "size")


def is_eval_caption(caption: str) -> bool:
  """True for the half of all caption strings reserved for evaluation sets."""
  return zlib.crc32(caption.encode()) % 2 == 0


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a pair must satisfy besides "positive true, negative clearly false".

  combos: (colour, shape) pairs the captions may name.
  heldout: the held-out pairs (for `cue`).
  half: "eval" or "train": which half of the caption language (`is_eval_caption`).
  longer: "pos" / "neg": that caption has at least as many characters; None: either.
  cue: "pos" / "neg": only that caption names a held-out pair; "both": both do;
    None: no constraint (seen pools cannot name one anyway).
  """
  combos: frozenset
  heldout: frozenset = frozenset()
  half: str = "eval"
  longer: str | None = None
  cue: str | None = None

  def __post_init__(self):
    if self.half not in ("eval", "train"):
      raise ValueError(f"half={self.half!r} must be 'eval' or 'train'.")
    if self.longer not in (None, "pos", "neg"):
      raise ValueError(f"longer={self.longer!r} must be None, 'pos' or 'neg'.")
    if self.cue not in (None, "pos", "neg", "both"):
      raise ValueError(f"cue={self.cue!r} must be None, 'pos', 'neg' or 'both'.")


def _shuffled(rng: np.random.Generator, seq: Sequence) -> list:
  return [seq[i] for i in rng.permutation(len(seq))]


def names_twice(caption: grammar.Caption) -> bool:
  """Does the caption name one (colour, shape) pair in two noun phrases?"""
  named = [(n.color, n.shape) for n in grammar.noun_phrases(caption) if n.color]
  return len(named) != len(set(named))


def names_heldout(caption: grammar.Caption, heldout: frozenset) -> bool:
  return bool(grammar.mentioned_combos(caption) & heldout)


def _texts_ok(pos: str, neg: str, spec: Spec) -> bool:
  want_eval = spec.half == "eval"
  if is_eval_caption(pos) != want_eval or is_eval_caption(neg) != want_eval:
    return False
  if spec.longer == "pos":
    return len(pos) >= len(neg)
  if spec.longer == "neg":
    return len(neg) >= len(pos)
  return True


def _cue_ok(pos: grammar.Caption, neg: grammar.Caption, spec: Spec) -> bool:
  if spec.cue is None:
    return True
  p, n = names_heldout(pos, spec.heldout), names_heldout(neg, spec.heldout)
  return (p, n) == {"pos": (True, False), "neg": (False, True), "both": (True, True)}[spec.cue]


# ---------------------------------------------------------------------------------------
# Positives.

def positive(subset: str, scene: world.Scene, rng: np.random.Generator,
             focus: int | None = None, avoid: int | None = None,
             ) -> grammar.Caption | None:
  """A true caption shaped for the subset, naming object `focus` and never object `avoid`
  when given.

  swap_obj / replace_rel: one relation; add_obj: 2-3 noun phrases (one becomes the added
  object); add_att: one attribute left out so the negative has a slot to fill.
  """
  usable = [i for i in range(len(scene.objects)) if i != avoid]
  n = len(usable)
  if n < (2 if subset in NEEDS_TWO else 1):
    return None
  relational = subset in ("swap_obj", "replace_rel") or (
      subset != "add_obj" and n >= 2 and rng.integers(3) == 0)
  if relational or subset == "swap_att":
    k = 2
  elif subset == "add_obj":
    k = int(rng.integers(2, min(3, n) + 1))
  else:
    k = int(rng.integers(1, min(2, n) + 1))
  order = [usable[int(i)] for i in rng.permutation(n)]
  if focus is not None:  # the focus object must be among the first k
    order.remove(focus)
    order.insert(int(rng.integers(k)), focus)
  if relational:
    return (grammar.relation_item(scene, order[0], order[1], rng),)
  nps = [grammar.full_np(scene.objects[i], rng) for i in order[:k]]
  if subset == "add_att":
    t = int(rng.integers(k))
    attr = "size" if nps[t].size is not None and rng.integers(2) else "color"
    nps[t] = dataclasses.replace(nps[t], **{attr: None})
  return tuple(nps)


# ---------------------------------------------------------------------------------------
# Negatives.

def edit_nps(caption: grammar.Caption, edit: Callable[[list[NP]], list[NP] | None]):
  """Applies an edit to the caption's noun phrases (in order) and rebuilds the caption."""
  nps = edit(grammar.noun_phrases(caption))
  if nps is None:
    return None
  out, k = [], 0
  for item in caption:
    if isinstance(item, Rel):
      out.append(Rel(nps[k], item.rel, nps[k + 1]))
      k += 2
    else:
      out.append(nps[k])
      k += 1
  return tuple(out)


def _put(caption: grammar.Caption, t: int, new: NP) -> grammar.Caption:
  return edit_nps(caption, lambda ps: ps[:t] + [new] + ps[t + 1:])


def _values(attr: str) -> tuple[str, ...]:
  return tuple(world.COLORS) if attr == "color" else world.SIZES


def _add_att(pos, nps, scene, rng, spec) -> Iterator[grammar.Caption]:
  """Drop one attribute of the positive (its true addition to the base) and add a false one
  in another slot. Attribute kinds are tried in random order, so neither caption tends to
  carry more colour (or size) words."""
  for a1, a2 in _shuffled(rng, [(x, y) for x in ATTRS for y in ATTRS]):
    for t1 in _shuffled(rng, range(len(nps))):
      if getattr(nps[t1], a1) is None:
        continue
      base = _put(pos, t1, dataclasses.replace(nps[t1], **{a1: None}))
      base_nps = grammar.noun_phrases(base)
      for t2 in _shuffled(rng, range(len(nps))):
        if (t2, a2) == (t1, a1) or getattr(base_nps[t2], a2) is not None:
          continue
        for v in _shuffled(rng, _values(a2)):
          yield _put(base, t2, dataclasses.replace(base_nps[t2], **{a2: v}))


def _add_obj(pos, nps, scene, rng, spec) -> Iterator[grammar.Caption]:
  """Replace one noun phrase (the positive's added object) by an absent object, described
  with the same attributes."""
  present = {o.combo for o in scene.objects}
  absent = [c for c in sorted(spec.combos) if c not in present]
  for t in _shuffled(rng, range(len(nps))):
    for c, s in _shuffled(rng, absent):
      yield _put(pos, t, NP(s, c, nps[t].size and _pick(rng, world.SIZES)))


def _pick(rng: np.random.Generator, seq: Sequence):
  return seq[int(rng.integers(len(seq)))]


def negatives(subset: str, pos: grammar.Caption, scene: world.Scene,
              rng: np.random.Generator, spec: Spec) -> Iterator[grammar.Caption]:
  """Candidate negatives of the subset's kind, in random order (checked by the caller)."""
  nps = grammar.noun_phrases(pos)
  if subset == "add_att":
    yield from _add_att(pos, nps, scene, rng, spec)
    return
  if subset == "add_obj":
    yield from _add_obj(pos, nps, scene, rng, spec)
    return
  if subset == "replace_rel":
    (r,) = pos
    yield (Rel(r.subj, world.OPPOSITE[r.rel], r.obj),)
    return
  if subset == "swap_obj":
    (r,) = pos
    yield (Rel(r.obj, r.rel, r.subj),)
    return
  if subset == "swap_att":
    a, b = nps[0], nps[1]
    for attr in _shuffled(rng, ATTRS):
      va, vb = getattr(a, attr), getattr(b, attr)
      if va and vb and va != vb:
        yield edit_nps(pos, lambda ps: [dataclasses.replace(a, **{attr: vb}),
                                        dataclasses.replace(b, **{attr: va})])
    return
  for t in _shuffled(rng, range(len(nps))):
    target = nps[t]
    if subset == "replace_obj":
      for s in _shuffled(rng, world.SHAPES):
        if s != target.shape:
          yield _put(pos, t, dataclasses.replace(target, shape=s))
    elif subset == "replace_att":
      for attr in _shuffled(rng, ATTRS):
        if getattr(target, attr) is None:
          continue
        for v in _shuffled(rng, _values(attr)):
          if v != getattr(target, attr):
            yield _put(pos, t, dataclasses.replace(target, **{attr: v}))
    else:
      raise ValueError(f"subset={subset!r} is not one of {SUBSETS}.")


def pair(subset: str, scene: world.Scene, rng: np.random.Generator, spec: Spec,
         focus: int | None = None, avoid: int | None = None) -> tuple[str, str] | None:
  """(positive, negative) caption texts for the scene, or None if this draw has none.

  focus / avoid: an object the positive must / must not name (`positive`).
  """
  if subset not in SUBSETS:
    raise ValueError(f"subset={subset!r} is not one of {SUBSETS}.")
  pos = positive(subset, scene, rng, focus, avoid)
  if pos is None or names_twice(pos) or not grammar.is_true(pos, scene):
    return None
  if not grammar.mentioned_combos(pos) <= spec.combos:
    return None
  if spec.cue is not None and names_heldout(pos, spec.heldout) != (spec.cue != "neg"):
    return None
  pos_text = grammar.text(pos)
  for neg in negatives(subset, pos, scene, rng, spec):
    if neg is None or neg == pos or names_twice(neg):
      continue
    if not grammar.mentioned_combos(neg) <= spec.combos or not _cue_ok(pos, neg, spec):
      continue
    neg_text = grammar.text(neg)
    if _texts_ok(pos_text, neg_text, spec) and not grammar.is_true(neg, scene, True):
      return pos_text, neg_text
  return None
