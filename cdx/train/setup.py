"""One experiment, built once: models, data, objective, state and the compiled step.

  s = build(cfg, workdir)   # cfg: a locked ConfigDict of configs/<stage>.py
  s.state, metrics = s.step_fn(s.state, s.frozen, s.teacher, batch)

The loop (cdx/train/loop.py) trains what `build` returns. The pieces below it are public so
that a benchmark or a test builds the same step from its own models (random, abstract):

  spec_config(spec, cfg, ids)                      MllmConfig of a model spec
  match_layers(cfg, student_cfg, teacher_cfg)      (student layers, teacher groups)
  make_objective(cfg, layers, groups, teacher)     the stage's `objective.Objective`
  make_training(cfg, params, total_steps)          trainable split, LoRA, optimizer, state
  make_loss_fn(student_cfg, teacher_cfg, obj, lora_spec[, compute_loss])
                                                   the loss `step.make_train_step` takes

layers.strategy=adaptive calibrates the attention matching on the first training batch
(both models, every band layer; `cdx.distill.layers.adaptive_match`) and records it in
manifest.json ("layers"); a resume reuses it.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from cdx import checkpoint as ckpt_lib
from cdx import hf
from cdx import parallel
from cdx import paths as paths_lib
from cdx.analysis import attention as attention_lib
from cdx.config import UserError
from cdx.data import pipeline as pipeline_lib
from cdx.data import sources
from cdx.data import images
from cdx.data import templates
from cdx.data import tokenizer as tokenizer_lib
from cdx.distill import layers as layers_lib
from cdx.distill import losses
from cdx.distill import objective as objective_lib
from cdx.distill import taf
from cdx.models import mllm
from cdx.train import lora as lora_lib
from cdx.train import optim
from cdx.train import step as step_lib
from cdx.train import vision_pretrain
from cdx.trained import load_trained

PyTree = Any

# ----------------------------------------------------------------------------- configs

# Config remat names that are not jax.checkpoint_policies names.
_REMAT_ALIASES = {"none": None, "": None, None: None, "full": "nothing_saveable"}


def _numerics(cfg: ml_collections.ConfigDict) -> dict:
  return dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
              remat=_REMAT_ALIASES.get(cfg.remat, cfg.remat),
              scan_layers=bool(cfg.get("scan_layers", False)))


def spec_config(spec: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                ids: tokenizer_lib.TokenIds, post_connector_in: int | None = None
                ) -> mllm.MllmConfig:
  """MllmConfig of a model spec of configs/common.py (architecture from names/dicts)."""
  as_plain = lambda x: x.to_dict() if hasattr(x, "to_dict") else x
  try:
    return mllm.make_config(
        as_plain(spec.vision), as_plain(spec.text), image_token_id=ids.image,
        pad_token_id=ids.pad, eos_token_id=ids.eos, adapter_depth=spec.adapter_depth,
        feature_layer=spec.feature_layer, feature_select=spec.feature_select,
        post_connector_in=post_connector_in, **_numerics(cfg))
  except (KeyError, TypeError) as e:
    raise UserError(f"{cfg.config_file}: bad model spec ({e}).") from None


def _allowed(field: str, value, allowed) -> str | None:
  if value in allowed:
    return None
  return f"{field}={value!r} is not one of {', '.join(map(str, allowed))}"


def _at_least(field: str, value, low, *, above: bool = False) -> str | None:
  bad = not isinstance(value, (int, float)) or value < low or (above and value == low)
  return f"{field}={value!r} must be {'>' if above else '>='} {low}" if bad else None


def _remat_names() -> tuple:
  """The remat values: none, full and the jax.checkpoint_policies that are policies (not
  factories taking names or other policies): their first parameter is the primitive."""
  def is_policy(name):
    try:
      first = next(iter(inspect.signature(getattr(jax.checkpoint_policies, name)).parameters))
    except (TypeError, ValueError, StopIteration):
      return False
    return first in ("prim", "_")
  names = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_") and is_policy(n)]
  return ("none", "full", *sorted(names))


def validate(cfg: ml_collections.ConfigDict) -> None:
  """One-line UserError for the first field out of range; the allowed values come from the
  modules that read them. Called on every planned stage by launch/run.py (--dry_run too)
  and again by `build`."""
  o, lc, d = cfg.optim, cfg.loss, cfg.data
  problems = [
      _at_least("optim.lr", o.lr, 0, above=True),
      _allowed("optim.schedule", o.schedule, optim.SCHEDULES),
      None if 0 <= o.warmup_ratio <= 1 else f"optim.warmup_ratio={o.warmup_ratio!r} must be "
      "in [0, 1]",
      _at_least("optim.max_nonfinite", o.max_nonfinite, 1),
      None if cfg.remat in _REMAT_ALIASES else _allowed("remat", cfg.remat, _remat_names()),
      _allowed("loss.kd_kind", lc.kd_kind, losses.KD_KINDS),
      _allowed("loss.kd_mask", lc.kd_mask, losses.KD_MASKS),
      _allowed("loss.attn_variant", lc.attn_variant, losses.ATTN_VARIANTS),
      _allowed("loss.fidelity", lc.get("fidelity", "cdx"), objective_lib.FIDELITIES),
      *(_at_least(f"loss.{k}", lc[k], 0) for k in ("lm", "kd", "attn")),
      _at_least("loss.kd_temperature", lc.kd_temperature, 0, above=True),
      _at_least("loss.chunk_size", lc.chunk_size, 1),
      _allowed("layers.strategy", cfg.layers.strategy, (*layers_lib.STRATEGIES, "adaptive")),
      _at_least("batch_size", cfg.batch_size, 1),
      _at_least("micro_batches", cfg.micro_batches, 1),
      _at_least("max_length", cfg.max_length, 1),
      _at_least("epochs", cfg.epochs, 0, above=True),
      None if cfg.total_steps == -1 or cfg.total_steps >= 1 else
      f"total_steps={cfg.total_steps!r} must be >= 1, or -1 (one pass over the data)",
      _allowed("data.template", d.template, templates.TEMPLATES),
      _allowed("data.image_mode", d.image_mode, images.MODES),
      _at_least("data.worker_count", d.worker_count, 0),
      _at_least("log.every_steps", cfg.log.every_steps, 1),
      _at_least("checkpoint.every_steps", cfg.checkpoint.every_steps, 1),
      _at_least("checkpoint.keep", cfg.checkpoint.keep, 1),
  ]
  sizes_ok = all(isinstance(cfg[k], int) and cfg[k] >= 1 for k in ("batch_size", "micro_batches"))
  if sizes_ok and cfg.batch_size % cfg.micro_batches:
    problems.append(f"batch_size={cfg.batch_size} must be divisible by micro_batches="
                    f"{cfg.micro_batches}")
  if d.synthetic:  # The synthetic world would silently replace the user's data.
    own = [k for k in ("image_root", "tokenizer") if d[k]]
    own += ["train"] * any(os.path.isabs(p.partition(":")[0]) for p in (d.train or "").split(","))
    if own:
      problems.append(f"data.{own[0]}={d[own[0]]!r} is ignored while data.synthetic=True "
                      "(the tiny preset's generated world): add --config.data.synthetic=False "
                      "to train on your own data")
  problems = [p for p in problems if p]
  if problems:
    raise UserError(f"{cfg.get('config_file') or cfg.name}: {problems[0]}.")


# ------------------------------------------------------------------------ data set-up

def prepare_data(cfg, workdir: str) -> tuple[Any, tokenizer_lib.TokenIds, list[str], str]:
  """(tokenizer, ids, training files, image root); tiny presets generate the world."""
  data = cfg.data
  root, tok_path = data.image_root, data.tokenizer
  if data.synthetic:
    from cdx.data.synthetic import export  # Only tiny runs need the renderer.
    root = os.path.join(workdir, "data")
    error = None
    if jax.process_index() == 0:
      try:
        export.ensure(root, data.synthetic_train, data.world_seed, vocab_size=1024,
                      num_cr=data.num_cr, format_frac=data.format_frac)
      except ValueError as e:  # An export made with other settings or by older code.
        error = f"data: {e}"
      except OSError as e:  # e.g. a full or read-only disk
        error = f"data: could not write the synthetic world to {root}: {e}"
    # Other hosts read what process 0 wrote, so they wait for it, and stop with it if it
    # could not write the world (a plain barrier would leave them waiting forever).
    error = ckpt_lib.gather_per_process(error)[0]
    if error:
      raise UserError(error)
    tok_path = os.path.join(root, "tokenizer")
  missing = [f"data.{k}" for k, v in (("train", data.train), ("tokenizer", tok_path)) if not v]
  where = " (the synthetic world's folder; for your own data add --config.data.synthetic=False)" \
      if data.synthetic else ""
  if missing:
    raise UserError(
        f"{cfg.config_file}: set {', '.join(missing)} (e.g. --config.data.train="
        "/data/llava_v1_5_mix665k.json --config.data.image_root=/data/images "
        "--config.data.tokenizer=/weights/Qwen1.5-1.8B).")
  files, weights = [], []
  for item in data.train.split(","):
    path, _, weight = item.partition(":")
    path = path if os.path.isabs(path) or not root else os.path.join(root, path)
    if not os.path.isfile(path):
      raise UserError(f"data.train: {path} does not exist{where}.")
    files.append(path)
    weights.append(float(weight or 1.0))
  if not os.path.isdir(tok_path):
    raise UserError(f"data.tokenizer: {tok_path} is not a directory with an HF tokenizer.")
  tokenizer, ids = tokenizer_lib.load_tokenizer(tok_path)
  return tokenizer, ids, list(zip(files, weights)), root


# ------------------------------------------------------------------------ model set-up

def _with_numerics(model_cfg: mllm.MllmConfig, cfg) -> mllm.MllmConfig:
  return dataclasses.replace(model_cfg, **_numerics(cfg))


def _cast(params: dict, dtype: str) -> dict:
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def _shared_vision(model_cfg: mllm.MllmConfig, cfg, workdir: str) -> dict:
  """The tiny presets' frozen vision tower, identical for teacher and student: pretrained
  on the synthetic world (`cfg.vision_pretrain`, cached in <workdir>/vision), or random
  with vision_pretrain.steps=0 or on other data (data.synthetic=False)."""
  vp = cfg.vision_pretrain
  if vp.steps <= 0 or not cfg.data.synthetic:
    return mllm.init_params(model_cfg, jax.random.key(cfg.seed + 7))["vision"]
  vision = vision_pretrain.pretrain_vision(
      cfg.data.world_seed, model_cfg.vision, os.path.join(workdir, "vision"), steps=vp.steps,
      seed=vp.seed, feature_layer=model_cfg.feature_layer, batch_size=vp.batch_size,
      lr=vp.lr, dense_weight=vp.dense_weight, position_weight=vp.position_weight)
  return jax.tree.map(jnp.asarray, vision)


def load_model(spec, cfg, workdir: str, init_stage: str, ids, fingerprint: str,
               role: str) -> tuple[mllm.MllmConfig, dict, dict]:
  """(config, params, provenance) of a model from an upstream stage, HF dirs or random;
  params in the layout of the config's `scan_layers`."""
  model_cfg, params, provenance = _load_model(spec, cfg, workdir, init_stage, ids,
                                              fingerprint, role)
  return model_cfg, mllm.to_layout(model_cfg, params), provenance


def _load_model(spec, cfg, workdir, init_stage, ids, fingerprint, role):
  if init_stage:
    path = os.path.join(workdir, init_stage)
    info = ckpt_lib.read_model_info(path)  # Raises for a stage that did not finish.
    if info.get("tokenizer") not in (None, fingerprint):
      raise UserError(
          f"The {role} from stage '{init_stage}' was trained with another tokenizer "
          f"({info['tokenizer']}) than data.tokenizer ({fingerprint}); teacher, student "
          "and data must share one tokenizer.")
    model_cfg, params, _ = load_trained(path)
    return _with_numerics(model_cfg, cfg), params, {"stage": init_stage}
  if spec.hf_path:
    if not os.path.isdir(spec.hf_path):
      raise UserError(f"{role}.hf_path: {spec.hf_path} is not a directory.")
    check_tokenizer(spec.hf_path, fingerprint, role)
    with open(os.path.join(spec.hf_path, "config.json")) as f:
      arch = json.load(f).get("architectures", [""])[0]
    if arch.startswith("Llava"):
      model_cfg, params, _ = load_trained(spec.hf_path, dtype=cfg.param_dtype)
      return _with_numerics(model_cfg, cfg), params, {"hf": spec.hf_path}
    if not spec.vision_path:
      raise UserError(f"{role}.hf_path {spec.hf_path} is a {arch or 'non-LLaVA'} dir: also "
                      f"set --config.{role}.vision_path to a SigLIP dir.")
    text_cfg, llm = hf.load_qwen2(spec.hf_path, dtype=cfg.param_dtype)
    vision_cfg, vision = hf.load_siglip(spec.vision_path, dtype=cfg.param_dtype)
    model_cfg = mllm.MllmConfig(
        vision=vision_cfg, text=text_cfg, image_token_id=ids.image, pad_token_id=ids.pad,
        eos_token_id=ids.eos, adapter_depth=spec.adapter_depth,
        feature_layer=spec.feature_layer, feature_select=spec.feature_select,
        **_numerics(cfg))
    params = mllm.init_params(model_cfg, jax.random.key(cfg.seed))  # The adapter is new.
    params.update(vision=vision, llm=llm)
    return model_cfg, params, {"hf": spec.hf_path, "vision": spec.vision_path}
  if cfg.preset != "tiny":
    raise UserError(f"No weights for the {role}: set --config.{role}.hf_path "
                    f"(an HF LLaVA dir, or a Qwen2 dir plus --config.{role}.vision_path).")
  model_cfg = spec_config(spec, cfg, ids)
  params = mllm.init_params(model_cfg, jax.random.key(cfg.seed + (1 if role == "teacher" else 2)))
  params["vision"] = _shared_vision(model_cfg, cfg, workdir)
  return model_cfg, params, {"random": cfg.seed,
                             "vision_pretrain_steps": int(cfg.vision_pretrain.steps)}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def check_tokenizer(path: str, fingerprint: str, role: str) -> None:
  """The tokenizer saved beside the weights in `path` (if any) must be the data's: a
  mismatch would train with KD between unrelated vocabularies."""
  if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    print(f"note: {role}.hf_path {path} holds no tokenizer; cannot check that it matches "
          "data.tokenizer.")
    return
  theirs = tokenizer_lib.fingerprint(tokenizer_lib.load_tokenizer(path)[0])
  if theirs != fingerprint:
    raise UserError(
        f"{role}.hf_path {path} comes with another tokenizer ({theirs}) than data.tokenizer "
        f"({fingerprint}); teacher, student and data must share one tokenizer.")


def check_pair(student: mllm.MllmConfig, teacher: mllm.MllmConfig, vocab: int) -> None:
  """Teacher and student must see the same images and ids."""
  if student.vision != teacher.vision or student.feature_layer != teacher.feature_layer:
    raise UserError("Teacher and student vision towers differ; CompoDistill shares one "
                    "frozen vision tower (docs/METHOD.md §1).")
  if student.image_token_id != teacher.image_token_id:
    raise UserError(f"image_token_id differs: student {student.image_token_id}, teacher "
                    f"{teacher.image_token_id}; they must share one tokenizer.")
  for who, c in (("student", student), ("teacher", teacher)):
    if c.text.vocab_size < vocab:
      raise UserError(f"The {who}'s vocab ({c.text.vocab_size}) is smaller than the "
                      f"tokenizer's ({vocab}).")


# ----------------------------------------------------- objective and training

def match_layers(cfg, student: mllm.MllmConfig, teacher: mllm.MllmConfig, calibrate=None
                 ) -> tuple[list[int], list[list[int]]]:
  """(student layers, teacher groups) of `cfg.layers`; `calibrate(s_band, t_band)` ->
  (s_maps, t_maps) is needed for strategy=adaptive without explicit layers."""
  lc = cfg.layers
  explicit = bool(lc.student_layers) or bool(lc.teacher_groups)
  if lc.strategy == "adaptive" and not explicit:
    s_band = layers_lib.student_band(student.text.num_layers)
    t_band = layers_lib.teacher_band(teacher.text.num_layers)
    s_maps, t_maps = calibrate(tuple(s_band), tuple(t_band))
    groups = layers_lib.adaptive_match(s_maps, t_maps, teacher_layers=t_band)
    return s_band, groups
  try:
    return layers_lib.resolve_layers(
        {"strategy": lc.strategy, "student_layers": list(lc.student_layers) or None,
         "teacher_groups": [list(g) for g in lc.teacher_groups] or None},
        student.text.num_layers, teacher.text.num_layers)
  except ValueError as e:
    raise UserError(f"layers: {e}") from None


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float

  @property
  def scale(self) -> float:
    """alpha / rank: what the factored branch is multiplied by."""
    return self.alpha / self.rank


def make_objective(cfg, student_layers, teacher_groups, with_teacher: bool
                   ) -> objective_lib.Objective:
  """The stage's loss: `cfg.loss` weights and options, the matched layers; KD and the
  attention term only with a teacher."""
  lc = cfg.loss
  return objective_lib.Objective(
      lm=lc.lm, kd=lc.kd if with_teacher else 0.0, attn=lc.attn if with_teacher else 0.0,
      kd_kind=lc.kd_kind, kd_temperature=lc.kd_temperature, kd_beta=lc.kd_beta,
      kd_mask=lc.kd_mask, attn_variant=lc.attn_variant, chunk_size=lc.chunk_size,
      student_layers=tuple(student_layers),
      teacher_groups=tuple(tuple(g) for g in teacher_groups), taf=cfg.taf,
      fidelity=lc.get("fidelity", "cdx"))


def make_loss_fn(student_cfg: mllm.MllmConfig, teacher_cfg: mllm.MllmConfig | None,
                 obj: objective_lib.Objective, lora_spec: LoraSpec | None,
                 compute_loss: Callable = objective_lib.compute_loss) -> Callable:
  """`loss_fn(diff, frozen, teacher, batch)` of `step.make_train_step`: the student tree
  is the trainable partition merged with the frozen rest, the LoRA factors stay unmerged.

  compute_loss: `objective.compute_loss`, or `cdx.distill.reference.compute_loss` (the
  official formulation, for benchmarks)."""

  def loss_fn(diff, frozen, teacher, batch):
    trainable, lora = diff
    params = paths_lib.merge(trainable, frozen)
    factors = None if lora_spec is None or not lora else mllm.Lora(lora, lora_spec.scale)
    return compute_loss(student_cfg, teacher_cfg, obj, params, teacher, batch, factors)

  return loss_fn


@dataclasses.dataclass
class Training:
  """What is trained and how: the trainable / frozen split of the student, LoRA, the
  optimizer and its schedule, the initial step state (arrays, or ShapeDtypeStructs)."""
  lora_spec: LoraSpec | None
  frozen: PyTree
  tx: Any
  schedule: Callable
  state: dict
  total_steps: int


def make_training(cfg, params: PyTree, total_steps: int, abstract: bool = False) -> Training:
  """Trainable set by `cfg.trainable` (+ the whole LLM for lora.full_finetune), LoRA
  factors (always trainable), AdamW of `cfg.optim`, `step.init_state`. With `abstract`,
  `params` may be ShapeDtypeStructs and nothing is allocated."""
  rules = tuple(cfg.trainable) + (("llm/.*",) if cfg.lora.full_finetune else ())
  try:
    mask = paths_lib.select(params, rules, strict=True)
  except ValueError as e:
    raise UserError(f"trainable: {e}") from None
  trainable, frozen = paths_lib.partition(params, mask)
  lora_spec, lora = None, {}
  if cfg.lora.enabled and not cfg.lora.full_finetune:
    lora_spec = LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    make_lora = lambda: lora_lib.init_lora(params, tuple(cfg.lora.targets), cfg.lora.rank,
                                           cfg.lora.alpha, jax.random.key(cfg.seed + 4))
    lora = jax.eval_shape(make_lora) if abstract else make_lora()
  tx = optim.make_optimizer(cfg.optim, total_steps, (trainable, lora))
  schedule = optim.learning_rate_schedule(cfg.optim, total_steps)
  make_state = lambda: step_lib.init_state(trainable, lora, tx, jax.random.key(cfg.seed))
  state = jax.eval_shape(make_state) if abstract else make_state()
  return Training(lora_spec, frozen, tx, schedule, state, total_steps)


# ---------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Setup:
  """Everything a stage run holds (host side)."""
  cfg: Any
  stage_dir: str
  mesh: Any
  model_cfg: mllm.MllmConfig
  teacher_cfg: mllm.MllmConfig | None
  objective: objective_lib.Objective
  lora_spec: LoraSpec | None
  state: dict
  frozen: dict
  teacher: dict | None
  step_fn: Any
  total_steps: int
  tokenizer: Any
  ids: tokenizer_lib.TokenIds
  data: Any
  provenance: dict
  layers: dict | None = None  # The attention matching (manifest "layers").


def _total_steps(cfg, num_samples: int) -> int:
  if cfg.total_steps > 0:
    return cfg.total_steps
  steps = int(cfg.epochs * num_samples) // cfg.batch_size
  if steps < 1:
    raise UserError(f"{num_samples} samples make no full batch of {cfg.batch_size}.")
  return steps


def build(cfg, workdir: str) -> Setup:
  """Resolves the config into models, data, state and the compiled step."""
  validate(cfg)
  stage_dir = os.path.join(workdir, cfg.name)
  n_dev = jax.device_count()
  try:
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  except ValueError as e:
    sizes = {k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")}
    raise UserError(f"mesh {sizes} on {n_dev} devices: {e}") from None
  try:
    axis_map = parallel.check_axis_map(cfg.mesh.get("axis_map", parallel.DEFAULT_AXIS_MAP))
  except ValueError as e:
    raise UserError(str(e)) from None
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.batch_size % (shards * cfg.micro_batches):
    raise UserError(f"batch_size={cfg.batch_size} must be divisible by mesh data*fsdp="
                    f"{shards} times micro_batches={cfg.micro_batches}.")

  tokenizer, ids, files, root = prepare_data(cfg, workdir)
  fingerprint = tokenizer_lib.fingerprint(tokenizer)
  vocab = len(tokenizer)

  teacher_cfg = teacher = None
  provenance = {}
  if cfg.use_teacher:
    teacher_cfg, teacher, provenance["teacher"] = load_model(
        cfg.teacher, cfg, workdir, "" if cfg.teacher.hf_path else cfg.inputs.teacher, ids,
        fingerprint, "teacher")
  model_cfg, params, provenance["init"] = load_model(
      cfg.model, cfg, workdir, cfg.inputs.init, ids, fingerprint, "model")
  if cfg.taf and "post" not in params:
    if teacher is None:
      raise UserError(f"Stage '{cfg.name}' builds a TAF student but has no teacher.")
    params = taf.make_taf_student(params, teacher, jax.random.key(cfg.seed + 3))
    model_cfg = dataclasses.replace(model_cfg, post_connector_in=teacher_cfg.text.hidden_size,
                                    adapter_depth=teacher_cfg.adapter_depth,
                                    adapter_hidden=teacher_cfg.adapter_hidden)
  params = _cast(params, cfg.param_dtype)

  source = sources.LlavaSource([f for f, _ in files], image_root=root,
                               weights=[w for _, w in files], seed=cfg.seed,
                               strict=cfg.data.strict,
                               allow_outside_root=cfg.data.allow_outside_root)
  per_process = cfg.batch_size // jax.process_count()
  pipe_cfg = pipeline_lib.PipelineConfig(
      batch_size=per_process, max_length=cfg.max_length,
      num_visual_tokens=mllm.num_visual_tokens(model_cfg), template=cfg.data.template,
      image_size=model_cfg.vision.image_size, image_mode=cfg.data.image_mode,
      seed=cfg.seed, shuffle=cfg.data.shuffle, worker_count=cfg.data.worker_count,
      strict=cfg.data.strict)
  make_data = lambda: pipeline_lib.make_pipeline(source, tokenizer, pipe_cfg, pad_id=ids.pad)
  data = make_data()  # Raises NoUsableData for files without a sample (before any model).

  student_layers, groups, layers_info = (), (), None
  if teacher is not None:
    check_pair(model_cfg, teacher_cfg, vocab)
    if cfg.loss.attn > 0:
      student_layers, groups, layers_info = _stage_layers(
          cfg, stage_dir, model_cfg, params, teacher_cfg, teacher, make_data)
    # The teacher shares the student's vision tower (and, with TAF, its adapter).
    teacher = {k: v for k, v in teacher.items()
               if k != "vision" and not (cfg.taf and k == "adapter")}
    teacher = _cast(teacher, cfg.compute_dtype)  # Frozen: no f32 master copy needed.
  elif model_cfg.text.vocab_size < vocab:
    raise UserError(f"The model's vocab ({model_cfg.text.vocab_size}) is smaller than the "
                    f"tokenizer's ({vocab}).")

  obj = make_objective(cfg, student_layers, groups, with_teacher=teacher is not None)
  t = make_training(cfg, params, _total_steps(cfg, len(source)))
  train_step = step_lib.make_train_step(
      make_loss_fn(model_cfg, teacher_cfg, obj, t.lora_spec), t.tx, t.schedule,
      cfg.micro_batches)
  # Shardings: params by path rules, optimizer moments like their params (step.py).
  step_fn, sh = step_lib.jit_train_step(train_step, mesh, t.state, t.frozen, teacher,
                                        axis_map)
  state = parallel.shard_tree(t.state, sh.state)
  frozen = parallel.shard_tree(t.frozen, sh.frozen)
  if teacher is not None:
    teacher = parallel.shard_tree(teacher, sh.teacher)

  provenance["tokenizer"] = fingerprint
  return Setup(cfg=cfg, stage_dir=stage_dir, mesh=mesh, model_cfg=model_cfg,
               teacher_cfg=teacher_cfg, objective=obj, lora_spec=t.lora_spec,
               state=state, frozen=frozen, teacher=teacher, step_fn=step_fn,
               total_steps=t.total_steps, tokenizer=tokenizer, ids=ids, data=data,
               provenance=provenance, layers=layers_info)


def _stage_layers(cfg, stage_dir, student_cfg, student, teacher_cfg, teacher, make_data):
  """(student layers, teacher groups, manifest record) of the attention loss.

  An adaptive matching is calibrated once, on the stage's first training batch, and
  recorded in the manifest; a resumed run reuses the recorded one, so the compiled step
  (and every later loss) is the same as in an uninterrupted run.
  """
  lc = cfg.layers
  previous = (ckpt_lib.read_manifest(stage_dir) or {}).get("layers")
  if (lc.strategy == "adaptive" and previous and previous.get("strategy") == "adaptive"
      and os.path.isdir(os.path.join(stage_dir, "checkpoints"))):
    return previous["student_layers"], previous["teacher_groups"], previous

  def calibrate(s_layers, t_layers):
    batch = next(make_data())  # A fresh iterator: training still starts at batch 0.
    try:
      return attention_lib.visual_attention(student_cfg, student, teacher_cfg, teacher, batch,
                                            s_layers, t_layers)
    except ValueError as e:
      raise UserError(f"layers.strategy=adaptive: {e}; set layers.student_layers and "
                      "layers.teacher_groups instead.") from None

  student_layers, groups = match_layers(cfg, student_cfg, teacher_cfg, calibrate)
  if lc.strategy == "adaptive" and jax.process_count() > 1:
    # Hosts calibrated on their own rows: all take process 0's matching.
    picks = ckpt_lib.gather_per_process([int(g[0]) for g in groups])[0]
    groups = [[int(l)] for l in picks]
  info = {"strategy": lc.strategy, "student_layers": [int(l) for l in student_layers],
          "teacher_groups": [[int(l) for l in g] for g in groups]}
  if lc.strategy == "adaptive":
    info["calibration"] = "first training batch (image rows, at most 8)"
  return info["student_layers"], info["teacher_groups"], info
