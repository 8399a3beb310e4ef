"""SFT on top of `dft_vat/` (folder `sft_vat/`): the final model of the +VAT-only row.

  python launch/run.py --config=configs/sft_vat.py[:PRESET] --workdir=DIR
"""
from configs import sft_kd


def get_config(arg=None):
  c = sft_kd.get_config(arg)
  c.name = "sft_vat"
  c.inputs.init = "dft_vat"
  return c
