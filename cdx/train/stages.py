"""The stage graph: which stages a stage needs, and in what order to run them.

Each stage writes `<workdir>/<name>/` and, when finished, `<workdir>/<name>/DONE`.
A stage's inputs are named in its config (`inputs.init`, `inputs.teacher`); an input is
satisfied by a finished upstream stage in the same workdir or by an explicit weights path
(`model.hf_path` / `teacher.hf_path`). Missing inputs are built first when
`build_missing` is set (the default for `tiny`), otherwise the run stops with the exact
command that makes them.

Which config builds an upstream folder is the caller's knowledge (the launcher passes
configs/registry.py's `config_spec`); nothing here knows the config files.
"""
from __future__ import annotations

import os
from typing import Sequence

import ml_collections

from cdx import checkpoint as ckpt_lib

def needed_inputs(cfg: ml_collections.ConfigDict) -> list[str]:
  """Upstream stages this config reads, minus those replaced by explicit weight paths."""
  needed = []
  if cfg.inputs.teacher and not cfg.teacher.hf_path:
    needed.append(cfg.inputs.teacher)
  if cfg.inputs.init:  # The init stage carries trained parts (e.g. the post-connector).
    needed.append(cfg.inputs.init)
  return needed


def plan(cfg: ml_collections.ConfigDict, workdir: str, load_config, config_spec,
         build_missing: bool | None = None) -> list[ml_collections.ConfigDict]:
  """Configs to run, upstream first, ending with `cfg` (finished stages are left out).

  `config_spec(name, preset, config_dir="configs") -> str` names the config that builds
  stage folder `name`; `load_config(spec) -> ConfigDict` builds it (the launcher passes one
  that applies the `--upstream.*` overrides). Raises `MissingInputError` when an input is
  missing and may not be built.
  """
  build = cfg.build_missing if build_missing is None else build_missing
  order: list[ml_collections.ConfigDict] = []
  seen: set[str] = set()

  def visit(c, chain: Sequence[str]):
    for name in needed_inputs(c):
      if name in chain:
        raise ValueError(f"Stage graph has a cycle: {' -> '.join([*chain, name])}")
      if name in seen or ckpt_lib.is_done(os.path.join(workdir, name)):
        continue
      if not build:
        raise MissingInputError(c, name, workdir, config_spec)
      up = load_config(config_spec(name, cfg.preset))
      visit(up, [*chain, name])
      seen.add(name)
      order.append(up)

  visit(cfg, [cfg.name])
  if not ckpt_lib.is_done(os.path.join(workdir, cfg.name)):
    order.append(cfg)
  return order


class MissingInputError(RuntimeError):
  """An input stage has no finished output and the run may not build it."""

  def __init__(self, cfg, name: str, workdir: str, config_spec):
    self.stage, self.missing = cfg.name, name
    # The upstream config sits beside the one the user ran (relative or absolute path).
    config_dir = os.path.dirname(cfg.get("config_file", "").partition(":")[0]) or "configs"
    cmd = (f"python launch/run.py --config={config_spec(name, cfg.preset, config_dir)} "
           f"--workdir={workdir}")
    field = "teacher.hf_path" if name == cfg.inputs.teacher else None
    alt = (f"\n  or point --config.{field}=DIR at an HF LLaVA dir of the teacher," if field
           else "")
    super().__init__(
        f"Stage '{cfg.name}' needs the finished stage '{name}' "
        f"({os.path.join(workdir, name, 'DONE')} does not exist). Make it with:\n"
        f"  {cmd} [your overrides for it]{alt}\n"
        f"  or add --build_missing to build missing stages before '{cfg.name}'.")
