"""Attention maths shared by the SigLIP encoder and the Qwen2 decoder.

Shapes (B batch, T queries, S keys, H query heads, G key/value heads, Dh head dim):
  q [B, T, H, Dh], k/v [B, S, G, Dh] (H a multiple of G: grouped-query attention),
  mask bool [B, T, S] (True = may attend).

`attend` is the ordinary path: `jax.nn.dot_product_attention` (logits and softmax in
float32 for low-precision inputs). Its implementation is picked at trace time by
`implementation(...)`: cuDNN's fused kernel on GPU for bf16/f16 inputs with a head dim it
takes (never materializes [B, H, T, S]), unless the caller asks for the exact path
(`fused=False`: layers whose attention is captured keep XLA's maths); XLA otherwise. On the
XLA path, longer than QUERY_BLOCK queries run block by block over the query axis, each
block rematerialized in the backward pass: the plain path would otherwise hold
[B, H, T, S] scores per layer, so memory would grow as L^2 (docs/PERFORMANCE.md); blocked,
it grows as L.

`visual_summary` is the attention-capture path used for VAT: only the visual query rows are
scored against all keys (exact float32 softmax under the same mask), then the visual key
columns are gathered and heads averaged -> [B, Nv, Nv] float32. Memory is O(H * Nv * S);
nothing of size [B, H, T, S] is built. `full_probs` builds that on purpose, for diagnostics
on small inputs only.
"""
import jax
import jax.numpy as jnp

# Finite "minus infinity": a fully masked row then yields a uniform softmax, never NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal_mask(key_valid: jax.Array) -> jax.Array:
  """bool [B, L] key validity (1 = real token) -> bool [B, L, L] causal+padding mask."""
  length = key_valid.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  return causal[None] & key_valid.astype(bool)[:, None, :]


# Query rows per block of `attend`: at most [B, H, QUERY_BLOCK, S] scores live at a time.
QUERY_BLOCK = 512


# cuDNN's fused attention: the dtypes and head dims it takes (else XLA's path is used).
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


def implementation(backend: str, dtype, head_dim: int, fused: bool = True) -> str:
  """"cudnn" or "xla": the `jax.nn.dot_product_attention` implementation for these inputs.

  cuDNN only on a GPU backend, only when the caller allows a fused kernel (`fused`; the
  captured layers do not), for bf16/f16 inputs and head dims that are multiples of 8 up to
  CUDNN_MAX_HEAD_DIM; everything else (CPU, TPU, float32, odd head dims) runs XLA's.
  """
  ok = (fused and backend in ("gpu", "cuda") and jnp.dtype(dtype).name in CUDNN_DTYPES
        and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)
  return "cudnn" if ok else "xla"


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, Dh] -> [B, T, G, H/G, Dh]: query heads grouped under their key head."""
  b, t, h, d = q.shape
  return q.reshape(b, t, kv_heads, h // kv_heads, d)


def _exact_forward(q, k, v, mask):
  """float32 attention, GQA without repeated K/V -> (out [B, T, H, Dh], probs, out)."""
  d = q.shape[-1]
  logits = jnp.einsum("btgrd,bsgd->bgrts", _grouped(q, k.shape[2]), k) * (1.0 / d ** 0.5)
  if mask is not None:  # [B, T, S] broadcast over the head axes, not materialized.
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1)  # [B, G, H/G, T, S]
  out = jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(q.shape)
  return out, (q, k, v, probs, out)


def _exact_backward(res, d_out):
  """The softmax backward through the output (FlashAttention's identity):
  dS = P * (dP - rowsum(dO * O)), one [T, S] product fewer than autodiff's rowsum(dP * P)."""
  q, k, v, probs, out = res
  d = q.shape[-1]
  g = k.shape[2]
  d_out_g = _grouped(d_out, g)
  d_v = jnp.einsum("bgrts,btgrd->bsgd", probs, d_out_g)
  d_probs = jnp.einsum("btgrd,bsgd->bgrts", d_out_g, v)
  delta = jnp.einsum("btgrd,btgrd->bgrt", d_out_g, _grouped(out, g))
  d_logits = probs * (d_probs - delta[..., None]) * (1.0 / d ** 0.5)
  d_q = jnp.einsum("bgrts,bsgd->btgrd", d_logits, k).reshape(q.shape)
  d_k = jnp.einsum("bgrts,btgrd->bsgd", d_logits, _grouped(q, g))
  return d_q, d_k, d_v, None


@jax.custom_vjp
def _exact(q, k, v, mask):
  return _exact_forward(q, k, v, mask)[0]


_exact.defvjp(_exact_forward, _exact_backward)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
           block: int = QUERY_BLOCK, fused: bool = True) -> jax.Array:
  """Softmax attention -> [B, T, H, Dh] in q's dtype; query-blocked when T > block on
  XLA's path; `fused=False` keeps XLA's path (`implementation`). float32 inputs on XLA's
  path run `_exact` (same maths as jax.nn.dot_product_attention's XLA path, no vmap over
  the query groups, a cheaper softmax backward: docs/PERFORMANCE.md)."""
  impl = implementation(jax.default_backend(), q.dtype, q.shape[-1], fused)

  def plain(q, mask):
    if impl == "xla" and q.dtype == jnp.float32:
      return _exact(q, k, v, mask)
    m = None if mask is None else mask[:, None, :, :]
    return jax.nn.dot_product_attention(q, k, v, mask=m, implementation=impl)

  b, t, h, d = q.shape
  if t <= block or impl == "cudnn":  # cuDNN never holds the [T, S] scores.
    return plain(q, mask)
  n = -(-t // block)
  pad = n * block - t  # Padded query rows see no key (uniform softmax) and are cut off.
  blocks = lambda x: jnp.moveaxis(
      jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(
          (b, n, block) + x.shape[2:]), 1, 0)
  xs = (blocks(q), None if mask is None else blocks(mask))
  out = jax.lax.map(jax.checkpoint(lambda x: plain(*x)), xs)  # [n, B, block, H, Dh]
  return jnp.moveaxis(out, 0, 1).reshape(b, n * block, h, d)[:, :t]


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
  """float32 softmax probabilities [B, H, T, S]; key heads repeated for GQA."""
  heads, kv_heads = q.shape[2], k.shape[2]
  k = jnp.repeat(k, heads // kv_heads, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
  logits = logits.astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
  if mask is not None:
    logits = jnp.where(mask[:, None, :, :], logits, _MASKED)
  return jax.nn.softmax(logits, axis=-1)


def full_probs(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Diagnostic per-head probabilities float32 [B, H, T, S] (small inputs only)."""
  return _scores(q, k, mask)


def visual_summary(q: jax.Array, k: jax.Array, mask: jax.Array,
                   visual_pos: jax.Array) -> jax.Array:
  """Head-averaged attention among visual tokens, float32 [B, Nv, Nv].

  visual_pos int [B, Nv] indexes both the query rows and the key columns (T == S: no
  cache). Row i / column j of the result are visual tokens i / j in sequence order.
  """
  take = jax.vmap(lambda x, p: x[p])  # per-sample gather along the sequence axis
  q_vis = take(q, visual_pos)  # [B, Nv, H, Dh]
  mask_vis = take(mask, visual_pos)  # [B, Nv, S]
  probs = _scores(q_vis, k, mask_vis)  # [B, H, Nv, S]
  probs = jax.vmap(lambda p, pos: p[..., pos])(probs, visual_pos)  # [B, H, Nv, Nv]
  return probs.mean(axis=1)


def override_visual(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    visual_pos: jax.Array, replacement: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Attention of the visual query rows with their head-averaged visual block replaced.

  replacement f32 [B, Nv, Nv]: the wanted head-averaged map of the visual queries over
  the visual keys (rows / columns in sequence order, as `visual_summary`). Per head h,
  the visual block P_h is rescaled entry-wise by replacement / mean_h(P) (so the heads'
  average becomes the replacement and each head keeps its share; entries the model
  gives no mass, e.g. masked ones, stay 0), then every row is divided by its sum over
  all keys, so the non-visual keys keep their relative weights and each row sums to 1.
  With replacement == the model's own `visual_summary`, nothing changes.
  Returns the new outputs of the visual rows [B, Nv, H, Dh] (q's dtype) and their
  probabilities f32 [B, H, Nv, S].
  """
  take = jax.vmap(lambda x, p: x[p])
  probs = _scores(take(q, visual_pos), k, take(mask, visual_pos))  # [B, H, Nv, S]
  block = jax.vmap(lambda p, pos: p[..., pos])(probs, visual_pos)  # [B, H, Nv, Nv]
  mean = block.mean(axis=1, keepdims=True)
  ratio = jnp.where(mean > 0, replacement[:, None].astype(jnp.float32) /
                    jnp.where(mean > 0, mean, 1.0), 0.0)
  probs = jax.vmap(lambda p, pos, new: p.at[..., pos].set(new))(probs, visual_pos,
                                                                 block * ratio)
  probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-30)
  vv = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2).astype(jnp.float32)
  out = jnp.einsum("bhns,bshd->bnhd", probs, vv)
  return out.astype(q.dtype), probs
