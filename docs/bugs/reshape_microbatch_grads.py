"""Standalone reproducer: a wrong gradient on a 2x2x2 CPU mesh from a reshape-built split.

  python docs/bugs/reshape_microbatch_grads.py      # no cdx import; 8 fake CPU devices

Two ways to take rows 0, 2, 4, 6 of a batch sharded over ("data", "fsdp"):
  "reshape": x.reshape(B/2, 2, ...).swapaxes(0, 1)[0]   (cdx's old `split_microbatches`)
  "stack":   jnp.stack([x[0::2], x[1::2]])[0]           (its current form)
The values are identical, yet the gradient of a chunk-scanned loss w.r.t. a weight whose
gradient is constrained to P(None, "tensor") comes out wrong with "reshape" when the head
is sharded P("fsdp", "tensor") on the 2x2x2 mesh. Prints the relative error of each form
against the unsharded gradient; exit status 1 if "stack" is wrong too.
Environment: MESH=d,f,t (default 2,2,2).
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

B, L, D, V, C = 8, 48, 32, 80, 16  # batch, length, width, vocab, chunk


def loss(w, head, x):
  """Sum of squared logits, computed chunk by chunk over the sequence (as lm_kd_chunked)."""
  h = x @ w                                                          # [b, L, D]
  chunks = jnp.moveaxis(h.reshape(h.shape[0], L // C, C, D), 1, 0)   # [L/C, b, C, D]

  def body(total, hc):
    return total + jnp.sum((hc @ head) ** 2), None

  return jax.lax.scan(body, 0.0, chunks)[0]


def first_micro_batch(x, how):
  if how == "reshape":
    return x.reshape((x.shape[0] // 2, 2) + x.shape[1:]).swapaxes(0, 1)[0]
  return jnp.stack([x[0::2], x[1::2]])[0]


def main():
  shape = tuple(int(v) for v in os.environ.get("MESH", "2,2,2").split(","))
  mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  w = rng.normal(size=(D, D)).astype(np.float32) / 6
  head = rng.normal(size=(D, V)).astype(np.float32) / 6
  w_sh = NamedSharding(mesh, P(None, "tensor"))
  args = (jax.device_put(w, w_sh), jax.device_put(head, NamedSharding(mesh, P("fsdp", "tensor"))),
          jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))))
  expected = np.asarray(jax.grad(loss)(w, head, x[0::2]))
  print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, mesh {shape}")
  errors = {}
  for how in ("reshape", "stack"):
    @jax.jit
    def grad(w, head, x):
      g = jax.grad(loss)(w, head, first_micro_batch(x, how))
      return jax.lax.with_sharding_constraint(g, w_sh)  # As the train step's out_shardings.

    got = np.asarray(grad(*args))
    errors[how] = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"  {how:8s} relative error {errors[how]:.3g}")
  return 1 if errors["stack"] > 1e-5 else 0


if __name__ == "__main__":
  sys.exit(main())
