"""The optimizer of every stage: AdamW + warmup-cosine + clipping + lr groups + skip-NaN.

  tx = make_optimizer(cfg, total_steps, trainable)   # trainable: the trainable partition
  opt_state = tx.init(trainable)                     # state only for trainable leaves
  updates, opt_state = tx.update(grads, opt_state, trainable, loss=loss)
  trainable = optax.apply_updates(trainable, updates)

Config fields (a dict, ConfigDict — e.g. `config.optim` of configs/common.py — or keyword
args; defaults = docs/METHOD.md §7):
  lr (required), b1 .9, b2 .999, eps 1e-8, weight_decay 0.0,
  no_decay rules (default: biases, norm scales, embeddings), warmup_ratio .03 (or
  warmup_steps), schedule "cosine" | "linear" | "constant" (after warmup), clip_norm 1.0
  (0/None = off), lr_groups ((regex, multiplier), ...), skip_nonfinite True,
  max_nonfinite (read by the loop, ignored here).

Schedule: linear warmup 0 → lr over ceil(warmup_ratio · total) steps, then cosine to 0 at
`total_steps` (HF `get_cosine_schedule_with_warmup`). Steps count optimizer updates.

Gradient accumulation is done before the optimizer, in the train step
(cdx/train/step.py): the optimizer sees one update per global batch.

Skip-non-finite: when the loss (passed as ``loss=``) or any gradient is NaN/Inf, the update
is all zeros and the inner state is left unchanged; `OptState.skipped` counts such steps.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdx import paths as P

PyTree = Any

# Biases, norm scales and embedding tables never decay when weight_decay > 0.
DEFAULT_NO_DECAY: tuple[P.Rule, ...] = (r".*/bias", r".*/scale", r".*norm.*", r".*/embedding")

_DEFAULTS = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, no_decay=DEFAULT_NO_DECAY,
                 warmup_ratio=0.03, warmup_steps=None, schedule="cosine", clip_norm=1.0,
                 lr_groups=(), skip_nonfinite=True, max_nonfinite=None)
SCHEDULES = ("cosine", "linear", "constant")


def _read_cfg(cfg: Any, overrides: Mapping[str, Any]) -> dict:
  """Merges a dict / ConfigDict / None with keyword overrides over the defaults."""
  if cfg is None:
    given = {}
  elif hasattr(cfg, "to_dict"):
    given = cfg.to_dict()
  elif isinstance(cfg, Mapping):
    given = dict(cfg)
  else:
    raise ValueError(f"optimizer config must be a dict or ConfigDict, got {type(cfg)}.")
  given.update(overrides)
  unknown = set(given) - set(_DEFAULTS) - {"lr"}
  if unknown:
    raise ValueError(f"unknown optimizer config fields {sorted(unknown)}; known: "
                     f"{sorted(set(_DEFAULTS) | {'lr'})}.")
  if "lr" not in given:
    raise ValueError("optimizer config needs `lr` (peak learning rate).")
  if given.get("schedule", "cosine") not in SCHEDULES:
    raise ValueError(f"optimizer schedule={given['schedule']!r}; choose one of {SCHEDULES}.")
  return {**_DEFAULTS, **given}


def warmup_steps(cfg: Mapping[str, Any], total_steps: int) -> int:
  if cfg.get("warmup_steps") is not None:
    return int(cfg["warmup_steps"])
  return int(math.ceil(cfg["warmup_ratio"] * total_steps))


def lr_schedule(peak: float, total_steps: int, warmup: int,
                kind: str = "cosine") -> Callable[[Any], jax.Array]:
  """step -> lr: linear 0 → peak over `warmup` steps, then `kind` ("cosine" or "linear"
  down to 0 at `total_steps`, or "constant")."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1.")
  if not 0 <= warmup <= total_steps:
    raise ValueError(f"warmup={warmup} must lie in [0, total_steps={total_steps}].")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    if kind == "cosine":
      decay = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
    elif kind == "linear":
      decay = peak * (1.0 - progress)
    else:
      decay = jnp.full_like(progress, peak)
    return jnp.where(step < warmup, warm, decay)

  return schedule


def learning_rate_schedule(cfg: Any, total_steps: int, **overrides) -> Callable:
  """The schedule `make_optimizer` uses, for logging the lr."""
  c = _read_cfg(cfg, overrides)
  return lr_schedule(float(c["lr"]), total_steps, warmup_steps(c, total_steps), c["schedule"])


def _lr_multipliers(tree: PyTree, groups) -> PyTree:
  """Per-leaf lr multiplier: the first (regex, mult) group matching the path, else 1."""
  rules = [(regex, float(mult)) for regex, mult in groups]

  def mult(path: str) -> float:
    hit = P.first_match(path, rules)
    return 1.0 if hit is None else hit[1]

  return jax.tree_util.tree_map(mult, P.tree_paths(tree))


def scale_by_tree(multipliers: PyTree) -> optax.GradientTransformation:
  """Multiplies each update leaf by a fixed per-leaf float (lr groups)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(init, update)


class OptState(NamedTuple):
  inner: Any
  skipped: jax.Array        # int32: steps skipped for a non-finite loss or gradient
  last_finite: jax.Array    # bool: whether the latest step was applied


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Zero update and unchanged inner state when `loss` or any gradient is not finite."""

  def init(params):
    return OptState(inner.init(params), jnp.zeros((), jnp.int32), jnp.ones((), bool))

  def update(updates, state, params=None, *, loss=None, **extra):
    del extra
    leaves = jax.tree_util.tree_leaves(updates)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves])) if leaves \
        else jnp.ones((), bool)
    if loss is not None:
      finite = finite & jnp.all(jnp.isfinite(loss))
    new_updates, new_inner = inner.update(updates, state.inner, params)
    pick = lambda new, old: jnp.where(finite, new, old)
    new_updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)),
                                         new_updates)
    new_inner = jax.tree_util.tree_map(pick, new_inner, state.inner)
    skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
    return new_updates, OptState(new_inner, skipped, finite)

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(cfg: Any, total_steps: int, trainable_tree: PyTree,
                   **overrides) -> optax.GradientTransformationExtraArgs:
  """AdamW chain for `trainable_tree` (the trainable partition; None leaves are frozen).

  `trainable_tree` fixes the structure the returned transform expects (for the decay mask
  and lr groups); arrays or `jax.ShapeDtypeStruct`s both work.
  """
  c = _read_cfg(cfg, overrides)
  schedule = lr_schedule(float(c["lr"]), total_steps, warmup_steps(c, total_steps),
                         c["schedule"])
  decay_mask = jax.tree_util.tree_map(lambda no: not no,
                                      P.select(trainable_tree, c["no_decay"]))
  parts = []
  if c["clip_norm"]:
    parts.append(optax.clip_by_global_norm(float(c["clip_norm"])))
  parts.append(optax.adamw(schedule, b1=c["b1"], b2=c["b2"], eps=c["eps"],
                           weight_decay=float(c["weight_decay"]), mask=decay_mask))
  if c["lr_groups"]:
    parts.append(scale_by_tree(_lr_multipliers(trainable_tree, c["lr_groups"])))
  tx = optax.chain(*parts)
  if c["skip_nonfinite"]:
    return skip_nonfinite(tx)
  return optax.with_extra_args_support(tx)
