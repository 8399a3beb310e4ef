"""Mesh, rule-based shardings, sharded step == single device, multi-process == 1 process."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as PS

from cdx import parallel
from cdx.models import mllm
from cdx.train import lora as L
from cdx.train import optim as O
from tests.multiprocess import run_workers

D, F, V, B = 16, 32, 24, 16
AXES = mllm.LOGICAL_AXES


def mlp_params(key=0):
  k = jax.random.split(jax.random.key(key), 5)
  return {"llm": {"embed": {"embedding": jax.random.normal(k[0], (V, D)) * 0.3},
                  "layers_0": {"input_norm": {"scale": jnp.ones((D,))},
                               "mlp": {"up": {"kernel": jax.random.normal(k[1], (D, F)) * 0.3},
                                       "down": {"kernel": jax.random.normal(k[2], (F, D)) * 0.3}}},
                  "lm_head": {"kernel": jax.random.normal(k[3], (D, V)) * 0.3}}}


def mlp_batch(key=1):
  k = jax.random.split(jax.random.key(key), 2)
  return {"ids": jax.random.randint(k[0], (B,), 0, V),
          "labels": jax.random.randint(k[1], (B,), 0, V)}


def loss_fn(p, batch):
  llm = p["llm"]
  x = llm["embed"]["embedding"][batch["ids"]]
  h = x * llm["layers_0"]["input_norm"]["scale"]
  h = x + jax.nn.gelu(h @ llm["layers_0"]["mlp"]["up"]["kernel"]) @ llm["layers_0"]["mlp"]["down"]["kernel"]
  logits = h @ llm["lm_head"]["kernel"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def make_step(tx):
  def step(p, st, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, st = tx.update(g, st, p, loss=loss)
    return optax.apply_updates(p, u), st, loss
  return step


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (-1, 2, 1)])
def test_make_mesh_shapes(shape):
  mesh = parallel.make_mesh(*shape)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert mesh.devices.size == 8
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  if shape[0] == -1:
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_bad_mesh_is_a_clear_error():
  with pytest.raises(ValueError, match=r"= 12 does not equal the device count 8"):
    parallel.make_mesh(3, 2, 2)
  with pytest.raises(ValueError, match="only one mesh axis may be -1"):
    parallel.make_mesh(-1, -1, 2)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.make_mesh(-1, 3, 1)


def test_default_specs_on_2x2x2():
  mesh = parallel.make_mesh(2, 2, 2)
  d = 8
  tree = {"llm": {"embed": {"embedding": jnp.zeros((V, d))},
                  "layers_0": {"attn": {"q": {"kernel": jnp.zeros((d, d)), "bias": jnp.zeros((d,))},
                                        "o": {"kernel": jnp.zeros((d, d))}},
                               "mlp": {"gate": {"kernel": jnp.zeros((d, F))},
                                       "down": {"kernel": jnp.zeros((F, d))}},
                               "post_norm": {"scale": jnp.zeros((d,))}},
                  "lm_head": {"kernel": jax.ShapeDtypeStruct((d, V), jnp.bfloat16)}},
          "adapter": {"fc1": {"kernel": jnp.zeros((12, d)), "bias": jnp.zeros((d,))}}}
  lora = L.init_lora(tree, [r"llm/layers_0/(attn/q|mlp/down)/kernel"], 4, 8.0,
                     jax.random.key(0))
  specs = parallel.param_specs({"base": tree, "lora": lora}, mesh, AXES)
  s = specs["base"]["llm"]
  assert s["layers_0"]["attn"]["q"]["kernel"] == PS("fsdp", "tensor")
  assert s["layers_0"]["attn"]["q"]["bias"] == PS("tensor")
  assert s["layers_0"]["attn"]["o"]["kernel"] == PS("tensor", "fsdp")
  assert s["layers_0"]["mlp"]["gate"]["kernel"] == PS("fsdp", "tensor")
  assert s["layers_0"]["mlp"]["down"]["kernel"] == PS("tensor", "fsdp")
  assert s["layers_0"]["post_norm"]["scale"] == PS()
  assert s["embed"]["embedding"] == PS("tensor", "fsdp")
  assert s["lm_head"]["kernel"] == PS("fsdp", "tensor")
  assert specs["base"]["adapter"]["fc1"]["kernel"] == PS(None, "tensor")
  lq = specs["lora"]["llm"]["layers_0"]["attn"]["q"]["kernel"]
  assert lq == {"a": PS("fsdp", None), "b": PS(None, "tensor")}
  ld = specs["lora"]["llm"]["layers_0"]["mlp"]["down"]["kernel"]
  assert ld == {"a": PS("tensor", None), "b": PS(None, "fsdp")}
  # The same rules shard a whole train state (step.py layout), Adam moments included.
  diff = (tree, lora)
  tx = O.make_optimizer({"lr": 1e-3}, 10, jax.eval_shape(lambda: diff))
  state = jax.eval_shape(lambda: {"step": jnp.zeros((), jnp.int32), "params": tree,
                                  "lora": lora, "opt": tx.init(diff)})
  st = parallel.param_specs(state, mesh, AXES)
  mu = st["opt"].inner[1][0].mu
  assert mu[0]["llm"]["layers_0"]["attn"]["q"]["kernel"] == PS("fsdp", "tensor")
  assert mu[1]["llm"]["layers_0"]["mlp"]["down"]["kernel"]["b"] == PS(None, "fsdp")
  assert st["params"]["llm"]["lm_head"]["kernel"] == PS("fsdp", "tensor")
  assert st["step"] == PS()
  sh = parallel.param_shardings(tree, mesh, AXES)
  assert isinstance(sh["llm"]["lm_head"]["kernel"], NamedSharding)
  assert parallel.batch_sharding(mesh).spec == PS(("data", "fsdp"))


def test_non_divisible_dims_fall_back_to_replication():
  mesh = parallel.make_mesh(1, 4, 2)
  tree = {"llm": {"layers_0": {"mlp": {"up": {"kernel": jnp.zeros((6, 10))}}},
                  "lm_head": {"kernel": jnp.zeros((8, 7))}}}
  specs = parallel.param_specs(tree, mesh, AXES)
  assert specs["llm"]["layers_0"]["mlp"]["up"]["kernel"] == PS(None, "tensor")  # 6 % 4 != 0
  assert specs["llm"]["lm_head"]["kernel"] == PS("fsdp", None)  # 7 % 2 != 0
  # A rule whose two dims map to the same mesh axis keeps only the first.
  rules = ((r".*", ("embed", "embed")),)
  assert parallel.param_specs({"w": jnp.zeros((8, 8))}, mesh, rules)["w"] == PS("fsdp", None)
  with pytest.raises(ValueError, match="names 1 logical axes"):
    parallel.param_specs({"w": jnp.zeros((8, 8))}, mesh, ((r".*", ("embed",)),))


def test_one_device_mesh_replicates_everything():
  specs = parallel.param_specs(mlp_params(), parallel.make_mesh(8, 1, 1), AXES)
  assert all(all(a is None for a in s) for s in jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, PS)))


@functools.lru_cache(maxsize=None)
def _reference_run(steps=2):
  """Two optimizer steps on one device."""
  params, batch = mlp_params(), mlp_batch()
  tx = O.make_optimizer({"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1}, 10, params)
  dev = jax.devices()[0]
  p, st = jax.device_put((params, tx.init(params)), dev)
  step = jax.jit(make_step(tx))
  losses = []
  for _ in range(steps):
    p, st, loss = step(p, st, jax.device_put(batch, dev))
    losses.append(float(loss))
  return p, losses


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_matches_single_device(shape):
  ref_params, ref_losses = _reference_run()
  mesh = parallel.make_mesh(*shape)
  params, batch = mlp_params(), mlp_batch()
  tx = O.make_optimizer({"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1}, 10, params)
  p_sh = parallel.param_shardings(params, mesh, AXES)
  st_sh = parallel.state_shardings(jax.eval_shape(tx.init, params), p_sh, mesh)
  p = parallel.shard_tree(params, p_sh)
  st = jax.jit(tx.init, out_shardings=st_sh)(p)
  b = parallel.shard_tree(batch, parallel.batch_sharding(mesh))
  step = jax.jit(make_step(tx), in_shardings=(p_sh, st_sh, parallel.batch_sharding(mesh)),
                 out_shardings=(p_sh, st_sh, parallel.replicated(mesh)))
  losses = []
  for _ in range(2):
    p, st, loss = step(p, st, b)
    losses.append(float(loss))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for a, r in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)
  if shape == (2, 2, 2):
    assert p["llm"]["layers_0"]["mlp"]["up"]["kernel"].sharding.spec == PS("fsdp", "tensor")
    adam = st.inner[1][0]  # chain(clip, adamw) -> adamw = (scale_by_adam, ...)
    assert adam.mu["llm"]["layers_0"]["mlp"]["up"]["kernel"].sharding.spec == PS("fsdp", "tensor")
    assert st.skipped.sharding.spec == PS()


def test_single_process_helpers(monkeypatch):
  for k in ("CDX_COORDINATOR", "CDX_NUM_PROCESSES", "CDX_PROCESS_ID", "SLURM_NTASKS",
            "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert parallel.initialize() is False
  assert parallel.process_batch_slice(12) == slice(0, 12)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.process_batch_slice(12, parallel.make_mesh(8, 1, 1))
  mesh = parallel.make_mesh(2, 2, 2)
  assert parallel.process_batch_slice(16, mesh) == slice(0, 16)
  arr = parallel.global_batch_array({"x": np.arange(32).reshape(16, 2)}, mesh, 16)["x"]
  assert arr.sharding.spec == PS(("data", "fsdp"))
  np.testing.assert_array_equal(arr, np.arange(32).reshape(16, 2))
  monkeypatch.setenv("CDX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="set all of CDX_COORDINATOR"):
    parallel.initialize()


_WORKER = """
from cdx import parallel
from cdx.models import mllm
parallel.initialize(cpu_collectives="gloo")
import jax, jax.numpy as jnp, numpy as np
mesh = parallel.make_mesh(-1, 1, 1)
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 5)).astype(np.float32)
w = rng.normal(size=(5, 3)).astype(np.float32)
rows = parallel.process_batch_slice(8, mesh)
gx = parallel.global_batch_array({"x": x[rows]}, mesh, 8)["x"]
loss_fn = lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2)
rep = parallel.replicated(mesh)
loss, g = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(rep, rep))(w, gx)
emit({"loss": float(loss), "grad": np.asarray(g).tolist(), "rows": [rows.start, rows.stop],
      "devices": jax.device_count(), "processes": jax.process_count()})
"""


@pytest.mark.parametrize("local_devices,rows", [((2, 2), [[0, 4], [4, 8]]),
                                                ((1, 3), [[0, 2], [2, 8]])])
def test_two_processes_match_one(local_devices, rows):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  w = rng.normal(size=(5, 3)).astype(np.float32)
  loss_fn = lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2)
  ref_loss, ref_g = jax.value_and_grad(loss_fn)(w, x)
  results = run_workers(_WORKER, local_devices=local_devices)
  assert [r["rows"] for r in results] == rows
  for r in results:
    assert r["devices"] == 4 and r["processes"] == 2
    np.testing.assert_allclose(r["loss"], float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(r["grad"], np.asarray(ref_g), rtol=1e-5, atol=1e-7)
