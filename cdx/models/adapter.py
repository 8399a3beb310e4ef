"""Vision-to-language connectors, flax linen.

`Connector` is LLaVA's `mlp{N}x_gelu`: N linears fc1..fcN, `in -> W`, `W -> W`, ..., `W -> H`,
with an exact (erf) GELU between them (PyTorch nn.GELU default). The intermediate width W is
`hidden` (default H = `features`, LLaVA's layout); W != H only arises from folding a TAF
post-connector into fcN (cdx/hf.py). Weights N(0, 0.02), biases 0 (LLaVA's initialisation).
[B, Nv, D_in] -> [B, Nv, H].

`PostConnector` is TAF's trainable Linear(teacher_hidden -> student_hidden) with PyTorch's
default nn.Linear initialisation: kaiming-uniform(a=sqrt(5)) weight, i.e. U(+-1/sqrt(fan_in)),
and bias U(+-1/sqrt(fan_in)).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def parse_connector(name: str) -> int:
  """'mlp2x_gelu' -> 2 (the number of linear layers)."""
  if not (name.startswith("mlp") and name.endswith("x_gelu") and name[3:-6].isdigit()
          and int(name[3:-6]) >= 1):
    raise ValueError(f"Unknown connector {name!r}; expected 'mlp{{N}}x_gelu', "
                     "e.g. 'mlp2x_gelu'.")
  return int(name[3:-6])


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
