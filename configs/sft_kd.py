"""SFT on top of `dft_kd/` (folder `sft_kd/`): the final model of the KD-only row.

  python launch/run.py --config=configs/sft_kd.py[:PRESET] --workdir=DIR
"""
from configs import sft


def get_config(arg=None):
  c = sft.get_config(arg)
  c.name = "sft_kd"
  c.taf = False
  c.inputs.init = "dft_kd"
  c.trainable = (r"adapter/.*",)
  return c
