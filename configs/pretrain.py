"""Stage 0: train the adapter on caption data (LM loss). `:tiny,role=student` for the student.

  python launch/run.py --config=configs/pretrain.py[:PRESET[,role=student]] --workdir=DIR

PRESET is `tiny` (default) or `paper`; see configs/common.py for the stage graph.
"""
from configs import common


def get_config(arg=None):
  return common.from_arg("pretrain", arg)
