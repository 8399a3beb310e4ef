"""Qwen2 decoder (HF `Qwen2ForCausalLM` architecture: Qwen1.5 and Qwen2.5), flax linen.

RMSNorm (float32 statistics), rotate-half RoPE, SwiGLU MLP, q/k/v with bias, o without,
grouped-query attention (num_kv_heads <= num_heads), tied or untied LM head.

`Decoder` works on embeddings so the MLLM can splice image features in first:
  embed_tokens(ids int [B, L]) -> [B, L, D] (compute dtype)
  __call__(embeds [B, L, D], attention_mask int [B, L], visual_pos int [B, Nv] | None,
           cache | None, attn_override | None) -> hidden [B, L, D] after the final
           norm, inter dict (attn_override: see `Capture.override`)
  logits(hidden) -> float32 [B, L, V]
  lm(ids, attention_mask, cache) -> (logits, inter): the three above chained

Without a cache, positions are 0..L-1 in every row (right padding) and the mask is
causal AND attention_mask[key]. What a call records besides the hidden states is one
static `Capture` spec: the layers in `Capture.layers` also return the visual attention
summary (see cdx/models/attention.py): inter["visual_attn"] f32 [K, B, Nv, Nv].

KV cache (for generation; a plain pytree, see `init_cache`):
  {"k": [num_layers, B, S, num_kv_heads, head_dim], "v": same, "lengths": int32 [B]}
`lengths[b]` = number of tokens already stored for row b. A call with a cache writes the
T new keys/values of row b at slots lengths[b] .. lengths[b]+T-1, gives them positions
lengths[b] + t, lets query t see slots <= its own position and < new length, and returns
the updated cache in inter["cache"] with lengths += attention_mask.sum(-1). So: prefill
a right-padded prompt batch once (pad slots are counted out and later overwritten), then
feed one token per row per step with attention_mask ones [B, 1]. Writes to slots beyond S
are dropped, so S must cover prompt + new tokens. Each layer scatters its entries into the
stacked cache, which a generation loop then updates in place.

Layer layouts: by default each layer is its own module and params are "layers_{i}"; with
`Decoder(scan_layers=True)` the layers' params are stacked under "layers" (leading axis
num_layers, cdx/models/stack.py converts) and one `lax.scan` runs them.

LoRA, factored (as PEFT computes it): pass the factors as a second variable collection,
  Decoder(cfg, lora_scale=alpha / rank).apply({"params": p, "lora": f}, ...)
(the scale is set once on the Decoder and reaches every linear inside its `Numerics`)
with f mirroring p and {"a": [in, r], "b": [r, out]} at a linear's kernel path (the
layout of cdx/train/lora.py, e.g. f["layers_0"]["attn"]["q"]["kernel"]["a"]). Each decoder
linear with factors computes y = x W (+ bias) + ((x a) b) * lora_scale in the compute
dtype; W + a b is never formed, so neither is its [in, out] gradient (scanned: the
factors are stacked like the params, f["layers"]["attn"]["q"]["kernel"]["a"] [n, in, r]).
Linears without factors are plain. The LM head and the embedding read their weights
directly and ignore factors (cdx.models.mllm.decode rejects factors for them).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdx.models import attention
from cdx.models import stack


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Architecture of a Qwen2-family decoder."""
  vocab_size: int = 151936
  hidden_size: int = 2048
  num_layers: int = 24
  num_heads: int = 16
  num_kv_heads: int = 16
  head_dim: int = 128
  mlp_dim: int = 5504
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  max_position_embeddings: int = 32768

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")


def _v(vocab, hidden, layers, heads, kv, mlp, theta=1e6, tie=False):
  return QwenConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                    num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                    mlp_dim=mlp, rope_theta=theta, tie_embeddings=tie)


# Numbers from the HF config.json of each checkpoint (Qwen/<name>).
VARIANTS = {
    "qwen1.5-0.5b": _v(151936, 1024, 24, 16, 16, 2816, tie=True),
    "qwen1.5-1.8b": _v(151936, 2048, 24, 16, 16, 5504),
    "qwen1.5-4b": _v(151936, 2560, 40, 20, 20, 6912, theta=5e6),
    "qwen1.5-7b": _v(151936, 4096, 32, 32, 32, 11008),
    "qwen2.5-0.5b": _v(151936, 896, 24, 14, 2, 4864, tie=True),
    "qwen2.5-1.5b": _v(151936, 1536, 28, 12, 2, 8960, tie=True),
    "qwen2.5-3b": _v(151936, 2048, 36, 16, 2, 11008, tie=True),
    "qwen2.5-7b": _v(152064, 3584, 28, 28, 4, 18944),
}

# Logical axes of each param dim, by path regex below the decoder's params (first
# fullmatch wins; leaves no rule names, the norms, are replicated). cdx/parallel.py maps
# logical axes onto the mesh; a stacked leaf's leading axis is "layers".
LOGICAL_AXES = (
    (r"layers(_\d+)?/attn/(q|k|v)/kernel", ("embed", "heads")),
    (r"layers(_\d+)?/attn/(q|k|v)/bias", ("heads",)),
    (r"layers(_\d+)?/attn/o/kernel", ("heads", "embed")),
    (r"layers(_\d+)?/mlp/(gate|up)/kernel", ("embed", "mlp")),
    (r"layers(_\d+)?/mlp/down/kernel", ("mlp", "embed")),
    (r"embed/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
)


def get_config(name_or_dict: "str | dict | QwenConfig") -> QwenConfig:
  """A variant name from VARIANTS (case-insensitive), a dict of fields, or a config."""
  if isinstance(name_or_dict, QwenConfig):
    return name_or_dict
  if isinstance(name_or_dict, dict):
    known = {f.name for f in dataclasses.fields(QwenConfig)}
    unknown = sorted(set(name_or_dict) - known)
    if unknown:
      raise ValueError(f"Unknown QwenConfig fields {unknown}; known: {sorted(known)}.")
    return QwenConfig(**name_or_dict)
  key = str(name_or_dict).lower().removeprefix("qwen/")
  if key not in VARIANTS:
    raise ValueError(f"Unknown Qwen variant {name_or_dict!r}; known: {sorted(VARIANTS)}.")
  return VARIANTS[key]


def init_cache(cfg: QwenConfig, batch_size: int, max_len: int,
               dtype: Any = jnp.float32) -> dict:
  """Empty KV cache for `batch_size` rows of up to `max_len` tokens."""
  shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "lengths": jnp.zeros((batch_size,), jnp.int32)}


@dataclasses.dataclass(frozen=True)
class Capture:
  """What a decoder call records besides the hidden states (static and hashable).

  layers: the layers whose visual attention summary is returned, inter["visual_attn"]
    f32 [len(layers), B, Nv, Nv] in this order (needs the visual positions).
  full_attn: also their per-head maps inter["full_attn"] f32 [K, B, H, L, L] (diagnostic,
    and the official formulation's memory layout).
  override: layers whose visual attention is replaced (the inference-time intervention of
    cdx/eval/diagnostics.py): the call then takes attn_override f32 [len(override),
    B, Nv, Nv], the head-averaged visual block each of these layers uses instead of its
    own (`attention.override_visual` says how rows are renormalized). Unrolled layers
    only, no KV cache.
  """
  layers: tuple[int, ...] = ()
  full_attn: bool = False
  override: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
    object.__setattr__(self, "override", tuple(int(l) for l in self.override))

  def extras(self, layer: int) -> tuple[str, ...]:
    """Names of what layer `layer` records ("visual_attn", "full_attn"); () if nothing."""
    if layer not in self.layers:
      return ()
    return ("visual_attn", "full_attn") if self.full_attn else ("visual_attn",)


@dataclasses.dataclass(frozen=True)
class Numerics:
  """How the layers compute: compute / param dtypes and the LoRA scale alpha / rank of
  the factors in the "lora" collection (if any). Set once by `Decoder`."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: float = 1.0


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate-half RoPE on x [B, T, H, Dh] at positions int [B, T]; maths in float32."""
  dh = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class Linear(nn.Module):
  """nn.Dense (same params, same maths) plus a factored LoRA branch when the "lora"
  collection holds {"a", "b"} for this layer's kernel (see the module docstring)."""
  features: int
  use_bias: bool
  num: Numerics

  @nn.compact
  def __call__(self, x):
    dtype = self.num.dtype
    kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                        self.num.param_dtype)
    x = x.astype(dtype)
    y = jnp.dot(x, kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.num.param_dtype)
      y = y + bias.astype(dtype)
    if self.has_variable("lora", "kernel"):
      factors = self.get_variable("lora", "kernel")
      a, b = factors["a"].astype(dtype), factors["b"].astype(dtype)
      if a.shape[0] != kernel.shape[0] or b.shape[1] != kernel.shape[1]:
        raise ValueError(f"LoRA factors a{a.shape} b{b.shape} at {'/'.join(self.path)} "
                         f"do not fit its kernel {kernel.shape}.")
      y = y + jnp.dot(jnp.dot(x, a), b) * jnp.asarray(self.num.lora_scale, dtype)
    return y


def _only_when(flag: jax.Array | None, fn) -> jax.Array:
  """fn() when flag (a traced bool) is None or True, zeros of its shape otherwise.

  A scanned layer stack runs one body for every layer; the flag keeps the capture
  computation out of the layers that do not need it."""
  if flag is None:
    return fn()
  out = jax.eval_shape(fn)
  return jax.lax.cond(flag, fn, lambda: jnp.zeros(out.shape, out.dtype))


class _Attention(nn.Module):
  cfg: QwenConfig
  num: Numerics
  capture: tuple[str, ...] = ()  # Capture.extras of this layer

  @nn.compact
  def __call__(self, x, positions, mask, visual_pos, kv, when=None, override=None):
    cfg = self.cfg
    b, t, _ = x.shape
    proj = lambda n, heads, bias: Linear(heads * cfg.head_dim, bias, self.num, name=n)(
        x).reshape(b, t, heads, cfg.head_dim)
    q = apply_rope(proj("q", cfg.num_heads, True), positions, cfg.rope_theta)
    k = apply_rope(proj("k", cfg.num_kv_heads, True), positions, cfg.rope_theta)
    v = proj("v", cfg.num_kv_heads, True)
    new_kv = None
    if kv is not None:  # Write the T new entries of this layer into the whole cache.
      cache_k, cache_v, layer, start = kv
      # A scatter into the stacked cache, not a per-layer slice re-stacked afterwards:
      # inside the generation loop XLA updates the buffer in place, so a decode step
      # writes B x T entries instead of copying the whole cache.
      at = (layer, jnp.arange(b)[:, None], start[:, None] + jnp.arange(t)[None])
      cache_k = cache_k.at[at].set(k.astype(cache_k.dtype), mode="drop")
      cache_v = cache_v.at[at].set(v.astype(cache_v.dtype), mode="drop")
      new_kv = (cache_k, cache_v)
      k, v = cache_k[layer].astype(self.num.dtype), cache_v[layer].astype(self.num.dtype)
    out = attention.attend(q, k, v, mask, fused=not self.capture)  # Captured: exact.
    if override is not None:  # The intervention: new visual rows (Capture.override).
      vis_out, _ = attention.override_visual(q, k, v, mask, visual_pos, override)
      out = jax.vmap(lambda o, p, new: o.at[p].set(new))(out, visual_pos, vis_out)
    extras = {}
    if "visual_attn" in self.capture:
      extras["visual_attn"] = _only_when(
          when, lambda: attention.visual_summary(q, k, mask, visual_pos))
    if "full_attn" in self.capture:
      extras["full_attn"] = _only_when(when, lambda: attention.full_probs(q, k, mask))
    out = Linear(cfg.hidden_size, False, self.num, name="o")(
        out.reshape(b, t, cfg.num_heads * cfg.head_dim))
    return out, extras, new_kv


class _Mlp(nn.Module):
  cfg: QwenConfig
  num: Numerics

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: Linear(n, False, self.num, name=name)
    gate = dense(self.cfg.mlp_dim, "gate")(x)
    up = dense(self.cfg.mlp_dim, "up")(x)
    return dense(self.cfg.hidden_size, "down")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  cfg: QwenConfig
  num: Numerics = Numerics()
  capture: tuple[str, ...] = ()  # Capture.extras of this layer

  @nn.compact
  def __call__(self, x, positions, mask, visual_pos, kv, when=None, override=None):
    norm = lambda name: RMSNorm(self.cfg.rms_norm_eps, self.num.dtype, self.num.param_dtype,
                                name=name)
    h, extras, new_kv = _Attention(self.cfg, self.num, self.capture, name="attn")(
        norm("input_norm")(x), positions, mask, visual_pos, kv, when, override)
    x = x + h
    x = x + _Mlp(self.cfg, self.num, name="mlp")(norm("post_norm")(x))
    return x, extras, new_kv


class Decoder(nn.Module):
  """Qwen2 decoder stack; see the module docstring for the methods.

  scan_layers: params of all layers stacked under "layers" ([num_layers, ...] leaves,
  `stack.stack_layers` of the unrolled "layers_{i}") and run by one `lax.scan` with a
  rematerialized body, instead of num_layers unrolled `layers_{i}` modules. Same maths;
  the compiled program holds one layer, so compile time and (on XLA:CPU) the memory of
  remat and of compute-dtype weight casts stop growing with depth (docs/PERFORMANCE.md).
  Captured layers are picked inside the scan by a per-layer flag; `capture.full_attn`
  then keeps a [B, H, L, L] slot per layer (zeros where not captured): a diagnostic.
  """
  cfg: QwenConfig
  capture: Capture = Capture()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str | None = None  # a jax.checkpoint_policies name, e.g. "nothing_saveable"
  lora_scale: float = 1.0  # alpha / rank of the factors in the "lora" collection, if any
  scan_layers: bool = False

  @property
  def num(self) -> Numerics:
    return Numerics(self.dtype, self.param_dtype, self.lora_scale)

  def setup(self):
    cfg = self.cfg
    bad = [i for i in self.capture.layers if not 0 <= i < cfg.num_layers]
    if bad:
      raise ValueError(f"attn_layers {bad} out of range for {cfg.num_layers} layers.")
    if self.remat and not hasattr(jax.checkpoint_policies, self.remat):
      raise ValueError(f"Unknown remat policy {self.remat!r}; use a name from "
                       "jax.checkpoint_policies, e.g. 'nothing_saveable'.")
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          embedding_init=nn.initializers.normal(0.02))
    if self.scan_layers:
      self.layers = self.param("layers", self._init_stack)
    else:
      layer_cls = DecoderLayer
      if self.remat:
        layer_cls = nn.remat(DecoderLayer, policy=self._policy())
      self.layers = [layer_cls(cfg, self.num, self.capture.extras(i))
                     for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = Linear(cfg.vocab_size, False, Numerics(self.dtype, self.param_dtype))

  def _check_override(self, attn_override, visual_pos, cache):
    over = self.capture.override
    if not over and attn_override is None:
      return
    bad = [i for i in over if not 0 <= i < self.cfg.num_layers]
    if bad:
      raise ValueError(f"Capture.override layers {bad} out of range for "
                       f"{self.cfg.num_layers} layers.")
    if attn_override is None or attn_override.shape[0] != len(over):
      got = None if attn_override is None else tuple(attn_override.shape)
      raise ValueError(f"Capture.override={over} needs attn_override [{len(over)}, B, Nv, "
                       f"Nv]; got {got}.")
    if visual_pos is None or cache is not None or self.scan_layers:
      raise ValueError("the attention override needs visual_pos, no KV cache and "
                       "unrolled layers (scan_layers=False; see mllm.unscanned).")

  def _policy(self):
    return getattr(jax.checkpoint_policies, self.remat)

  def _one_layer(self, capture: tuple[str, ...] = ()) -> DecoderLayer:
    """The (unbound) layer a scanned stack applies to each slice of its params."""
    return DecoderLayer(self.cfg, self.num, capture, parent=None)

  def _init_stack(self, rng: jax.Array) -> dict:
    x = jnp.zeros((1, 1, self.cfg.hidden_size), self.dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    mask = attention.causal_mask(jnp.ones((1, 1), jnp.int32))
    return stack.init(self._one_layer(), rng, self.cfg.num_layers, x, pos, mask, None, None)

  def embed_tokens(self, ids: jax.Array) -> jax.Array:
    return self.embed(ids)

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.cfg.tie_embeddings:
      kernel = self.embed.embedding.T
    else:
      kernel = self.lm_head.variables["params"]["kernel"]
    return jnp.einsum("bld,dv->blv", hidden, kernel.astype(hidden.dtype),
                      preferred_element_type=jnp.float32).astype(jnp.float32)

  def lm(self, ids: jax.Array, attention_mask: jax.Array | None = None,
         cache: dict | None = None) -> tuple[jax.Array, dict]:
    """Text-only language model: ids [B, L] -> logits f32 [B, L, V], inter."""
    hidden, inter = self(self.embed_tokens(ids), attention_mask, None, cache)
    return self.logits(hidden), inter

  def init_all(self, ids: jax.Array) -> jax.Array:
    """Touches every parameter (use as `method=` in `init`)."""
    hidden, _ = self(self.embed_tokens(ids), jnp.ones(ids.shape, jnp.int32))
    if not self.cfg.tie_embeddings:
      self.lm_head(hidden)
    return self.logits(hidden)

  def _unrolled(self, x, positions, mask, visual_pos, cache, attn_override=None):
    """-> x, {name: [K, ...] in capture.layers order} of the captured extras, the updated
    (k, v) of the cache (None without one)."""
    extras = {}
    new_kv = None if cache is None else (cache["k"], cache["v"])
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (*new_kv, i, cache["lengths"])
      over = (attn_override[self.capture.override.index(i)]
              if i in self.capture.override else None)
      x, layer_extras, new_kv = layer(x, positions, mask, visual_pos, kv, None, over)
      for name, value in layer_extras.items():
        extras.setdefault(name, {})[i] = value
    extras = {name: jnp.stack([by_layer[i] for i in self.capture.layers])
              for name, by_layer in extras.items()}
    return x, extras, new_kv

  def _scanned(self, x, positions, mask, visual_pos, cache):
    """Same as `_unrolled` but extras hold a slot for every layer, in layer order."""
    layer = self._one_layer(self.capture.extras(self.capture.layers[0])
                            if self.capture.layers else ())
    lora = self.get_variable("lora", "layers") if self.has_variable("lora", "layers") \
        else None
    n = self.cfg.num_layers
    flags = jnp.asarray([i in self.capture.layers for i in range(n)])
    # The whole cache rides in the carry (updated in place, as in `_unrolled`).
    carry = (x, None if cache is None else (cache["k"], cache["v"]))

    def body(carry, xs):
      x, kv = carry
      params, factors, flag, i = xs
      variables = {"params": params, **({} if factors is None else {"lora": factors})}
      kv = None if kv is None else (*kv, i, cache["lengths"])
      x, extras, new_kv = layer.apply(variables, x, positions, mask, visual_pos, kv, flag)
      return (x, new_kv), extras

    if self.remat:
      body = jax.checkpoint(body, policy=self._policy(), prevent_cse=False)
    (x, new_kv), extras = jax.lax.scan(body, carry, (self.layers, lora, flags,
                                                     jnp.arange(n)))
    return x, extras, new_kv

  def __call__(self, embeds, attention_mask=None, visual_pos=None, cache=None,
               attn_override=None):
    b, t, _ = embeds.shape
    self._check_override(attn_override, visual_pos, cache)
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if self.capture.layers and visual_pos is None:
      raise ValueError("attn_layers given but visual_pos is None: pass the visual "
                       "positions from visual_positions(...).")
    if self.capture.layers and cache is not None:
      raise ValueError("attention capture is not supported together with a KV cache.")
    if cache is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      mask = attention.causal_mask(attention_mask)
    else:
      start = cache["lengths"]
      positions = start[:, None] + jnp.arange(t)[None]
      new_lengths = start + attention_mask.astype(jnp.int32).sum(-1)
      slots = jnp.arange(cache["k"].shape[2])[None, None, :]
      mask = (slots <= positions[:, :, None]) & (slots < new_lengths[:, None, None])
    run = (self._scanned if self.scan_layers else
           lambda *a: self._unrolled(*a, attn_override=attn_override))
    x, extras, new_kv = run(embeds.astype(self.dtype), positions, mask, visual_pos, cache)
    if self.scan_layers:  # One slot per layer: keep the captured ones, in the asked order.
      extras = {name: value[jnp.asarray(self.capture.layers, jnp.int32)]
                for name, value in extras.items()}
    hidden = self.final_norm(x)
    nv = 0 if visual_pos is None else visual_pos.shape[1]
    inter = {"visual_attn": extras.get("visual_attn", jnp.zeros((0, b, nv, nv)))}
    if self.capture.full_attn:
      inter["full_attn"] = extras["full_attn"]
    if cache is not None:
      inter["cache"] = {"k": new_kv[0], "v": new_kv[1], "lengths": new_lengths}
    return hidden, inter
