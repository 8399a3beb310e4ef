"""Path rules (cdx/paths.py): selection order, strictness, partition/merge round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdx import paths as P


def llava_tree(d=4, v=6, n_layers=2):
  """A hand-made param tree with the docs/ARCHITECTURE.md layout (tiny shapes)."""
  lin = lambda i, o, bias=True: ({"kernel": jnp.ones((i, o)), "bias": jnp.zeros((o,))}
                                 if bias else {"kernel": jnp.ones((i, o))})
  layer = {"input_norm": {"scale": jnp.ones((d,))},
           "attn": {"q": lin(d, d), "k": lin(d, d), "v": lin(d, d), "o": lin(d, d, False)},
           "post_norm": {"scale": jnp.ones((d,))},
           "mlp": {"gate": lin(d, 2 * d, False), "up": lin(d, 2 * d, False),
                   "down": lin(2 * d, d, False)}}
  llm = {f"layers_{i}": layer for i in range(n_layers)}
  llm.update(embed={"embedding": jnp.ones((v, d))}, final_norm={"scale": jnp.ones((d,))},
             lm_head={"kernel": jnp.ones((d, v))})
  return {"vision": {"patch": {"kernel": jnp.ones((3, d))}},
          "adapter": {"fc1": lin(3, d), "fc2": lin(d, d)},
          "post": lin(d, d), "llm": llm}


def selected(tree, rules, **kw):
  """Sorted paths the rules select."""
  mask = P.select(tree, rules, **kw)
  return sorted(p for p, m in zip(P.leaf_paths(tree), jax.tree_util.tree_leaves(mask)) if m)


def test_path_str_and_tree_paths():
  t = llava_tree()
  paths = jax.tree_util.tree_leaves(P.tree_paths(t))
  assert P.leaf_paths(t) == paths
  assert "llm/layers_1/attn/q/kernel" in paths
  assert "adapter/fc2/bias" in paths
  assert len(paths) == len(jax.tree_util.tree_leaves(t))


def test_select_first_rule_wins_and_negation():
  t = llava_tree()
  got = selected(t, ["!llm/.*norm.*", ("llm/lm_head/.*", False), "llm/.*"])
  assert "llm/layers_0/attn/q/kernel" in got
  assert "llm/embed/embedding" in got
  assert not any("norm" in p or "lm_head" in p for p in got)
  # Same rules in another order: the catch-all now wins for norms.
  got2 = selected(t, ["llm/.*", "!llm/.*norm.*"])
  assert "llm/final_norm/scale" in got2


def test_select_fullmatch_not_search():
  t = llava_tree()
  assert selected(t, ["fc1/kernel"]) == []
  assert selected(t, [".*fc1/kernel"]) == ["adapter/fc1/kernel"]


def test_strict_rejects_pattern_matching_nothing():
  t = llava_tree()
  with pytest.raises(ValueError, match="adaptor"):
    P.select(t, ["adaptor/.*"], strict=True)
  assert selected(t, ["adaptor/.*"]) == []


def test_bad_rule_is_a_clear_error():
  with pytest.raises(ValueError, match="does not compile"):
    P.select(llava_tree(), ["llm/(("])
  with pytest.raises(ValueError, match="neither"):
    P.select(llava_tree(), [("llm/.*", "yes")])


def test_partition_merge_round_trip_and_grad_only_on_trainable():
  t = jax.tree_util.tree_map(lambda x: x + 0.5, llava_tree())
  mask = P.select(t, ["post/.*"])
  train, frozen = P.partition(t, mask)
  assert P.count(train) == 4 * 4 + 4
  assert P.count(train) + P.count(frozen) == P.count(t)
  merged = P.merge(train, frozen)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(t)
  for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(t)):
    np.testing.assert_array_equal(a, b)

  def loss(tr):
    p = P.merge(tr, frozen)
    return sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(p))

  grads = jax.grad(loss)(train)
  assert sorted(P.tree_paths(grads)["post"].values()) == ["post/bias", "post/kernel"]
  assert len(jax.tree_util.tree_leaves(grads)) == 2


def test_is_stacked_and_first_match():
  assert P.is_stacked("llm/layers/attn/q/kernel") and P.is_stacked("layers/mlp/up/kernel")
  assert not P.is_stacked("llm/layers_0/attn/q/kernel")
  assert not P.is_stacked("llm/final_norm/scale")
  rules = ((r"llm/.*", 2.0), (r".*/kernel", 3.0))
  assert P.first_match("llm/lm_head/kernel", rules) == (0, 2.0)
  assert P.first_match("adapter/fc1/kernel", rules) == (1, 3.0)
  assert P.first_match("adapter/fc1/bias", rules) is None
