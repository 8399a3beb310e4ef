"""DFT without the visual-attention term (folder `dft_novat/`): the miniature's +TAF-only row.

  python launch/run.py --config=configs/dft_novat.py[:PRESET] --workdir=DIR
"""
from configs import dft


def get_config(arg=None):
  c = dft.get_config(arg)
  c.name = "dft_novat"
  c.loss.attn = 0.0
  return c
