"""The stage recipes' trainable patterns and LoRA targets select the right parameters."""
import os

import pytest

from cdx import config as config_lib
from tests.test_paths import llava_tree, selected

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("stage,trainable,lora", [
    ("pretrain", ["adapter/fc1/bias", "adapter/fc1/kernel", "adapter/fc2/bias",
                  "adapter/fc2/kernel"], False),
    ("dpt", ["post/bias", "post/kernel"], False),
    ("dft", ["post/bias", "post/kernel"], True),
])
def test_stage_recipes_select_their_params(stage, trainable, lora):
  cfg = config_lib.load(os.path.join(CONFIGS, f"{stage}.py:paper"))
  t = llava_tree()
  assert selected(t, cfg.trainable, strict=True) == trainable
  assert cfg.lora.enabled == lora
  targets = selected(t, cfg.lora.targets, strict=True)
  assert len(targets) == 2 * 7  # q k v o gate up down per layer; never lm_head
  assert all(p.startswith("llm/layers_") and p.endswith("/kernel") for p in targets)
