"""CompoDistill losses: next-token LM, logit KD and visual-attention alignment (VAT).

All losses are computed in float32 whatever the input dtype. Shapes:

  logits           float [B, L, V]   position t predicts labels[t + 1]
  labels           int   [B, L]      HF convention: token at t, IGNORE (-100) = unsupervised
  hidden states    float [B, L, D]   (chunked path; may be bfloat16)
  attention blocks float [K, B, N, N] head-averaged attention of the N visual query rows over
                                     the N visual key columns, one map per matched layer pair

Every mean has a `*_sums` twin returning (sum, count) so that the chunked LM head, gradient
accumulation and data parallelism can combine partial results exactly: mean = sum / count.

KD temperature convention: both logits are divided by T and the per-token loss is multiplied
by T**2 (Hinton et al.), so gradient magnitudes do not shrink as T grows. T = 1 (the paper's
setting, docs/METHOD.md §5) leaves the loss untouched. The teacher's logits never carry gradient.
"""
import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100
# Logit given to student-vocab entries the teacher lacks: exp() underflows to exactly 0
# while staying finite, so no inf - inf = nan appears in the KL terms.
_PAD_LOGIT = -1e9
_COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity default
_KL_EPS = 1e-8

KD_KINDS = ("forward", "reverse", "jsd")
KD_MASKS = ("shifted", "official")
ATTN_VARIANTS = ("official", "cosine", "mse", "kl")


# ----------------------------------------------------------------------------------------
# Positions.

def next_token_targets(labels: jax.Array) -> jax.Array:
  """int [B, L] -> int [B, L]: targets[t] = labels[t + 1]; the last position is IGNORE."""
  pad = jnp.full_like(labels[:, :1], IGNORE)
  return jnp.concatenate([labels[:, 1:], pad], axis=1)


def kd_positions(labels: jax.Array, mask: str = "shifted") -> jax.Array:
  """bool [B, L]: the logit positions the KD loss uses.

  "shifted": the positions L_lm uses (those predicting a supervised token).
  "official": the official code's unshifted mask (docs/METHOD.md §8): positions holding a supervised
    token, i.e. the prediction after each answer token; the first answer token is missed.
  """
  if mask == "shifted":
    return next_token_targets(labels) != IGNORE
  if mask == "official":
    return labels != IGNORE
  raise ValueError(f"kd mask={mask!r} is not one of {KD_MASKS}.")


def _safe_div(total: jax.Array, count: jax.Array) -> jax.Array:
  return total / jnp.maximum(count, 1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# Per-token losses: [..., V] -> [...], float32.

def token_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy of logits [..., V] against int targets [...]; 0 where target is IGNORE."""
  logits = logits.astype(jnp.float32)
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - picked
  return jnp.where(valid, ce, 0.0)


def match_vocab(teacher_logits: jax.Array, vocab_size: int) -> jax.Array:
  """Cuts (or pads with a huge negative logit) the teacher's last axis to `vocab_size`.

  Qwen checkpoints pad their vocabularies differently (151936 vs 152064); the extra rows are
  never real tokens, so cutting them changes the teacher's distribution only negligibly.
  """
  vt = teacher_logits.shape[-1]
  if vt >= vocab_size:
    return teacher_logits[..., :vocab_size]
  pad = [(0, 0)] * (teacher_logits.ndim - 1) + [(0, vocab_size - vt)]
  return jnp.pad(teacher_logits, pad, constant_values=_PAD_LOGIT)


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis from log-probabilities; 0 * log 0 terms count as 0."""
  p = jnp.exp(logp)
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def token_kd(student_logits: jax.Array, teacher_logits: jax.Array,
             temperature: float = 1.0, kind: str = "forward",
             beta: float = 0.5) -> jax.Array:
  """Per-position distillation loss [..., V] x [..., Vt] -> [...] float32.

  "forward": -sum_v p_t log p_s (forward KL up to the teacher's entropy; docs/METHOD.md §5).
  "reverse": KL(p_s || p_t).
  "jsd":     beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s.
  Logits are divided by `temperature` and the result multiplied by temperature**2.
  """
  if kind not in KD_KINDS:
    raise ValueError(f"kd kind={kind!r} is not one of {KD_KINDS}.")
  if not temperature > 0:
    raise ValueError(f"kd temperature={temperature} must be > 0.")
  if kind == "jsd" and not 0.0 < beta < 1.0:
    raise ValueError(f"kd beta={beta} must lie strictly between 0 and 1 for jsd; use "
                     "kind='forward' or 'reverse' for the end points.")
  s = student_logits.astype(jnp.float32) / temperature
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  t = match_vocab(t, s.shape[-1]) / temperature
  log_ps = jax.nn.log_softmax(s, axis=-1)
  log_pt = jax.nn.log_softmax(t, axis=-1)
  if kind == "forward":
    loss = -jnp.sum(jnp.exp(log_pt) * log_ps, axis=-1)
  elif kind == "reverse":
    loss = _kl(log_ps, log_pt)
  else:
    log_m = jnp.logaddexp(np.log(beta) + log_pt, np.log1p(-beta) + log_ps)
    loss = beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)
  return loss * temperature**2


# ----------------------------------------------------------------------------------------
# Sequence losses on full logits.

def lm_sums(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token CE over supervised tokens, number of them); logits [B, L, V]."""
  targets = next_token_targets(labels)
  return token_ce(logits, targets).sum(), (targets != IGNORE).sum()


def lm(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Next-token cross-entropy, mean over supervised tokens (0 when there are none)."""
  return _safe_div(*lm_sums(logits, labels))


def kd_sums(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
            temperature: float = 1.0, kind: str = "forward", beta: float = 0.5,
            mask: str = "shifted") -> tuple[jax.Array, jax.Array]:
  """(sum of per-position KD over the `mask` positions, number of them)."""
  use = kd_positions(labels, mask)
  per_pos = token_kd(student_logits, teacher_logits, temperature, kind, beta)
  return jnp.where(use, per_pos, 0.0).sum(), use.sum()


def kd(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
       temperature: float = 1.0, kind: str = "forward", beta: float = 0.5,
       mask: str = "shifted") -> jax.Array:
  """Logit KD [B, L, Vs] x [B, L, Vt] -> scalar, mean over the `mask` positions."""
  return _safe_div(*kd_sums(student_logits, teacher_logits, labels, temperature, kind,
                            beta, mask))


# ----------------------------------------------------------------------------------------
# Chunked LM head: LM + KD without a [B, L, V] tensor.

@dataclasses.dataclass(frozen=True)
class KDOptions:
  """Static KD settings (hashable, so usable under jit)."""
  temperature: float = 1.0
  kind: str = "forward"
  beta: float = 0.5
  mask: str = "shifted"


class LossSums(NamedTuple):
  """Partial sums of the token losses; the loss is sum / max(count, 1)."""
  lm_sum: jax.Array
  lm_count: jax.Array
  kd_sum: jax.Array
  kd_count: jax.Array


def _to_chunks(x: jax.Array, n_chunks: int, chunk: int) -> jax.Array:
  """[B, L, ...] -> [n_chunks, B, chunk, ...], padding L with zeros at the end."""
  pad = n_chunks * chunk - x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((x.shape[0], n_chunks, chunk) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _compact(order: jax.Array, x: jax.Array) -> jax.Array:
  """Reorders the sequence axis of x [B, L, ...] by order [B, L]."""
  idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


HEAD_LAYOUTS = ("dv", "vd")  # LM head as a kernel [D, V], or as a (tied) table [V, D]


def _project(h: jax.Array, head: jax.Array, layout: str) -> jax.Array:
  """[B, C, D] x head ([D, V] or [V, D], see HEAD_LAYOUTS) -> float32 logits [B, C, V].

  Contracting a [V, D] table directly avoids a transposed copy of it (1.16 GiB f32 for
  the paper's tied-size [151936, 2048] table, kept for the whole step)."""
  return jnp.einsum(f"bcd,{layout}->bcv", h, head, preferred_element_type=jnp.float32)


def _logit_sums(opts: KDOptions, t_layout: str, x: dict, s_logits: jax.Array,
                t_head: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(LM sum, KD sum) of one chunk from its student logits; the teacher's are made here."""
  lm_sum = token_ce(s_logits, x["tgt"]).sum()
  kd_sum = jnp.zeros((), jnp.float32)
  if t_head is not None:
    per_pos = token_kd(s_logits, _project(x["ht"], t_head, t_layout), opts.temperature,
                       opts.kind, opts.beta)
    kd_sum = jnp.where(x["kd"], per_pos, 0.0).sum()
  return lm_sum, kd_sum


def _chunk_used(x: dict) -> jax.Array:
  return jnp.any(x["tgt"] != IGNORE) | jnp.any(x["kd"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunk_loss(opts: KDOptions, compact: bool, layouts: tuple[str, str], x: dict,
                s_head: jax.Array,
                t_head: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(LM sum, KD sum) of one chunk x = {"hs" [B, C, Ds], "tgt", "kd" [B, C], "ht"?}.

  `layouts` = (student, teacher) head layouts (HEAD_LAYOUTS).
  With `compact`, a chunk with no used position is skipped (lax.cond). A custom VJP, not
  jax.checkpoint: its residuals are exactly (x, s_head, t_head), so the backward pass
  recomputes this chunk's logits and holds nothing of the head's size. (Differentiating a
  cond inside a checkpoint made XLA keep a copy of the student head, and a zero-filled
  twin for the skip branch, as cond residuals: 1.16 GiB f32 at the paper's [2048, 151936]
  head; docs/PERFORMANCE.md §1.)
  """
  def run(x, s_head, t_head):
    return _logit_sums(opts, layouts[1], x, _project(x["hs"], s_head, layouts[0]), t_head)

  def skip(x, s_head, t_head):
    del x, s_head, t_head
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)

  if not compact:
    return run(x, s_head, t_head)
  return jax.lax.cond(_chunk_used(x), run, skip, x, s_head, t_head)


def _chunk_loss_fwd(opts, compact, layouts, x, s_head, t_head):
  return _chunk_loss(opts, compact, layouts, x, s_head, t_head), (x, s_head, t_head)


def _chunk_loss_bwd(opts, compact, layouts, res, g):
  """Cotangents of (x, s_head, t_head); only x["hs"] and s_head get nonzero ones (the
  teacher's logits carry no gradient, docs/METHOD.md §5)."""
  x, s_head, t_head = res

  def grads(x, s_head, t_head, g):
    s_logits = _project(x["hs"], s_head, layouts[0])
    _, vjp = jax.vjp(lambda l: _logit_sums(opts, layouts[1], x, l, t_head), s_logits)
    (d_logits,) = vjp(g)
    d_hs = jnp.einsum(f"bcv,{layouts[0]}->bcd", d_logits, s_head,
                      preferred_element_type=jnp.float32)
    return d_hs.astype(x["hs"].dtype), d_logits

  def skip(x, s_head, t_head, g):
    del t_head, g
    return (jnp.zeros_like(x["hs"]),
            jnp.zeros(x["hs"].shape[:2] + (s_head.shape[layouts[0].index("v")],),
                      jnp.float32))

  if compact:
    d_hs, d_logits = jax.lax.cond(_chunk_used(x), grads, skip, x, s_head, t_head, g)
  else:
    d_hs, d_logits = grads(x, s_head, t_head, g)
  # Outside the cond: when the head is frozen nothing uses d_head and XLA drops this dot.
  d_head = jnp.einsum(f"bcd,bcv->{layouts[0]}", x["hs"], d_logits,
                      preferred_element_type=jnp.float32)
  d_x = {k: (d_hs if k == "hs" else None) for k in x}
  return d_x, d_head.astype(s_head.dtype), None


_chunk_loss.defvjp(_chunk_loss_fwd, _chunk_loss_bwd)


def lm_kd_chunked(student_hidden: jax.Array, student_head: jax.Array,
                  teacher_hidden: Optional[jax.Array], teacher_head: Optional[jax.Array],
                  labels: jax.Array, chunk_size: int,
                  kd_options: Optional[KDOptions] = None, compact: bool = True,
                  head_layouts: tuple[str, str] = ("dv", "dv")) -> LossSums:
  """LM (and KD) sums from final hidden states, chunk by chunk over the sequence.

  student_hidden [B, L, Ds] @ student_head [Ds, Vs]; teacher_hidden [B, L, Dt] @
  teacher_head [Dt, Vt] (both None: no KD, kd sums are 0). `head_layouts` = (student,
  teacher): "dv" for a kernel [D, V] as above, "vd" for a table [V, D] (a tied embedding,
  contracted as is: no transposed copy). The projection accumulates in
  float32 and each chunk's logits are recomputed in the backward pass (a custom VJP whose
  residuals are the chunk's hidden states and the heads), so memory holds at most
  [B, chunk_size, V] logits at a time and nothing of a head's size. With `compact`, each row's used positions
  are first moved to the front (a stable gather), and chunks with no used position are
  skipped with lax.cond: the cost follows the number of supervised tokens, not L.
  Equal to `lm_sums` + `kd_sums` on the full logits.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
  has_teacher = teacher_hidden is not None
  if has_teacher != (teacher_head is not None):
    raise ValueError("teacher_hidden and teacher_head must be given together (or neither).")
  opts = kd_options or KDOptions()
  bad = [l for l in head_layouts if l not in HEAD_LAYOUTS]
  if len(head_layouts) != 2 or bad:
    raise ValueError(f"head_layouts={head_layouts!r}: give (student, teacher), each one of "
                     f"{HEAD_LAYOUTS}.")
  targets = next_token_targets(labels)
  kd_use = kd_positions(labels, opts.mask) if has_teacher else jnp.zeros_like(labels, bool)
  if has_teacher and teacher_hidden.shape[:2] != student_hidden.shape[:2]:
    raise ValueError(f"teacher_hidden {teacher_hidden.shape} and student_hidden "
                     f"{student_hidden.shape} must share [B, L].")

  if compact:
    used = (targets != IGNORE) | kd_use
    order = jnp.argsort(jnp.logical_not(used).astype(jnp.int32), axis=1, stable=True)
    student_hidden = _compact(order, student_hidden)
    targets, kd_use = _compact(order, targets), _compact(order, kd_use)
    if has_teacher:
      teacher_hidden = _compact(order, teacher_hidden)

  n_chunks = -(-labels.shape[1] // chunk_size)
  # Padded tail positions carry target IGNORE and kd_use False: they add nothing.
  targets = jnp.pad(targets, [(0, 0), (0, n_chunks * chunk_size - labels.shape[1])],
                    constant_values=IGNORE)
  xs = {"hs": _to_chunks(student_hidden, n_chunks, chunk_size),
        "tgt": jnp.moveaxis(targets.reshape(-1, n_chunks, chunk_size), 1, 0),
        "kd": _to_chunks(kd_use, n_chunks, chunk_size)}
  if has_teacher:
    xs["ht"] = _to_chunks(teacher_hidden, n_chunks, chunk_size)

  step = functools.partial(_chunk_loss, opts, compact, tuple(head_layouts))

  def body(carry, x):
    sums = step(x, student_head, teacher_head)
    return (carry[0] + sums[0], carry[1] + sums[1]), None

  zero = jnp.zeros((), jnp.float32)
  (lm_sum, kd_sum), _ = jax.lax.scan(body, (zero, zero), xs)
  return LossSums(lm_sum, (targets != IGNORE).sum(), kd_sum, kd_use.sum())


# ----------------------------------------------------------------------------------------
# Visual attention alignment (VAT).

def teacher_group_average(teacher_attn: jax.Array, groups: Sequence[Sequence[int]],
                          captured_layers: Optional[Sequence[int]] = None) -> jax.Array:
  """[Lt, B, N, N] teacher maps -> [K, B, N, N], the mean over each group's layers.

  `groups` holds decoder-layer indices. Axis 0 of `teacher_attn` is layer `captured_layers[i]`
  (default: axis 0 is the layer index itself, i.e. all layers were captured).
  """
  layers = list(range(teacher_attn.shape[0])) if captured_layers is None \
      else list(captured_layers)
  if len(layers) != teacher_attn.shape[0]:
    raise ValueError(f"captured_layers has {len(layers)} entries but teacher_attn has "
                     f"{teacher_attn.shape[0]} maps.")
  weights = np.zeros((len(groups), len(layers)), np.float32)
  for k, group in enumerate(groups):
    if not group:
      raise ValueError(f"teacher group {k} is empty.")
    for layer in group:
      if layer not in layers:
        raise ValueError(f"teacher group {k} uses layer {layer}, which was not captured "
                         f"(captured: {layers}).")
      weights[k, layers.index(layer)] += 1.0 / len(group)
  return jnp.einsum("kl,lbij->kbij", weights, teacher_attn.astype(jnp.float32))


def _cosine(x: jax.Array, y: jax.Array) -> jax.Array:
  """Cosine over the last axis, each norm floored at eps (torch semantics), nan-free grads."""
  def unit(v):
    return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), _COS_EPS**2))
  return jnp.sum(unit(x) * unit(y), axis=-1)


def _sink_filtered_profiles(s: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """docs/METHOD.md §5 steps 3-4: [..., N, N] maps -> [..., N] column profiles of the filtered maps.

  keep = (S <= mu_S + sd_S) & (T <= mu_T + sd_T), mu and sd (unbiased) over the whole block
  including the causal zeros. An entry (i, j) survives if its filtered teacher value
  T[i, j] * keep[i, j] is nonzero; column j is the mean of its surviving entries over the
  query rows i (count floored at 1).
  """
  def threshold(x):
    x = jax.lax.stop_gradient(x)
    return (jnp.mean(x, axis=(-2, -1), keepdims=True)
            + jnp.std(x, axis=(-2, -1), keepdims=True, ddof=1))
  keep = (s <= threshold(s)) & (t <= threshold(t))
  valid = jax.lax.stop_gradient(keep & (t != 0))
  count = jnp.maximum(valid.sum(axis=-2), 1).astype(jnp.float32)
  s_vec = jnp.where(valid, s, 0.0).sum(axis=-2) / count
  t_vec = jnp.where(valid, t, 0.0).sum(axis=-2) / count
  return s_vec, t_vec


def _causal_profiles(s: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """No sink filter: column j is the mean over the causal query rows i >= j."""
  n = s.shape[-1]
  causal = np.tril(np.ones((n, n), bool))
  count = causal.sum(axis=0).astype(np.float32)
  return (jnp.where(causal, s, 0.0).sum(-2) / count,
          jnp.where(causal, t, 0.0).sum(-2) / count)


def _pair_losses(s: jax.Array, t: jax.Array, variant: str) -> jax.Array:
  """[K, B, N, N] x 2 -> [K, B] loss per (layer pair, sample)."""
  if variant == "cosine":
    s_vec, t_vec = _causal_profiles(s, t)
    return 1.0 - _cosine(s_vec, t_vec)
  s_vec, t_vec = _sink_filtered_profiles(s, t)
  if variant == "official":
    return 1.0 - _cosine(s_vec, t_vec)
  if variant == "mse":
    return jnp.mean(jnp.square(s_vec - t_vec), axis=-1)
  # "kl": KL(teacher || student) between the profiles normalized to distributions over keys.
  def normalize(v):
    return v / jnp.maximum(v.sum(-1, keepdims=True), _KL_EPS)
  p, q = normalize(t_vec), normalize(s_vec)
  return jnp.sum(p * (jnp.log(p + _KL_EPS) - jnp.log(q + _KL_EPS)), axis=-1)


def attention_alignment_sums(student_attn: jax.Array, teacher_attn: jax.Array,
                             has_image: Optional[jax.Array] = None,
                             variant: str = "official") -> tuple[jax.Array, jax.Array]:
  """(sum over layer pairs and image samples of the per-pair loss, number of image samples).

  student_attn, teacher_attn: [K, B, N, N] (teacher already group-averaged); has_image:
  bool [B] (None: all samples have an image). Samples without an image contribute nothing
  (their blocks are zeroed first, so garbage there cannot leak nan into the gradients).
  """
  if variant not in ATTN_VARIANTS:
    raise ValueError(f"attention loss variant={variant!r} is not one of {ATTN_VARIANTS}.")
  if student_attn.shape != teacher_attn.shape or student_attn.ndim != 4:
    raise ValueError(f"student_attn {student_attn.shape} and teacher_attn "
                     f"{teacher_attn.shape} must both be [K, B, N, N].")
  if student_attn.shape[-1] != student_attn.shape[-2] or student_attn.shape[-1] < 2:
    raise ValueError(f"attention blocks must be square N x N with N >= 2, got "
                     f"{student_attn.shape}.")
  b = student_attn.shape[1]
  has_image = jnp.ones((b,), bool) if has_image is None else jnp.asarray(has_image, bool)
  img = has_image[None, :, None, None]
  s = jnp.where(img, student_attn.astype(jnp.float32), 0.0)
  t = jnp.where(img, jax.lax.stop_gradient(teacher_attn).astype(jnp.float32), 0.0)
  per_pair = jnp.where(has_image[None, :], _pair_losses(s, t, variant), 0.0)
  return per_pair.sum(), has_image.sum()


def attention_alignment_loss(student_attn: jax.Array, teacher_attn: jax.Array,
                             has_image: Optional[jax.Array] = None,
                             variant: str = "official") -> jax.Array:
  """L_attn = sum_k sum_b loss_kb / B_img (docs/METHOD.md §5), B_img = #samples with an image (>= 1).

  With every sample holding an image this is exactly the official sum_k sum_b loss_kb / B.
  Variants (paper ablations): "official" (sink filter + 1 - cos of column profiles),
  "cosine" (1 - cos of causal column means, no sink filter), "mse" and "kl" (on the
  official filtered profiles; kl normalizes them to distributions over key columns).
  """
  return _safe_div(*attention_alignment_sums(student_attn, teacher_attn, has_image,
                                             variant))


def attention_cosine(student_attn: jax.Array, teacher_attn: jax.Array,
                     has_image: Optional[jax.Array] = None) -> jax.Array:
  """Metric [K]: cosine of the flattened N x N maps per pair, mean over image samples."""
  k, b = student_attn.shape[:2]
  has_image = jnp.ones((b,), bool) if has_image is None else jnp.asarray(has_image, bool)
  cos = _cosine(student_attn.reshape(k, b, -1).astype(jnp.float32),
                teacher_attn.reshape(k, b, -1).astype(jnp.float32))
  cos = jnp.where(has_image[None, :], cos, 0.0)
  return cos.sum(axis=1) / jnp.maximum(has_image.sum(), 1)
