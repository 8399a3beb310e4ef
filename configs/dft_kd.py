"""DFT without TAF and without the attention term (folder `dft_kd/`): LM + logit KD, the
student's own adapter. The miniature's KD-only row (LLaVA-KD style).

  python launch/run.py --config=configs/dft_kd.py[:PRESET] --workdir=DIR
"""
from configs import dft


def get_config(arg=None):
  c = dft.get_config(arg)
  c.name = "dft_kd"
  c.taf = False
  c.inputs.init = "dpt_kd"
  c.trainable = (r"adapter/.*",)
  c.loss.attn = 0.0
  return c
