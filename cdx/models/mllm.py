"""The LLaVA-style MLLM as pure functions of (config, params, arrays).

SigLIP vision tower -> `mlp{N}x_gelu` adapter -> (TAF student only) post-connector ->
image features spliced into the token embeddings at the image-token slots -> Qwen2
decoder -> LM head. Shapes: input_ids int [B, L] holding exactly Nv image-token ids per
image row (0 for text-only rows), pixel_values float32 [B, H, W, 3] NHWC, normalized.

Param tree (docs/ARCHITECTURE.md): {"vision", "adapter", "post" (TAF only), "llm"}; the
layers under "vision" and "llm" are "layers_{i}", or one stacked "layers" each when
cfg.scan_layers (`to_layout` converts; files always hold the unstacked layout).
The pieces are separate functions so a train step can run the vision tower and the
(teacher's) adapter once for teacher and student; `forward` chains them all.

Capture: what `decode` records besides the hidden states is one static `Capture` spec
(captured layers, per-head maps or not); the visual positions it needs are an argument.

LoRA: `decode` and `forward` take the factors unmerged, bundled with their scale as
`Lora(factors, scale)` (factors: the tree of cdx/train/lora.py, scale = alpha / rank,
static), and compute every adapted decoder linear factored, x W + ((x a) b) * scale, as
PEFT does (cdx/models/qwen.py). Only the
decoder's layer linears can be adapted this way; factors for the vision tower, the
adapters, the embedding or the LM head raise ValueError (merge those with
`cdx.train.lora.merge_lora` instead).
"""
import dataclasses
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cdx import paths as paths_lib
from cdx.models import adapter as adapter_lib
from cdx.models import qwen
from cdx.models import siglip
from cdx.models import stack

Capture = qwen.Capture


@flax.struct.dataclass
class Lora:
  """Unmerged LoRA factors {"llm": ...} (cdx/train/lora.py layout) and their scale
  alpha / rank: a pytree of the factors, the scale static (it is part of the program)."""
  factors: dict
  scale: float = flax.struct.field(pytree_node=False, default=1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MllmConfig:
  """Architecture + numerics of an MLLM. Hashable: usable as a static jit argument."""
  vision: siglip.SiglipConfig
  text: qwen.QwenConfig
  image_token_id: int
  adapter_depth: int = 2  # mlp{N}x_gelu
  post_connector_in: int | None = None  # TAF: teacher hidden size feeding `post`
  # Intermediate width of the adapter (fc1..fc{N-1} outputs); None = adapter_out (LLaVA).
  # Set by folding a TAF student whose teacher hidden != its own (cdx/hf.py, docs/EXPORT.md).
  adapter_hidden: int | None = None
  feature_layer: int = -2  # HF hidden_states index of the vision tower
  feature_select: str = "default"  # "default" drops the first token, "full" keeps all
  # Qwen checkpoints: eos <|endoftext|> = 151643, pad <|extra_0|> (docs/METHOD.md §3, != eos);
  # the data/tokenizer side sets them, None = unknown.
  pad_token_id: int | None = None
  eos_token_id: int | None = None
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str | None = None  # jax.checkpoint_policies name for decoder layers, or None
  # Encoder and decoder layers stacked under vision/layers, llm/layers and run by lax.scan
  # (cdx/models/stack.py); `to_layout` converts. Saved models and HF exports are unstacked.
  scan_layers: bool = False

  def __post_init__(self):
    if self.feature_select not in ("default", "full"):
      raise ValueError(f"feature_select={self.feature_select!r}; use 'default' or 'full'.")
    if self.adapter_depth < 1:
      raise ValueError(f"adapter_depth={self.adapter_depth} must be >= 1.")
    if self.adapter_hidden is not None and self.adapter_hidden < 1:
      raise ValueError(f"adapter_hidden={self.adapter_hidden} must be >= 1 (or None).")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"image_token_id={self.image_token_id} must index the embedding "
                       f"table (vocab_size={self.text.vocab_size}).")
    for name in ("pad_token_id", "eos_token_id"):
      value = getattr(self, name)
      if value is not None and not 0 <= value < self.text.vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary "
                         f"(vocab_size={self.text.vocab_size}).")
    siglip.layers_needed(self.vision, self.feature_layer)
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"{name}={getattr(self, name)!r} is not a dtype name.") from e

  @property
  def adapter_out(self) -> int:
    """Output width of the adapter: teacher hidden for TAF, else the LLM hidden."""
    return self.post_connector_in or self.text.hidden_size

  @property
  def adapter_width(self) -> int:
    """Intermediate width of the adapter (its fc1 output when depth > 1)."""
    return self.adapter_hidden or self.adapter_out


def make_config(vision: "str | dict | siglip.SiglipConfig",
                text: "str | dict | qwen.QwenConfig", **fields: Any) -> MllmConfig:
  """MllmConfig from variant names / dicts, e.g. make_config('so400m-patch14-384',
  'qwen1.5-1.8b', image_token_id=151646)."""
  return MllmConfig(vision=siglip.get_config(vision), text=qwen.get_config(text), **fields)


def config_to_dict(cfg: MllmConfig) -> dict:
  """JSON-able dict of a config (written as model.json beside a stage's weights)."""
  return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> MllmConfig:
  """Inverse of `config_to_dict`."""
  d = dict(d)
  return MllmConfig(vision=siglip.SiglipConfig(**d.pop("vision")),
                    text=qwen.QwenConfig(**d.pop("text")), **d)


def num_visual_tokens(cfg: MllmConfig) -> int:
  """Image tokens per image: 728 for so400m-384 with 'default' selection."""
  return cfg.vision.num_patches - (1 if cfg.feature_select == "default" else 0)


def _concrete(x) -> np.ndarray | None:
  """x as numpy, or None while tracing (values unknown until run time)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def visual_positions(input_ids: jax.Array, image_token_id: int,
                     num_visual: int) -> tuple[jax.Array, jax.Array]:
  """Image-token slots -> pos int32 [B, Nv] (sequence order; 0s when no image), has_image [B].

  With concrete ids, rows holding neither 0 nor num_visual image tokens raise ValueError
  (under jit the count cannot be checked).
  """
  is_img = input_ids == image_token_id
  ids = _concrete(input_ids)
  if ids is not None:
    counts = (ids == image_token_id).sum(-1)
    bad = [(i, int(c)) for i, c in enumerate(counts) if c not in (0, num_visual)]
    if bad:
      raise ValueError(f"Rows (index, count) {bad} hold a number of image tokens "
                       f"(id {image_token_id}) other than 0 or Nv={num_visual}; expand "
                       "the image placeholder to exactly Nv image-token ids.")
  pos = jax.vmap(lambda r: jnp.nonzero(r, size=num_visual, fill_value=0)[0])(is_img)
  return pos.astype(jnp.int32), is_img.any(-1)


def _under(part: str, rules: tuple) -> tuple:
  return tuple((f"{part}/(?:{regex})", axes) for regex, axes in rules)


# Logical axes of every param dim, by path regex below the MLLM's params: each part's own
# table under its name (cdx/parallel.py maps them onto the mesh; docs/CONFIG.md `mesh`).
LOGICAL_AXES = (_under("vision", siglip.LOGICAL_AXES)
                + _under("adapter", adapter_lib.CONNECTOR_AXES)
                + _under("post", adapter_lib.POST_AXES)
                + _under("llm", qwen.LOGICAL_AXES))


def _dtypes(cfg: MllmConfig):
  return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def _vision(cfg: MllmConfig) -> siglip.Encoder:
  dtype, param_dtype = _dtypes(cfg)
  return siglip.Encoder(cfg.vision, cfg.feature_layer, dtype, param_dtype, cfg.scan_layers)


def _adapter(cfg: MllmConfig) -> adapter_lib.Connector:
  dtype, param_dtype = _dtypes(cfg)
  return adapter_lib.Connector(cfg.adapter_out, cfg.adapter_depth, dtype, param_dtype,
                               cfg.adapter_hidden)


def _post(cfg: MllmConfig) -> adapter_lib.PostConnector:
  dtype, param_dtype = _dtypes(cfg)
  return adapter_lib.PostConnector(cfg.text.hidden_size, dtype, param_dtype)


def _decoder(cfg: MllmConfig, capture: Capture = Capture(),
             lora_scale: float = 1.0) -> qwen.Decoder:
  dtype, param_dtype = _dtypes(cfg)
  return qwen.Decoder(cfg.text, capture, dtype, param_dtype, cfg.remat, lora_scale,
                      cfg.scan_layers)


def to_layout(cfg: MllmConfig, tree: dict) -> dict:
  """`tree` (params, or any tree shaped like them, e.g. LoRA factors) with the layers of
  its "vision" and "llm" parts stacked when cfg.scan_layers, unstacked otherwise (no-op
  where they already are)."""
  counts = {"vision": siglip.layers_needed(cfg.vision, cfg.feature_layer),
            "llm": cfg.text.num_layers}
  out = dict(tree)
  for part, n in counts.items():
    if isinstance(out.get(part), dict):
      out[part] = (stack.stack_layers(out[part]) if cfg.scan_layers
                   else stack.unstack_layers(out[part], n))
  return out


def unscanned(cfg: MllmConfig, params: dict) -> tuple[MllmConfig, dict]:
  """(config, params) in the unstacked layout that files (final/, HF) always hold."""
  cfg = dataclasses.replace(cfg, scan_layers=False)
  return cfg, to_layout(cfg, params)


# Where the decoder applies factors (qwen.Linear inside a layer); paths below "llm".
_FACTORED = re.compile(r"layers(_\d+)?/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel/(a|b)")


def _lora_variables(lora: dict | None) -> dict:
  """The decoder's "lora" collection from a LoRA tree {"llm": ...}; checks every path."""
  if not lora:
    return {}
  paths = paths_lib.leaf_paths(lora)
  bad = [p for p in paths if not (p.startswith("llm/") and _FACTORED.fullmatch(p[4:]))]
  if bad:
    raise ValueError(f"LoRA factors at {bad[:4]} cannot be applied factored: only the "
                     "decoder layers' q/k/v/o/gate/up/down kernels can (never the vision "
                     "tower, adapters, embedding or LM head). Merge the others into the "
                     "params with cdx.train.lora.merge_lora, or drop them from the targets.")
  return {"lora": lora["llm"]}


def encode_images(cfg: MllmConfig, params: dict, pixel_values: jax.Array) -> jax.Array:
  """float32 [B, H, W, 3] -> selected vision features [B, Nv, Dv] (compute dtype)."""
  feats = _vision(cfg).apply({"params": params["vision"]}, pixel_values)
  return feats[:, 1:] if cfg.feature_select == "default" else feats


def adapt(cfg: MllmConfig, params: dict, feats: jax.Array) -> jax.Array:
  """The adapter (the teacher's, for TAF): [B, Nv, Dv] -> [B, Nv, adapter_out]."""
  return _adapter(cfg).apply({"params": params["adapter"]}, feats)


def post(cfg: MllmConfig, params: dict, x: jax.Array) -> jax.Array:
  """TAF post-connector [B, Nv, teacher_hidden] -> [B, Nv, D]; identity without TAF."""
  if cfg.post_connector_in is None:
    return x
  return _post(cfg).apply({"params": params["post"]}, x)


def embed(cfg: MllmConfig, params: dict, input_ids: jax.Array,
          image_embeds: jax.Array | None) -> jax.Array:
  """Token embeddings [B, L, D] with image_embeds [B, Nv, D] at the image-token slots."""
  tokens = _decoder(cfg).apply({"params": params["llm"]}, input_ids,
                               method=qwen.Decoder.embed_tokens)
  if image_embeds is None:
    return tokens
  is_img = input_ids == cfg.image_token_id
  # Slot t of a row takes image feature #(number of image tokens before t).
  index = jnp.clip(jnp.cumsum(is_img, axis=-1) - 1, 0, image_embeds.shape[1] - 1)
  spliced = jnp.take_along_axis(image_embeds.astype(tokens.dtype), index[..., None], axis=1)
  return jnp.where(is_img[..., None], spliced, tokens)


def decode(cfg: MllmConfig, params: dict, embeds: jax.Array,
           attention_mask: jax.Array | None, capture: Capture = Capture(),
           visual_pos: jax.Array | None = None, cache: dict | None = None,
           lora: Lora | None = None,
           attn_override: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Decoder stack -> hidden [B, L, D] after the final norm, inter.

  inter["visual_attn"]: f32 [len(capture.layers), B, Nv, Nv] (needs visual_pos int [B, Nv]).
  inter["full_attn"]: f32 [K, B, H, L, L] per-head maps when capture.full_attn.
  inter["cache"]: the updated KV cache when `cache` is given (see cdx/models/qwen.py).
  lora: LoRA factors applied factored (module docstring).
  attn_override: f32 [len(capture.override), B, Nv, Nv], the visual attention the layers
  of capture.override use instead of their own (cdx/models/qwen.py `Capture`).
  """
  factors, scale = (None, 1.0) if lora is None else (lora.factors, lora.scale)
  variables = {"params": params["llm"], **_lora_variables(factors)}
  return _decoder(cfg, capture, scale).apply(variables, embeds, attention_mask, visual_pos,
                                             cache, attn_override)


def lm_head_kernel(cfg: MllmConfig, params: dict) -> jax.Array:
  """[D, V]; the transposed embedding table when embeddings are tied."""
  if cfg.text.tie_embeddings:
    return params["llm"]["embed"]["embedding"].T
  return params["llm"]["lm_head"]["kernel"]


def lm_head(cfg: MllmConfig, params: dict) -> tuple[jax.Array, str]:
  """(LM head, layout) without copying it: the embedding table [V, D] and "vd" when
  embeddings are tied, else the kernel [D, V] and "dv" (`losses.HEAD_LAYOUTS`)."""
  if cfg.text.tie_embeddings:
    return params["llm"]["embed"]["embedding"], "vd"
  return params["llm"]["lm_head"]["kernel"], "dv"


def init_cache(cfg: MllmConfig, batch_size: int, max_len: int) -> dict:
  """Empty KV cache in the compute dtype (see cdx/models/qwen.py)."""
  return qwen.init_cache(cfg.text, batch_size, max_len, _dtypes(cfg)[0])


def _check_pixels(cfg: MllmConfig, input_ids, pixel_values):
  want = (cfg.vision.image_size, cfg.vision.image_size, 3)
  if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
    raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; the vision "
                     f"config expects [B, {want[0]}, {want[1]}, 3] (NHWC).")
  if pixel_values.shape[0] != input_ids.shape[0]:
    raise ValueError(f"pixel_values batch {pixel_values.shape[0]} != input_ids batch "
                     f"{input_ids.shape[0]}.")


def image_embeds(cfg: MllmConfig, params: dict, pixel_values: jax.Array) -> jax.Array:
  """Vision tower -> adapter -> (TAF) post-connector: [B, H, W, 3] -> [B, Nv, D]."""
  return post(cfg, params, adapt(cfg, params, encode_images(cfg, params, pixel_values)))


def forward(cfg: MllmConfig, params: dict, input_ids: jax.Array,
            pixel_values: jax.Array, attention_mask: jax.Array | None = None,
            attn_layers: tuple = (), lora: Lora | None = None) -> tuple[jax.Array, dict]:
  """Full model: logits float32 [B, L, V], inter (the public entry point).

  inter["visual_attn"]: f32 [len(attn_layers), B, Nv, Nv]. `lora`: unmerged LoRA factors
  for the decoder, see `decode`.
  """
  _check_pixels(cfg, input_ids, pixel_values)
  nv = num_visual_tokens(cfg)
  pos, _ = visual_positions(input_ids, cfg.image_token_id, nv)
  embeds = embed(cfg, params, input_ids, image_embeds(cfg, params, pixel_values))
  hidden, inter = decode(cfg, params, embeds, attention_mask, Capture(tuple(attn_layers)),
                         pos, lora=lora)
  logits = jnp.einsum("bld,dv->blv", hidden,
                      lm_head_kernel(cfg, params).astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  return logits.astype(jnp.float32), inter


def init_params(cfg: MllmConfig, rng: jax.Array) -> dict:
  """Random params (vision, adapter, optional post, llm); works under jax.eval_shape."""
  r_vis, r_ad, r_post, r_llm = jax.random.split(rng, 4)
  pixels = jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
  feats = jnp.zeros((1, 1, cfg.vision.hidden_size), jnp.float32)
  params = {"vision": _vision(cfg).init(r_vis, pixels)["params"],
            "adapter": _adapter(cfg).init(r_ad, feats)["params"]}
  if cfg.post_connector_in is not None:
    x = jnp.zeros((1, 1, cfg.post_connector_in), jnp.float32)
    params["post"] = _post(cfg).init(r_post, x)["params"]
  ids = jnp.zeros((1, 1), jnp.int32)
  params["llm"] = _decoder(cfg).init(r_llm, ids, method=qwen.Decoder.init_all)["params"]
  return params
