"""Loading experiment configs: `configs/<stage>.py[:ARG]` plus `--config.a.b=v` overrides.

A config file defines `get_config(arg: str) -> ml_collections.ConfigDict`. `ARG` is
`PRESET[,key=value,...]` (e.g. `tiny`, `paper`, `tiny,role=student`); the file decides
what the keys mean. Overrides are applied after `get_config`, typed by the field they
replace, and the result is locked so a typo can never add a silent new field.

Errors name the file, the key and the nearest valid keys:

  >>> load("configs/dft.py", ["--config.optim.lrr=1e-4"])
  ValueError: configs/dft.py has no field 'optim.lrr'. Did you mean: optim.lr?
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict


class UserError(RuntimeError):
  """A problem the user can fix (bad path, mesh, mismatch); printed without a traceback."""


def parse_arg(arg: str | None, known_presets: Sequence[str],
              default: str = "tiny") -> tuple[str, dict[str, str]]:
  """Splits `PRESET[,k=v,...]` into the preset name and a dict of string options."""
  parts = [p for p in (arg or "").split(",") if p]
  preset = default
  if parts and "=" not in parts[0]:
    preset = parts.pop(0)
  if preset not in known_presets:
    raise ValueError(f"Unknown preset {preset!r}; known presets: {', '.join(known_presets)}.")
  options = {}
  for p in parts:
    if "=" not in p:
      raise ValueError(f"Config argument {p!r} is not of the form key=value (in {arg!r}).")
    k, v = p.split("=", 1)
    options[k.strip()] = v.strip()
  return preset, options


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Imports `path.py[:ARG]` and returns its `get_config(ARG)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist (from --config={spec}).")
  name = "cdx_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  # Config files import their shared pieces as `from configs import common`.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"Config file {path!r} defines no get_config(arg).")
  cfg = module.get_config(arg or None)
  cfg.unlock()
  cfg.config_file = spec
  return cfg


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    full = f"{prefix}{k}"
    keys.append(full)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(flat_keys(v, full + "."))
  return keys


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # A bare word is a string: --config.data.template=pretrain.


def override(cfg: ml_collections.ConfigDict, key: str, text: str, source: str = "config"):
  """Sets `cfg.<key>` from the command-line string `text`, typed by the existing field."""
  *parents, leaf = key.split(".")
  node = cfg
  for i, p in enumerate(parents):
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      _unknown(cfg, key, source)
    node = node[p]
  if leaf not in node:
    _unknown(cfg, key, source)
  old = node[leaf]
  value = _parse_value(text)
  if isinstance(old, str) or (old is None and isinstance(value, (int, float))
                              and _field_type(node, leaf) is str):
    value = text  # Keep strings verbatim (e.g. a path that looks like a number).
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
    value = (value,) if isinstance(old, tuple) else [value]
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ValueError(f"--{source}.{key}={text}: {e}") from None


def _field_type(node, leaf):
  ref = node.get_ref(leaf) if hasattr(node, "get_ref") else None
  return getattr(ref, "_field_type", None) if ref is not None else None


def _unknown(cfg, key, source):
  keys = flat_keys(cfg)
  leaf = key.split(".")[-1]  # The right name in the wrong group (e.g. 'lr' for 'optim.lr').
  near = [k for k in keys if k.split(".")[-1] == leaf]
  near += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.6) if k not in near]
  near = near[:3]
  hint = f" Did you mean: {', '.join(near)}?" if near else ""
  file = cfg.get("config_file", "the config")
  raise ValueError(f"{file} has no field {key!r} (from --{source}.{key}).{hint}")


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file and applies `--config.a.b=v` style overrides; returns it locked."""
  cfg = load_file(spec)
  for item in overrides:
    if not item.startswith("--config."):
      raise ValueError(f"Unexpected argument {item!r}: overrides look like --config.a.b=value.")
    body = item[len("--config."):]
    if "=" not in body:
      raise ValueError(f"Override {item!r} has no '=value'.")
    key, text = body.split("=", 1)
    override(cfg, key, text)
  cfg.lock()
  return cfg


def placeholder(kind):
  """A typed empty field (e.g. a path the user must give for real presets)."""
  return config_dict.placeholder(kind)
