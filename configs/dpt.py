"""Distilled pre-training: TAF post-connector only, LM + KD (SPEC §7).

  python launch/run.py --config=configs/dpt.py[:PRESET] --workdir=DIR

PRESET is `tiny` (default) or `paper`; see configs/common.py for the stage graph.
"""
from configs import common


def get_config(arg=None):
  return common.from_arg("dpt", arg)
