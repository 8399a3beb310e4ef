"""SigLIP vision encoder (the vision tower of the MLLM), flax linen.

Input: pixels float32 [B, H, W, 3] (NHWC, already normalized). Output: hidden states
[B, N, D] of one chosen layer, N = (H / patch)^2, in the compute dtype.

Layer indexing follows HF `hidden_states`: index 0 is the patch+position embedding,
index i the output of encoder layer i, -1 the last layer (all before `post_layernorm`).
Only the layers needed for the chosen index are built and run: for so400m with the
default -2 the param tree holds 26 of the 27 layers. There is no post-layernorm and no
pooling head (the MLLM never uses them).

Param tree (every linear is a 2-D `kernel [in, out]` + `bias`):
  patch/{kernel [p*p*3, D], bias}   patch conv as a matmul over (row, col, channel) pixels
  pos_embedding [N, D]
  layers_i/{norm1, attn/{q,k,v,o}, norm2, mlp/{fc1, fc2}}
or, with `scan_layers`, one `layers/...` whose leaves are stacked [n, ...] (stack.py).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdx.models import attention
from cdx.models import stack


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """Architecture of a SigLIP vision tower."""
  image_size: int = 384
  patch_size: int = 14
  hidden_size: int = 1152
  num_layers: int = 27
  num_heads: int = 16
  mlp_dim: int = 4304
  layer_norm_eps: float = 1e-6

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


VARIANTS = {
    "so400m-patch14-384": SiglipConfig(),
    "so400m-patch14-224": SiglipConfig(image_size=224),
    "base-patch16-224": SiglipConfig(image_size=224, patch_size=16, hidden_size=768,
                                     num_layers=12, num_heads=12, mlp_dim=3072),
    "base-patch16-384": SiglipConfig(image_size=384, patch_size=16, hidden_size=768,
                                     num_layers=12, num_heads=12, mlp_dim=3072),
    "large-patch16-384": SiglipConfig(image_size=384, patch_size=16, hidden_size=1024,
                                      num_layers=24, num_heads=16, mlp_dim=4096),
}

# Logical axes of each param dim, by path regex below the encoder's params (as
# qwen.LOGICAL_AXES; the patch embedding, positions and norms are replicated).
LOGICAL_AXES = (
    (r"layers(_\d+)?/attn/(q|k|v)/kernel", ("embed", "heads")),
    (r"layers(_\d+)?/attn/(q|k|v)/bias", ("heads",)),
    (r"layers(_\d+)?/attn/o/kernel", ("heads", "embed")),
    (r"layers(_\d+)?/mlp/fc1/kernel", ("embed", "mlp")),
    (r"layers(_\d+)?/mlp/fc1/bias", ("mlp",)),
    (r"layers(_\d+)?/mlp/fc2/kernel", ("mlp", "embed")),
)


def get_config(name_or_dict: "str | dict | SiglipConfig") -> SiglipConfig:
  """A variant name from VARIANTS, a dict of SiglipConfig fields, or a config."""
  if isinstance(name_or_dict, SiglipConfig):
    return name_or_dict
  if isinstance(name_or_dict, dict):
    known = {f.name for f in dataclasses.fields(SiglipConfig)}
    unknown = sorted(set(name_or_dict) - known)
    if unknown:
      raise ValueError(f"Unknown SiglipConfig fields {unknown}; known: {sorted(known)}.")
    return SiglipConfig(**name_or_dict)
  if name_or_dict not in VARIANTS:
    raise ValueError(f"Unknown SigLIP variant {name_or_dict!r}; known: {sorted(VARIANTS)}.")
  return VARIANTS[name_or_dict]


def layers_needed(cfg: SiglipConfig, feature_layer: int) -> int:
  """Number of encoder layers to run for HF `hidden_states[feature_layer]`."""
  n = feature_layer if feature_layer >= 0 else cfg.num_layers + 1 + feature_layer
  if not 0 <= n <= cfg.num_layers:
    raise ValueError(f"feature_layer={feature_layer} is out of range for a "
                     f"{cfg.num_layers}-layer encoder (valid: -{cfg.num_layers + 1}.."
                     f"{cfg.num_layers}).")
  return n


class _Attention(nn.Module):
  cfg: SiglipConfig
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
    split = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.head_dim)
    q, k, v = (split(dense(n)(x)) for n in ("q", "k", "v"))
    out = attention.attend(q, k, v, mask=None)
    return dense("o")(out.reshape(*x.shape[:2], cfg.hidden_size))


class _Mlp(nn.Module):
  cfg: SiglipConfig
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    h = nn.gelu(dense(self.cfg.mlp_dim, "fc1")(x), approximate=True)
    return dense(self.cfg.hidden_size, "fc2")(h)


class _Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x)), gelu(tanh)."""
  cfg: SiglipConfig
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    x = x + _Attention(cfg, self.dtype, self.param_dtype, name="attn")(norm("norm1")(x))
    return x + _Mlp(cfg, self.dtype, self.param_dtype, name="mlp")(norm("norm2")(x))


class Encoder(nn.Module):
  """SigLIP encoder returning HF `hidden_states[feature_layer]` [B, N, D]."""
  cfg: SiglipConfig
  feature_layer: int = -2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False  # layers stacked under "layers", run by lax.scan (stack.py)

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, h, w, c = pixels.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"pixel_values has shape {pixels.shape}; the vision config expects "
                       f"[B, {cfg.image_size}, {cfg.image_size}, 3] (NHWC).")
    p = cfg.patch_size
    g = cfg.image_size // p
    # Non-overlapping p x p patches, flattened in (row, col, channel) order. Like a
    # stride-p "valid" conv, trailing pixels that fill no whole patch are dropped
    # (384 = 27 * 14 + 6 for so400m).
    pixels = pixels[:, :g * p, :g * p]
    patches = pixels.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, g * g, p * p * c).astype(self.dtype)
    x = nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="patch")(patches)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (cfg.num_patches, cfg.hidden_size), self.param_dtype)
    x = x + pos.astype(self.dtype)[None]
    n = layers_needed(cfg, self.feature_layer)
    if not self.scan_layers:
      for i in range(n):
        x = _Block(cfg, self.dtype, self.param_dtype, name=f"layers_{i}")(x)
      return x
    if n == 0:
      return x
    block = _Block(cfg, self.dtype, self.param_dtype, parent=None)
    layers = self.param("layers", lambda rng: stack.init(block, rng, n, x[:1, :1]))
    x, _ = jax.lax.scan(lambda x, p: (block.apply({"params": p}, x), None), x, layers)
    return x
