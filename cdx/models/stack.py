"""Layer stacks: the stacked ("scanned") param layout shared by the SigLIP encoder and the
Qwen decoder (`scan_layers`).

Unrolled, a stack of n identical layers is n modules with params "layers_0" ..
"layers_{n-1}"; stacked, one "layers" subtree holds the same leaves with a new leading
axis [n, ...], and one `lax.scan` runs the layer over it (the compiled program holds one
layer). `stack_layers` / `unstack_layers` convert any tree shaped like the params (LoRA
factors, gradients, Adam moments, shardings' specs); `init` makes stacked params directly.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

PREFIX = "layers_"
STACKED = "layers"


def stack_layers(tree: dict) -> dict:
  """{"layers_0": t0, ..., "layers_{n-1}": t} -> {"layers": leaves stacked on a new axis 0}.

  Other keys are kept; a tree without "layers_{i}" keys (e.g. already stacked) is returned
  unchanged."""
  names = {k for k in tree if k.startswith(PREFIX)}
  if not names:
    return tree
  n = len(names)
  if names != {f"{PREFIX}{i}" for i in range(n)}:
    raise ValueError(f"cannot stack layers {sorted(names)}: expected {PREFIX}0..{PREFIX}{n - 1} "
                     "(a scanned stack needs every layer, e.g. LoRA on all of them).")
  out = {k: v for k, v in tree.items() if k not in names}
  out[STACKED] = jax.tree.map(lambda *xs: jnp.stack(xs),
                              *[tree[f"{PREFIX}{i}"] for i in range(n)])
  return out


def unstack_layers(tree: dict, num_layers: int | None = None) -> dict:
  """Inverse of `stack_layers`; a tree without "layers" is returned unchanged.

  `num_layers` is needed only when "layers" holds no array (e.g. the frozen-out half of
  a partitioned tree, all None)."""
  if STACKED not in tree:
    return tree
  out = {k: v for k, v in tree.items() if k != STACKED}
  leaves = jax.tree.leaves(tree[STACKED])
  n = leaves[0].shape[0] if leaves else num_layers
  if n is None:
    raise ValueError("unstack_layers: 'layers' holds no arrays; pass num_layers.")
  for i in range(n):
    out[f"{PREFIX}{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[STACKED])
  return out


def init(layer: nn.Module, rng: jax.Array, num_layers: int, *args) -> dict:
  """Params of `num_layers` independent inits of the unbound `layer` (called on `args`),
  stacked on a new leading axis."""
  one = lambda r: layer.init(r, *args)["params"]
  return jax.vmap(one)(jax.random.split(rng, num_layers))
