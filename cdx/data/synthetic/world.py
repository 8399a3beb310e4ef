"""Scenes of the synthetic compositional world and a vectorized numpy renderer.

A scene holds 1-4 non-overlapping objects. Each object has a shape (`SHAPES`), a colour
(`COLORS`), a size (`SIZES`) and a centre `(x, y)` in normalized image coordinates
(x grows to the right, y grows downwards, both in [0, 1]). Within a scene every
(colour, shape) combination appears at most once, so "the red circle" always names one
object; the same shape or the same colour may repeat.

Relations between two objects come from their centres. `relation_holds` is the strict
meaning used for every true/false judgement: "a left of b" holds when b's centre lies more
than `RELATION_MARGIN` to the right of a's. Placement keeps every pair at least
`MIN_PRIMARY_OFFSET` apart along its dominant axis, so `primary_relation(a, b)` always
holds and its opposite is always clearly false.

`render(scenes, size)` draws a batch of scenes into uint8 [N, size, size, 3] images on a
grey background. It works on small per-object patches, all objects at once, so it costs
O(objects * patch) instead of O(objects * image). Every shape fits inside the circle of
its radius, so objects never touch. Timing on this project's shared 2-core CPU box:

  python -c "import time, numpy as np; from cdx.data.synthetic import world as w; \
    s=[w.sample_scene(np.random.default_rng([0, i])) for i in range(20000)]; \
    t=time.time(); w.render(s, 64); print(time.time()-t)"

With the larger objects of world version 2 (export.WORLD_VERSION), 20k scenes sample in
5.7 s and render in 6.5 s (64x64, no anti-aliasing), measured while another training job
shared the box; with the old radii (0.08 / 0.14) and an idle box it was ~1.0 s and ~1.4-2 s.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "star": "stars", "diamond": "diamonds", "cross": "crosses"}
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
    "pink": (250, 130, 200),
    "cyan": (40, 220, 230),
}
SIZES = ("small", "large")
# Radius of the shape's bounding circle, as a fraction of the image side. At 64 px with
# 8 px patches (the tiny presets' SigLIP) a small object spans ~2 patches, a large ~3, so
# its shape shows in more than one patch (it was ~1 and ~2 before, too small to learn).
RADIUS = {"small": 0.12, "large": 0.18}
BACKGROUND = (120, 120, 120)

RELATIONS = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above",
            "small": "large", "large": "small"}
RELATION_MARGIN = 0.06
MIN_GAP = 0.03            # free space between the bounding circles of two objects
MIN_PRIMARY_OFFSET = 0.12  # dominant-axis distance of any pair (> RELATION_MARGIN)


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  size: str
  x: float
  y: float

  @property
  def combo(self) -> tuple[str, str]:
    return (self.color, self.shape)


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Obj, ...]

  def to_json(self) -> list[dict]:
    return [dict(shape=o.shape, color=o.color, size=o.size,
                 x=round(o.x, 4), y=round(o.y, 4)) for o in self.objects]

  @classmethod
  def from_json(cls, objs: Sequence[dict]) -> "Scene":
    return cls(tuple(Obj(**o) for o in objs))


ALL_COMBOS = tuple((c, s) for s in SHAPES for c in COLORS)


def heldout_combos(shift: int = 3) -> frozenset[tuple[str, str]]:
  """One (colour, shape) combination per shape, all colours distinct.

  Shape i is held out with colour (i + shift) mod #colours, so every shape and every colour
  stays visible in training, only their pairing is new.
  """
  colors = list(COLORS)
  if not 0 <= shift < len(colors):
    raise ValueError(f"shift={shift} must be in [0, {len(colors)}).")
  return frozenset((colors[(i + shift) % len(colors)], s) for i, s in enumerate(SHAPES))


def seen_combos(heldout: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
  heldout = set(heldout)
  return tuple(c for c in ALL_COMBOS if c not in heldout)


# ---------------------------------------------------------------------------------------
# Relations.

def relation_holds(a: Obj, rel: str, b: Obj) -> bool:
  """Strict meaning of "a <rel> b" (image y grows downwards)."""
  if rel == "left":
    return b.x - a.x > RELATION_MARGIN
  if rel == "right":
    return a.x - b.x > RELATION_MARGIN
  if rel == "above":
    return b.y - a.y > RELATION_MARGIN
  if rel == "below":
    return a.y - b.y > RELATION_MARGIN
  raise ValueError(f"relation={rel!r} is not one of {RELATIONS}.")


def relation_possible(a: Obj, rel: str, b: Obj) -> bool:
  """Lenient meaning: "a <rel> b" is not clearly false (borderline offsets count)."""
  return not relation_holds(a, OPPOSITE[rel], b)


def relation_is_clear(a: Obj, rel: str, b: Obj) -> bool:
  """True when "a <rel> b" is clearly true or clearly false (no borderline offsets)."""
  return relation_holds(a, rel, b) or relation_holds(a, OPPOSITE[rel], b)


def primary_relation(a: Obj, b: Obj) -> str:
  """The relation of a to b along the axis where they are furthest apart."""
  dx, dy = b.x - a.x, b.y - a.y
  if abs(dx) >= abs(dy):
    return "left" if dx > 0 else "right"
  return "above" if dy > 0 else "below"


# ---------------------------------------------------------------------------------------
# Sampling.

def fits(x: float, y: float, r: float, placed: Sequence[Obj]) -> bool:
  """Can an object of radius r sit at (x, y) beside the placed ones?"""
  for o in placed:
    dx, dy = x - o.x, y - o.y
    if (dx * dx + dy * dy) ** 0.5 < r + RADIUS[o.size] + MIN_GAP:
      return False
    if max(abs(dx), abs(dy)) < MIN_PRIMARY_OFFSET:
      return False
  return True


def place(rng: np.random.Generator, sizes: Sequence[str], tries: int = 200,
          ) -> list[tuple[float, float]] | None:
  """Non-overlapping centres for objects of the given sizes, or None if none was found."""
  placed: list[Obj] = []
  for size in sizes:
    r = RADIUS[size]
    for _ in range(tries):
      x, y = rng.uniform(r, 1.0 - r, size=2)
      if fits(x, y, r, placed):
        placed.append(Obj("circle", "red", size, float(x), float(y)))  # fits() reads size, x, y
        break
    else:
      return None
  return [(o.x, o.y) for o in placed]


def sample_scene(rng: np.random.Generator, num_objects: int | None = None,
                 combos: Sequence[tuple[str, str]] = ALL_COMBOS,
                 required: Sequence[tuple[str, str]] = ()) -> Scene:
  """A random scene whose (colour, shape) pairs come from `combos`, distinct.

  Args:
    rng: the source of randomness (the scene is a pure function of its state).
    num_objects: 1..4; drawn uniformly when None.
    combos: allowed (colour, shape) pairs.
    required: when non-empty, the first object's pair is drawn from these instead.
  """
  if num_objects is None:
    num_objects = int(rng.integers(1, 5))
  if not 1 <= num_objects <= 4:
    raise ValueError(f"num_objects={num_objects} must be in [1, 4].")
  combos = list(combos)
  if len(combos) < num_objects:
    raise ValueError(f"Only {len(combos)} combos allowed for {num_objects} objects.")
  while True:
    picks = []
    if required:
      picks.append(tuple(required[int(rng.integers(len(required)))]))
    rest = [c for c in combos if c not in picks]
    idx = rng.choice(len(rest), size=num_objects - len(picks), replace=False)
    picks += [rest[i] for i in idx]
    sizes = [SIZES[int(i)] for i in rng.integers(0, len(SIZES), size=num_objects)]
    centres = place(rng, sizes)
    if centres is not None:
      return Scene(tuple(Obj(s, c, z, x, y)
                         for (c, s), z, (x, y) in zip(picks, sizes, centres)))


# ---------------------------------------------------------------------------------------
# Rendering.

def _star(u: np.ndarray, v: np.ndarray, inner: float = 0.45) -> np.ndarray:
  """Five-pointed star with straight edges, one tip pointing up."""
  sector = 2 * np.pi / 5
  a = np.mod(np.arctan2(v, u) + np.pi / 2, sector)
  a = np.minimum(a, sector - a)  # fold onto [0, sector/2], 0 = along a tip
  rho = np.sqrt(u * u + v * v)
  qx, qy = rho * np.cos(a), rho * np.sin(a)
  # Inside = same side as the origin of the edge from the tip (1, 0) to the valley.
  vx, vy = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
  return (vx - 1.0) * qy - vy * (qx - 1.0) >= 0


# Inside-tests in local coordinates (u, v in units of the radius, v grows downwards);
# every shape stays inside the unit circle, so placement by radius never overlaps.
_INSIDE = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.7,
    "triangle": lambda u, v: (v <= 0.5) & (v >= -1.0 + np.sqrt(3.0) * abs(u)),
    "star": _star,
    "diamond": lambda u, v: abs(u) + abs(v) <= 1.0,
    "cross": lambda u, v: (((abs(u) <= 0.32) & (abs(v) <= 0.92))
                           | ((abs(v) <= 0.32) & (abs(u) <= 0.92))),
}


def _shape_masks(shape_ids: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """bool [M, P, P]: which patch pixels of object m lie inside its shape."""
  out = np.zeros(u.shape, bool)
  for i, name in enumerate(SHAPES):
    sel = shape_ids == i
    if sel.any():
      out[sel] = _INSIDE[name](u[sel], v[sel])
  return out


def render(scenes: Sequence[Scene], size: int = 64, antialias: int = 1,
           chunk: int = 1024) -> np.ndarray:
  """Draws scenes into uint8 [N, size, size, 3]; `antialias` = supersampling factor."""
  if size < 8:
    raise ValueError(f"size={size} is too small to draw shapes; use >= 8.")
  if antialias < 1:
    raise ValueError(f"antialias={antialias} must be >= 1 (1 = off).")
  out = np.empty((len(scenes), size, size, 3), np.uint8)
  for start in range(0, len(scenes), chunk):  # chunks keep the canvas cache-sized
    out[start:start + chunk] = _render_chunk(scenes[start:start + chunk], size, antialias)
  return out


def _render_chunk(scenes: Sequence[Scene], size: int, antialias: int) -> np.ndarray:
  canvas = np.empty((len(scenes), size, size, 3), np.uint8)
  canvas[:] = BACKGROUND
  objs = [(i, o) for i, s in enumerate(scenes) for o in s.objects]
  if not objs:
    return canvas
  img = np.array([i for i, _ in objs])
  cx = np.array([o.x for _, o in objs]) * size
  cy = np.array([o.y for _, o in objs]) * size
  rad = np.array([RADIUS[o.size] for _, o in objs]) * size
  shape_ids = np.array([SHAPES.index(o.shape) for _, o in objs])
  rgb = np.array([COLORS[o.color] for _, o in objs], np.float32)
  patch = int(np.ceil(2 * max(RADIUS.values()) * size)) + 2
  x0 = np.floor(cx - patch / 2).astype(int)
  y0 = np.floor(cy - patch / 2).astype(int)
  offs = np.arange(patch)
  px = x0[:, None, None] + offs[None, None, :]  # [M, 1, P] pixel columns
  py = y0[:, None, None] + offs[None, :, None]  # [M, P, 1] pixel rows
  # Coverage = fraction of antialias x antialias sub-pixel samples inside the shape.
  cover = np.zeros((len(objs), patch, patch), np.float32)
  for sy, sx in itertools.product(range(antialias), repeat=2):
    u = (px + (sx + 0.5) / antialias - cx[:, None, None]) / rad[:, None, None]
    v = (py + (sy + 0.5) / antialias - cy[:, None, None]) / rad[:, None, None]
    cover += _shape_masks(shape_ids, *np.broadcast_arrays(u, v))
  cover /= antialias**2
  cover *= (px >= 0) & (px < size) & (py >= 0) & (py < size)
  # Shapes are MIN_GAP apart, so no pixel is covered by two objects: plain assignment.
  m, yy, xx = np.nonzero(cover)
  c = cover[m, yy, xx][:, None]
  pixels = c * rgb[m] + (1.0 - c) * np.asarray(BACKGROUND, np.float32)
  canvas[img[m], y0[m] + yy, x0[m] + xx] = np.round(pixels).astype(np.uint8)
  return canvas


def pixel_of(obj: Obj, size: int) -> tuple[int, int]:
  """(row, col) of the pixel holding the object's centre."""
  return min(int(obj.y * size), size - 1), min(int(obj.x * size), size - 1)


def all_pairs(scene: Scene) -> list[tuple[int, int]]:
  return list(itertools.permutations(range(len(scene.objects)), 2))
