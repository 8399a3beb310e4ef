"""Parameter paths and path rules: the one mechanism that names leaves of a param tree.

Every leaf of a param pytree (nested dicts, see docs/ARCHITECTURE.md) has a path such as
``llm/layers_3/attn/q/kernel``. A *rule list* is an ordered sequence of regexes, each
either a bare string (selects) or a pair ``(regex, bool)``; a string that starts with
``!`` is shorthand for ``(regex[1:], False)``. For each leaf the first rule whose regex
``fullmatch``es the path decides; a leaf no rule matches is not selected.

  mask = select(params, ["llm/lm_head/.*", "!llm/.*norm.*", "llm/.*"])  # bool tree
  trainable, frozen = partition(params, mask)      # None where the other half holds the leaf
  params = merge(trainable, frozen)

``trainable`` has the same nested-dict structure as ``params`` with ``None`` in place of
frozen leaves; ``None`` is an empty subtree to JAX, so ``jax.grad`` and optax only ever
see (and keep state for) the trainable arrays.

Rules with other values (`first_match`) serve the optimizer's lr groups and the models'
logical axes (cdx/parallel.py). This module sits below every other one: it knows no model.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Union

import jax

PyTree = Any
Rule = Union[str, tuple[str, bool]]


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath: Sequence[Any]) -> str:
  """'/'-joined form of a JAX key path, e.g. 'llm/layers_3/attn/q/kernel'."""
  return "/".join(_key_str(k) for k in keypath)


def tree_paths(tree: PyTree) -> PyTree:
  """A tree of the same structure whose leaves are the leaves' path strings."""
  return jax.tree_util.tree_map_with_path(lambda kp, _: path_str(kp), tree)


def leaf_paths(tree: PyTree) -> list[str]:
  """The leaves' path strings in flattening order."""
  return jax.tree_util.tree_leaves(tree_paths(tree))


_STACKED = re.compile(r"(^|/)layers/")


def is_stacked(path: str) -> bool:
  """True for a leaf of a scanned layer stack (`llm/layers/...`, cdx/models/stack.py),
  whose arrays carry a leading layer axis before the usual dims."""
  return _STACKED.search(path) is not None


def _compile(rules: Sequence[Rule]) -> list[tuple[str, re.Pattern, bool]]:
  if isinstance(rules, str):
    rules = (rules,)
  compiled = []
  for rule in rules:
    if isinstance(rule, str):
      value = not rule.startswith("!")
      regex = rule if value else rule[1:]
    elif (isinstance(rule, (tuple, list)) and len(rule) == 2
          and isinstance(rule[0], str) and isinstance(rule[1], bool)):
      regex, value = rule
    else:
      raise ValueError(
          f"rule {rule!r} is neither a regex string nor a (regex, bool) pair.")
    try:
      compiled.append((regex, re.compile(regex), value))
    except re.error as e:
      raise ValueError(f"rule regex {regex!r} does not compile: {e}") from e
  return compiled


def first_match(path: str, rules: Sequence[tuple[str, Any]]) -> tuple[int, Any] | None:
  """(index, value) of the first `(regex, value)` rule fullmatching `path`, else None.

  The generic form used by lr groups and logical axes, whose values are not bools.
  """
  for i, (regex, value) in enumerate(rules):
    if re.fullmatch(regex, path):
      return i, value
  return None


def select(tree: PyTree, rules: Sequence[Rule], strict: bool = False) -> PyTree:
  """Bool tree: True where the first fullmatching rule selects the leaf's path.

  With `strict`, a selecting rule that matches no path at all raises ValueError (catches typos such
  as 'adaptor/.*' that would silently freeze everything).
  """
  compiled = _compile(rules)
  paths = leaf_paths(tree)
  if strict:
    for regex, pattern, value in compiled:  # Exclusions may match nothing (e.g. no lm_head).
      if value and not any(pattern.fullmatch(p) for p in paths):
        raise ValueError(
            f"pattern {regex!r} matches no parameter path; first paths: {paths[:5]}.")

  def decide(path: str) -> bool:
    for _, pattern, value in compiled:
      if pattern.fullmatch(path):
        return value
    return False

  return jax.tree_util.tree_map(decide, tree_paths(tree))


def partition(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits `tree` into (selected, rest); each holds None where the other has the leaf."""
  selected = jax.tree_util.tree_map(lambda x, m: x if m else None, tree, mask)
  rest = jax.tree_util.tree_map(lambda x, m: None if m else x, tree, mask)
  return selected, rest


def merge(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `partition`: takes each leaf from whichever half is not None."""
  is_none = lambda x: x is None
  return jax.tree_util.tree_map(
      lambda t, f: f if t is None else t, trainable, frozen, is_leaf=is_none)


def count(tree: PyTree) -> int:
  """Number of scalar entries in the tree's array leaves (None leaves count 0)."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
