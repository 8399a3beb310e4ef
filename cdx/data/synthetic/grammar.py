"""The world's small caption language: structured meanings, their words, their truth.

A caption is a tuple of items joined by "and" ("x and y", "x, y and z"); an item is either
a noun phrase `NP` ("a large red circle", "a circle") or a relation `Rel`
("a red circle to the left of a blue square"). Meaning: there are *distinct* objects, one
per noun phrase, each matching its phrase, with every relation holding between its two
objects (`world.relation_holds`). `is_true(caption, scene)` checks that by trying every
assignment (at most 4 objects, so this is tiny); with `lenient=True` borderline relations
count as true, so "not is_true(c, s, lenient=True)" means clearly false.

Keeping the meaning structured lets the SugarCrepe-style negatives be built by editing
one field (a colour, a shape, a relation) and then verified, instead of string surgery.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence, Union

import numpy as np

from cdx.data.synthetic import world

REL_WORDS = {"left": "to the left of", "right": "to the right of",
             "above": "above", "below": "below"}


@dataclasses.dataclass(frozen=True)
class NP:
  shape: str
  color: str | None = None
  size: str | None = None

  def words(self) -> list[str]:
    return [w for w in (self.size, self.color, self.shape) if w is not None]

  def indefinite(self) -> str:
    body = " ".join(self.words())
    return ("an " if body[0] in "aeiou" else "a ") + body

  def definite(self) -> str:
    return "the " + " ".join(self.words())

  def matches(self, obj: world.Obj) -> bool:
    return (obj.shape == self.shape and self.color in (None, obj.color)
            and self.size in (None, obj.size))

  @classmethod
  def of(cls, obj: world.Obj, color: bool = True, size: bool = True) -> "NP":
    return cls(obj.shape, obj.color if color else None, obj.size if size else None)


@dataclasses.dataclass(frozen=True)
class Rel:
  subj: NP
  rel: str
  obj: NP

  def text(self) -> str:
    return f"{self.subj.indefinite()} {REL_WORDS[self.rel]} {self.obj.indefinite()}"


Item = Union[NP, Rel]
Caption = tuple  # tuple[Item, ...]


def item_text(item: Item) -> str:
  return item.text() if isinstance(item, Rel) else item.indefinite()


def text(caption: Caption) -> str:
  parts = [item_text(i) for i in caption]
  if not parts:
    raise ValueError("A caption needs at least one item.")
  if len(parts) == 1:
    return parts[0]
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def noun_phrases(caption: Caption) -> list[NP]:
  out = []
  for item in caption:
    out += [item.subj, item.obj] if isinstance(item, Rel) else [item]
  return out


def is_true(caption: Caption, scene: world.Scene, lenient: bool = False) -> bool:
  """Is there an injective assignment of phrases to objects satisfying the caption?

  lenient=True also accepts borderline relations; a caption false even then is clearly
  false, which is what negatives must be.
  """
  holds = world.relation_possible if lenient else world.relation_holds
  nps = noun_phrases(caption)
  objs = scene.objects
  for perm in itertools.permutations(range(len(objs)), len(nps)):
    if not all(np_.matches(objs[j]) for np_, j in zip(nps, perm)):
      continue
    k, ok = 0, True
    for item in caption:
      if isinstance(item, Rel):
        ok &= holds(objs[perm[k]], item.rel, objs[perm[k + 1]])
        k += 2
      else:
        k += 1
    if ok:
      return True
  return False


def mentioned_combos(caption: Caption) -> set[tuple[str, str]]:
  """(colour, shape) pairs the caption names together."""
  return {(n.color, n.shape) for n in noun_phrases(caption) if n.color is not None}


def unique_phrase(scene: world.Scene, index: int, candidates: Sequence[NP]) -> NP | None:
  """The first candidate phrase that matches object `index` and no other object."""
  for np_ in candidates:
    hits = [j for j, o in enumerate(scene.objects) if np_.matches(o)]
    if hits == [index]:
      return np_
  return None


def full_np(obj: world.Obj, rng: np.random.Generator | None = None) -> NP:
  """Colour + shape (unique in a scene), with the size when rng says so (or always)."""
  return NP.of(obj, size=True if rng is None else bool(rng.integers(2)))


def relation_item(scene: world.Scene, i: int, j: int, rng: np.random.Generator) -> Rel:
  """Object i related to object j by their primary relation, sizes as rng says."""
  a, b = scene.objects[i], scene.objects[j]
  return Rel(full_np(a, rng), world.primary_relation(a, b), full_np(b, rng))
