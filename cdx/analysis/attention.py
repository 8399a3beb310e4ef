"""Where do teacher and student look? Visual-attention diagnostics (paper §3).

  s, t = visual_attention(s_cfg, s_params, t_cfg, t_params, batch, s_layers, t_layers)
      # f32 [Ks, B, Nv, Nv], [Kt, B, Nv, Nv]: head-averaged attention of the visual queries
      # over the visual keys, both models on the same images (image rows of the batch)
  sim = layers.similarity_matrix(s, t)        # [Ks, Kt] cosine per layer pair
  grid = patch_heatmap(s[k, b])               # [side, side]: attention each patch receives

Used by the loop to calibrate `layers.strategy=adaptive` and by notebooks/quickstart.ipynb.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cdx.distill import objective
from cdx.models import mllm


def visual_attention(student_cfg: mllm.MllmConfig, student: dict,
                     teacher_cfg: mllm.MllmConfig, teacher: dict, batch: dict,
                     student_layers: tuple, teacher_layers: tuple,
                     max_rows: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Visual attention f32 [K, B, Nv, Nv] of both models on (<= max_rows image rows of) a batch.

  Both models see the same vision features (`objective.forward`, as in training); the
  student goes through its own adapter (+ TAF post-connector), the teacher through its
  own adapter. A batch without an image row raises ValueError.
  """
  rows = np.flatnonzero(np.asarray(batch["has_image"]))[:max_rows]
  if rows.size == 0:
    raise ValueError("the batch holds no image sample")
  ids = jnp.asarray(np.asarray(batch["input_ids"])[rows])
  mask = jnp.asarray(np.asarray(batch["attention_mask"])[rows])
  pixels = jnp.asarray(np.asarray(batch["pixel_values"])[rows])

  @jax.jit
  def maps(student, teacher, ids, mask, pixels):
    out = objective.forward(
        student_cfg, teacher_cfg, student, teacher,
        {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels},
        student_capture=mllm.Capture(tuple(student_layers)),
        teacher_capture=mllm.Capture(tuple(teacher_layers)), shared_adapter=False)
    return out.inter["visual_attn"], out.t_inter["visual_attn"]

  s_maps, t_maps = maps(student, teacher, ids, mask, pixels)
  return np.asarray(s_maps), np.asarray(t_maps)


def patch_heatmap(attn, dropped_first: bool = True) -> np.ndarray:
  """[Nv, Nv] map -> [side, side]: mean attention each image patch receives (column means).

  With the `default` feature selection the first patch was dropped before the LLM; it is
  shown as 0 so the grid keeps the image's layout.
  """
  col = np.asarray(attn, np.float32).mean(0)
  if dropped_first:
    col = np.concatenate([[0.0], col])
  side = int(round(np.sqrt(col.size)))
  if side * side != col.size:
    raise ValueError(f"{col.size} patches do not form a square grid "
                     f"(dropped_first={dropped_first}).")
  return col.reshape(side, side)
