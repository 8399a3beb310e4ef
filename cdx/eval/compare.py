"""Comparing rows of a results table: seeds, paired bootstrap over items, gap closure.

A row is a model recipe trained with several seeds and scored item by item on the same
evaluation items. Its per-item score (1 right, 0 wrong, 0.5 for one of two orders right)
is averaged over seeds first, so that the bootstrap below resamples items, the source of
the evaluation noise, while the seed spread is reported separately (mean ± std).

  s = seed_summary([0.61, 0.64, 0.60])            # {"mean", "std", "n"}
  d = paired_bootstrap(a, b, rounds=2000, seed=0)  # a, b: [items] per-item scores, same order
      # {"diff": mean(a) - mean(b), "lo", "hi" (95 % percentile interval), "p_le_0"}
  g = gap_closure(method, base, teacher)          # (method - base) / (teacher - base)

`paired_bootstrap` draws one set of item indices per round and applies it to both rows
(the pairing removes the item difficulty shared by the rows). `gap_closure_bootstrap`
does the same for the ratio, with three rows.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def seed_summary(values: Sequence[float]) -> dict:
  """Mean and sample standard deviation (ddof=1; 0 for one seed) over seeds."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError("no values to summarize.")
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "n": int(v.size)}


def standard_error(item_scores: Sequence[float]) -> float:
  """SE of the mean of per-item scores (std / sqrt(n), ddof=1)."""
  v = np.asarray(item_scores, np.float64)
  return float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")


def _check(*rows: np.ndarray) -> None:
  n = {r.shape for r in rows}
  if len(n) != 1 or rows[0].ndim != 1 or rows[0].size == 0:
    raise ValueError(f"rows must be non-empty 1-D arrays of one length, got shapes "
                     f"{sorted(n)}; score the same items in the same order.")


def _indices(n: int, rounds: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], rounds: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict:
  """Mean difference a - b with its paired percentile bootstrap interval over items."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  _check(a, b)
  idx = _indices(a.size, rounds, seed)
  diffs = a[idx].mean(1) - b[idx].mean(1)
  q = (1 - level) / 2
  return {"diff": float(a.mean() - b.mean()), "lo": float(np.quantile(diffs, q)),
          "hi": float(np.quantile(diffs, 1 - q)), "p_le_0": float((diffs <= 0).mean()),
          "rounds": rounds, "items": int(a.size)}


def gap_closure(method: float, base: float, teacher: float) -> float:
  """(method - base) / (teacher - base): the share of the teacher's lead that the method
  recovers (nan when the teacher does not lead the base)."""
  gap = teacher - base
  return float((method - base) / gap) if gap > 0 else float("nan")


def gap_closure_bootstrap(method: Sequence[float], base: Sequence[float],
                          teacher: Sequence[float], rounds: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict:
  """Gap closure of per-item scores with a paired percentile interval over items (rounds
  where the resampled teacher does not lead the base are dropped and counted)."""
  m, b, t = (np.asarray(x, np.float64) for x in (method, base, teacher))
  _check(m, b, t)
  idx = _indices(m.size, rounds, seed)
  mm, bb, tt = m[idx].mean(1), b[idx].mean(1), t[idx].mean(1)
  ok = tt - bb > 0
  ratios = (mm[ok] - bb[ok]) / (tt[ok] - bb[ok])
  q = (1 - level) / 2
  lo, hi = ((float(np.quantile(ratios, q)), float(np.quantile(ratios, 1 - q)))
            if ratios.size else (float("nan"), float("nan")))
  return {"closure": gap_closure(m.mean(), b.mean(), t.mean()), "lo": lo, "hi": hi,
          "dropped_rounds": int((~ok).sum()), "rounds": rounds}
