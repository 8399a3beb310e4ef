"""The jitted, mesh-sharded train step: generic over the loss it is given.

  loss_fn(diff, frozen, teacher, batch) -> (loss f32[], metrics)   # metrics["loss"] = loss
  train_step = make_train_step(loss_fn, tx, schedule, micro_batches)
  state, metrics = train_step(state, frozen, teacher, batch)

`diff` = (trainable params, LoRA factors) is what is differentiated and updated; the
distillation loss of a stage is built by `cdx.train.setup.make_loss_fn` from
`cdx.distill.objective.compute_loss` (or the official formulation beside it).

State (what is checkpointed; only trainable leaves have optimizer state):
  {"step": int32[], "params": trainable partition of the student tree,
   "lora": LoRA factors or {}, "opt": optax state, "rng": key, "nonfinite": int32[]}
The frozen rest of the student ("frozen") and the teacher ("teacher", without the vision
tower and — for TAF — without the adapter, which the student tree already holds) are
separate arguments: never donated, never differentiated.

Gradient accumulation is done *before* the optimizer, not with `optax.MultiSteps`: with
`micro_batches` > 1 the batch gets a leading micro-batch axis ``[A, B/A, ...]``
(`split_microbatches`, strided so that every micro-batch keeps rows on every device of a
batch-sharded mesh) and `accumulate_gradients` scans over it, averaging grads and
metrics; the optimizer then sees one update per global batch. So one jitted call = one
optimizer step, the schedule counts real updates, and there is no extra accumulator in the
optimizer state. Micro-batches are weighted equally (each loss is already a mean over its
own tokens).

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
from cdx.models import mllm

PyTree = Any


def init_state(trainable: PyTree, lora: PyTree, tx: optax.GradientTransformation,
               rng: jax.Array) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": trainable, "lora": lora,
          "opt": tx.init((trainable, lora)), "rng": rng,
          "nonfinite": jnp.zeros((), jnp.int32)}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformationExtraArgs,
                    schedule: Callable[[jax.Array], jax.Array],
                    micro_batches: int = 1) -> Callable:
  """Returns `train_step(state, frozen, teacher, batch) -> (state, metrics)` (not jitted).

  `loss_fn(diff, frozen, teacher, batch) -> (loss, metrics)` with metrics["loss"] and,
  summed over micro-batches, metrics["tokens"]. `tx` is
  `cdx.train.optim.make_optimizer(...)`: its skip-non-finite wrapper leaves params and
  optimizer state untouched on a NaN/Inf loss or gradient. With `micro_batches` > 1 the
  batch is split (strided) and gradients are averaged in a scan before the one update.
  """

  def train_step(state, frozen, teacher, batch):
    def grad_fn(diff, batch):
      loss = lambda diff: loss_fn(diff, frozen, teacher, batch)
      (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(diff)
      return grads, metrics

    diff = (state["params"], state["lora"])
    if micro_batches > 1:
      grads, metrics = accumulate_gradients(
          grad_fn, diff, split_microbatches(batch, micro_batches))
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
    metrics["nonfinite"] = (~finite).astype(jnp.int32)  # 1: this update was skipped
    metrics["nonfinite_run"] = new_state["nonfinite"]
    return new_state, metrics

  return train_step


def split_microbatches(batch: PyTree, num: int) -> PyTree:
  """[B, ...] leaves -> [num, B/num, ...], row i*num + j going to micro-batch j.

  Strided, not contiguous: with the batch sharded over devices each micro-batch still
  holds rows of every device, so no data moves. Raises if B is not divisible by `num`.

  Built as a stack of strided slices ``x[j::num]``, never as ``reshape`` + ``swapaxes``:
  the reshape form (the same values) makes XLA's SPMD partitioner compute wrong
  gradients on meshes with both fsdp and tensor > 1 once they are sharded like the
  params (docs/bugs/reshape_microbatch_grads.md has a standalone reproducer).
  """

  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={num}.")
    return jnp.stack([x[j::num] for j in range(num)])

  if num < 1:
    raise ValueError(f"micro_batches={num} must be >= 1.")
  return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(grad_fn: Callable, trainable: PyTree,
                         microbatches: PyTree) -> tuple[PyTree, PyTree]:
  """Mean (grads, aux) of `grad_fn(trainable, microbatch) -> (grads, aux)` over axis 0.

  Uses `lax.scan` so only one micro-batch's activations live at a time; grads accumulate
  in float32.
  """

  def body(acc, mb):
    grads, aux = grad_fn(trainable, mb)
    grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
    acc = jax.tree_util.tree_map(jnp.add, acc, (grads, aux))
    return acc, None

  first = jax.tree_util.tree_map(lambda x: x[0], microbatches)
  shapes = jax.eval_shape(grad_fn, trainable, first)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
  total, _ = jax.lax.scan(body, zeros, microbatches)
  n = jax.tree_util.tree_leaves(microbatches)[0].shape[0]
  return jax.tree_util.tree_map(lambda x: x / n, total)


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
