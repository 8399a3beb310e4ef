"""Visual instruction tuning: LoRA + adapter, LM loss. The teacher, or with `role=student`
the "SFT 2B" baseline.

  python launch/run.py --config=configs/finetune.py[:PRESET[,role=student]] --workdir=DIR

Starts from its own stage 0 (`pretrain/`, or `pretrain_student/`) and writes `finetune/`
(the teacher every distillation stage reads) or `finetune_student/`. LoRA covers every
linear of the LLM but lm_head; the tiny LLMs have no pretrained base to adapt, so there the
whole LLM trains instead.
PRESET is `tiny` (default) or `paper`; configs/common.py describes the presets.
"""
from configs import common


def get_config(arg=None):
  preset, role = common.parse(arg, roles=("teacher", "student"))
  tiny = preset == "tiny"
  return common.stage(
      "finetune", preset, role=role,
      model_of=role,
      init="pretrain" if role == "teacher" else "pretrain_student",
      paper=dict(lr=2e-4, batch_size=128, max_length=2048),
      # The SFT baseline is step-matched to the distilled students (DFT + SFT steps).
      tiny=dict(lr=1e-3, batch_size=16, total_steps=120 if role == "teacher" else
                common.TINY_DFT_STEPS + common.TINY_SFT_STEPS),
      trainable=(r"adapter/.*",),
      lora_targets=common.LLM_LINEARS, full_finetune=tiny,
      loss_weights=dict(lm=1.0, kd=0.0, attn=0.0),
      data_kind="instruct",
  )
