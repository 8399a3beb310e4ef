"""Visual instruction tuning with LoRA + adapter (LM loss): the teacher, or with
`role=student` the "SFT 2B" baseline.

  python launch/run.py --config=configs/finetune.py[:PRESET[,role=student]] --workdir=DIR

PRESET is `tiny` (default) or `paper`; see configs/common.py for the stage graph.
"""
from configs import common


def get_config(arg=None):
  return common.from_arg("finetune", arg)
