"""DPT without TAF (folder `dpt_kd/`): the student's own adapter learns captions with LM +
logit KD from the teacher, the LLM frozen (LLaVA-KD's distilled pre-training). The first
stage of the miniature's KD-only and +VAT-only rows.

  python launch/run.py --config=configs/dpt_kd.py[:PRESET] --workdir=DIR
"""
from configs import dpt


def get_config(arg=None):
  c = dpt.get_config(arg)
  c.name = "dpt_kd"
  c.taf = False  # No post-connector: the student's own adapter maps the vision features.
  c.trainable = (r"adapter/.*",)
  return c
