"""Vision-to-language connectors, flax linen.

`Connector` is LLaVA's `mlp{N}x_gelu`: N linears fc1..fcN, `in -> W`, `W -> W`, ..., `W -> H`,
with an exact (erf) GELU between them (PyTorch nn.GELU default). The intermediate width W is
`hidden` (default H = `features`, LLaVA's layout); W != H only arises from folding a TAF
post-connector into fcN (cdx/hf.py). Weights N(0, 0.02), biases 0 (LLaVA's initialisation).
[B, Nv, D_in] -> [B, Nv, H].

`PostConnector` is TAF's trainable Linear(teacher_hidden -> student_hidden) with PyTorch's
default nn.Linear initialisation: kaiming-uniform(a=sqrt(5)) weight, i.e. U(+-1/sqrt(fan_in)),
and bias U(+-1/sqrt(fan_in)).

Param algebra on these trees (exact rewrites of the same function, used by the HF export and
by TAF, docs/EXPORT.md): `fold_post_connector` merges a post-connector into the connector's
last linear, `pad_hidden` widens a 2-layer connector's intermediate width with zeros.
"""
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = dict[str, Any]

# Logical axes of each param dim, by path regex below each module's params (see
# qwen.LOGICAL_AXES): both connectors shard their output (LLM-side) dim.
CONNECTOR_AXES = ((r"fc\d+/kernel", (None, "mlp")), (r"fc\d+/bias", ("mlp",)))
POST_AXES = ((r"kernel", (None, "mlp")), (r"bias", ("mlp",)))


class Connector(nn.Module):
  """mlp{depth}x_gelu: [..., D_in] -> [..., features], intermediate width `hidden`."""
  features: int
  depth: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  hidden: int | None = None  # None: features

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    for i in range(self.depth):
      if i:
        x = nn.gelu(x, approximate=False)
      width = self.features if i == self.depth - 1 else (self.hidden or self.features)
      x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.normal(0.02),
                   bias_init=nn.initializers.zeros, name=f"fc{i + 1}")(x)
    return x


def _torch_uniform(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class PostConnector(nn.Module):
  """TAF post-connector Linear(teacher_hidden -> features), PyTorch default init."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # kaiming_uniform(a=sqrt(5)) on a [out, in] weight has bound sqrt(6/((1+5)*fan_in)).
    init = _torch_uniform(x.shape[-1])
    kernel = self.param("kernel", init, (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", init, (self.features,), self.param_dtype)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


# ------------------------------------------------------------------------ param algebra

def last_linear(adapter_params: Params) -> str:
  """Name of the connector's final Linear (fc2 for mlp2x_gelu; fcN for deeper ones)."""
  names = [k for k in adapter_params if re.fullmatch(r"fc\d+", k)]
  if not names:
    raise ValueError(f"adapter params have no fcN layers (keys: {sorted(adapter_params)}).")
  return max(names, key=lambda k: int(k[2:]))


def fold_post_connector(adapter_params: Params, post_params: Params) -> Params:
  """Connector params whose last Linear is post ∘ last: x W2 + b2 -> (x W2 + b2) P + c.

  Folded kernel W2 P [H, Ds], bias b2 P + c; computed in float32, stored in W2's dtype.
  Other layers are returned unchanged.
  """
  name = last_linear(adapter_params)
  last = adapter_params[name]
  w2 = last["kernel"].astype(jnp.float32)
  p = post_params["kernel"].astype(jnp.float32)
  if w2.shape[1] != p.shape[0]:
    raise ValueError(f"adapter {name} outputs {w2.shape[1]} features but the post-connector "
                     f"takes {p.shape[0]}.")
  b2 = last["bias"].astype(jnp.float32) if "bias" in last else jnp.zeros(w2.shape[1])
  c = post_params["bias"].astype(jnp.float32) if "bias" in post_params \
      else jnp.zeros(p.shape[1])
  hi = jax.lax.Precision.HIGHEST
  dtype = last["kernel"].dtype
  out = dict(adapter_params)
  out[name] = {"kernel": jnp.matmul(w2, p, precision=hi).astype(dtype),
               "bias": (jnp.matmul(b2, p, precision=hi) + c).astype(dtype)}
  return out


def pad_hidden(adapter_params: Params, width: int) -> Params:
  """mlp2x_gelu with intermediate W < width -> W = width, same function.

  fc1 gets zero output columns and zero bias (gelu(0) = 0), fc2 zero input rows.
  """
  fc1, fc2 = adapter_params["fc1"], adapter_params["fc2"]
  extra = width - fc1["kernel"].shape[1]
  return dict(adapter_params,
              fc1={"kernel": jnp.pad(jnp.asarray(fc1["kernel"]), ((0, 0), (0, extra))),
                   "bias": jnp.pad(jnp.asarray(fc1["bias"]), (0, extra))},
              fc2=dict(fc2, kernel=jnp.pad(jnp.asarray(fc2["kernel"]), ((0, extra), (0, 0)))))
