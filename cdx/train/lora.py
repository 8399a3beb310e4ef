"""LoRA factors: they live beside the frozen weights and are applied factored in the step.

For every targeted 2-D kernel ``W [in, out]`` (path rules as in `cdx.paths`) the
LoRA tree holds ``{"a": [in, r], "b": [r, out]}`` at the kernel's own path, i.e. it mirrors
the param tree with each targeted kernel leaf replaced by a dict:

  lora["llm"]["layers_0"]["attn"]["q"]["kernel"] == {"a": ..., "b": ...}
  # paths: llm/layers_0/attn/q/kernel/a, .../kernel/b

In a scanned decoder (params stacked under ``llm/layers`` with a leading layer axis) the
factors are stacked the same way: ``{"a": [layers, in, r], "b": [layers, r, out]}`` at
``llm/layers/attn/q/kernel``; targets then select a kernel of every layer at once.

The effective weight is ``W + (a @ b) * alpha / rank``, computed in float32 and cast back to
W's dtype. Init follows PEFT: ``a`` kaiming-uniform with a=√5 over fan_in = in (that is
U(±1/√in)) and ``b`` zeros, so at init the effective weight equals the base exactly.
Factors default to float32 (they are the trainable master copy) whatever W's dtype.

The train step does not merge: it passes the factors to the model
(`mllm.decode(..., lora=mllm.Lora(factors, alpha / rank))`), whose decoder linears compute
``x W + ((x a) b) * alpha / rank`` as PEFT does, so no [in, out] f32 copy of W nor its
gradient is ever formed (docs/PERFORMANCE.md §1). `merge_lora` (= `apply_lora`) folds the
factors into the weights, to export or to hand the merged LLM to the next stage; the merged
and the factored forward agree (tests/test_lora.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cdx import paths as P

PyTree = Any


def _set_path(tree: dict, keys: Sequence[str], value: Any) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _get_path(tree: Any, keys: Sequence[str]) -> Any:
  for k in keys:
    if not isinstance(tree, dict) or k not in tree:
      raise ValueError(f"LoRA path {'/'.join(keys)!r} is not in the param tree.")
    tree = tree[k]
  return tree


def _is_factor_pair(node: Any) -> bool:
  return isinstance(node, dict) and set(node) == {"a", "b"}


def _factor_items(lora: PyTree, prefix: tuple[str, ...] = ()):
  """Yields (key tuple, {"a","b"}) for every factor pair in a LoRA tree."""
  if _is_factor_pair(lora):
    yield prefix, lora
    return
  if not isinstance(lora, dict):
    raise ValueError(f"LoRA tree node at {'/'.join(prefix)!r} is not a dict: {type(lora)}.")
  for k, v in lora.items():
    yield from _factor_items(v, prefix + (str(k),))


def init_lora(params: PyTree, target_patterns: Sequence[P.Rule], rank: int,
              alpha: float, rng: jax.Array, dtype: Any = jnp.float32,
              strict: bool = True) -> dict:
  """LoRA factors for every kernel selected by `target_patterns`.

  Returns a nested dict mirroring `params` (only targeted branches) with {"a","b"}
  at each kernel's path. `alpha` is accepted for symmetry with `apply_lora` (PEFT's init
  does not depend on it). Raises ValueError if a target is not 2-D or if, with `strict`,
  a pattern matches nothing.
  """
  del alpha
  if rank < 1:
    raise ValueError(f"LoRA rank={rank} must be >= 1.")
  mask = P.select(params, target_patterns, strict=strict)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_mask = jax.tree_util.tree_leaves(mask)
  targets = [(kp, x) for (kp, x), m in zip(flat, flat_mask) if m]
  lora: dict = {}
  for i, (kp, kernel) in enumerate(targets):
    path = P.path_str(kp)
    stacked = P.is_stacked(path)
    if kernel.ndim != 2 + stacked:
      raise ValueError(f"LoRA target {path!r} has shape {kernel.shape}; only linear kernels "
                       "[in, out] ([layers, in, out] in a scanned stack) can be adapted — "
                       "tighten the target patterns.")
    *lead, d_in, d_out = kernel.shape
    bound = 1.0 / (d_in ** 0.5)  # kaiming_uniform(a=√5) over fan_in = d_in
    a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, d_in, rank), jnp.float32,
                           -bound, bound).astype(dtype)
    b = jnp.zeros((*lead, rank, d_out), dtype)
    _set_path(lora, path.split("/"), {"a": a, "b": b})
  return lora


def _adapted(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  if a.shape[-2] != kernel.shape[-2] or b.shape[-1] != kernel.shape[-1]:
    raise ValueError(f"LoRA factors a{a.shape} b{b.shape} do not fit kernel {kernel.shape}.")
  delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
  return (kernel.astype(jnp.float32) + delta * scale).astype(kernel.dtype)


def apply_lora(params: PyTree, lora: PyTree, alpha: float, rank: int) -> PyTree:
  """Params with every LoRA-targeted kernel replaced by W + (a @ b) * alpha / rank.

  Returns a new tree (untargeted leaves are shared, not copied). Jit- and grad-friendly.
  """
  if not lora:
    return params
  scale = alpha / rank
  out = _copy_dicts(params)
  for keys, ab in _factor_items(lora):
    kernel = _get_path(params, keys)
    _set_path(out, keys, _adapted(kernel, ab["a"], ab["b"], scale))
  return out


def merge_lora(params: PyTree, lora: PyTree, alpha: float, rank: int) -> PyTree:
  """Folds LoRA into the base weights (for export or the next stage's frozen base)."""
  return apply_lora(params, lora, alpha, rank)


def _copy_dicts(tree: Any) -> Any:
  """Copies the dict skeleton so that writes do not touch the caller's tree."""
  if isinstance(tree, dict):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree
