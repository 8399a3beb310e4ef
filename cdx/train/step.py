"""The jitted, mesh-sharded train step: LM + KD + visual-attention alignment (SPEC §5).

Data flow of one step (DESIGN §1), every arrow a pure function of pytrees:

  pixels ─► vision tower (once) ─► adapter (once; the teacher's for TAF) ─┬─► teacher decoder
                                                                          │   (no grad; band
                                                                          │   attention kept)
                                                  student post-connector ─┴─► student decoder
  hidden states of both ─► chunked LM head: CE + KD per chunk, no [B, L, V] tensor
  attention summaries [K, B, Nv, Nv] of both ─► attention-alignment loss

State (what is checkpointed; only trainable leaves have optimizer state):
  {"step": int32[], "params": trainable partition of the student tree,
   "lora": LoRA factors or {}, "opt": optax state, "rng": key, "nonfinite": int32[]}
The frozen rest of the student ("frozen") and the teacher ("teacher", without the vision
tower and — for TAF — without the adapter, which the student tree already holds) are
separate arguments: never donated, never differentiated.

Compiling for a mesh (`jit_train_step`): trainable params, LoRA factors, Adam moments and
the frozen/teacher trees are sharded by `cdx.parallel`'s path rules, the batch's leading dim
over ("data", "fsdp"), counters/rng and the metrics replicated; the state is donated.

  step_fn, sh = jit_train_step(make_train_step(...), mesh, state, frozen, teacher)
  state, frozen, teacher = (parallel.shard_tree(x, s) for x, s in
                            ((state, sh.state), (frozen, sh.frozen), (teacher, sh.teacher)))
  state, metrics = step_fn(state, frozen, teacher, parallel.global_batch_array(...))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cdx import parallel
from cdx.distill import losses
from cdx.models import mllm
from cdx.train import optim
from cdx.train import params as params_lib
from cdx.train import reference

PyTree = Any


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

  @property
  def uses_teacher(self) -> bool:
    return self.kd > 0 or self.attn > 0

  @property
  def teacher_layers(self) -> tuple[int, ...]:
    """The teacher layers whose attention is captured, sorted, each once."""
    return tuple(sorted({l for g in self.teacher_groups for l in g}))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float


def init_state(trainable: PyTree, lora: PyTree, tx: optax.GradientTransformation,
               rng: jax.Array) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": trainable, "lora": lora,
          "opt": tx.init((trainable, lora)), "rng": rng,
          "nonfinite": jnp.zeros((), jnp.int32)}


def _student_params(trainable, lora, frozen, lora_spec) -> tuple[PyTree, dict]:
  """(full student tree, LoRA keyword arguments of `compute_loss`): never merged."""
  params = params_lib.merge(trainable, frozen)
  if lora_spec is None or not lora:
    return params, {}
  return params, {"lora": lora, "lora_scale": lora_spec.alpha / lora_spec.rank}


def compute_loss(student_cfg: mllm.MllmConfig, teacher_cfg: mllm.MllmConfig | None,
                 obj: Objective, params: PyTree, teacher: PyTree | None,
                 batch: dict, lora: PyTree | None = None,
                 lora_scale: float = 1.0) -> tuple[jax.Array, dict]:
  """Total loss and its terms for one (micro-)batch. `params` is the full student tree;
  `lora` its LoRA factors (or None), applied factored with `lora_scale` = alpha / rank."""
  ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
  nv = mllm.num_visual_tokens(student_cfg)
  vis_pos, has_image = mllm.visual_positions(ids, student_cfg.image_token_id, nv)
  has_image = jnp.logical_and(has_image, batch["has_image"])

  # One vision forward and one adapter forward serve both models (frozen: no grad needed).
  feats = jax.lax.stop_gradient(mllm.encode_images(student_cfg, params, batch["pixel_values"]))
  adapted = mllm.adapt(student_cfg, params, feats)
  s_img = mllm.post(student_cfg, params, adapted)
  s_emb = mllm.embed(student_cfg, params, ids, s_img)
  s_hidden, s_inter = mllm.decode(student_cfg, params, s_emb, mask,
                                  attn_layers=obj.student_layers if obj.attn > 0 else (),
                                  visual_pos=vis_pos, lora=lora, lora_scale=lora_scale)

  t_hidden = t_head = None
  t_layout = "dv"
  metrics = {}
  if obj.uses_teacher:
    t_params = teacher
    if obj.taf:  # The TAF student's adapter *is* the teacher's: reuse its output.
      t_img = jax.lax.stop_gradient(adapted)
    else:
      t_img = mllm.adapt(teacher_cfg, t_params, feats)
    t_emb = mllm.embed(teacher_cfg, t_params, ids, t_img)
    t_hidden, t_inter = mllm.decode(teacher_cfg, t_params, t_emb, mask,
                                    attn_layers=obj.teacher_layers if obj.attn > 0 else (),
                                    visual_pos=vis_pos)
    t_hidden = jax.lax.stop_gradient(t_hidden)
    t_head, t_layout = mllm.lm_head(teacher_cfg, t_params)
    t_head = jax.lax.stop_gradient(t_head)

  kd_options = losses.KDOptions(temperature=obj.kd_temperature, kind=obj.kd_kind,
                                beta=obj.kd_beta, mask=obj.kd_mask)
  # Heads in their stored layout: a tied [V, D] table is contracted as is, not transposed.
  s_head, s_layout = mllm.lm_head(student_cfg, params)
  sums = losses.lm_kd_chunked(
      s_hidden, s_head, t_hidden if obj.kd > 0 else None, t_head if obj.kd > 0 else None,
      labels, chunk_size=obj.chunk_size, kd_options=kd_options,
      head_layouts=(s_layout, t_layout if obj.kd > 0 else "dv"))
  lm_loss = sums.lm_sum / jnp.maximum(sums.lm_count, 1)
  total = obj.lm * lm_loss
  metrics["lm"] = lm_loss
  metrics["tokens"] = sums.lm_count
  if obj.kd > 0:
    kd_loss = sums.kd_sum / jnp.maximum(sums.kd_count, 1)
    total = total + obj.kd * kd_loss
    metrics["kd"] = kd_loss
  if obj.attn > 0:
    t_attn = losses.teacher_group_average(jax.lax.stop_gradient(t_inter["visual_attn"]),
                                          obj.teacher_groups, obj.teacher_layers)
    total = total + attention_term(obj, s_inter["visual_attn"], t_attn, has_image, metrics)
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


def make_train_step(student_cfg: mllm.MllmConfig, teacher_cfg: mllm.MllmConfig | None,
                    obj: Objective, tx: optax.GradientTransformationExtraArgs,
                    schedule: Callable[[jax.Array], jax.Array],
                    lora_spec: LoraSpec | None = None, micro_batches: int = 1,
                    formulation: str = "cdx") -> Callable:
  """Returns `train_step(state, frozen, teacher, batch) -> (state, metrics)` (not jitted).

  `formulation`: "cdx" (`compute_loss`) or "official" (`cdx.train.reference.compute_loss`:
  the same loss with the official code's memory layout, for benchmarks only).

  `tx` is `cdx.train.optim.make_optimizer(...)`: its skip-non-finite wrapper leaves params
  and optimizer state untouched on a NaN/Inf loss or gradient. With `micro_batches` > 1 the
  batch is split (strided) and gradients are averaged in a scan before the one update.
  """

  if formulation == "cdx":
    loss_impl = compute_loss
  elif formulation == "official":
    loss_impl = reference.compute_loss
  else:
    raise ValueError(f"formulation={formulation!r}; use 'cdx' or 'official'.")

  def train_step(state, frozen, teacher, batch):
    def grad_fn(diff, batch):
      def loss_fn(diff):
        params, lora_kw = _student_params(diff[0], diff[1], frozen, lora_spec)
        return loss_impl(student_cfg, teacher_cfg, obj, params, teacher, batch, **lora_kw)
      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(diff)
      return grads, metrics

    diff = (state["params"], state["lora"])
    if micro_batches > 1:
      grads, metrics = optim.accumulate_gradients(
          grad_fn, diff, optim.split_microbatches(batch, micro_batches))
      # Metrics are micro-batch means; the token count is a total (an int, as without).
      metrics["tokens"] = jnp.round(metrics["tokens"] * micro_batches).astype(jnp.int32)
    else:
      grads, metrics = grad_fn(diff, batch)
    updates, new_opt = tx.update(grads, state["opt"], diff, loss=metrics["loss"])
    new_diff = optax.apply_updates(diff, updates)
    finite = getattr(new_opt, "last_finite", jnp.isfinite(metrics["loss"]))
    new_state = {
        "step": state["step"] + 1,
        "params": new_diff[0], "lora": new_diff[1], "opt": new_opt,
        "rng": jax.random.fold_in(state["rng"], state["step"]),
        "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1).astype(jnp.int32),
    }
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(new_diff)
    metrics["lr"] = schedule(state["step"])
    metrics["skipped"] = (~finite).astype(jnp.int32)
    metrics["nonfinite_run"] = new_state["nonfinite"]
    return new_state, metrics

  return train_step


@dataclasses.dataclass(frozen=True)
class StepShardings:
  """Where each argument / result of the jitted step lives (trees of NamedSharding)."""
  state: PyTree
  frozen: PyTree
  teacher: PyTree | None
  batch: jax.sharding.NamedSharding
  metrics: jax.sharding.NamedSharding


def step_shardings(mesh: jax.sharding.Mesh, state: PyTree, frozen: PyTree,
                   teacher: PyTree | None,
                   axis_map: dict = parallel.DEFAULT_AXIS_MAP) -> StepShardings:
  """Shardings for `init_state`'s layout; trees may hold arrays or ShapeDtypeStructs.

  Params shard by the MLLM's logical axes (`mllm.LOGICAL_AXES`) mapped by `axis_map`."""
  missing = {"step", "params", "lora", "opt", "rng", "nonfinite"} - set(state)
  if missing:
    raise ValueError(f"state lacks {sorted(missing)}; build it with step.init_state.")
  rep = parallel.replicated(mesh)
  # Optimizer moments mirror (params, lora), so they shard exactly like them.
  param_sh = lambda tree: parallel.param_shardings(tree, mesh, mllm.LOGICAL_AXES, axis_map)
  diff_sh = param_sh((state["params"], state["lora"]))
  state_sh = {k: rep for k in state}
  state_sh.update(params=diff_sh[0], lora=diff_sh[1],
                  opt=parallel.state_shardings(state["opt"], diff_sh, mesh))
  return StepShardings(
      state=state_sh, frozen=param_sh(frozen),
      teacher=None if teacher is None else param_sh(teacher),
      batch=parallel.batch_sharding(mesh), metrics=rep)


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh, state: PyTree,
                   frozen: PyTree, teacher: PyTree | None,
                   axis_map: dict = parallel.DEFAULT_AXIS_MAP
                   ) -> tuple[Callable, StepShardings]:
  """(jitted `train_step`, its shardings): the one way a step is compiled for a mesh.

  The state argument is donated (its buffers are reused for the new state): keep host
  copies of anything needed after the call. Place inputs with `parallel.shard_tree`.
  """
  sh = step_shardings(mesh, state, frozen, teacher, axis_map)
  fn = jax.jit(train_step, in_shardings=(sh.state, sh.frozen, sh.teacher, sh.batch),
               out_shardings=(sh.state, sh.metrics), donate_argnums=(0,),
               compiler_options=compiler_options(mesh.devices.flat[0].platform))
  return fn, sh


def compiler_options(platform: str) -> dict:
  """XLA options a train step is compiled with on `platform` ("cpu", "gpu", "tpu").

  XLA:CPU has no bf16 dot: it upcasts both operands to f32, and its while-loop invariant
  code motion then hoists that upcast of a scanned layer stack's weights (`scan_layers`)
  out of the layer loop: an f32 copy of every layer at once (11.8 GiB of the paper
  teacher; docs/PERFORMANCE.md §1). The pass is off on CPU; GPUs and TPUs multiply bf16
  natively and keep it."""
  if platform == "cpu":
    return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
  return {}
