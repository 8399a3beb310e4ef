"""A finished model read from disk: the one reader that training and evaluation share.

  cfg, params, info = load_trained("DIR/dft")           # a cdx stage dir
  cfg, params, info = load_trained("/weights/llava-hf")  # an HF LLaVA dir (info == {})

A cdx stage dir holds `model.json` and `final/` (`cdx.checkpoint.save_model`); an HF LLaVA
dir holds config.json + safetensors (`cdx.hf.load_llava`). It sits below cdx/train and
cdx/eval so that evaluation reads trained models without importing the training layer.
"""
from __future__ import annotations

import os
from typing import Callable

from cdx import checkpoint as ckpt_lib
from cdx import hf
from cdx.models import mllm


def load_trained(path: str, dtype: str = "float32", check: Callable[[dict], None] = None
                 ) -> tuple[mllm.MllmConfig, dict, dict]:
  """(config, params, model.json) of a finished stage dir (`final/` + `model.json`), or
  (config, params, {}) of an HF LLaVA dir (its weights as `dtype`). ValueError otherwise.

  check(model.json): called before any weight is read (e.g. the tokenizer fingerprint)."""
  if os.path.isfile(os.path.join(path, ckpt_lib.MODEL_FILE)):
    if check is not None:
      check(ckpt_lib.read_model_info(path))
    params, info = ckpt_lib.load_model(path)
    return mllm.config_from_dict(info["config"]), params, info
  if os.path.isfile(os.path.join(path, "config.json")):
    model_cfg, params = hf.load_llava(path, dtype=dtype)
    return model_cfg, params, {}
  raise ValueError(f"model path {path!r} holds neither model.json (a cdx stage dir) nor "
                   "config.json (an HF LLaVA dir).")
