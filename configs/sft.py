"""Supervised fine-tuning after DFT (its LoRA merged): a new LoRA + post-connector, LM only.

  python launch/run.py --config=configs/sft.py[:PRESET] --workdir=DIR

PRESET is `tiny` (default) or `paper`; see configs/common.py for the stage graph.
"""
from configs import common


def get_config(arg=None):
  return common.from_arg("sft", arg)
