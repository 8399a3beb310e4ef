"""The loss computed the way the official PyTorch code does it (docs/METHOD.md §8).

Same signature and result as `cdx.distill.objective.compute_loss`; only the memory layout
differs. It exists to measure what the cdx formulation saves (launch/bench.py,
tests/test_memory.py): pass it as the loss of a train step,

  setup.make_loss_fn(student_cfg, teacher_cfg, obj, lora_spec, reference.compute_loss)

What the official code keeps, and how it is reproduced here:
  * vision tower (and TAF adapter) run once per model      -> two `encode_images` calls
  * `output_attentions=True`: eager attention, every layer's
    per-head map [B, H, L, L] of both models held in the
    returned `attentions` tuple until the loss              -> `decode(Capture(all,
                                                               full_attn=True))`; one
                                                               optimization_barrier over all
                                                               maps keeps them live together
                                                               (XLA would otherwise drop the
                                                               maps the loss never reads)
  * the visual block sliced from those maps, heads averaged -> `visual_block`
  * full logits [B, L, V] of both models, unchunked LM + KD -> `losses.lm`, `losses.kd`
  * PEFT LoRA: x W + ((x a) b) * alpha / r, never merged    -> `decode(lora=...)`, as cdx

Shapes: maps f32 [Ls or Lt, B, H, L, L]; logits f32 [B, L, V]; visual block f32
[K, B, Nv, Nv]. Everything this project chose differently from the official code on purpose
(shifted KD mask, no loss on text-only samples, visual tokens located from the ids) follows
the Objective exactly as in `compute_loss`, so both formulations give one loss value.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cdx.distill import losses
from cdx.distill import objective
from cdx.models import mllm

PyTree = Any


def visual_block(maps: jax.Array, visual_pos: jax.Array) -> jax.Array:
  """Per-head maps f32 [K, B, H, L, L] -> head-averaged visual block f32 [K, B, Nv, Nv]."""
  def one(m, pos):  # m [K, H, L, L], pos [Nv]: rows then columns at the visual slots.
    return m[:, :, pos, :][:, :, :, pos].mean(axis=1)
  return jax.vmap(one, in_axes=(1, 0), out_axes=1)(maps, visual_pos)


def _logits(cfg: mllm.MllmConfig, params: dict, hidden: jax.Array) -> jax.Array:
  return jnp.einsum("bld,dv->blv", hidden, mllm.lm_head_kernel(cfg, params).astype(hidden.dtype),
                    preferred_element_type=jnp.float32)


def compute_loss(student_cfg: mllm.MllmConfig, teacher_cfg: mllm.MllmConfig | None,
                 obj: objective.Objective, params: PyTree, teacher: PyTree | None,
                 batch: dict, lora: mllm.Lora | None = None) -> tuple[jax.Array, dict]:
  """Total loss and its terms, official memory layout.

  `lora` (student only) is applied factored, as PEFT does in the official code."""
  ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
  pixels = batch["pixel_values"]
  nv = mllm.num_visual_tokens(student_cfg)
  vis_pos, has_image = objective.attention_positions(ids, student_cfg.image_token_id, nv,
                                                     obj.fidelity)
  if obj.fidelity != "official":
    has_image = jnp.logical_and(has_image, batch["has_image"])
  keep_maps = obj.attn > 0

  def run(cfg, llm_params, adapter_params, post_params, lora=None):
    feats = jax.lax.stop_gradient(
        mllm.encode_images(cfg, {"vision": params["vision"]}, pixels))
    img = mllm.adapt(cfg, adapter_params, feats)
    if post_params is not None:
      img = mllm.post(cfg, post_params, img)
    emb = mllm.embed(cfg, llm_params, ids, img)
    layers = tuple(range(cfg.text.num_layers)) if keep_maps else ()
    hidden, inter = mllm.decode(cfg, llm_params, emb, mask,
                                mllm.Capture(layers, full_attn=keep_maps),
                                visual_pos=vis_pos, lora=lora)
    return _logits(cfg, llm_params, hidden), inter.get("full_attn")

  s_logits, s_maps = run(student_cfg, params, params, params, lora)
  t_logits = t_maps = None
  if obj.uses_teacher:
    t_logits, t_maps = run(teacher_cfg, teacher, params if obj.taf else teacher, None)
    t_logits, t_maps = jax.lax.stop_gradient((t_logits, t_maps))
  if keep_maps:  # Both models' maps of every layer live at once, as in PyTorch.
    s_maps, t_maps, s_logits, t_logits = jax.lax.optimization_barrier(
        (s_maps, t_maps, s_logits, t_logits))

  lm_loss = losses.lm(s_logits, labels)
  total = obj.lm * lm_loss
  metrics = {"lm": lm_loss,
             "tokens": (losses.next_token_targets(labels) != losses.IGNORE).sum()}
  if obj.kd > 0:
    kd_loss = losses.kd(s_logits, t_logits, labels, temperature=obj.kd_temperature,
                        kind=obj.kd_kind, beta=obj.kd_beta, mask=obj.kd_positions)
    total = total + obj.kd * kd_loss
    metrics["kd"] = kd_loss
  if keep_maps:
    s_attn = visual_block(s_maps, vis_pos)[np.asarray(obj.student_layers)]
    t_attn = losses.teacher_group_average(visual_block(t_maps, vis_pos), obj.teacher_groups)
    total = total + objective.attention_term(obj, s_attn, t_attn, has_image, metrics)
  metrics["loss"] = total
  return total, metrics
