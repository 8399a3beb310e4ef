"""Distilled fine-tuning: LoRA + post-connector, LM + KD + visual-attention alignment.

  python launch/run.py --config=configs/dft.py[:PRESET] --workdir=DIR

PRESET is `tiny` (default) or `paper`; see configs/common.py for the stage graph.
"""
from configs import common


def get_config(arg=None):
  return common.from_arg("dft", arg)
