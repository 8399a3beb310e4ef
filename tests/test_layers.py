"""Tests for cdx.distill.layers: the official table, the 30-70 % rule and the strategies."""
import numpy as np
import pytest

from cdx.distill import layers


def test_official_24_student_40_teacher():
  student, groups = layers.match_layers(24, 40)
  assert student == list(range(8, 15))
  assert groups[0] == [13, 14, 15, 16, 17]
  assert groups[-1] == [19, 20, 21, 22, 23]
  assert [g[0] for g in groups] == list(range(13, 20))
  assert all(len(g) == 5 for g in groups)
  assert layers.captured_layers(groups) == list(range(13, 24))


@pytest.mark.parametrize("depth,starts,size", [(24, range(8, 15), 2), (28, range(9, 16), 3),
                                               (32, range(11, 18), 3),
                                               (40, range(13, 20), 5)])
def test_official_teacher_table(depth, starts, size):
  student, groups = layers.match_layers(24, depth)
  assert student == list(range(8, 15))
  assert [g[0] for g in groups] == list(starts)
  for g in groups:  # consecutive windows of the table's group size
    assert g == list(range(g[0], g[0] + size))


@pytest.mark.parametrize("depth,first", [(24, 8), (28, 9), (40, 13)])
def test_official_student_table(depth, first):
  student, _ = layers.match_layers(depth, 40)
  assert student == list(range(first, first + 7))


def test_24_vs_24_windows_of_two():
  student, groups = layers.match_layers(24, 24)
  assert student == list(range(8, 15))
  assert groups == [[j, j + 1] for j in range(8, 15)]


@pytest.mark.parametrize("ds,dt", [(10, 20), (12, 16), (6, 10), (2, 4), (16, 40), (4, 6)])
def test_middle_rule_for_other_depths(ds, dt):
  student, groups = layers.match_layers(ds, dt)
  assert len(student) == len(groups) >= 1
  assert student == sorted(set(student))
  for depth, used in ((ds, student), (dt, layers.captured_layers(groups))):
    if depth in (24, 28, 32, 40):
      continue
    assert min(used) >= np.floor(0.3 * depth) and max(used) < np.ceil(0.7 * depth) + 1
  # Windows slide by one over the band and cover it in order.
  band = layers.captured_layers(groups)
  n = len(band) - len(student) + 1
  assert groups == [band[j:j + n] for j in range(len(student))]


def test_middle_rule_values():
  assert layers.student_band(10) == [3, 4, 5, 6]
  assert layers.teacher_band(20) == list(range(6, 14))


def test_teacher_band_smaller_than_student_band_raises():
  with pytest.raises(ValueError, match="fewer layers"):
    layers.match_layers(40, 4)


def test_simple_strategy_one_to_one_uniform():
  student, groups = layers.match_layers(24, 40, strategy="simple")
  assert student == list(range(8, 15))
  flat = [g[0] for g in groups]
  assert all(len(g) == 1 for g in groups)
  assert flat[0] == 13 and flat[-1] == 23 and flat == sorted(flat)
  assert len(set(flat)) == len(flat)


def test_bad_strategy_raises():
  with pytest.raises(ValueError, match="adaptive_match"):
    layers.match_layers(24, 40, strategy="adaptive")
  with pytest.raises(ValueError, match="num_student_layers"):
    layers.match_layers(0, 40)


def _planted_maps(rng, plant, kt=6, b=3, n=6):
  """Teacher maps random; student map k = teacher map plant[k] plus small noise."""
  teacher = rng.random((kt, b, n, n))
  student = np.stack([teacher[j] + 0.05 * rng.random((b, n, n)) for j in plant])
  return student, teacher


def test_adaptive_picks_planted_layer():
  rng = np.random.default_rng(0)
  plant = [4, 1, 5]  # crossing order
  student, teacher = _planted_maps(rng, plant)
  groups = layers.adaptive_match(student, teacher, teacher_layers=range(10, 16))
  assert groups == [[14], [11], [15]]


def test_adaptive_monotone_keeps_order():
  rng = np.random.default_rng(1)
  student, teacher = _planted_maps(rng, [1, 3, 4])
  assert layers.adaptive_match(student, teacher, monotone=True) == [[1], [3], [4]]
  student, teacher = _planted_maps(rng, [4, 1, 5])
  picks = [g[0] for g in layers.adaptive_match(student, teacher, monotone=True)]
  assert picks == sorted(picks) and picks != [4, 1, 5]


def test_resolve_layers_default_and_explicit():
  assert layers.resolve_layers({}, 24, 40) == layers.match_layers(24, 40)
  assert layers.resolve_layers({"strategy": "simple"}, 24, 40) == \
      layers.match_layers(24, 40, "simple")
  cfg = {"student_layers": [1, 2], "teacher_groups": [[3, 4], 5]}
  assert layers.resolve_layers(cfg, 4, 8) == ([1, 2], [[3, 4], [5]])


@pytest.mark.parametrize("cfg,match", [
    ({"student_layers": [1, 2]}, "together"),
    ({"student_layers": [1, 9], "teacher_groups": [[1], [2]]}, "outside 0..3"),
    ({"student_layers": [1, 2], "teacher_groups": [[1]]}, "one to one"),
    ({"student_layers": [1, 2], "teacher_groups": [[1], []]}, "empty"),
    ({"student_layers": [1, 2], "teacher_groups": [[1], [8]]}, "teacher_groups\\[1\\]"),
    ({"student_layers": [1, 1], "teacher_groups": [[1], [2]]}, "repeats"),
    ({"student_layers": [1.5], "teacher_groups": [[1]]}, "not an int"),
])
def test_resolve_layers_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    layers.resolve_layers(cfg, 4, 8)
