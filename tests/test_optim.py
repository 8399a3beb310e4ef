"""Optimizer: schedule shape, AdamW reference, decay mask, lr groups, clipping, skip-NaN,
state only for trainable leaves, gradient accumulation == one big batch."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cdx import paths as P
from cdx.train import optim as O


def tree():
  k = jax.random.split(jax.random.key(0), 4)
  return {"adapter": {"fc1": {"kernel": jax.random.normal(k[0], (3, 4)),
                              "bias": jax.random.normal(k[1], (4,))}},
          "llm": {"layers_0": {"mlp": {"up": {"kernel": jax.random.normal(k[2], (4, 4))}},
                               "input_norm": {"scale": jnp.ones((4,))}}}}


def grads_like(t, key=1):
  leaves, treedef = jax.tree_util.tree_flatten(t)
  return jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(jax.random.key(key + i), x.shape) for i, x in enumerate(leaves)])


def test_schedule_warmup_then_cosine_to_zero():
  sched = O.learning_rate_schedule({"lr": 1e-3}, total_steps=100)
  assert O.warmup_steps({"warmup_ratio": 0.03}, 100) == 3
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(1)), 1e-3 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(3)), 1e-3, rtol=1e-6)
  mid = 3 + 97 / 2
  np.testing.assert_allclose(float(sched(mid)), 0.5e-3, rtol=1e-5)
  np.testing.assert_allclose(float(sched(100)), 0.0, atol=1e-12)
  vals = [float(sched(s)) for s in range(3, 101)]
  assert all(a >= b for a, b in zip(vals, vals[1:]))
  with pytest.raises(ValueError, match="total_steps"):
    O.learning_rate_schedule({"lr": 1e-3}, 0)


def test_matches_reference_adamw_with_clipping():
  t = tree()
  tx = O.make_optimizer({"lr": 1e-2, "warmup_steps": 0, "clip_norm": 1.0}, 10, t)
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(O.lr_schedule(1e-2, 10, 0), weight_decay=0.0))
  s, rs = tx.init(t), ref.init(t)
  p, rp = t, t
  for i in range(3):
    g = jax.tree_util.tree_map(lambda x: 10 * x, grads_like(t, 10 * i))
    u, s = tx.update(g, s, p, loss=jnp.float32(1.0))
    ru, rs = ref.update(g, rs, rp)
    p, rp = optax.apply_updates(p, u), optax.apply_updates(rp, ru)
  for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(rp)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(s.skipped) == 0
  # Clipping really acts: without it the result differs.
  tx2 = O.make_optimizer({"lr": 1e-2, "warmup_steps": 0, "clip_norm": 0}, 10, t)
  # Adam's first step is scale-free, so compare after a large then a small gradient.
  big = jax.tree_util.tree_map(lambda x: 100 * x, grads_like(t))
  small = jax.tree_util.tree_map(lambda x: 0.01 * x, grads_like(t, 5))
  _, s1 = tx.update(big, tx.init(t), t)
  _, s2 = tx2.update(big, tx2.init(t), t)
  u1, _ = tx.update(small, s1, t)
  u2, _ = tx2.update(small, s2, t)
  assert not np.allclose(u1["adapter"]["fc1"]["kernel"], u2["adapter"]["fc1"]["kernel"])


def test_weight_decay_mask_skips_bias_and_norm():
  t = tree()
  zero = jax.tree_util.tree_map(jnp.zeros_like, t)
  tx = O.make_optimizer(ml_collections.ConfigDict(
      {"lr": 0.1, "warmup_steps": 0, "weight_decay": 0.5}), 10, t)
  u, _ = tx.update(zero, tx.init(t), t)
  # With zero grads only decay moves params: -lr * wd * p on kernels, 0 on bias/scale.
  np.testing.assert_allclose(u["adapter"]["fc1"]["kernel"], -0.1 * 0.5 * t["adapter"]["fc1"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_array_equal(u["adapter"]["fc1"]["bias"], 0.0)
  np.testing.assert_array_equal(u["llm"]["layers_0"]["input_norm"]["scale"], 0.0)


def test_lr_groups_scale_updates():
  t = tree()
  g = grads_like(t)
  base = O.make_optimizer({"lr": 1e-2, "warmup_steps": 0}, 10, t)
  grouped = O.make_optimizer({"lr": 1e-2, "warmup_steps": 0,
                              "lr_groups": (("adapter/.*", 0.1), ("llm/.*", 2.0))}, 10, t)
  u0, _ = base.update(g, base.init(t), t)
  u1, _ = grouped.update(g, grouped.init(t), t)
  np.testing.assert_allclose(u1["adapter"]["fc1"]["kernel"], 0.1 * u0["adapter"]["fc1"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_allclose(u1["llm"]["layers_0"]["mlp"]["up"]["kernel"],
                             2.0 * u0["llm"]["layers_0"]["mlp"]["up"]["kernel"], rtol=1e-6)


def test_state_only_for_trainable_partition():
  t = tree()
  train, frozen = P.partition(t, P.select(t, ["adapter/.*"]))
  tx = O.make_optimizer({"lr": 1e-3}, 10, train)
  state = tx.init(train)
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state))
  # mu + nu for 3*4 + 4 trainable entries, plus a handful of scalars (counts, skipped).
  assert 2 * P.count(train) <= n_state <= 2 * P.count(train) + 8
  g = jax.grad(lambda tr: sum(jnp.sum(x ** 2) for x in
                              jax.tree_util.tree_leaves(P.merge(tr, frozen))))(train)
  u, _ = tx.update(g, state, train)
  assert jax.tree_util.tree_structure(u) == jax.tree_util.tree_structure(train)


def test_skip_nonfinite_leaves_params_and_state_unchanged():
  t = tree()
  tx = O.make_optimizer({"lr": 1e-2, "warmup_steps": 0}, 10, t)
  s = tx.init(t)
  u, s = tx.update(grads_like(t), s, t, loss=jnp.float32(2.0))
  p1 = optax.apply_updates(t, u)
  step = jax.jit(lambda g, s, p, l: tx.update(g, s, p, loss=l))
  bad = grads_like(t, 7)
  bad["adapter"]["fc1"]["bias"] = bad["adapter"]["fc1"]["bias"].at[0].set(jnp.nan)
  for g, loss in [(bad, 1.0), (grads_like(t, 8), jnp.inf)]:
    u2, s2 = step(g, s, p1, jnp.float32(loss))
    p2 = optax.apply_updates(p1, u2)
    for a, b in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(p1)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(s2.inner), jax.tree_util.tree_leaves(s.inner)):
      np.testing.assert_array_equal(a, b)
    assert not bool(s2.last_finite)
    s = s2
  assert int(s.skipped) == 2
  u3, s3 = step(grads_like(t, 9), s, p1, jnp.float32(1.0))
  assert int(s3.skipped) == 2 and bool(s3.last_finite)
  assert np.abs(u3["adapter"]["fc1"]["kernel"]).max() > 0


def test_without_skip_wrapper_loss_kwarg_is_accepted():
  t = tree()
  tx = O.make_optimizer({"lr": 1e-2, "warmup_steps": 0, "skip_nonfinite": False}, 10, t)
  bad = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), t)
  u, _ = tx.update(bad, tx.init(t), t, loss=jnp.float32(1.0))
  assert np.isnan(np.asarray(u["adapter"]["fc1"]["kernel"])).all()  # nothing guards it


def test_schedule_kinds_and_repo_config_fields():
  lin = O.learning_rate_schedule({"lr": 1.0, "warmup_steps": 0, "schedule": "linear"}, 10)
  const = O.learning_rate_schedule({"lr": 1.0, "warmup_steps": 2, "schedule": "constant"}, 10)
  np.testing.assert_allclose([float(lin(s)) for s in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-6)
  np.testing.assert_allclose([float(const(s)) for s in (1, 2, 9)], [0.5, 1.0, 1.0])
  cfg = ml_collections.ConfigDict(dict(
      lr=2e-4, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0, b1=0.9, b2=0.999,
      eps=1e-8, clip_norm=1.0, skip_nonfinite=True, max_nonfinite=100))
  t = tree()
  tx = O.make_optimizer(cfg, 100, t)
  assert isinstance(tx.init(t), O.OptState)
  with pytest.raises(ValueError, match="schedule='cos'"):
    O.make_optimizer({"lr": 1.0, "schedule": "cos"}, 10, t)


def test_config_errors():
  with pytest.raises(ValueError, match="needs `lr`"):
    O.make_optimizer({}, 10, tree())
  with pytest.raises(ValueError, match="learning_rate"):
    O.make_optimizer({"lr": 1.0, "learning_rate": 2.0}, 10, tree())
  assert math.isclose(float(O.learning_rate_schedule({"lr": 2.0, "warmup_ratio": 0.5}, 4)(1)), 1.0)
