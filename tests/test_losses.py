"""Tests for cdx.distill.losses against straightforward numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cdx.distill import losses

IGNORE = losses.IGNORE


# ----------------------------------------------------------------------------------------
# References, written as plain loops.

def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_lm(logits, labels):
  total, n = 0.0, 0
  for b in range(labels.shape[0]):
    for t in range(1, labels.shape[1]):
      if labels[b, t] != IGNORE:
        total -= _log_softmax(logits[b, t - 1])[labels[b, t]]
        n += 1
  return total / n


def ref_kd(s_logits, t_logits, labels, shifted=True):
  vs = s_logits.shape[-1]
  total, n = 0.0, 0
  for b in range(labels.shape[0]):
    for t in range(labels.shape[1]):
      if shifted:
        use = t + 1 < labels.shape[1] and labels[b, t + 1] != IGNORE
      else:
        use = labels[b, t] != IGNORE
      if use:
        tl = t_logits[b, t, :vs]
        if tl.shape[0] < vs:  # teacher lacks entries: they get probability 0
          tl = np.concatenate([tl, np.full(vs - tl.shape[0], -np.inf)])
        p = np.exp(_log_softmax(tl))
        total -= np.sum(p * _log_softmax(s_logits[b, t]))
        n += 1
  return total / n


def ref_attention_official(s, t):
  """docs/METHOD.md §5 steps 3-5 with explicit loops over (k, b, i, j)."""
  k_pairs, batch, n, _ = s.shape
  total = 0.0
  for k in range(k_pairs):
    for b in range(batch):
      sm, tm = s[k, b].astype(np.float64), t[k, b].astype(np.float64)
      thr_s = sm.mean() + sm.std(ddof=1)
      thr_t = tm.mean() + tm.std(ddof=1)
      s_vec, t_vec = np.zeros(n), np.zeros(n)
      for j in range(n):
        acc_s = acc_t = 0.0
        count = 0
        for i in range(n):
          keep = sm[i, j] <= thr_s and tm[i, j] <= thr_t
          if keep and tm[i, j] != 0:
            acc_s += sm[i, j]
            acc_t += tm[i, j]
            count += 1
        s_vec[j] = acc_s / max(count, 1)
        t_vec[j] = acc_t / max(count, 1)
      cos = s_vec @ t_vec / (max(np.linalg.norm(s_vec), 1e-8)
                             * max(np.linalg.norm(t_vec), 1e-8))
      total += 1 - cos
  return total / batch


def random_attention(rng, k, b, n, prefix=3, sinks=(0, 4)):
  """Head-averaged causal attention blocks [k, b, n, n] with a few sink columns.

  Rows are softmaxes over `prefix` text keys plus the causal visual keys, restricted to the
  visual columns (so rows sum to < 1, as in the real visual block).
  """
  scores = rng.normal(size=(k, b, n, prefix + n))
  for j in sinks:
    scores[..., prefix + j] += 4.0
  causal = np.tril(np.ones((n, n), bool))
  mask = np.concatenate([np.ones((n, prefix), bool), causal], axis=1)
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return probs[..., prefix:].astype(np.float32)


def random_labels(rng, b, length, p=0.5):
  labels = rng.integers(0, 20, size=(b, length))
  labels[rng.random((b, length)) < 1 - p] = IGNORE
  labels[:, 1] = 3  # at least one supervised target per row
  return labels.astype(np.int32)


# ----------------------------------------------------------------------------------------
# LM and KD.

def test_lm_matches_reference_and_sums():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 7, 20)).astype(np.float32)
  labels = random_labels(rng, 2, 7)
  np.testing.assert_allclose(losses.lm(logits, labels), ref_lm(logits, labels), rtol=1e-5)
  total, count = losses.lm_sums(logits, labels)
  assert int(count) == int((labels[:, 1:] != IGNORE).sum())
  np.testing.assert_allclose(total / count, ref_lm(logits, labels), rtol=1e-5)


def test_lm_no_supervised_tokens_is_zero():
  logits = jnp.ones((1, 4, 5))
  labels = jnp.full((1, 4), IGNORE)
  assert float(losses.lm(logits, labels)) == 0.0


@pytest.mark.parametrize("mask", ["shifted", "official"])
@pytest.mark.parametrize("vt", [20, 24, 17])
def test_kd_forward_matches_reference(mask, vt):
  rng = np.random.default_rng(1)
  s = rng.normal(size=(2, 6, 20)).astype(np.float32)
  t = rng.normal(size=(2, 6, vt)).astype(np.float32) * 2
  labels = random_labels(rng, 2, 6)
  got = losses.kd(s, t, labels, mask=mask)
  np.testing.assert_allclose(got, ref_kd(s, t, labels, shifted=mask == "shifted"),
                             rtol=1e-5)


def test_kd_official_mask_differs_from_shifted():
  # Official mask covers positions of supervised tokens, shifted the positions before them.
  labels = np.array([[IGNORE, IGNORE, 5, 6, IGNORE]], np.int32)
  np.testing.assert_array_equal(losses.kd_positions(labels, "shifted"),
                                [[False, True, True, False, False]])
  np.testing.assert_array_equal(losses.kd_positions(labels, "official"),
                                [[False, False, True, True, False]])


@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_reverse_and_jsd_zero_iff_equal(kind):
  rng = np.random.default_rng(2)
  s = rng.normal(size=(2, 5, 11)).astype(np.float32)
  labels = random_labels(rng, 2, 5)
  same = losses.kd(s, s + 3.0, labels, kind=kind)  # softmax is shift invariant
  assert abs(float(same)) < 1e-5
  diff = losses.kd(s, rng.normal(size=s.shape).astype(np.float32), labels, kind=kind)
  assert float(diff) > 1e-3


def test_reverse_kl_matches_reference():
  rng = np.random.default_rng(3)
  s = rng.normal(size=(4, 9))
  t = rng.normal(size=(4, 9))
  ls, lt = _log_softmax(s), _log_softmax(t)
  want = np.sum(np.exp(ls) * (ls - lt), -1)
  np.testing.assert_allclose(losses.token_kd(s, t, kind="reverse"), want, rtol=1e-5)


def test_jsd_matches_reference():
  rng = np.random.default_rng(4)
  s, t, beta = rng.normal(size=(3, 8)), rng.normal(size=(3, 8)), 0.3
  ps, pt = np.exp(_log_softmax(s)), np.exp(_log_softmax(t))
  m = beta * pt + (1 - beta) * ps
  want = (beta * np.sum(pt * np.log(pt / m), -1)
          + (1 - beta) * np.sum(ps * np.log(ps / m), -1))
  np.testing.assert_allclose(losses.token_kd(s, t, kind="jsd", beta=beta), want,
                             rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_kd_temperature_convention(kind):
  # Documented convention: logits / T, loss * T**2.
  rng = np.random.default_rng(5)
  s = rng.normal(size=(2, 6, 10)).astype(np.float32)
  t = rng.normal(size=(2, 6, 10)).astype(np.float32)
  labels = random_labels(rng, 2, 6)
  temp = 2.5
  got = losses.kd(s, t, labels, temperature=temp, kind=kind)
  want = temp**2 * losses.kd(s / temp, t / temp, labels, kind=kind)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert not np.isclose(float(got), float(losses.kd(s, t, labels, kind=kind)))


def test_kd_teacher_gets_no_gradient():
  rng = np.random.default_rng(6)
  s = rng.normal(size=(1, 4, 6)).astype(np.float32)
  t = rng.normal(size=(1, 4, 6)).astype(np.float32)
  labels = random_labels(rng, 1, 4)
  g = jax.grad(lambda t: losses.kd(s, t, labels))(t)
  assert float(jnp.abs(g).max()) == 0.0


def test_kd_bad_options_raise():
  x = jnp.zeros((1, 3, 4))
  labels = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="kind"):
    losses.kd(x, x, labels, kind="tvd")
  with pytest.raises(ValueError, match="mask"):
    losses.kd(x, x, labels, mask="none")
  with pytest.raises(ValueError, match="beta"):
    losses.kd(x, x, labels, kind="jsd", beta=1.0)


# ----------------------------------------------------------------------------------------
# Chunked LM head.

def _chunk_case(rng, b=2, length=13, ds=8, dt=6, vs=21, vt=25):
  hs = rng.normal(size=(b, length, ds)).astype(np.float32)
  ht = rng.normal(size=(b, length, dt)).astype(np.float32)
  ws = rng.normal(size=(ds, vs)).astype(np.float32) * 0.5
  wt = rng.normal(size=(dt, vt)).astype(np.float32) * 0.5
  labels = rng.integers(0, vs, size=(b, length)).astype(np.int32)
  labels[:, :7] = IGNORE  # a prompt, so whole chunks are unused
  labels[1, 9] = IGNORE
  return hs, ws, ht, wt, labels


def _unchunked(hs, ws, ht, wt, labels, opts):
  s_logits = jnp.einsum("bld,dv->blv", hs, ws)
  t_logits = jnp.einsum("bld,dv->blv", ht, wt)
  lm = losses.lm(s_logits, labels)
  kd = losses.kd(s_logits, t_logits, labels, opts.temperature, opts.kind, opts.beta,
                 opts.mask)
  return lm + 0.7 * kd, (lm, kd)


def _chunked(hs, ws, ht, wt, labels, opts, chunk, compact):
  sums = losses.lm_kd_chunked(hs, ws, ht, wt, labels, chunk, opts, compact=compact)
  lm = sums.lm_sum / jnp.maximum(sums.lm_count, 1)
  kd = sums.kd_sum / jnp.maximum(sums.kd_count, 1)
  return lm + 0.7 * kd, (lm, kd)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("opts", [losses.KDOptions(),
                                  losses.KDOptions(temperature=2.0, kind="jsd",
                                                   mask="official")])
def test_chunked_equals_unchunked_values_and_grads(compact, opts):
  rng = np.random.default_rng(7)
  hs, ws, ht, wt, labels = _chunk_case(rng)
  chunk = 4  # 13 is not a multiple of 4
  f_ref = jax.value_and_grad(_unchunked, argnums=(0, 1), has_aux=True)
  f_chk = jax.jit(jax.value_and_grad(_chunked, argnums=(0, 1), has_aux=True),
                  static_argnums=(5, 6, 7))
  (v_ref, (lm_ref, kd_ref)), g_ref = f_ref(hs, ws, ht, wt, labels, opts)
  (v_chk, (lm_chk, kd_chk)), g_chk = f_chk(hs, ws, ht, wt, labels, opts, chunk, compact)
  np.testing.assert_allclose(lm_chk, lm_ref, rtol=1e-5)
  np.testing.assert_allclose(kd_chk, kd_ref, rtol=1e-5)
  np.testing.assert_allclose(v_chk, v_ref, rtol=1e-5)
  for a, b in zip(g_chk, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_counts_and_no_teacher():
  rng = np.random.default_rng(8)
  hs, ws, _, _, labels = _chunk_case(rng)
  sums = losses.lm_kd_chunked(hs, ws, None, None, labels, chunk_size=5)
  assert int(sums.lm_count) == int((labels[:, 1:] != IGNORE).sum())
  assert float(sums.kd_sum) == 0.0 and int(sums.kd_count) == 0
  want = losses.lm(jnp.einsum("bld,dv->blv", hs, ws), labels)
  np.testing.assert_allclose(sums.lm_sum / sums.lm_count, want, rtol=1e-5)


def test_chunked_bf16_hidden_close_to_f32():
  rng = np.random.default_rng(9)
  hs, ws, ht, wt, labels = _chunk_case(rng)
  f32 = losses.lm_kd_chunked(hs, ws, ht, wt, labels, 4)
  bf16 = losses.lm_kd_chunked(jnp.asarray(hs, jnp.bfloat16), jnp.asarray(ws, jnp.bfloat16),
                              jnp.asarray(ht, jnp.bfloat16), jnp.asarray(wt, jnp.bfloat16),
                              labels, 4)
  assert bf16.lm_sum.dtype == jnp.float32
  np.testing.assert_allclose(bf16.lm_sum, f32.lm_sum, rtol=3e-2)
  np.testing.assert_allclose(bf16.kd_sum, f32.kd_sum, rtol=3e-2)


# ----------------------------------------------------------------------------------------
# Attention alignment.

def test_attention_official_matches_loop_reference():
  rng = np.random.default_rng(10)
  s = random_attention(rng, 3, 2, 10)
  t = random_attention(rng, 3, 2, 10, sinks=(0, 1, 6))
  got = losses.attention_alignment_loss(s, t)
  want = ref_attention_official(s, t)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # The sink filter matters: without it the loss differs.
  assert not np.isclose(float(got), float(losses.attention_alignment_loss(s, t, None,
                                                                          "cosine")))


def test_attention_official_matches_torch_transcription():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(11)
  s = random_attention(rng, 2, 3, 9)
  t = random_attention(rng, 2, 3, 9, sinks=(2,))
  ts, tt = torch.tensor(s), torch.tensor(t)
  # docs/METHOD.md §5 steps 3-5, transcribed with torch reductions.
  thr_s = ts.mean(dim=(2, 3), keepdim=True) + ts.std(dim=(2, 3), keepdim=True)
  thr_t = tt.mean(dim=(2, 3), keepdim=True) + tt.std(dim=(2, 3), keepdim=True)
  keep = (ts <= thr_s) & (tt <= thr_t)
  fs, ft = ts * keep, tt * keep
  alive = (ft != 0).float()
  count = alive.sum(dim=2).clamp(min=1)
  sv, tv = (fs * alive).sum(dim=2) / count, (ft * alive).sum(dim=2) / count
  cos = torch.nn.functional.cosine_similarity(sv.flatten(0, 1), tv.flatten(0, 1), dim=-1)
  want = ((1 - cos).sum() / s.shape[1]).item()
  np.testing.assert_allclose(losses.attention_alignment_loss(s, t), want, rtol=1e-4)


def test_attention_official_gradients():
  rng = np.random.default_rng(12)
  s = random_attention(rng, 2, 2, 6).astype(np.float64)
  t = random_attention(rng, 2, 2, 6, sinks=(1,)).astype(np.float64)
  with jax.enable_x64(True):
    f = lambda x: losses.attention_alignment_loss(x, jnp.asarray(t))
    check_grads(f, (jnp.asarray(s),), order=1, modes=("rev",), eps=1e-6)
    g = jax.grad(lambda t_: losses.attention_alignment_loss(jnp.asarray(s), t_))(
        jnp.asarray(t))
    assert float(jnp.abs(g).max()) == 0.0  # the teacher map is a constant


def test_attention_text_only_samples_contribute_nothing():
  rng = np.random.default_rng(13)
  s = random_attention(rng, 2, 3, 8)
  t = random_attention(rng, 2, 3, 8)
  s[:, 1] = np.nan  # garbage block of a text-only sample
  t[:, 1] = 123.0
  has_image = np.array([True, False, True])
  got = losses.attention_alignment_loss(s, t, has_image)
  want = losses.attention_alignment_loss(s[:, [0, 2]], t[:, [0, 2]])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  g = jax.grad(losses.attention_alignment_loss)(jnp.asarray(s), t, has_image)
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g[:, 1]).max()) == 0.0
  total, n_img = losses.attention_alignment_sums(s, t, has_image)
  assert int(n_img) == 2
  none = losses.attention_alignment_loss(s, t, np.zeros(3, bool))
  assert float(none) == 0.0


def test_attention_cosine_variant_matches_reference():
  rng = np.random.default_rng(14)
  s, t = random_attention(rng, 1, 2, 7), random_attention(rng, 1, 2, 7)
  total = 0.0
  for b in range(2):
    sv = np.array([s[0, b, j:, j].mean() for j in range(7)])
    tv = np.array([t[0, b, j:, j].mean() for j in range(7)])
    total += 1 - sv @ tv / np.linalg.norm(sv) / np.linalg.norm(tv)
  np.testing.assert_allclose(losses.attention_alignment_loss(s, t, None, "cosine"),
                             total / 2, rtol=1e-5)


@pytest.mark.parametrize("variant", ["official", "cosine", "mse", "kl"])
def test_attention_variants_zero_iff_equal(variant):
  rng = np.random.default_rng(15)
  s, t = random_attention(rng, 2, 2, 8), random_attention(rng, 2, 2, 8, sinks=(3,))
  assert abs(float(losses.attention_alignment_loss(s, s, None, variant))) < 1e-5
  assert float(losses.attention_alignment_loss(s, t, None, variant)) > 1e-7


def test_attention_bad_variant_and_shapes():
  x = jnp.zeros((1, 1, 4, 4))
  with pytest.raises(ValueError, match="variant"):
    losses.attention_alignment_loss(x, x, variant="l1")
  with pytest.raises(ValueError, match="K, B, N, N"):
    losses.attention_alignment_loss(x, x[0])


def test_teacher_group_average():
  rng = np.random.default_rng(16)
  maps = rng.random((6, 2, 4, 4)).astype(np.float32)
  got = losses.teacher_group_average(maps, [[0, 1], [1, 2, 3]])
  np.testing.assert_allclose(got[0], maps[:2].mean(0), rtol=1e-6)
  np.testing.assert_allclose(got[1], maps[1:4].mean(0), rtol=1e-6)
  # Only layers 10..13 captured, in that order.
  got = losses.teacher_group_average(maps[:4], [[11, 12]], captured_layers=[10, 11, 12, 13])
  np.testing.assert_allclose(got[0], maps[1:3].mean(0), rtol=1e-6)
  with pytest.raises(ValueError, match="not captured"):
    losses.teacher_group_average(maps[:4], [[9]], captured_layers=[10, 11, 12, 13])


def test_attention_cosine_metric():
  rng = np.random.default_rng(17)
  s, t = random_attention(rng, 3, 2, 5), random_attention(rng, 3, 2, 5)
  np.testing.assert_allclose(losses.attention_cosine(s, s), np.ones(3), rtol=1e-5)
  got = losses.attention_cosine(s, t, np.array([True, False]))
  want = [(s[k, 0].ravel() @ t[k, 0].ravel()) / np.linalg.norm(s[k, 0])
          / np.linalg.norm(t[k, 0]) for k in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("compact", [True, False])
def test_chunked_backward_never_holds_full_logits(compact):
  b, length, d, v, chunk = 1, 1024, 8, 2048, 16
  hs, w = jnp.ones((b, length, d)), jnp.ones((d, v))
  labels = jnp.full((b, length), 5, jnp.int32)

  def loss(hs, w):
    sums = losses.lm_kd_chunked(hs, w, hs, w, labels, chunk, compact=compact)
    return sums.lm_sum + sums.kd_sum

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hs, w).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("backend gives no memory analysis")
  full_logits = 2 * b * length * v * 4  # student + teacher, float32
  assert stats.temp_size_in_bytes < full_logits / 8
