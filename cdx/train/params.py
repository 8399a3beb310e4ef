"""Per-stage trainable patterns and LoRA targets, as path rules (cdx/paths.py syntax).

The rule machinery itself (path strings, select/partition/merge/count) lives in
cdx/paths.py, below the models; its names are re-exported here for callers that still
import them from this module.
``STAGES`` holds the per-stage trainable patterns of SPEC §7 as data for the configs.
"""
from __future__ import annotations

# Re-exports for callers not yet moved to cdx.paths.
from cdx.paths import (Rule, count, merge, partition, path_str, select,  # noqa: F401
                       tree_paths)

# Every 2-D linear kernel of the LLM except the output head; the embedding table is named
# `embedding`, not `kernel`, so it never matches (SPEC §7: "every linear layer of the LLM
# except lm_head").
DEFAULT_LORA_TARGETS: tuple[Rule, ...] = (("llm/lm_head/.*", False), r"llm/.*/kernel")

# Trainable base-param patterns and LoRA targets per stage (SPEC §7). LoRA factors, when a
# stage has targets, are always trainable; `trainable` names the base params that train.
STAGES: dict[str, dict[str, tuple[Rule, ...]]] = {
    "pretrain": {"trainable": (r"adapter/.*",), "lora_targets": ()},
    "finetune": {"trainable": (r"adapter/.*",), "lora_targets": DEFAULT_LORA_TARGETS},
    "finetune_full": {"trainable": (r"adapter/.*", r"llm/.*"), "lora_targets": ()},
    "dpt": {"trainable": (r"post/.*",), "lora_targets": ()},
    "dft": {"trainable": (r"post/.*",), "lora_targets": DEFAULT_LORA_TARGETS},
    "sft": {"trainable": (r"post/.*",), "lora_targets": DEFAULT_LORA_TARGETS},
}


def stage_rules(stage: str) -> dict[str, tuple[Rule, ...]]:
  """Returns {"trainable": rules, "lora_targets": rules} for a stage name of `STAGES`."""
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r} is unknown; choose one of {sorted(STAGES)}.")
  return dict(STAGES[stage])
