"""How much each loss term pushes the student: gradient norms of the terms, separately.

The attention term of CompoDistill (docs/METHOD.md §5) has weight 1 in the paper, where
its loss is of the order of the LM and KD terms. On a tiny model the same weight can leave
it orders of magnitude smaller, so that it barely acts. This measures its share of the
gradient, which is what an optimizer step sees:

  shares = term_gradient_norms(student_cfg, teacher_cfg, obj, params, teacher, batches,
                               trainable=lambda path: path.startswith(("post/", "llm/")))
  # {"lm_kd": mean |g|, "attn": mean |g| (at the objective's attn weight),
  #  "ratio": mean of |g_attn| / |g_lm_kd| per batch, "per_batch": [...], "batches": n}

Both norms are over the trainable leaves only (the frozen vision tower and adapter get no
update whatever their gradient). `obj.attn` must be > 0 and the objective must have a
teacher (its `student_layers` / `teacher_groups` set, as `cdx.train.setup` builds them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from cdx import paths as paths_lib
from cdx.distill import objective as objective_lib
from cdx.models import mllm

PyTree = Any


def _norm(grads: PyTree, keep: PyTree) -> jax.Array:
  leaves = [jnp.sum(jnp.square(g)) for g, k in zip(jax.tree.leaves(grads),
                                                   jax.tree.leaves(keep)) if k]
  return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros(())


def term_gradient_norms(student_cfg: mllm.MllmConfig, teacher_cfg: mllm.MllmConfig,
                        obj: objective_lib.Objective, params: PyTree, teacher: PyTree,
                        batches: Iterable[dict],
                        trainable: Callable[[str], bool]) -> dict:
  """Gradient norms of (lm * LM + kd * KD) and of (attn * ATTN) on each batch.

  trainable(path) -> bool: whether the student leaf at `path` ('llm/layers_3/mlp/...',
  `cdx.paths.path_str`) trains.
  Returns the means over batches, the mean per-batch ratio attn / lm_kd and the per-batch
  values (floats).
  """
  if obj.attn <= 0:
    raise ValueError(f"objective attn={obj.attn}: there is no attention term to measure.")
  keep = jax.tree_util.tree_map_with_path(
      lambda p, _: bool(trainable(paths_lib.path_str(p))), params)
  if not any(jax.tree.leaves(keep)):
    raise ValueError("no trainable leaf: check the `trainable` predicate.")
  lm_kd = dataclasses.replace(obj, attn=0.0)
  # lm = kd = 0 leaves only the weighted attention term (KD is still set so the teacher
  # runs; its contribution is multiplied by 0).
  attn_only = dataclasses.replace(obj, lm=0.0, kd=0.0)

  def grad_norm(o):
    def loss(p, t, batch):
      return objective_lib.compute_loss(student_cfg, teacher_cfg, o, p, t, batch)[0]
    return jax.jit(lambda p, t, b: _norm(jax.grad(loss)(p, t, b), keep))

  g_main, g_attn = grad_norm(lm_kd), grad_norm(attn_only)
  rows = []
  for batch in batches:
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    a, b = float(g_main(params, teacher, batch)), float(g_attn(params, teacher, batch))
    rows.append({"lm_kd": a, "attn": b, "ratio": b / a if a > 0 else float("inf")})
  if not rows:
    raise ValueError("no batch given.")
  mean = lambda k: float(np.mean([r[k] for r in rows]))
  return {"lm_kd": mean("lm_kd"), "attn": mean("attn"), "ratio": mean("ratio"),
          "attn_weight": obj.attn, "per_batch": rows, "batches": len(rows)}
