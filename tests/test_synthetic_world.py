"""Scenes and rendering of the synthetic world: placement, determinism, pixels."""
import numpy as np
import pytest

from cdx.data.synthetic import world


def _scenes(n, seed=0, **kw):
  return [world.sample_scene(np.random.default_rng([seed, i]), **kw) for i in range(n)]


def test_sampling_is_deterministic_and_seed_dependent():
  assert _scenes(20, seed=3) == _scenes(20, seed=3)
  assert _scenes(20, seed=3) != _scenes(20, seed=4)


def test_placement_is_legal():
  counts = set()
  for s in _scenes(300):
    objs = s.objects
    counts.add(len(objs))
    combos = [o.combo for o in objs]
    assert len(set(combos)) == len(combos)
    for o in objs:
      r = world.RADIUS[o.size]
      assert r <= o.x <= 1 - r and r <= o.y <= 1 - r
    for a, b in world.all_pairs(s):
      dx, dy = objs[a].x - objs[b].x, objs[a].y - objs[b].y
      assert np.hypot(dx, dy) >= world.RADIUS[objs[a].size] + world.RADIUS[objs[b].size]
      assert max(abs(dx), abs(dy)) >= world.MIN_PRIMARY_OFFSET
      # Every pair has a clear primary relation whose opposite is clearly false.
      rel = world.primary_relation(objs[a], objs[b])
      assert world.relation_holds(objs[a], rel, objs[b])
      assert not world.relation_possible(objs[a], world.OPPOSITE[rel], objs[b])
  assert counts == {1, 2, 3, 4}


def test_relations_follow_image_axes():
  a = world.Obj("circle", "red", "small", 0.2, 0.8)   # left, bottom (y grows downwards)
  b = world.Obj("square", "blue", "small", 0.7, 0.3)
  assert world.relation_holds(a, "left", b) and world.relation_holds(b, "right", a)
  assert world.relation_holds(b, "above", a) and world.relation_holds(a, "below", b)
  assert not world.relation_holds(a, "right", b) and not world.relation_holds(a, "above", b)


def test_combos_and_required():
  held = world.heldout_combos()
  assert len(held) == len(world.SHAPES)
  assert {s for _, s in held} == set(world.SHAPES)      # one per shape
  assert len({c for c, _ in held}) == len(held)          # distinct colours
  seen = world.seen_combos(held)
  for s in _scenes(100, combos=seen):
    assert not {o.combo for o in s.objects} & held
  for s in _scenes(50, required=sorted(held)):
    assert s.objects[0].combo in held
  with pytest.raises(ValueError, match="num_objects"):
    world.sample_scene(np.random.default_rng(0), num_objects=5)


@pytest.mark.parametrize("size", [32, 64, 97])
def test_render_puts_each_colour_at_its_object(size):
  scenes = _scenes(40, seed=size)
  images = world.render(scenes, size)
  assert images.shape == (40, size, size, 3) and images.dtype == np.uint8
  palette = {rgb: name for name, rgb in world.COLORS.items()}
  for img, scene in zip(images, scenes):
    for o in scene.objects:
      r, c = world.pixel_of(o, size)
      assert tuple(img[r, c]) == world.COLORS[o.color], (o, size)
    # Every painted pixel lies within the bounding circle of an object of that colour.
    ys, xs = np.nonzero((img != world.BACKGROUND).any(-1))
    for y, x in zip(ys, xs):
      name = palette[tuple(img[y, x])]
      near = [np.hypot((x + 0.5) / size - o.x, (y + 0.5) / size - o.y)
              <= world.RADIUS[o.size] + 1.0 / size
              for o in scene.objects if o.color == name]
      assert any(near), (y, x, name)


def test_render_draws_shapes_differently_and_antialias_blends():
  objs = [world.Obj(s, "red", "large", 0.5, 0.5) for s in world.SHAPES]
  masks = [(world.render([world.Scene((o,))], 64)[0] != world.BACKGROUND).any(-1)
           for o in objs]
  for i, j in zip(*np.triu_indices(len(masks), 1)):  # distinct silhouettes
    assert (masks[i] != masks[j]).sum() > 10, (world.SHAPES[i], world.SHAPES[j])
  circle = world.Scene((objs[0],))
  sharp, smooth = world.render([circle], 64)[0], world.render([circle], 64, antialias=3)[0]
  assert tuple(smooth[32, 32]) == world.COLORS["red"]
  blended = {tuple(p) for p in smooth.reshape(-1, 3)} - {world.BACKGROUND, world.COLORS["red"]}
  assert blended and not ({tuple(p) for p in sharp.reshape(-1, 3)}
                          - {world.BACKGROUND, world.COLORS["red"]})
  assert (world.render([], 64).shape == (0, 64, 64, 3))
  with pytest.raises(ValueError, match="antialias"):
    world.render([circle], 64, antialias=0)
