"""Distilled pre-training (DPT): the TAF post-connector alone, LM + KD, on captions.

  python launch/run.py --config=configs/dpt.py[:PRESET] --workdir=DIR

The student takes the finetuned teacher's adapter (frozen) and learns a post-connector from
the teacher's hidden size to its own (docs/METHOD.md §2, §7). The LLM is the base student
(frozen in pretrain, so the paper needs no student stage 0 here); the tiny LLMs have no base,
so there DPT starts from `pretrain_student/`.
PRESET is `tiny` (default) or `paper`; configs/common.py describes the presets.
"""
from configs import common


def get_config(arg=None):
  preset, _ = common.parse(arg)
  tiny = preset == "tiny"
  return common.stage(
      "dpt", preset,
      model_of="student", teacher="finetune", taf=True,
      init="pretrain_student" if tiny else "",
      paper=dict(lr=2e-4, batch_size=256, max_length=1536),
      tiny=dict(lr=2e-3, batch_size=16, total_steps=40, max_length=128),  # captions
      trainable=(r"post/.*",),
      lora_targets=(),
      loss_weights=dict(lm=1.0, kd=1.0, attn=0.0),
      data_kind="pretrain",
  )
