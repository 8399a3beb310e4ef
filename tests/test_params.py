"""Path rules: selection order, strictness, partition/merge round trip, stage recipes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdx import config as config_lib
from cdx.train import params as P

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


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
  return P.selected_paths(tree, P.select(tree, rules, **kw))


def test_path_str_and_tree_paths():
  t = llava_tree()
  paths = jax.tree_util.tree_leaves(P.tree_paths(t))
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


@pytest.mark.parametrize("stage,trainable,lora", [
    ("pretrain", ["adapter/fc1/bias", "adapter/fc1/kernel", "adapter/fc2/bias",
                  "adapter/fc2/kernel"], False),
    ("dpt", ["post/bias", "post/kernel"], False),
    ("dft", ["post/bias", "post/kernel"], True),
])
def test_stage_recipes_select_their_params(stage, trainable, lora):
  cfg = config_lib.load(os.path.join(CONFIGS, f"{stage}.py:paper"))
  t = llava_tree()
  assert selected(t, cfg.trainable, strict=True) == trainable
  assert cfg.lora.enabled == lora
  targets = selected(t, cfg.lora.targets, strict=True)
  assert len(targets) == 2 * 7  # q k v o gate up down per layer; never lm_head
  assert all(p.startswith("llm/layers_") and p.endswith("/kernel") for p in targets)
