"""The per-stage trainable patterns and LoRA targets (cdx/train/params.py)."""
import pytest

from cdx.train import params as P
from tests.test_paths import llava_tree, selected


def test_stage_table():
  t = llava_tree()
  assert selected(t, P.stage_rules("pretrain")["trainable"], strict=True) == [
      "adapter/fc1/bias", "adapter/fc1/kernel", "adapter/fc2/bias", "adapter/fc2/kernel"]
  assert selected(t, P.stage_rules("dpt")["trainable"]) == ["post/bias", "post/kernel"]
  assert P.stage_rules("dpt")["lora_targets"] == ()
  lora = selected(t, P.stage_rules("dft")["lora_targets"], strict=True)
  assert len(lora) == 2 * 7  # q k v o gate up down per layer
  assert all(p.startswith("llm/layers_") and p.endswith("/kernel") for p in lora)
  with pytest.raises(ValueError, match="stage='dtf'"):
    P.stage_rules("dtf")
