"""LoRA: PEFT init, merged == unmerged forward, grads reach only a/b, dtype handling;
the MLLM's factored LoRA (x W + ((x a) b) * s inside the decoder) == the merged weights."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cdx import paths as paths_lib
from cdx.models import mllm
from cdx.train import lora as L
from configs.common import LLM_LINEARS

RANK, ALPHA = 4, 8.0


def toy_params(key, d=8, h=16, v=5):
  """Two linear LLM layers, an embedding and an lm_head in the shared layout."""
  k = jax.random.split(key, 5)
  return {"llm": {"embed": {"embedding": jax.random.normal(k[0], (v, d))},
                  "layers_0": {"mlp": {"up": {"kernel": jax.random.normal(k[1], (d, h))},
                                       "down": {"kernel": jax.random.normal(k[2], (h, d))}},
                               "input_norm": {"scale": jnp.ones((d,))}},
                  "lm_head": {"kernel": jax.random.normal(k[3], (d, v))}},
          "adapter": {"fc1": {"kernel": jax.random.normal(k[4], (d, d))}}}


def forward(params, x):
  """Merged forward: uses whatever kernels are in `params`."""
  l0 = params["llm"]["layers_0"]["mlp"]
  hdn = jax.nn.relu(x @ l0["up"]["kernel"]) @ l0["down"]["kernel"]
  return hdn @ params["llm"]["lm_head"]["kernel"]


def forward_unmerged(params, lora, x):
  """LoRA as side branches: x W + (x a) b * alpha/r — what PEFT computes."""
  s = ALPHA / RANK
  l0, f0 = params["llm"]["layers_0"]["mlp"], lora["llm"]["layers_0"]["mlp"]
  side = lambda y, n: y @ l0[n]["kernel"] + (y @ f0[n]["kernel"]["a"]) @ f0[n]["kernel"]["b"] * s
  hdn = side(jax.nn.relu(side(x, "up")), "down")
  return hdn @ params["llm"]["lm_head"]["kernel"]


def randomize_b(lora, key):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
  new = [jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
         if paths_lib.path_str(kp).endswith("/b") else x for i, (kp, x) in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)


def test_default_targets_and_init():
  params = toy_params(jax.random.key(0))
  lora = L.init_lora(params, LLM_LINEARS, RANK, ALPHA, jax.random.key(1))
  paths = sorted(paths_lib.leaf_paths(lora))
  assert paths == ["llm/layers_0/mlp/down/kernel/a", "llm/layers_0/mlp/down/kernel/b",
                   "llm/layers_0/mlp/up/kernel/a", "llm/layers_0/mlp/up/kernel/b"]
  up = lora["llm"]["layers_0"]["mlp"]["up"]["kernel"]
  assert up["a"].shape == (8, RANK) and up["b"].shape == (RANK, 16)
  assert up["a"].dtype == jnp.float32
  np.testing.assert_array_equal(up["b"], 0.0)
  bound = 1 / np.sqrt(8)
  assert np.abs(up["a"]).max() <= bound and np.abs(up["a"]).max() > 0.5 * bound
  assert np.std(np.asarray(up["a"])) > 0.3 * bound  # not degenerate
  # Initial effective weights equal the base exactly.
  applied = L.apply_lora(params, lora, ALPHA, RANK)
  for a, b in zip(jax.tree_util.tree_leaves(applied), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_merged_equals_unmerged_forward():
  params = toy_params(jax.random.key(0))
  lora = L.init_lora(params, LLM_LINEARS, RANK, ALPHA, jax.random.key(1))
  lora = randomize_b(lora, jax.random.key(2))
  x = jax.random.normal(jax.random.key(3), (3, 8))
  merged = L.merge_lora(params, lora, ALPHA, RANK)
  np.testing.assert_allclose(forward(merged, x), forward_unmerged(params, lora, x),
                             rtol=1e-5, atol=1e-4)
  assert not np.allclose(forward(merged, x), forward(params, x), atol=1e-2)
  # The caller's tree is untouched.
  assert params["llm"]["layers_0"]["mlp"]["up"]["kernel"] is not \
      merged["llm"]["layers_0"]["mlp"]["up"]["kernel"]


def test_gradient_only_into_factors_and_base_unchanged():
  params = toy_params(jax.random.key(0))
  lora = L.init_lora(params, LLM_LINEARS, RANK, ALPHA, jax.random.key(1))
  x = jax.random.normal(jax.random.key(3), (4, 8))
  y = jax.random.normal(jax.random.key(4), (4, 5))
  base = jax.tree_util.tree_map(np.asarray, params)

  def loss(lo, p):
    return jnp.mean((forward(L.apply_lora(p, lo, ALPHA, RANK), x) - y) ** 2)

  g = jax.grad(loss)(lora, params)
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(lora)
  gup = g["llm"]["layers_0"]["mlp"]["up"]["kernel"]
  assert np.abs(gup["b"]).max() > 0  # b gets gradient at init
  np.testing.assert_array_equal(gup["a"], 0.0)  # a does not while b == 0 (PEFT behaviour)

  tx = optax.adam(1e-2)
  state = tx.init(lora)

  @jax.jit
  def step(lo, st):
    l, gr = jax.value_and_grad(loss)(lo, params)
    up, st = tx.update(gr, st, lo)
    return optax.apply_updates(lo, up), st, l

  losses = []
  for _ in range(5):
    lora, state, l = step(lora, state)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  assert np.abs(lora["llm"]["layers_0"]["mlp"]["up"]["kernel"]["a"]
                - L.init_lora(params, LLM_LINEARS, RANK, ALPHA,
                              jax.random.key(1))["llm"]["layers_0"]["mlp"]["up"]["kernel"]["a"]
                ).max() > 0
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(base)):
    np.testing.assert_array_equal(a, b)


def test_bf16_kernel_computed_in_f32_then_cast():
  w = jnp.full((4, 4), 1.0, jnp.bfloat16)
  params = {"llm": {"layers_0": {"attn": {"q": {"kernel": w}}}}}
  lora = {"llm": {"layers_0": {"attn": {"q": {"kernel": {
      "a": jnp.full((4, 2), 0.1, jnp.float32), "b": jnp.full((2, 4), 0.1, jnp.float32)}}}}}}
  out = L.apply_lora(params, lora, alpha=4.0, rank=2)["llm"]["layers_0"]["attn"]["q"]["kernel"]
  assert out.dtype == jnp.bfloat16
  expected = 1.0 + 2 * 0.01 * 2.0  # W + (a@b) * alpha/rank, rounded once to bf16
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(jnp.asarray(expected, jnp.bfloat16), np.float32))


def test_errors():
  params = toy_params(jax.random.key(0))
  with pytest.raises(ValueError, match="only linear kernels"):
    L.init_lora(params, ["llm/.*/scale"], RANK, ALPHA, jax.random.key(1))
  with pytest.raises(ValueError, match="matches no parameter"):
    L.init_lora(params, ["llm/layers_9/.*"], RANK, ALPHA, jax.random.key(1))
  bad = {"llm": {"layers_0": {"mlp": {"up": {"kernel": {
      "a": jnp.zeros((3, RANK)), "b": jnp.zeros((RANK, 16))}}}}}}
  with pytest.raises(ValueError, match="do not fit"):
    L.apply_lora(params, bad, ALPHA, RANK)
  with pytest.raises(ValueError, match="not in the param tree"):
    L.apply_lora(params, {"llm": {"nope": {"kernel": {"a": 0, "b": 0}}}}, ALPHA, RANK)


# A tiny MLLM (untied head, remat on: the "lora" collection must pass through nn.remat).
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
              mlp_dim=64)  # Nv = 15
TEXT = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8, mlp_dim=64, rope_theta=1e4, tie_embeddings=False)


def tiny_mllm(targets=LLM_LINEARS):
  cfg = mllm.make_config(VISION, TEXT, image_token_id=3, remat="nothing_saveable")
  params = mllm.init_params(cfg, jax.random.key(0))
  lora = randomize_b(L.init_lora(params, targets, RANK, ALPHA, jax.random.key(1)),
                     jax.random.key(2))
  lora = jax.tree.map(lambda x: 0.3 * x, lora)  # A sizeable but not dominant update.
  ids = jnp.array([[5, 6, 7] + [3] * 15 + [9, 10, 11, 12, 0, 0],
                   [8] * 20 + [13, 14, 0, 0]], jnp.int32)
  mask = (ids != 0).astype(jnp.int32)
  pixels = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  return cfg, params, lora, (ids, pixels, mask)


@pytest.mark.slow
def test_factored_forward_and_grads_equal_merged():
  # Every linear kind of layer 0, two of layer 1: the rest of layer 1 must stay plain.
  targets = [r"llm/layers_0/.*/kernel", r"llm/layers_1/(attn/v|mlp/down)/kernel"]
  cfg, params, lora, (ids, pixels, mask) = tiny_mllm(targets)
  target = jax.random.normal(jax.random.key(4), ids.shape + (TEXT["vocab_size"],))

  def loss_and_grads(factored):
    def loss(lo):
      if factored:
        out = mllm.forward(cfg, params, ids, pixels, mask,
                           lora=mllm.Lora(lo, ALPHA / RANK))[0]
      else:
        out = mllm.forward(cfg, L.merge_lora(params, lo, ALPHA, RANK), ids, pixels, mask)[0]
      return jnp.mean((out - target) ** 2), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (_, out_f), grads_f = loss_and_grads(True)(lora)
  merged = loss_and_grads(False)
  (_, out_m), grads_m = merged(lora)
  np.testing.assert_allclose(out_f, out_m, rtol=1e-5, atol=1e-5)
  (_, base), _ = merged(jax.tree.map(jnp.zeros_like, lora))  # b = 0: the base model.
  assert np.abs(out_f - base).max() > 1e-2  # The factors matter.
  # Gradients into a and b agree too (merged: through W + a b; factored: through x a b).
  for gm, gf in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads_f)):
    assert np.abs(gm).max() > 0
    np.testing.assert_allclose(gf, gm, rtol=1e-4, atol=1e-6)


def test_factored_lora_rejects_what_the_decoder_cannot_apply():
  cfg, params, lora, (ids, pixels, mask) = tiny_mllm()
  run = lambda lo: mllm.forward(cfg, params, ids, pixels, mask, lora=mllm.Lora(lo, 2.0))
  for targets in (["llm/lm_head/kernel"], ["adapter/fc1/kernel"]):
    bad = L.init_lora(params, targets, RANK, ALPHA, jax.random.key(1))
    with pytest.raises(ValueError, match="cannot be applied factored"):
      run(bad)
  q = lora["llm"]["layers_0"]["attn"]["q"]["kernel"]
  q["a"] = q["a"][:-1]
  with pytest.raises(ValueError, match="layers_0/attn/q.*do not fit"):
    run(lora)
