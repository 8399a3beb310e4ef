"""A/B timings of cdx's float32 attention core, both variants in one process, alternating.

  python launch/attention_ab.py layer [--heads 8 --kv-heads 4 --seq 512 --batch 2]
  python launch/attention_ab.py step  [--seq 512]

`layer`: one attention layer's forward + backward (grads of q, k, v), causal + padding
mask, `jax.nn.dot_product_attention`'s XLA path ("xla") vs `cdx.models.attention._exact`
("exact"). `step`: the whole cdx DFT step of launch/bench.py's `bench` preset compiled
twice, once with each (the official KD mask, as `step --against torch` runs it), with
XLA's temp buffer size of each (`memory_analysis()`, load-independent). Runs
alternate A B B A ... so both see the same machine load; medians (ms) and the losses or
the largest gradient difference are printed. docs/PERFORMANCE.md §6 quotes the results.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cdx.models import attention  # noqa: E402

EXACT = attention._exact  # pylint: disable=protected-access


def xla(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None])


def alternate(fns: dict, args, rounds: int) -> dict:
  """{name: (median ms, last output)} over `rounds` timed calls each, after one untimed."""
  times, out = {n: [] for n in fns}, {}
  for i in range(rounds + 1):
    for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
      t = time.perf_counter()
      out[name] = jax.block_until_ready(fns[name](*args))
      if i:
        times[name].append(1e3 * (time.perf_counter() - t))
  return {n: (statistics.median(times[n]), min(times[n]), out[n]) for n in fns}


def layer(a) -> None:
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (a.batch, a.seq, a.heads, 32))
  k, v = (jax.random.normal(x, (a.batch, a.seq, a.kv_heads, 32)) for x in ks[1:3])
  w = jax.random.normal(ks[3], q.shape)
  lengths = jnp.asarray([a.seq - 100 * i for i in range(a.batch)])
  mask = attention.causal_mask(jnp.arange(a.seq)[None] < lengths[:, None])
  make = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, mask) * w),
                                    argnums=(0, 1, 2)))
  r = alternate({"xla": make(xla), "exact": make(EXACT)}, (q, k, v), a.rounds)
  for name, (med, low, _) in r.items():
    print(f"{name:6} fwd+bwd {med:8.1f} ms median, {low:8.1f} min")
  diff = max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
             for x, y in zip(r["exact"][2], r["xla"][2]))
  print(f"largest gradient difference (relative to the leaf's max): {diff:.1e}")


def step(a) -> None:
  from launch import bench  # pylint: disable=import-outside-toplevel
  from cdx.train import step as step_lib  # pylint: disable=import-outside-toplevel
  b = bench._official_kd(bench.build("bench", a.seq))  # pylint: disable=protected-access
  fns = {}
  for name, core in (("xla", xla), ("exact", EXACT)):
    attention._exact = core  # pylint: disable=protected-access
    fns[name] = jax.jit(b.step_fn("cdx"), compiler_options=step_lib.compiler_options(
        jax.default_backend())).lower(*b.args()).compile()
  attention._exact = EXACT  # pylint: disable=protected-access
  r = alternate(fns, jax.device_put(b.args()), a.rounds)
  for name, (med, low, (_, metrics)) in r.items():
    temp = fns[name].memory_analysis().temp_size_in_bytes / 2**20
    print(f"{name:6} step {med:8.1f} ms median, {low:8.1f} min, loss "
          f"{float(metrics['loss']):.8f}, XLA temp {temp:.1f} MiB")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("layer", "step"))
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=4)
  p.add_argument("--rounds", type=int, default=6)
  a = p.parse_args(argv)
  (layer if a.what == "layer" else step)(a)
  print(os.popen("uptime").read().strip())
  return 0


if __name__ == "__main__":
  sys.exit(main())
