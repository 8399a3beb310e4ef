"""DFT with the attention term but without TAF (folder `dft_vat/`): LM + logit KD + visual
attention alignment, the student's own adapter. The miniature's +VAT-only row.

  python launch/run.py --config=configs/dft_vat.py[:PRESET] --workdir=DIR
"""
from configs import dft
from configs import dft_kd


def get_config(arg=None):
  c = dft_kd.get_config(arg)
  c.name = "dft_vat"
  c.loss.attn = dft.get_config(arg).loss.attn  # The full method's weight.
  return c
