"""SFT on top of `dft_novat/`: the final model of the miniature's +TAF-only row (`sft_novat/`).

  python launch/run.py --config=configs/sft_novat.py[:PRESET] --workdir=DIR
"""
from configs import sft


def get_config(arg=None):
  c = sft.get_config(arg)
  c.name = "sft_novat"
  c.inputs.init = "dft_novat"
  return c
