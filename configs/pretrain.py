"""Stage 0: train the adapter on caption data (LM loss). `:tiny,role=student` for the student.

  python launch/run.py --config=configs/pretrain.py[:PRESET[,role=student]] --workdir=DIR

PRESET is `tiny` (default) or `paper`; see configs/common.py for the stage graph.
"""
from configs import common
from cdx.config import parse_arg


def get_config(arg=None):
  preset, options = parse_arg(arg, common.PRESETS)
  role = options.pop("role", "teacher")
  if options:
    raise ValueError(f"Unknown config arguments {sorted(options)}; only role= is accepted.")
  return common.get_config("pretrain", preset, role)
