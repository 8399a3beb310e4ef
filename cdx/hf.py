"""HF checkpoint import/export: SigLIP vision, Qwen2 LM, LLaVA (SigLIP + Qwen2).

Each architecture has ONE mapping table, rows `(our param path, HF key, transform)`, used
in both directions. Transforms: "copy"; "linear" (HF Linear weight [out, in] <-> our
kernel [in, out]); "conv" (HF patch Conv2d weight [D, 3, p, p] <-> our 2-D patch kernel
[p*p*3, D] in (row, col, channel) order). Only local directories are read (config.json +
model.safetensors or a sharded model.safetensors.index.json); nothing touches the hub.

Loading fails on missing keys and on unexpected keys, naming them; keys the model never
uses (SigLIP post_layernorm and pooling head, vision layers after the feature layer,
a tied lm_head, SigLIP's text tower) are ignored explicitly.

Keys are spelled as transformers 5.x `save_pretrained` writes them (LLaVA:
vision_tower.* / multi_modal_projector.* / language_model.model.* /
language_model.lm_head.weight; SigLIP without a `vision_model.` level); other spellings
(model.language_model.*, vision_tower.vision_model.*, vision_model.*) are renamed on load.
Export writes config.json + one model.safetensors. The vision tower is written truncated to the layers the
feature layer needs (HF `vision_feature_layer` becomes -1, no head), which computes the
same features. HF's SigLIP module still holds a `post_layernorm` that the features never
pass through (they are taken before it); cdx does not keep it, so export writes it as
weight 1, bias 0 and transformers loads the dir without newly initialising anything.
A TAF student's post-connector is folded into the projector's second
linear (post ∘ fc2 is one linear map); the projector's intermediate width then stays the
teacher's hidden Ht, which stock HF LLaVA cannot hold unless Ht == the text hidden Hs:
Ht < Hs is zero-padded to Hs (exact), Ht > Hs writes a `projector_hidden_size` and a small
remote-code model file (cdx/modeling_cdx_llava.py). docs/EXPORT.md has the details.
"""
import dataclasses
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from cdx.models import adapter as adapter_lib
from cdx.models import mllm
from cdx.models import qwen
from cdx.models import siglip
from cdx.models import stack

# --------------------------------------------------------------------------- tables

_SIGLIP_TOP = [
    ("patch/kernel", "embeddings.patch_embedding.weight", "conv"),
    ("patch/bias", "embeddings.patch_embedding.bias", "copy"),
    ("pos_embedding", "embeddings.position_embedding.weight", "copy"),
]
_SIGLIP_LAYER = [
    ("norm1/scale", "layer_norm1.weight", "copy"),
    ("norm1/bias", "layer_norm1.bias", "copy"),
    ("norm2/scale", "layer_norm2.weight", "copy"),
    ("norm2/bias", "layer_norm2.bias", "copy"),
    *[row for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"),
                               ("o", "out_proj"))
      for row in ((f"attn/{ours}/kernel", f"self_attn.{theirs}.weight", "linear"),
                  (f"attn/{ours}/bias", f"self_attn.{theirs}.bias", "copy"))],
    *[row for fc in ("fc1", "fc2")
      for row in ((f"mlp/{fc}/kernel", f"mlp.{fc}.weight", "linear"),
                  (f"mlp/{fc}/bias", f"mlp.{fc}.bias", "copy"))],
]
_QWEN_TOP = [
    ("embed/embedding", "embed_tokens.weight", "copy"),
    ("final_norm/scale", "norm.weight", "copy"),
]
_QWEN_LAYER = [
    ("input_norm/scale", "input_layernorm.weight", "copy"),
    ("post_norm/scale", "post_attention_layernorm.weight", "copy"),
    *[row for p in ("q", "k", "v")
      for row in ((f"attn/{p}/kernel", f"self_attn.{p}_proj.weight", "linear"),
                  (f"attn/{p}/bias", f"self_attn.{p}_proj.bias", "copy"))],
    ("attn/o/kernel", "self_attn.o_proj.weight", "linear"),
    *[(f"mlp/{p}/kernel", f"mlp.{p}_proj.weight", "linear") for p in ("gate", "up", "down")],
]


def _siglip_table(num_layers: int, ours: str, theirs: str) -> list:
  rows = [(ours + o, theirs + t, f) for o, t, f in _SIGLIP_TOP]
  for i in range(num_layers):
    rows += [(f"{ours}layers_{i}/{o}", f"{theirs}encoder.layers.{i}.{t}", f)
             for o, t, f in _SIGLIP_LAYER]
  return rows


def _qwen_table(cfg: qwen.QwenConfig, ours: str, theirs: str,
                head: str = "lm_head.weight") -> list:
  rows = [(ours + o, theirs + t, f) for o, t, f in _QWEN_TOP]
  for i in range(cfg.num_layers):
    rows += [(f"{ours}layers_{i}/{o}", f"{theirs}layers.{i}.{t}", f)
             for o, t, f in _QWEN_LAYER]
  if not cfg.tie_embeddings:
    rows.append((ours + "lm_head/kernel", head, "linear"))
  return rows


def _llava_table(cfg: mllm.MllmConfig, in_memory: bool = False) -> list:
  """Rows in save_pretrained's spelling, or (in_memory) the module names of transformers 5
  LLaVA (model.vision_tower. / model.multi_modal_projector. / model.language_model. /
  lm_head.), which load without HF's per-class renaming (skipped for remote code)."""
  model = "model." if in_memory else ""
  rows = _siglip_table(siglip.layers_needed(cfg.vision, cfg.feature_layer), "vision/",
                       model + "vision_tower.")
  rows += [(f"adapter/fc{n}/{o}", f"{model}multi_modal_projector.linear_{n}.{t}", f)
           for n in (1, 2) for o, t, f in (("kernel", "weight", "linear"),
                                           ("bias", "bias", "copy"))]
  if in_memory:
    return rows + _qwen_table(cfg.text, "llm/", "model.language_model.", "lm_head.weight")
  return rows + _qwen_table(cfg.text, "llm/", "language_model.model.",
                            "language_model.lm_head.weight")


# ----------------------------------------------------------------------- transforms

def _to_ours(x: np.ndarray, transform: str) -> np.ndarray:
  if transform == "linear":
    return x.T
  if transform == "conv":  # [D, C, p, p] -> [p, p, C, D] -> [p*p*C, D]
    return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
  return x


def _to_hf(x, transform: str):
  if transform == "linear":
    return x.T
  if transform == "conv":
    p = int(round((x.shape[0] / 3) ** 0.5))
    return x.reshape(p, p, 3, x.shape[1]).transpose(3, 2, 0, 1)
  return x


# ------------------------------------------------------------------------ file I/O

def _read_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise ValueError(f"No config.json in {path!r}: expected a local HF model directory.")
  with open(file) as f:
    return json.load(f)


def _open_tensors(path: str) -> dict:
  """HF key -> (file, key) for a single-file or sharded safetensors checkpoint."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  single = os.path.join(path, "model.safetensors")
  if not os.path.isfile(single):
    raise ValueError(f"No model.safetensors or model.safetensors.index.json in {path!r}.")
  with safe_open(single, framework="flax") as f:
    return {k: single for k in f.keys()}


def _load(path: str, table: list, ignore: list, rename=lambda k: k, dtype="float32"):
  """Reads the table's tensors -> nested param dict; strict about missing/unexpected.

  ignore: regexes or predicates over (renamed) HF keys that may be present but unused.
  """
  files = {rename(k): (f, k) for k, f in _open_tensors(path).items()}
  wanted = {theirs for _, theirs, _ in table}
  missing = sorted(wanted - set(files))
  unexpected = sorted(k for k in set(files) - wanted
                      if not any(p(k) if callable(p) else re.search(p, k) for p in ignore))
  if missing or unexpected:
    raise ValueError(f"Checkpoint {path!r} does not match the model: missing keys "
                     f"{missing[:20]}{' ...' if len(missing) > 20 else ''}; unexpected keys "
                     f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}.")
  by_file = {}
  for ours, theirs, transform in table:
    by_file.setdefault(files[theirs][0], []).append((ours, files[theirs][1], transform))
  params = {}
  for file, rows in by_file.items():
    with safe_open(file, framework="flax") as f:
      for ours, key, transform in rows:
        x = _to_ours(f.get_tensor(key), transform)
        _set(params, ours, jnp.asarray(x, dtype))
  return params


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for p in path.split("/"):
    if p not in tree:
      raise ValueError(f"params lack {path!r} (missing {p!r}).")
    tree = tree[p]
  return tree


def _post_layernorm(prefix: str, hidden: int) -> dict:
  """SigLIP's unused post_layernorm (see the module docstring) as weight 1, bias 0."""
  return {f"{prefix}post_layernorm.weight": np.ones((hidden,), np.float32),
          f"{prefix}post_layernorm.bias": np.zeros((hidden,), np.float32)}


def _save(params: dict, table: list, path: str, config: dict, dtype,
          constants: dict | None = None) -> None:
  """Writes the table's tensors and `constants` (HF key -> array) in `dtype`."""
  os.makedirs(path, exist_ok=True)
  tensors = {theirs: jnp.asarray(_to_hf(jnp.asarray(_get(params, ours)), f), dtype)
             for ours, theirs, f in table}
  tensors.update({k: jnp.asarray(v, dtype) for k, v in (constants or {}).items()})
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


# ---------------------------------------------------------------------- configs

def _siglip_config(d: dict) -> siglip.SiglipConfig:
  act = d.get("hidden_act", "gelu_pytorch_tanh")
  if act != "gelu_pytorch_tanh" or d.get("num_channels", 3) != 3:
    raise ValueError(f"Unsupported SigLIP config: hidden_act={act!r}, num_channels="
                     f"{d.get('num_channels', 3)} (need gelu_pytorch_tanh and 3).")
  return siglip.SiglipConfig(
      image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 16),
      hidden_size=d.get("hidden_size", 768), num_layers=d.get("num_hidden_layers", 12),
      num_heads=d.get("num_attention_heads", 12), mlp_dim=d.get("intermediate_size", 3072),
      layer_norm_eps=d.get("layer_norm_eps", 1e-6))


def _siglip_hf(cfg: siglip.SiglipConfig, num_layers: int) -> dict:
  return {"model_type": "siglip_vision_model", "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.mlp_dim, "num_hidden_layers": num_layers,
          "num_attention_heads": cfg.num_heads, "image_size": cfg.image_size,
          "patch_size": cfg.patch_size, "num_channels": 3,
          "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
          "vision_use_head": False}


def _qwen_config(d: dict, tie: bool | None = None) -> qwen.QwenConfig:
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ValueError(f"Unsupported RoPE scaling {rope}; only plain RoPE is implemented.")
  if d.get("use_sliding_window", False):
    raise ValueError("use_sliding_window=True is not supported.")
  if d.get("hidden_act", "silu") != "silu":
    raise ValueError(f"Unsupported Qwen2 hidden_act={d['hidden_act']!r}; need 'silu'.")
  heads = d.get("num_attention_heads", 32)
  hidden = d.get("hidden_size", 4096)
  return qwen.QwenConfig(
      vocab_size=d.get("vocab_size", 151936), hidden_size=hidden,
      num_layers=d.get("num_hidden_layers", 32), num_heads=heads,
      num_kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim") or hidden // heads,
      mlp_dim=d.get("intermediate_size", 22016),
      rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
      rms_norm_eps=d.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(d.get("tie_word_embeddings", False) if tie is None else tie),
      max_position_embeddings=d.get("max_position_embeddings", 32768))


def _qwen_hf(cfg: qwen.QwenConfig, eos=None, pad=None) -> dict:
  if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    raise ValueError(f"HF Qwen2 needs head_dim*num_heads == hidden_size; got "
                     f"{cfg.head_dim}*{cfg.num_heads} != {cfg.hidden_size}.")
  return {"model_type": "qwen2", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.mlp_dim,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "hidden_act": "silu",
          "max_position_embeddings": cfg.max_position_embeddings,
          "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "use_sliding_window": False, "tie_word_embeddings": cfg.tie_embeddings,
          "eos_token_id": eos, "pad_token_id": pad}


def _vision_ignores(n_layers: int) -> list:
  """Vision keys the encoder never uses, including layers >= n_layers."""
  def later_layer(key: str) -> bool:
    m = re.search(r"^(vision_tower\.)?encoder\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(2)) >= n_layers
  return [r"post_layernorm\.", r"(^|\.)head\.", later_layer]


# ------------------------------------------------------------------------ public API

def load_siglip(path: str, feature_layer: int = -2,
                dtype: str = "float32") -> tuple[siglip.SiglipConfig, dict]:
  """SiglipVisionModel or SiglipModel dir -> (config, vision params up to feature_layer)."""
  d = _read_config(path)
  cfg = _siglip_config(d.get("vision_config", d) if d.get("model_type") == "siglip" else d)
  n = siglip.layers_needed(cfg, feature_layer)
  ignore = _vision_ignores(n) + [r"^text_model\.", r"^logit_scale$", r"^logit_bias$"]
  rename = lambda k: re.sub(r"^vision_model\.", "", k)
  return cfg, _load(path, _siglip_table(n, "", ""), ignore, rename, dtype)


def load_qwen2(path: str, dtype: str = "float32") -> tuple[qwen.QwenConfig, dict]:
  """Qwen2ForCausalLM dir -> (config, params of the `llm` sub-tree)."""
  cfg = _qwen_config(_read_config(path))
  ignore = [r"rotary_emb\.inv_freq$"] + ([r"^lm_head\.weight$"] if cfg.tie_embeddings
                                         else [])
  return cfg, _load(path, _qwen_table(cfg, "", "model."), ignore, dtype=dtype)


# Key spellings across transformers versions -> the one save_pretrained writes (v5.23).
_LLAVA_RENAMES = [(r"^model\.language_model\.", "language_model.model."),
                  (r"^lm_head\.", "language_model.lm_head."),
                  (r"^model\.vision_tower\.", "vision_tower."),
                  (r"^vision_tower\.vision_model\.", "vision_tower."),
                  (r"^model\.multi_modal_projector\.", "multi_modal_projector.")]


def _rename_llava(key: str) -> str:
  for old, new in _LLAVA_RENAMES:
    key = re.sub(old, new, key)
  return key


def load_llava(path: str, dtype: str = "float32") -> tuple[mllm.MllmConfig, dict]:
  """LlavaForConditionalGeneration dir (SigLIP + Qwen2) -> (MllmConfig, params).

  Also reads cdx's remote-code exports: `projector_hidden_size` -> cfg.adapter_hidden.
  """
  d = _read_config(path)
  vis, txt = d.get("vision_config", {}), d.get("text_config", {})
  if vis.get("model_type") not in ("siglip_vision_model", "siglip"):
    raise ValueError(f"Vision tower {vis.get('model_type')!r} is not SigLIP.")
  if txt.get("model_type") != "qwen2":
    raise ValueError(f"Text model {txt.get('model_type')!r} is not qwen2.")
  if d.get("projector_hidden_act", "gelu") != "gelu":
    raise ValueError(f"projector_hidden_act={d['projector_hidden_act']!r}; only 'gelu' "
                     "(mlp2x_gelu) is supported.")
  if not d.get("multimodal_projector_bias", True):
    raise ValueError("multimodal_projector_bias=False is not supported.")
  feature_layer = d.get("vision_feature_layer", -2)
  if not isinstance(feature_layer, int):
    raise ValueError(f"vision_feature_layer={feature_layer!r}: only one layer supported.")
  image_token = d.get("image_token_index", d.get("image_token_id"))
  if image_token is None:
    raise ValueError("config.json has neither image_token_index nor image_token_id.")
  tie = d.get("tie_word_embeddings") or txt.get("tie_word_embeddings", False)
  extra = {k: v for k, v in (("eos_token_id", txt.get("eos_token_id")),
                             ("pad_token_id", d.get("pad_token_id",
                                                    txt.get("pad_token_id"))))
           if isinstance(v, int)}
  text_cfg = _qwen_config(txt, tie=tie)
  # cdx exports of TAF students with a teacher wider than the student (docs/EXPORT.md).
  width = d.get("projector_hidden_size") or text_cfg.hidden_size
  cfg = mllm.MllmConfig(
      vision=_siglip_config(vis), text=text_cfg,
      adapter_hidden=None if width == text_cfg.hidden_size else width,
      image_token_id=image_token, feature_layer=feature_layer,
      feature_select=d.get("vision_feature_select_strategy", "default"),
      dtype=dtype, param_dtype=dtype, **extra)
  n_vis = siglip.layers_needed(cfg.vision, feature_layer)
  ignore = _vision_ignores(n_vis) + [r"rotary_emb\.inv_freq$"]
  if cfg.text.tie_embeddings:
    ignore.append(r"^language_model\.lm_head\.weight$")
  return cfg, _load(path, _llava_table(cfg), ignore, _rename_llava, dtype)


def fold_post_connector(cfg: mllm.MllmConfig, params: dict) -> tuple[mllm.MllmConfig, dict]:
  """TAF student -> plain (non-TAF) model: fcN' = post ∘ fcN (exact, one linear).

  GELU sits between fc1 and fc2, so only fcN and post merge: the intermediate width stays
  the teacher's, recorded as `adapter_hidden` (None when it equals the student hidden).
  """
  if cfg.post_connector_in is None:
    return cfg, params
  if "post" not in params:
    raise ValueError("cfg.post_connector_in is set but params have no 'post' subtree.")
  width = cfg.adapter_width
  folded = {k: v for k, v in params.items() if k != "post"}
  folded["adapter"] = adapter_lib.fold_post_connector(params["adapter"], params["post"])
  hidden = None if width == cfg.text.hidden_size else width
  return dataclasses.replace(cfg, post_connector_in=None, adapter_hidden=hidden), folded


REMOTE_CODE = "modeling_cdx_llava.py"
_REMOTE_AUTO_MAP = {
    "AutoConfig": "modeling_cdx_llava.CdxLlavaConfig",
    "AutoModelForImageTextToText": "modeling_cdx_llava.CdxLlavaForConditionalGeneration"}


def save_llava(config: mllm.MllmConfig, params: dict, path: str,
               dtype: str | None = None) -> None:
  """Writes an HF LLaVA dir (config.json + model.safetensors), see docs/EXPORT.md.

  TAF students are folded first. Projector intermediate width W vs text hidden H:
  W == H: stock LlavaForConditionalGeneration. W < H: zero-padded to H (exact), stock.
  W > H: stock layout + `projector_hidden_size` = W + remote code (modeling_cdx_llava.py,
  auto_map); load with trust_remote_code=True. Stock LLaVA refuses it (shape mismatch).
  """
  if config.adapter_depth != 2:
    raise ValueError(f"HF LLaVA has a 2-layer projector; adapter_depth="
                     f"{config.adapter_depth}.")
  cfg, params = fold_post_connector(*mllm.unscanned(config, params))
  width, hidden = cfg.adapter_width, cfg.text.hidden_size
  if width < hidden:
    params = dict(params, adapter=adapter_lib.pad_hidden(params["adapter"], hidden))
  n_vis = siglip.layers_needed(cfg.vision, cfg.feature_layer)
  dtype = dtype or cfg.param_dtype
  text = _qwen_hf(cfg.text, cfg.eos_token_id, cfg.pad_token_id)
  hf_config = {
      "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
      "image_token_index": cfg.image_token_id,
      "image_seq_length": mllm.num_visual_tokens(cfg),
      "vision_feature_layer": -1, "vision_feature_select_strategy": cfg.feature_select,
      "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
      "tie_word_embeddings": cfg.text.tie_embeddings, "pad_token_id": cfg.pad_token_id,
      "vision_config": _siglip_hf(cfg.vision, n_vis), "text_config": text,
      "dtype": str(jnp.dtype(dtype))}
  remote = os.path.join(path, REMOTE_CODE)
  if width > hidden:
    hf_config.update(architectures=["CdxLlavaForConditionalGeneration"],
                     projector_hidden_size=width, auto_map=_REMOTE_AUTO_MAP)
  table = _llava_table(dataclasses.replace(
      cfg, feature_layer=-1, vision=dataclasses.replace(cfg.vision, num_layers=n_vis)),
      in_memory=width > hidden)
  vision_prefix = ("model." if width > hidden else "") + "vision_tower."
  _save(params, table, path, hf_config, dtype,
        _post_layernorm(vision_prefix, cfg.vision.hidden_size))
  if width > hidden:
    shutil.copyfile(os.path.join(os.path.dirname(__file__), REMOTE_CODE), remote)
  elif os.path.exists(remote):  # a stale copy from an earlier export to this dir
    os.remove(remote)


def save_qwen2(config: qwen.QwenConfig, params: dict, path: str,
               dtype: str = "float32") -> None:
  """Writes an HF Qwen2ForCausalLM dir from the `llm` params sub-tree (either layout)."""
  params = stack.unstack_layers(params)
  hf_config = dict(_qwen_hf(config), architectures=["Qwen2ForCausalLM"],
                   dtype=str(jnp.dtype(dtype)))
  _save(params, _qwen_table(config, "", "model."), path, hf_config, dtype)


def save_siglip(config: siglip.SiglipConfig, params: dict, path: str,
                dtype: str = "float32") -> None:
  """Writes an HF SiglipVisionModel dir holding the layers present in `params` (either
  layout)."""
  params = stack.unstack_layers(params)
  n = sum(k.startswith("layers_") for k in params)
  hf_config = dict(_siglip_hf(config, n), architectures=["SiglipVisionModel"],
                   dtype=str(jnp.dtype(dtype)))
  _save(params, _siglip_table(n, "", ""), path, hf_config, dtype,
        _post_layernorm("", config.hidden_size))
