"""The DFT train step (LM + KD + attention, TAF student, LoRA + post-connector trainable).

Checked on tiny models with one synthetic batch:
  * meshes 8x1x1, 2x2x2, 1x4x2 give the 1-device losses and updated params (<= 1e-5);
  * only post/* and the LoRA factors change; vision, teacher adapter, LLM base, teacher stay;
  * the merged (exported) student computes the step's LM/KD losses through `mllm.forward`;
  * micro_batches=2 equals one full batch on 1 device and on 2x2x2 (where a reshape-built
    micro-batch split once hit an XLA bug: docs/bugs/reshape_microbatch_grads.md); a NaN
    skips the update; metrics are complete.

`build_setup`/`make_batch`/`make_step` are also used by tests/test_step_multiprocess.py.
Compiled steps are cached per (mesh shape, micro_batches) so tests share them. CPU time
(`time pytest tests/test_step.py`, 2 shared cores): 47-54 s user; 47 s wall when quiet,
65-80 s under load.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdx import parallel
from cdx.distill import losses
from cdx.distill import objective as objective_lib
from cdx.distill import taf
from cdx.models import mllm
from cdx.train import lora as lora_lib
from cdx.train import optim
from cdx import paths as params_lib
from cdx.train import setup as setup_lib
from cdx.train import step as step_lib
from configs.common import LLM_LINEARS

# Tiny relatives of configs/common.py TINY_*: teacher deeper/wider, MHA, untied, padded
# vocab; student GQA with tied embeddings. 24 px / 8 px patches -> Nv = 9 - 1 = 8.
# The vision tower runs 0 blocks (feature_layer -2 of 1): frozen, it only needs to exist.
VISION = dict(image_size=24, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
              mlp_dim=64)
TEACHER = dict(vocab_size=96, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=4,
               head_dim=12, mlp_dim=96, rope_theta=10000.0, tie_embeddings=False)
STUDENT = dict(vocab_size=80, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=8, mlp_dim=64, rope_theta=10000.0, tie_embeddings=True)
EOS, PAD, IMG = 1, 2, 3
B, L, NV = 8, 48, 8
RANK, ALPHA = 4, 8.0
# Per row: (text before the image, prompt after it, answer length, has image). Rows 2k and
# 2k+1 have equal answers and each parity holds one text-only row, so the strided
# micro-batches (even rows / odd rows) have equal token and image counts.
ROWS = ((0, 5, 6, True), (3, 4, 6, True), (7, 2, 9, True), (1, 6, 9, False),
        (12, 3, 4, True), (5, 8, 4, True), (2, 4, 7, False), (20, 3, 7, True))
OPTIM = dict(lr=1e-2, warmup_steps=0, weight_decay=0.01, clip_norm=1.0,
             # Adam's first update is ~lr*sign(g): a larger eps keeps float noise in
             # near-zero gradients from flipping signs between meshes.
             eps=1e-4)
TOTAL_STEPS = 10
TOL = dict(rtol=1e-5, atol=1e-5)


@dataclasses.dataclass
class Setup:
  student_cfg: mllm.MllmConfig
  teacher_cfg: mllm.MllmConfig
  objective: objective_lib.Objective
  lora_spec: setup_lib.LoraSpec
  trainable: dict   # host (numpy) trees
  frozen: dict
  lora: dict
  teacher: dict     # without vision and adapter (the student holds them)
  teacher_full: dict


def _key(seed):
  # rbg compiles far faster than threefry on CPU; the tests need any fixed random trees.
  return jax.random.key(seed, impl="unsafe_rbg")


def _host(tree):
  return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=None)
def build_setup() -> Setup:
  """Teacher + TAF student as in setup.build (dft stage rules), on the host."""
  ids = dict(image_token_id=IMG, pad_token_id=PAD, eos_token_id=EOS)
  t_cfg = mllm.make_config(VISION, TEACHER, **ids)
  s_cfg = mllm.make_config(VISION, STUDENT, **ids)
  rules = {"trainable": (r"post/.*",), "lora_targets": LLM_LINEARS}  # configs/dft.py

  @jax.jit  # One compile for all the random trees (eager ops would each compile).
  def trees():
    teacher = mllm.init_params(t_cfg, _key(1))
    student = mllm.init_params(s_cfg, _key(2))
    student["vision"] = teacher["vision"]  # One shared frozen vision tower (docs/METHOD.md §1).
    student = taf.make_taf_student(student, teacher, _key(3))
    lora = lora_lib.init_lora(student, rules["lora_targets"], RANK, ALPHA, _key(4))
    return teacher, student, lora

  teacher, student, lora = _host(trees())
  s_cfg = dataclasses.replace(s_cfg, post_connector_in=TEACHER["hidden_size"],
                              adapter_depth=t_cfg.adapter_depth)
  mask = params_lib.select(student, rules["trainable"], strict=True)
  trainable, frozen = params_lib.partition(student, mask)
  objective = objective_lib.Objective(lm=1.0, kd=1.0, attn=1.0, chunk_size=16,
                                 student_layers=(0, 1), teacher_groups=((0, 1), (1, 2)),
                                 taf=True)
  return Setup(student_cfg=s_cfg, teacher_cfg=t_cfg, objective=objective,
               lora_spec=setup_lib.LoraSpec(RANK, ALPHA), trainable=trainable,
               frozen=frozen, lora=lora,
               teacher={k: v for k, v in teacher.items() if k not in ("vision", "adapter")},
               teacher_full=teacher)


def make_batch(seed: int = 0) -> dict:
  """Host batch: image block at a different offset per row, right padding, labels."""
  rng = np.random.default_rng(seed)
  ids = np.full((B, L), PAD, np.int32)
  labels = np.full((B, L), losses.IGNORE, np.int32)
  mask = np.zeros((B, L), np.int32)
  text = lambda n: rng.integers(4, STUDENT["vocab_size"], n)
  for b, (before, prompt, answer, image) in enumerate(ROWS):
    row = [text(before), np.full(NV if image else 0, IMG), text(prompt)]
    start = sum(len(x) for x in row)
    row += [text(answer), [EOS]]
    row = np.concatenate(row).astype(np.int32)
    ids[b, :len(row)] = row
    mask[b, :len(row)] = 1
    labels[b, start:len(row)] = row[start:]
  pixels = rng.normal(size=(B, VISION["image_size"], VISION["image_size"], 3))
  has_image = np.array([r[3] for r in ROWS])
  pixels[~has_image] = 0.0  # As the pipeline's zero image.
  return dict(input_ids=ids, attention_mask=mask, labels=labels,
              pixel_values=pixels.astype(np.float32), has_image=has_image)


def supervised_targets(batch) -> int:
  """Positions predicting a supervised token (counted independently of losses.py)."""
  return int((batch["labels"][:, 1:] != losses.IGNORE).sum())


def make_tx(s: Setup):
  return optim.make_optimizer(OPTIM, TOTAL_STEPS, (s.trainable, s.lora))


def fresh_state(s: Setup) -> dict:
  """A new init state (new buffers: the jitted step donates its state argument)."""
  trainable, lora = jax.tree.map(jnp.array, (s.trainable, s.lora))
  return step_lib.init_state(trainable, lora, make_tx(s), jax.random.key(0))


# LLVM -O0: about half the CPU compile time. The SPMD partitioner and every HLO pass run
# as in production; only the generated machine code is less optimized.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def make_step(s: Setup, mesh, micro_batches: int = 1):
  """(compiled step, shardings) for `mesh`, built as setup.build does."""
  loss_fn = setup_lib.make_loss_fn(s.student_cfg, s.teacher_cfg, s.objective, s.lora_spec)
  train_step = step_lib.make_train_step(
      loss_fn, make_tx(s), optim.learning_rate_schedule(OPTIM, TOTAL_STEPS), micro_batches)
  shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  state, frozen, teacher = jax.eval_shape(lambda: fresh_state(s)), shapes(s.frozen), \
      shapes(s.teacher)
  fn, sh = step_lib.jit_train_step(train_step, mesh, state, frozen, teacher)
  lowered = fn.lower(state, frozen, teacher, shapes(make_batch()))
  return lowered.compile(COMPILER_OPTIONS), sh


def one_device_mesh():
  return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@functools.lru_cache(maxsize=None)
def _compiled(shape: tuple, micro_batches: int = 1):
  s = build_setup()
  mesh = one_device_mesh() if shape == (1, 1, 1) else parallel.make_mesh(*shape)
  fn, sh = make_step(s, mesh, micro_batches)
  return fn, sh, mesh


def run(shape: tuple, steps: int = 2, micro_batches: int = 1):
  """Trains `steps` steps on `shape` from the init state; (host state, metrics per step)."""
  s = build_setup()
  fn, sh, mesh = _compiled(shape, micro_batches)
  state = parallel.shard_tree(fresh_state(s), sh.state)
  frozen = parallel.shard_tree(s.frozen, sh.frozen)
  teacher = parallel.shard_tree(s.teacher, sh.teacher)
  batch = parallel.global_batch_array(make_batch(), mesh, B)
  history = []
  for _ in range(steps):
    state, m = fn(state, frozen, teacher, batch)
    history.append(jax.device_get(m))
  return state, history


@functools.lru_cache(maxsize=None)
def reference():
  state, history = run((1, 1, 1))
  return _diff_host(state), history


def _diff_host(state):
  return {k: _host(state[k]) for k in ("params", "lora")} | {
      "opt": _host(state["opt"]), "step": int(state["step"]),
      "nonfinite": int(state["nonfinite"])}


@jax.jit
def merged_student(trainable, lora, frozen):
  """The tree a stage exports (loop.final_params): LoRA merged into the base."""
  return lora_lib.merge_lora(params_lib.merge(trainable, frozen), lora, ALPHA, RANK)


def _assert_trees_close(a, b, **tol):
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for (path, x), y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path),
                               **(tol or TOL))


# --------------------------------------------------------------------------------- tests

def test_batch_is_what_the_tests_claim():
  batch, s = make_batch(), build_setup()
  counts = (batch["input_ids"] == IMG).sum(1)
  assert set(counts.tolist()) == {0, NV} and (counts == 0).sum() == 2
  starts = [int(np.argmax(r == IMG)) for r, c in zip(batch["input_ids"], counts) if c]
  assert len(set(starts)) == len(starts)  # A different image offset in every image row.
  assert batch["attention_mask"][:, -1].sum() == 0  # Every row right-padded.
  even, odd = batch["labels"][0::2, 1:], batch["labels"][1::2, 1:]
  assert (even != losses.IGNORE).sum() == (odd != losses.IGNORE).sum()
  assert NV == mllm.num_visual_tokens(s.student_cfg)


def test_reference_step_metrics_and_learning():
  s, batch = build_setup(), make_batch()
  state, history = reference()
  m = history[0]
  for key in ("loss", "lm", "kd", "attn", "grad_norm", "param_norm", "tokens", "lr",
              "attn_cos", "nonfinite", "nonfinite_run"):
    assert key in m, key
  assert np.shape(m["attn_cos"]) == (len(s.objective.student_layers),)
  assert np.all(np.abs(m["attn_cos"]) <= 1 + 1e-6) and np.all(m["attn_cos"] != 0)
  assert int(m["tokens"]) == supervised_targets(batch)
  np.testing.assert_allclose(m["loss"], m["lm"] + m["kd"] + m["attn"], rtol=1e-6)
  np.testing.assert_allclose(m["lr"], OPTIM["lr"], rtol=1e-6)  # No warmup: peak at step 0.
  assert m["grad_norm"] > 0 and m["attn"] > 0 and m["kd"] > 0
  assert int(m["nonfinite"]) == 0 and int(m["nonfinite_run"]) == 0
  # param_norm is the norm of the updated trainable set (post + LoRA).
  leaves = jax.tree.leaves((state["params"], state["lora"]))
  np.testing.assert_allclose(history[-1]["param_norm"],
                             np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in leaves)),
                             rtol=1e-5)
  assert state["step"] == 2
  assert history[1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_matches_one_device(shape):
  ref_state, ref_history = reference()
  state, history = run(shape)
  for m, r in zip(history, ref_history):
    for key in ("loss", "lm", "kd", "attn", "attn_cos", "grad_norm", "param_norm", "tokens"):
      np.testing.assert_allclose(m[key], r[key], err_msg=key, **TOL)
  host = _diff_host(state)
  _assert_trees_close(host["params"], ref_state["params"])
  _assert_trees_close(host["lora"], ref_state["lora"])
  _assert_trees_close(host["opt"], ref_state["opt"])
  if shape == (2, 2, 2):  # The comparison is between really sharded arrays.
    q = state["lora"]["llm"]["layers_0"]["attn"]["q"]["kernel"]
    assert q["a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert q["b"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert state["params"]["post"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "tensor")


def test_only_the_trainable_set_changes():
  s = build_setup()
  state, _ = reference()
  trainable_paths = params_lib.tree_paths(s.trainable)
  assert sorted(jax.tree.leaves(trainable_paths)) == ["post/bias", "post/kernel"]
  # Every trainable leaf moved (LoRA `a` only in step 2: `b` starts at zero).
  for new, old in zip(jax.tree.leaves((state["params"], state["lora"])),
                      jax.tree.leaves((s.trainable, s.lora))):
    assert np.abs(new - old).max() > 0
  # The student the stage exports: LoRA merged into the frozen base.
  before = _host(merged_student(s.trainable, s.lora, s.frozen))
  after = _host(merged_student(state["params"], state["lora"], s.frozen))
  lora_targets = set(jax.tree.leaves(params_lib.tree_paths(s.lora)))
  adapted = {p.rsplit("/", 1)[0] for p in lora_targets}
  changed = []
  for (path, x), y in zip(jax.tree.leaves_with_path(after), jax.tree.leaves(before)):
    name = params_lib.path_str(path)
    if name in adapted or name.startswith("post/"):
      changed.append(name)
      continue
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  assert len(changed) == len(adapted) + 2
  # Frozen and teacher arguments are never donated nor written.
  fn, sh, mesh = _compiled((1, 1, 1))
  frozen = parallel.shard_tree(s.frozen, sh.frozen)
  teacher = parallel.shard_tree(s.teacher, sh.teacher)
  st = parallel.shard_tree(fresh_state(s), sh.state)
  for _ in range(2):
    st, _ = fn(st, frozen, teacher, parallel.global_batch_array(make_batch(), mesh, B))
  _assert_trees_close(_host(frozen), s.frozen, rtol=0, atol=0)
  _assert_trees_close(_host(teacher), s.teacher, rtol=0, atol=0)


def test_merged_student_forward_gives_the_step_losses():
  """Export path (LoRA merged, plain mllm.forward + full logits) == step (factors applied
  inside, chunked head), with nonzero trained LoRA factors."""
  s, batch = build_setup(), make_batch()
  state, _ = reference()
  spec = s.lora_spec
  params = params_lib.merge(state["params"], s.frozen)
  assert np.abs(state["lora"]["llm"]["layers_1"]["mlp"]["up"]["kernel"]["b"]).max() > 0
  merged = merged_student(state["params"], state["lora"], s.frozen)
  k = params["llm"]["layers_1"]["mlp"]["up"]["kernel"]
  ab = state["lora"]["llm"]["layers_1"]["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(merged["llm"]["layers_1"]["mlp"]["up"]["kernel"],
                             k + ab["a"] @ ab["b"] * (ALPHA / RANK), rtol=1e-5, atol=1e-6)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def losses_from_forward(cfg, t_cfg, params, teacher, batch):
    s_logits, _ = mllm.forward(cfg, params, batch["input_ids"], batch["pixel_values"],
                               batch["attention_mask"])
    t_logits, _ = mllm.forward(t_cfg, teacher, batch["input_ids"], batch["pixel_values"],
                               batch["attention_mask"])
    return (losses.lm(s_logits, batch["labels"]),
            losses.kd(s_logits, t_logits, batch["labels"]))

  @jax.jit
  def step_losses(trainable, lora, batch):
    obj = dataclasses.replace(s.objective, attn=0.0)
    loss_fn = setup_lib.make_loss_fn(s.student_cfg, s.teacher_cfg, obj, spec)
    return loss_fn((trainable, lora), s.frozen, s.teacher, batch)[1]

  lm, kd = losses_from_forward(s.student_cfg, s.teacher_cfg, merged, s.teacher_full, batch)
  m = step_losses(state["params"], state["lora"], batch)
  np.testing.assert_allclose(lm, m["lm"], **TOL)
  np.testing.assert_allclose(kd, m["kd"], **TOL)
  base_lm, _ = losses_from_forward(s.student_cfg, s.teacher_cfg, params, s.teacher_full,
                                   batch)
  assert abs(float(base_lm) - float(lm)) > 1e-4  # The LoRA factors matter.


@pytest.mark.parametrize("shape", [
    (1, 1, 1), pytest.param((2, 2, 2), marks=pytest.mark.slow)])
def test_two_micro_batches_equal_one_batch(shape):
  """Micro-batch losses are means over their own tokens, averaged with equal weights: equal
  to the full-batch step when both halves hold as many tokens and images (ROWS)."""
  ref_state, ref_history = reference()
  state, history = run(shape, micro_batches=2)
  for m, r in zip(history, ref_history):
    for key in ("loss", "lm", "kd", "attn", "attn_cos", "grad_norm", "tokens"):
      np.testing.assert_allclose(m[key], r[key], err_msg=key, **TOL)
    assert m["tokens"].dtype == r["tokens"].dtype
  host = _diff_host(state)
  _assert_trees_close(host["params"], ref_state["params"])
  _assert_trees_close(host["lora"], ref_state["lora"])


def test_gradient_accumulation_equals_full_batch():
  w = {"kernel": jax.random.normal(jax.random.key(0), (3, 2))}
  x = jax.random.normal(jax.random.key(1), (8, 3))
  y = jax.random.normal(jax.random.key(2), (8, 2))

  def loss(p, b):
    return jnp.mean((b["x"] @ p["kernel"] - b["y"]) ** 2)

  grad_fn = lambda p, b: (jax.grad(loss)(p, b), {"loss": loss(p, b)})
  batch = {"x": x, "y": y}
  micro = step_lib.split_microbatches(batch, 4)
  assert micro["x"].shape == (4, 2, 3)
  np.testing.assert_array_equal(micro["x"][1], np.asarray(x)[[1, 5]])  # strided: rows 1 and 5
  g, aux = jax.jit(lambda p, m: step_lib.accumulate_gradients(grad_fn, p, m))(w, micro)
  np.testing.assert_allclose(g["kernel"], jax.grad(loss)(w, batch)["kernel"], rtol=1e-5)
  np.testing.assert_allclose(aux["loss"], loss(w, batch), rtol=1e-5)
  with pytest.raises(ValueError, match="not divisible by micro_batches=3"):
    step_lib.split_microbatches(batch, 3)


def test_split_microbatches_gradients_on_2x2x2():
  """The pattern that once hit an XLA SPMD bug (docs/bugs/reshape_microbatch_grads.md):
  grads of a chunk-scanned loss over split micro-batches, pinned to a tensor-sharded spec
  on data=fsdp=tensor=2 with the head on fsdp x tensor, equal the unsharded mean of the
  micro-batch grads (the reshape-built split swapped rows between devices here)."""
  mesh = parallel.make_mesh(2, 2, 2)
  sharding = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, 32, 16)).astype(np.float32)
  w = (rng.normal(size=(16, 16)) / 4).astype(np.float32)
  head = (rng.normal(size=(16, 40)) / 4).astype(np.float32)

  def grad_fn(w, head, mb):
    def loss(w):
      h = mb["x"] @ w
      chunks = jnp.moveaxis(h.reshape(h.shape[0], 4, 8, 16), 1, 0)  # As lm_kd_chunked.
      total = jax.lax.scan(lambda t, c: (t + jnp.sum((c @ head) ** 2), None), 0.0,
                           chunks)[0]
      return total, total
    return jax.grad(loss, has_aux=True)(w)

  @jax.jit
  def accumulated(w, head, x):
    micro = step_lib.split_microbatches({"x": x}, 2)
    g, _ = step_lib.accumulate_gradients(lambda w, mb: grad_fn(w, head, mb), w, micro)
    return jax.lax.with_sharding_constraint(g, sharding(None, "tensor"))

  expected = np.mean([grad_fn(w, head, {"x": x[j::2]})[0] for j in range(2)], axis=0)
  got = accumulated(jax.device_put(w, sharding(None, "tensor")),
                    jax.device_put(head, sharding("fsdp", "tensor")),
                    jax.device_put(x, sharding(("data", "fsdp"))))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5,
                             atol=1e-6 * np.abs(expected).max())


def test_nonfinite_loss_skips_the_update():
  s = build_setup()
  fn, sh, mesh = _compiled((1, 1, 1))
  frozen = parallel.shard_tree(s.frozen, sh.frozen)
  teacher = parallel.shard_tree(s.teacher, sh.teacher)
  state = parallel.shard_tree(fresh_state(s), sh.state)
  clean = make_batch()
  state, _ = fn(state, frozen, teacher, parallel.global_batch_array(clean, mesh, B))

  bad_frozen = jax.tree.map(np.array, s.frozen)  # A copy: s is shared by every test.
  bad_frozen["vision"]["patch"]["kernel"][0, 0] = np.nan  # NaN in every image's features.
  bad_pixels = dict(clean, pixel_values=clean["pixel_values"].copy())
  bad_pixels["pixel_values"][0, -1, -1, 0] = np.nan  # Not patch 0: "default" drops it.
  cases = [(parallel.shard_tree(bad_frozen, sh.frozen), clean), (frozen, bad_pixels)]
  for run_length, (fz, batch) in enumerate(cases, start=1):
    before = _diff_host(state)
    state, m = fn(state, fz, teacher, parallel.global_batch_array(batch, mesh, B))
    m, after = jax.device_get(m), _diff_host(state)
    assert not np.isfinite(m["loss"])
    assert int(m["nonfinite"]) == 1 and int(m["nonfinite_run"]) == run_length
    assert after["nonfinite"] == run_length and after["opt"].skipped == run_length
    _assert_trees_close(after["params"], before["params"], rtol=0, atol=0)
    _assert_trees_close(after["lora"], before["lora"], rtol=0, atol=0)
    _assert_trees_close(after["opt"].inner, before["opt"].inner, rtol=0, atol=0)
  # A finite step afterwards updates again and resets the run.
  before = _diff_host(state)
  state, m = fn(state, frozen, teacher, parallel.global_batch_array(clean, mesh, B))
  assert int(m["nonfinite"]) == 0 and int(m["nonfinite_run"]) == 0
  assert np.isfinite(m["loss"])
  assert np.abs(np.asarray(state["params"]["post"]["kernel"])
                - before["params"]["post"]["kernel"]).max() > 0
