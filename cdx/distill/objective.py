"""The distillation objective: LM + KD + visual-attention alignment (docs/METHOD.md §5).

Data flow of one (micro-)batch, every arrow a pure function of pytrees:

  pixels ─► vision tower (once) ─► adapter (once; the teacher's for TAF) ─┬─► teacher decoder
                                                                          │   (no grad; band
                                                                          │   attention kept)
                                                  student post-connector ─┴─► student decoder
  hidden states of both ─► chunked LM head: CE + KD per chunk, no [B, L, V] tensor
  attention summaries [K, B, Nv, Nv] of both ─► attention-alignment loss

  total, metrics = compute_loss(student_cfg, teacher_cfg, obj, params, teacher, batch, lora)

`forward` is the first line alone (both models on one batch, the attention they are asked
to capture); the adaptive layer matching (cdx/analysis/attention.py) runs it too.
`params` is the full student tree; `teacher` the teacher's tree (its vision tower and, for
TAF, its adapter are not read: the student's serve both). The same loss computed with the
official code's memory layout is `cdx.distill.reference.compute_loss`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cdx.distill import losses
from cdx.models import mllm

PyTree = Any

# loss.fidelity: "cdx" (docs/METHOD.md §5), or "official": every departure of the loss
# listed in docs/METHOD.md §8 undone (attention window, text-only rows, KD mask).
FIDELITIES = ("cdx", "official")
# Where the official code's hard-coded attention window starts: the 31 tokens before
# `<image>` of its template with the Qwen tokenizer (docs/METHOD.md §8).
OFFICIAL_START = 31


@dataclasses.dataclass(frozen=True)
class Objective:
  """Static description of the loss (hashable: part of the compiled step)."""
  lm: float = 1.0
  kd: float = 0.0
  attn: float = 0.0
  kd_kind: str = "forward"
  kd_temperature: float = 1.0
  kd_beta: float = 0.5
  kd_mask: str = "shifted"
  attn_variant: str = "official"
  chunk_size: int = 256
  student_layers: tuple[int, ...] = ()
  teacher_groups: tuple[tuple[int, ...], ...] = ()
  taf: bool = True
  fidelity: str = "cdx"

  @property
  def kd_positions(self) -> str:
    """The KD mask in effect: `fidelity=official` brings the unshifted one back."""
    return "official" if self.fidelity == "official" else self.kd_mask

  @property
  def uses_teacher(self) -> bool:
    return self.kd > 0 or self.attn > 0

  @property
  def teacher_layers(self) -> tuple[int, ...]:
    """The teacher layers whose attention is captured, sorted, each once."""
    return tuple(sorted({l for g in self.teacher_groups for l in g}))


class Forward(NamedTuple):
  """Both models on one batch. hidden [B, L, D] after the final norm; inter["visual_attn"]
  f32 [K, B, Nv, Nv] of the captured layers; the teacher's None when it was not run."""
  hidden: jax.Array
  inter: dict
  t_hidden: jax.Array | None
  t_inter: dict | None
  visual_pos: jax.Array  # int32 [B, N]: the attention block's positions (N = Nv, or Nv + 1)
  has_image: jax.Array   # bool [B]: the row's block counts in the attention loss


def attention_positions(input_ids: jax.Array, image_token_id: int, num_visual: int,
                        fidelity: str = "cdx") -> tuple[jax.Array, jax.Array]:
  """(positions int32 [B, N], rows that count bool [B]) of the attention block.

  cdx: the Nv image tokens of each row (N = Nv); rows without an image do not count.
  official: the official code's fixed window of Nv + 1 positions (the image tokens and
  the token after them, its "\n"), and every row counts. A text-only row takes the window
  where the batch's first image row has it (the official template puts every image at
  the same place), or at OFFICIAL_START in a batch without images; positions past the
  sequence are clipped to its last one.
  """
  pos, has_image = mllm.visual_positions(input_ids, image_token_id, num_visual)
  if fidelity == "cdx":
    return pos, has_image
  if fidelity != "official":
    raise ValueError(f"loss fidelity={fidelity!r} is not one of {FIDELITIES}.")
  common = jnp.where(has_image.any(), pos[jnp.argmax(has_image), 0], OFFICIAL_START)
  start = jnp.where(has_image, pos[:, 0], common)
  window = start[:, None] + jnp.arange(num_visual + 1, dtype=jnp.int32)[None, :]
  window = jnp.minimum(window, input_ids.shape[1] - 1).astype(jnp.int32)
  return window, jnp.ones_like(has_image)


def forward(student_cfg: mllm.MllmConfig, teacher_cfg: mllm.MllmConfig | None,
            params: PyTree, teacher: PyTree | None, batch: dict, *,
            student_capture: mllm.Capture = mllm.Capture(),
            teacher_capture: mllm.Capture | None = None, shared_adapter: bool = True,
            lora: mllm.Lora | None = None, fidelity: str = "cdx") -> Forward:
  """Vision tower once and adapter once for both models, then both decoders.

  batch: input_ids int [B, L], attention_mask int [B, L], pixel_values f32 [B, H, W, 3].
  teacher_capture None: the teacher is not run. shared_adapter (TAF): the teacher reads
  the student's adapter output (the student holds the teacher's adapter); otherwise the
  teacher's own adapter runs on the shared vision features. The vision features and the
  teacher are outside the gradient. fidelity: which attention block is captured
  (`attention_positions`).
  """
  ids, mask = batch["input_ids"], batch["attention_mask"]
  nv = mllm.num_visual_tokens(student_cfg)
  vis_pos, has_image = attention_positions(ids, student_cfg.image_token_id, nv, fidelity)

  # One vision forward and one adapter forward serve both models (frozen: no grad needed).
  feats = jax.lax.stop_gradient(mllm.encode_images(student_cfg, params, batch["pixel_values"]))
  adapted = mllm.adapt(student_cfg, params, feats)
  s_img = mllm.post(student_cfg, params, adapted)
  s_emb = mllm.embed(student_cfg, params, ids, s_img)
  s_hidden, s_inter = mllm.decode(student_cfg, params, s_emb, mask, student_capture,
                                  visual_pos=vis_pos, lora=lora)
  t_hidden = t_inter = None
  if teacher_capture is not None:
    if shared_adapter:  # The TAF student's adapter *is* the teacher's: reuse its output.
      t_img = jax.lax.stop_gradient(adapted)
    else:
      t_img = mllm.adapt(teacher_cfg, teacher, feats)
    t_emb = mllm.embed(teacher_cfg, teacher, ids, t_img)
    t_hidden, t_inter = mllm.decode(teacher_cfg, teacher, t_emb, mask, teacher_capture,
                                    visual_pos=vis_pos)
    t_hidden = jax.lax.stop_gradient(t_hidden)
  return Forward(s_hidden, s_inter, t_hidden, t_inter, vis_pos, has_image)


def compute_loss(student_cfg: mllm.MllmConfig, teacher_cfg: mllm.MllmConfig | None,
                 obj: Objective, params: PyTree, teacher: PyTree | None,
                 batch: dict, lora: mllm.Lora | None = None) -> tuple[jax.Array, dict]:
  """Total loss and its terms for one (micro-)batch (+ "tokens": supervised targets).

  `params` is the full student tree; `lora` its unmerged LoRA factors (or None)."""
  labels = batch["labels"]
  capture = lambda layers: mllm.Capture(layers if obj.attn > 0 else ())
  out = forward(student_cfg, teacher_cfg, params, teacher, batch,
                student_capture=capture(obj.student_layers),
                teacher_capture=capture(obj.teacher_layers) if obj.uses_teacher else None,
                shared_adapter=obj.taf, lora=lora, fidelity=obj.fidelity)
  has_image = out.has_image if obj.fidelity == "official" else jnp.logical_and(
      out.has_image, batch["has_image"])

  t_head, t_layout = None, "dv"
  if obj.uses_teacher:
    t_head, t_layout = mllm.lm_head(teacher_cfg, teacher)
    t_head = jax.lax.stop_gradient(t_head)
  metrics = {}
  kd_options = losses.KDOptions(temperature=obj.kd_temperature, kind=obj.kd_kind,
                                beta=obj.kd_beta, mask=obj.kd_positions)
  # Heads in their stored layout: a tied [V, D] table is contracted as is, not transposed.
  s_head, s_layout = mllm.lm_head(student_cfg, params)
  sums = losses.lm_kd_chunked(
      out.hidden, s_head, out.t_hidden if obj.kd > 0 else None,
      t_head if obj.kd > 0 else None, labels, chunk_size=obj.chunk_size,
      kd_options=kd_options, head_layouts=(s_layout, t_layout if obj.kd > 0 else "dv"))
  lm_loss = sums.lm_sum / jnp.maximum(sums.lm_count, 1)
  total = obj.lm * lm_loss
  metrics["lm"] = lm_loss
  metrics["tokens"] = sums.lm_count
  if obj.kd > 0:
    kd_loss = sums.kd_sum / jnp.maximum(sums.kd_count, 1)
    total = total + obj.kd * kd_loss
    metrics["kd"] = kd_loss
  if obj.attn > 0:
    t_attn = losses.teacher_group_average(jax.lax.stop_gradient(out.t_inter["visual_attn"]),
                                          obj.teacher_groups, obj.teacher_layers)
    total = total + attention_term(obj, out.inter["visual_attn"], t_attn, has_image, metrics)
  metrics["loss"] = total
  return total, metrics


def attention_term(obj: Objective, s_attn: jax.Array, t_attn: jax.Array,
                   has_image: jax.Array, metrics: dict) -> jax.Array:
  """Weighted VAT loss of [K, B, Nv, Nv] blocks; records it and the per-pair cosine."""
  attn_loss = losses.attention_alignment_loss(s_attn, t_attn, has_image=has_image,
                                              variant=obj.attn_variant)
  metrics["attn"] = attn_loss
  metrics["attn_cos"] = jax.lax.stop_gradient(
      losses.attention_cosine(s_attn, t_attn, has_image=has_image))
  return obj.attn * attn_loss
