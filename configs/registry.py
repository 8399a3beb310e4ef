"""The stage registry: every stage folder under --workdir and the config that builds it.

The stage graph (docs/METHOD.md §7). An arrow carries a stage's trained parts on; the
distillation stages (dpt*, dft*) also read the teacher, `finetune/`:

  pretrain ─► finetune                              the teacher
  pretrain_student ─► finetune_student              the "SFT 2B" baseline
  (pretrain_student, tiny only) ─► dpt ─► dft ─► sft                  CompoDistill
                                   dpt ─► dft_novat ─► sft_novat      +TAF only (no VAT)
  (pretrain_student) ─► dpt_kd ─► dft_kd ─► sft_kd                    KD only (no TAF/VAT)
                        dpt_kd ─► dft_vat ─► sft_vat                  +VAT only (no TAF)

A stage is one recipe file in configs/ plus its row below. The launcher resolves upstream
folders with `config_spec`; cdx/train/stages.py plans with the resolver it is given.
"""
from __future__ import annotations

import os

# Folder under --workdir -> (config file stem in configs/, arguments after the preset).
STAGES = {
    "pretrain": ("pretrain", ""),
    "finetune": ("finetune", ""),
    "pretrain_student": ("pretrain", "role=student"),
    "finetune_student": ("finetune", "role=student"),
    "dpt": ("dpt", ""),
    "dft": ("dft", ""),
    "sft": ("sft", ""),
    "dft_novat": ("dft_novat", ""),
    "sft_novat": ("sft_novat", ""),
    "dpt_kd": ("dpt_kd", ""),
    "dft_kd": ("dft_kd", ""),
    "sft_kd": ("sft_kd", ""),
    "dft_vat": ("dft_vat", ""),
    "sft_vat": ("sft_vat", ""),
}


def config_spec(name: str, preset: str, config_dir: str = "configs") -> str:
  """The `--config=` value that builds stage folder `name` with `preset`."""
  if name not in STAGES:
    raise ValueError(f"No config builds stage folder {name!r}; known stages: "
                     f"{', '.join(STAGES)} (add a row to configs/registry.py).")
  stem, arg = STAGES[name]
  return f"{os.path.join(config_dir, stem)}.py:{preset}{',' + arg if arg else ''}"
