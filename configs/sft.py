"""Supervised fine-tuning after DFT: a new LoRA + post-connector, LM loss only.

  python launch/run.py --config=configs/sft.py[:PRESET] --workdir=DIR

Starts from `dft/` with DFT's LoRA merged into the LLM and trains a fresh LoRA (tiny: the
whole LLM) and the post-connector on instructions, without a teacher (docs/METHOD.md §7).
PRESET is `tiny` (default) or `paper`; configs/common.py describes the presets.
"""
from configs import common


def get_config(arg=None):
  preset, _ = common.parse(arg)
  tiny = preset == "tiny"
  return common.stage(
      "sft", preset,
      model_of="student", taf=True,
      init="dft",
      paper=dict(lr=2e-4, batch_size=192, max_length=1536),
      tiny=dict(lr=1e-3, batch_size=16, total_steps=common.TINY_SFT_STEPS),
      trainable=(r"post/.*",),
      lora_targets=common.LLM_LINEARS, full_finetune=tiny,
      loss_weights=dict(lm=1.0, kd=0.0, attn=0.0),
      data_kind="instruct",
  )
