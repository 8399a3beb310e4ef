"""Qwen2 decoder: HF parity (MHA/GQA, tied/untied, right padding), KV cache, remat,
full-size parameter counts, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_fixtures as F
from cdx import hf
from cdx.models import qwen


def _lm(cfg, params, ids, mask=None, cache=None, **kw):
  return qwen.Decoder(cfg, **kw).apply({"params": params}, jnp.asarray(ids), mask, cache,
                                       method=qwen.Decoder.lm)


_jit_lm = jax.jit(_lm, static_argnums=0)


def _batch(lengths, total, seed=0, vocab=F.VOCAB):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, vocab, size=(len(lengths), total)).astype(np.int32)
  mask = (np.arange(total)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return np.where(mask, ids, F.PAD), mask


@pytest.mark.parametrize("gqa,tie", [(False, False), (True, False), (False, True),
                                     (True, True)])
def test_logits_match_hf_with_right_padding(tmp_path, gqa, tie):
  model = F.save_qwen2(str(tmp_path), gqa=gqa, tie=tie)
  cfg, params = hf.load_qwen2(str(tmp_path))
  assert cfg.tie_embeddings == tie and ("lm_head" in params) == (not tie)
  assert cfg.num_kv_heads == (2 if gqa else 4)
  assert cfg.rope_theta == 500.0 and cfg.rms_norm_eps == 1e-5  # non-default values
  ids, mask = _batch([9, 5, 12], 12)
  ours, _ = _lm(cfg, params, ids, jnp.asarray(mask))
  with torch.no_grad():
    ref = model(torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
  cfg = qwen.QwenConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, mlp_dim=48, rope_theta=10000.0)
  init = jax.jit(lambda r: qwen.Decoder(cfg).init(r, jnp.zeros((1, 4), jnp.int32),
                                                  method=qwen.Decoder.init_all))
  params = init(jax.random.PRNGKey(0))["params"]
  return cfg, params


def test_kv_cached_decoding_equals_uncached_forward(tiny):
  cfg, params = tiny
  lengths, steps = np.array([6, 3]), 4
  full, _ = _batch(lengths + steps, 10, seed=1, vocab=64)  # each row: prompt then `steps` tokens
  prompt = np.where(np.arange(6)[None] < lengths[:, None], full[:, :6], F.PAD)
  ref, _ = _jit_lm(cfg, params, full, jnp.asarray((full != F.PAD).astype(np.int32)))
  assert np.isfinite(np.asarray(ref)).all()
  cache = qwen.init_cache(cfg, batch_size=2, max_len=12)
  logits, inter = _jit_lm(cfg, params, prompt,
                      jnp.asarray((np.arange(6)[None] < lengths[:, None]).astype(np.int32)),
                      cache)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(logits[b, :n], ref[b, :n], atol=1e-5)
  cache = inter["cache"]
  np.testing.assert_array_equal(cache["lengths"], lengths)
  step = jax.jit(lambda p, tok, c: _lm(cfg, p, tok, jnp.ones(tok.shape, jnp.int32), c))
  for s in range(steps):
    token = full[np.arange(2), lengths + s][:, None]
    logits, inter = step(params, token, cache)
    cache = inter["cache"]
    np.testing.assert_allclose(logits[:, 0], ref[np.arange(2), lengths + s], atol=1e-5)
  np.testing.assert_array_equal(cache["lengths"], lengths + steps)


def test_decode_loop_updates_the_cache_in_place(tiny):
  """A compiled decode loop with a donated cache holds no second copy of it: each layer
  scatters its new entries into the stacked cache (re-stacking per-layer slices, as
  before, kept a whole copy in temporaries)."""
  cfg, params = tiny
  batch, slots = 4, 256

  def loop(params, cache):
    def step(_, cache):
      ones = jnp.ones((batch, 1), jnp.int32)
      return _lm(cfg, params, ones, ones, cache)[1]["cache"]
    return jax.lax.fori_loop(0, 4, step, cache)

  cache = qwen.init_cache(cfg, batch, slots)
  memory = jax.jit(loop, donate_argnums=1).lower(params, cache).compile().memory_analysis()
  cache_bytes = cache["k"].nbytes + cache["v"].nbytes
  assert memory.alias_size_in_bytes >= cache_bytes  # the cache is donated ...
  assert memory.temp_size_in_bytes < 0.75 * cache_bytes  # ... and not copied


def test_remat_gives_same_values_and_grads(tiny):
  cfg, params = tiny
  ids, mask = _batch([7, 4], 7, vocab=64)

  def loss(p, remat):
    logits, _ = _lm(cfg, p, ids, jnp.asarray(mask), remat=remat)
    return jnp.mean(logits ** 2)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g0 = grad(params, None)
  g1 = grad(params, "nothing_saveable")
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(g0))
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32(tiny):
  cfg, params = tiny
  ids, mask = _batch([7, 4], 7, vocab=64)
  f32, _ = _lm(cfg, params, ids, jnp.asarray(mask))
  bf16, _ = _lm(cfg, params, ids, jnp.asarray(mask), dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.float32 and np.isfinite(np.asarray(bf16)).all()
  assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 0.1


def _count(cfg):
  shapes = jax.eval_shape(
      lambda r: qwen.Decoder(cfg).init(r, jnp.zeros((1, 1), jnp.int32),
                                       method=qwen.Decoder.init_all),
      jax.random.PRNGKey(0))
  return sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name,published", [
    ("qwen1.5-1.8b", 1.84e9), ("qwen1.5-4b", 3.95e9), ("qwen1.5-7b", 7.72e9),
    ("qwen2.5-0.5b", 0.494e9),
    ("qwen2.5-1.5b", 1.54e9), ("qwen2.5-3b", 3.09e9), ("qwen2.5-7b", 7.61e9)])
def test_param_counts_match_published(name, published):
  # Published totals: HF model cards / hub parameter counts of Qwen/<name>.
  assert abs(_count(qwen.get_config(name)) - published) / published < 0.005


def test_bad_configs_raise(tiny):
  cfg, params = tiny
  with pytest.raises(ValueError, match="qwen1.5-1.8b"):
    qwen.get_config("qwen9-1b")
  with pytest.raises(ValueError, match="multiple of"):
    qwen.QwenConfig(num_heads=6, num_kv_heads=4)
  ids = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="out of range"):
    _lm(cfg, params, ids, capture=qwen.Capture((5,)))
  with pytest.raises(ValueError, match="remat policy"):
    _lm(cfg, params, ids, remat="sometimes")
