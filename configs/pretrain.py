"""Stage 0: the adapter learns to map vision features into the LLM, on captions (LM loss).

  python launch/run.py --config=configs/pretrain.py[:PRESET[,role=student]] --workdir=DIR

Trains the teacher (folder `pretrain/`), or with `role=student` the student
(`pretrain_student/`: the "SFT" baseline's start, and the tiny DPT's LLM). The LLM stays
frozen; only the tiny LLMs, which start from random weights, train here too.
PRESET is `tiny` (default) or `paper`; configs/common.py describes the presets.
"""
from configs import common


def get_config(arg=None):
  preset, role = common.parse(arg, roles=("teacher", "student"))
  tiny = preset == "tiny"
  return common.stage(
      "pretrain", preset, role=role,
      model_of=role,
      init="",  # Base weights: SigLIP + the LLM (paper: model.hf_path, model.vision_path).
      paper=dict(lr=1e-3, batch_size=256, max_length=2048),
      # Tiny captions are at most ~90 tokens with the 64 image tokens: 128, not 256, halves
      # the cost of a step.
      tiny=dict(lr=3e-3, batch_size=16, total_steps=120, max_length=128),
      trainable=(r"adapter/.*", r"llm/.*") if tiny else (r"adapter/.*",),
      lora_targets=(),
      loss_weights=dict(lm=1.0, kd=0.0, attn=0.0),
      data_kind="pretrain",
  )
