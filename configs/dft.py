"""Distilled fine-tuning (DFT): LoRA + post-connector, LM + KD + visual-attention alignment.

  python launch/run.py --config=configs/dft.py[:PRESET] --workdir=DIR

The TAF student from `dpt/` learns instructions from the finetuned teacher: LoRA on every
linear of its LLM but lm_head (tiny: the whole LLM) and the post-connector, with KD on the
logits and the attention of matched layer groups over the image (docs/METHOD.md §5–7).
PRESET is `tiny` (default) or `paper`; configs/common.py describes the presets.
"""
from configs import common


def get_config(arg=None):
  preset, _ = common.parse(arg)
  tiny = preset == "tiny"
  return common.stage(
      "dft", preset,
      model_of="student", teacher="finetune", taf=True,
      init="dpt",
      paper=dict(lr=2e-4, batch_size=128, max_length=1536),
      tiny=dict(lr=1e-3, batch_size=16, total_steps=common.TINY_DFT_STEPS),
      trainable=(r"post/.*",),
      lora_targets=common.LLM_LINEARS, full_finetune=tiny,
      # The paper's attention weight is 1; the tiny models need more (configs/common.py).
      loss_weights=dict(lm=1.0, kd=1.0, attn=common.TINY_ATTN_WEIGHT if tiny else 1.0),
      data_kind="instruct",
  )
