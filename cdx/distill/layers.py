"""Which student decoder layers learn from which teacher layers (docs/METHOD.md §6).

A matching is `(student_layers, teacher_groups)`: K student layer indices (0-indexed decoder
layers, increasing) and K non-empty lists of teacher layer indices. Pair k aligns student
layer `student_layers[k]` with the mean of the teacher maps of `teacher_groups[k]`
(see `cdx.distill.losses.teacher_group_average`).

Strategies (paper ablation: group 66.7 > adaptive 65.7 > simple 65.6):
  "group"    the official one: student band S (k layers), teacher band T (m layers),
             window n = m - k + 1, pair j uses T[j .. j + n - 1].
  "simple"   one teacher layer per student layer, spread uniformly over the teacher band.
  "adaptive" one teacher layer per student layer, the one whose attention is most similar
             on a calibration batch (`adaptive_match`).
Bands come from the official table for the depths it lists and from the paper's "middle
30-70 %" rule otherwise.
"""
import math
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

STRATEGIES = ("group", "simple")

# depth -> (first band layer, number of band layers when used as a student,
#           teacher group size when used as a teacher with a 7-layer student band).
_OFFICIAL = {24: (8, 7, 2), 28: (9, 7, 3), 32: (11, 7, 3), 40: (13, 7, 5)}
_OFFICIAL_STUDENT_LAYERS = 7


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def _middle_band(depth: int) -> list[int]:
  """Layers in the middle 30-70 % of a `depth`-layer decoder (at least one layer)."""
  lo = min(_round_half_up(0.3 * depth), depth - 1)
  hi = max(lo + 1, _round_half_up(0.7 * depth))
  return list(range(lo, min(hi, depth)))


def student_band(num_layers: int) -> list[int]:
  """The student's distilled layers: official table (e.g. 24 -> 8..14) or the 30-70 % rule."""
  _check_depth("num_student_layers", num_layers)
  if num_layers in _OFFICIAL:
    start, k, _ = _OFFICIAL[num_layers]
    return list(range(start, start + k))
  return _middle_band(num_layers)


def teacher_band(num_layers: int) -> list[int]:
  """The teacher layers that the groups cover.

  Official depths: the table's group starts plus (group size - 1) layers, e.g. 40 -> 13..23.
  The table's group sizes assume 7 student layers; for another student band size the band
  keeps its start and covers (7 + group size - 1) layers all the same. Other depths: the
  30-70 % rule.
  """
  _check_depth("num_teacher_layers", num_layers)
  if num_layers in _OFFICIAL:
    start, k, group = _OFFICIAL[num_layers]
    return list(range(start, start + k + group - 1))
  return _middle_band(num_layers)


def _check_depth(name: str, depth: int) -> None:
  if not isinstance(depth, (int, np.integer)) or depth < 1:
    raise ValueError(f"{name}={depth!r} must be a positive int (decoder depth).")


def sliding_groups(num_pairs: int, band: Sequence[int]) -> list[list[int]]:
  """Overlapping windows of size n = len(band) - num_pairs + 1; window j starts at band[j]."""
  n = len(band) - num_pairs + 1
  if n < 1:
    raise ValueError(f"teacher band {list(band)} has fewer layers than the {num_pairs} "
                     "student layers; pass explicit student_layers/teacher_groups.")
  return [list(band[j:j + n]) for j in range(num_pairs)]


def uniform_groups(num_pairs: int, band: Sequence[int]) -> list[list[int]]:
  """One teacher layer per pair, spread evenly over the band (first and last included)."""
  if num_pairs == 1:
    return [[band[len(band) // 2]]]
  step = (len(band) - 1) / (num_pairs - 1)
  return [[band[_round_half_up(j * step)]] for j in range(num_pairs)]


def match_layers(num_student_layers: int, num_teacher_layers: int,
                 strategy: str = "group") -> tuple[list[int], list[list[int]]]:
  """(student_layers, teacher_groups) for the given depths (docs/METHOD.md §6).

  match_layers(24, 40) -> student 8..14, teacher windows [13..17], [14..18], ..., [19..23].
  match_layers(24, 24) -> student 8..14, teacher windows [8, 9], [9, 10], ..., [14, 15].
  """
  if strategy not in STRATEGIES:
    hint = " (adaptive needs attention maps: use adaptive_match)" \
        if strategy == "adaptive" else ""
    raise ValueError(f"layer strategy={strategy!r} is not one of {STRATEGIES}{hint}.")
  student = student_band(num_student_layers)
  band = teacher_band(num_teacher_layers)
  if strategy == "group":
    return student, sliding_groups(len(student), band)
  if len(band) < len(student):
    raise ValueError(f"teacher band {band} has fewer layers than the student band "
                     f"{student}; pass explicit student_layers/teacher_groups.")
  return student, uniform_groups(len(student), band)


def captured_layers(groups: Sequence[Sequence[int]]) -> list[int]:
  """Sorted distinct teacher layers used by the groups: the layers the teacher must capture."""
  return sorted({int(layer) for group in groups for layer in group})


def similarity_matrix(student_maps, teacher_maps) -> np.ndarray:
  """[Ks, B, N, N] x [Kt, B, N, N] -> [Ks, Kt] mean over samples of the maps' cosine."""
  s = jnp.asarray(student_maps, jnp.float32)
  t = jnp.asarray(teacher_maps, jnp.float32)
  if s.shape[1:] != t.shape[1:]:
    raise ValueError(f"student maps {s.shape} and teacher maps {t.shape} must agree on "
                     "[B, N, N].")
  def unit(x):
    x = x.reshape(x.shape[0], x.shape[1], -1)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
  return np.asarray(jnp.einsum("sbx,tbx->st", unit(s), unit(t)) / s.shape[1])


def _best_monotone(sim: np.ndarray) -> list[int]:
  """argmax over non-decreasing assignments of sum_k sim[k, a_k] (dynamic programming)."""
  ks, kt = sim.shape
  best = np.full((ks, kt), -np.inf)
  back = np.zeros((ks, kt), int)
  best[0] = sim[0]
  for k in range(1, ks):
    # prefix argmax over teacher index <= j of the previous row
    arg = np.zeros(kt, int)
    for j in range(1, kt):
      arg[j] = j if best[k - 1, j] > best[k - 1, arg[j - 1]] else arg[j - 1]
    back[k] = arg
    best[k] = sim[k] + best[k - 1, arg]
  out = [int(np.argmax(best[-1]))]
  for k in range(ks - 1, 0, -1):
    out.append(int(back[k, out[-1]]))
  return out[::-1]


def adaptive_match(student_maps, teacher_maps,
                   teacher_layers: Optional[Sequence[int]] = None,
                   monotone: bool = False) -> list[list[int]]:
  """Teacher groups (one layer each) chosen by attention similarity on a calibration batch.

  student_maps [Ks, B, N, N] are the student's band layers; teacher_maps [Kt, B, N, N] are
  candidate teacher layers `teacher_layers` (default 0..Kt-1). Each student layer gets the
  candidate with the highest mean cosine similarity. With `monotone`, the assignment is
  order-preserving (deeper student layer -> same or deeper teacher layer), the best such by
  total similarity; without it, picks are independent and may cross.
  """
  sim = similarity_matrix(student_maps, teacher_maps)
  layers = list(range(sim.shape[1])) if teacher_layers is None else list(teacher_layers)
  if len(layers) != sim.shape[1]:
    raise ValueError(f"teacher_layers has {len(layers)} entries but teacher_maps has "
                     f"{sim.shape[1]} maps.")
  picks = _best_monotone(sim) if monotone else [int(i) for i in sim.argmax(axis=1)]
  return [[layers[i]] for i in picks]


def _check_indices(name: str, indices: Sequence[Any], depth: int) -> list[int]:
  out = []
  for i in indices:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
      raise ValueError(f"{name} entry {i!r} is not an int layer index.")
    if not 0 <= i < depth:
      raise ValueError(f"{name} entry {i} is outside 0..{depth - 1} (the model has "
                       f"{depth} decoder layers).")
    out.append(int(i))
  return out


def resolve_layers(cfg: Mapping[str, Any], num_student_layers: int,
                   num_teacher_layers: int) -> tuple[list[int], list[list[int]]]:
  """The matching a config asks for, validated.

  cfg keys (a dict or ml_collections.ConfigDict): "strategy" ("group" default, "simple"),
  "student_layers" (list[int] | None), "teacher_groups" (list[list[int]] | None). Explicit
  lists override the strategy; give both or neither. "adaptive" is not resolvable here: it
  needs maps (call `adaptive_match` on a calibration batch, then pass its groups explicitly).
  """
  student = cfg.get("student_layers", None)
  groups = cfg.get("teacher_groups", None)
  if student is None and groups is None:
    return match_layers(num_student_layers, num_teacher_layers,
                        cfg.get("strategy", None) or "group")
  if student is None or groups is None:
    raise ValueError("student_layers and teacher_groups must be given together; got "
                     f"student_layers={student!r}, teacher_groups={groups!r}.")
  student = _check_indices("student_layers", list(student), num_student_layers)
  groups = [list(g) if isinstance(g, (list, tuple)) else [g] for g in groups]
  if len(groups) != len(student):
    raise ValueError(f"teacher_groups has {len(groups)} groups but student_layers has "
                     f"{len(student)} layers; they pair up one to one.")
  if len(set(student)) != len(student):
    raise ValueError(f"student_layers {student} repeats a layer.")
  for k, group in enumerate(groups):
    if not group:
      raise ValueError(f"teacher_groups[{k}] is empty.")
    groups[k] = _check_indices(f"teacher_groups[{k}]", group, num_teacher_layers)
  return student, groups
