"""Running one stage: build models and data from the config, train, checkpoint, export.

  run_stage(cfg, workdir)   # cfg: a locked ConfigDict of configs/<stage>.py

Layout of `<workdir>/<cfg.name>/`:
  checkpoints/<step>/   orbax: trainable params + LoRA + optimizer state + step + rng,
                        the data iterator state and the config (frozen weights are not
                        copied: manifest.json says where they come from)
  metrics.jsonl, tb/    one JSON object per logged step; TensorBoard events
  final/, model.json    the trained model (LoRA merged), read by downstream stages
  hf/                   the same model as an HF LLaVA dir (+ tokenizer)
  summary.json, DONE    written last

layers.strategy=adaptive calibrates the attention matching on the first training batch
(both models, every band layer; `cdx.distill.layers.adaptive_match`) and records it in
manifest.json ("layers"); a resume reuses it.

Resume: rerunning the same command continues from the newest checkpoint; the losses of
every later step are bitwise identical to an uninterrupted run (same data order, same rng,
same compiled step).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cdx import checkpoint as ckpt_lib
from cdx import hf
from cdx import parallel
from cdx.analysis import attention as attention_lib
from cdx.data import pipeline as pipeline_lib
from cdx.data import sources
from cdx.data import tokenizer as tokenizer_lib
from cdx.distill import layers as layers_lib
from cdx.distill import taf
from cdx.models import mllm
from cdx.train import guard
from cdx.train import lora as lora_lib
from cdx.train import metrics as metrics_lib
from cdx.train import optim
from cdx.train import params as params_lib
from cdx.train import step as step_lib


class UserError(RuntimeError):
  """A problem the user can fix (bad path, mesh, mismatch); printed without a traceback."""


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


# ------------------------------------------------------------------------ data set-up

def prepare_data(cfg, workdir: str) -> tuple[Any, tokenizer_lib.TokenIds, list[str], str]:
  """(tokenizer, ids, training files, image root); tiny presets generate the world."""
  data = cfg.data
  root, tok_path = data.image_root, data.tokenizer
  if data.synthetic:
    from cdx.data.synthetic import export  # Only tiny runs need the renderer.
    root = os.path.join(workdir, "data")
    if jax.process_index() == 0:
      tok_path = export.ensure(root, data.synthetic_train, cfg.seed, vocab_size=1024)
    ckpt_lib._sync("cdx_synthetic_data")  # Other hosts read what process 0 wrote.
    tok_path = os.path.join(root, "tokenizer")
  missing = [f"data.{k}" for k, v in (("train", data.train), ("tokenizer", tok_path)) if not v]
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
      raise UserError(f"data.train: {path} does not exist.")
    files.append(path)
    weights.append(float(weight or 1.0))
  if not os.path.isdir(tok_path):
    raise UserError(f"data.tokenizer: {tok_path} is not a directory with an HF tokenizer.")
  tokenizer, ids = tokenizer_lib.load_tokenizer(tok_path)
  return tokenizer, ids, list(zip(files, weights)), root


# ------------------------------------------------------------------------ model set-up

def _stage_output(workdir: str, name: str) -> tuple[mllm.MllmConfig, dict, dict]:
  """(config, params, model.json) of a finished upstream stage."""
  params, info = ckpt_lib.load_model(os.path.join(workdir, name))
  return mllm.config_from_dict(info["config"]), params, info


def _with_numerics(model_cfg: mllm.MllmConfig, cfg) -> mllm.MllmConfig:
  return dataclasses.replace(model_cfg, **_numerics(cfg))


def _cast(params: dict, dtype: str) -> dict:
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def _shared_vision(model_cfg: mllm.MllmConfig, seed: int) -> dict:
  """The tiny presets' vision tower: random but identical for teacher and student."""
  full = mllm.init_params(model_cfg, jax.random.key(seed + 7))
  return full["vision"]


def load_model(spec, cfg, workdir: str, init_stage: str, ids, fingerprint: str,
               role: str) -> tuple[mllm.MllmConfig, dict, dict]:
  """(config, params, provenance) of a model from an upstream stage, HF dirs or random;
  params in the layout of the config's `scan_layers`."""
  model_cfg, params, provenance = _load_model(spec, cfg, workdir, init_stage, ids,
                                              fingerprint, role)
  return model_cfg, mllm.to_layout(model_cfg, params), provenance


def _load_model(spec, cfg, workdir, init_stage, ids, fingerprint, role):
  if init_stage:
    model_cfg, params, info = _stage_output(workdir, init_stage)
    if info.get("tokenizer") not in (None, fingerprint):
      raise UserError(
          f"The {role} from stage '{init_stage}' was trained with another tokenizer "
          f"({info['tokenizer']}) than data.tokenizer ({fingerprint}); teacher, student "
          "and data must share one tokenizer.")
    return _with_numerics(model_cfg, cfg), params, {"stage": init_stage}
  if spec.hf_path:
    if not os.path.isdir(spec.hf_path):
      raise UserError(f"{role}.hf_path: {spec.hf_path} is not a directory.")
    with open(os.path.join(spec.hf_path, "config.json")) as f:
      arch = json.load(f).get("architectures", [""])[0]
    if arch.startswith("Llava"):
      model_cfg, params = hf.load_llava(spec.hf_path, dtype=cfg.param_dtype)
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
  params["vision"] = _shared_vision(model_cfg, cfg.seed)
  return model_cfg, params, {"random": cfg.seed}


def check_pair(student: mllm.MllmConfig, teacher: mllm.MllmConfig, vocab: int) -> None:
  """Teacher and student must see the same images and ids."""
  if student.vision != teacher.vision or student.feature_layer != teacher.feature_layer:
    raise UserError("Teacher and student vision towers differ; CompoDistill shares one "
                    "frozen vision tower (SPEC §1).")
  if student.image_token_id != teacher.image_token_id:
    raise UserError(f"image_token_id differs: student {student.image_token_id}, teacher "
                    f"{teacher.image_token_id}; they must share one tokenizer.")
  for who, c in (("student", student), ("teacher", teacher)):
    if c.text.vocab_size < vocab:
      raise UserError(f"The {who}'s vocab ({c.text.vocab_size}) is smaller than the "
                      f"tokenizer's ({vocab}).")


# ---------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Setup:
  """Everything a stage run holds (host side)."""
  cfg: Any
  stage_dir: str
  mesh: Any
  model_cfg: mllm.MllmConfig
  teacher_cfg: mllm.MllmConfig | None
  objective: step_lib.Objective
  lora_spec: step_lib.LoraSpec | None
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


def _layers(cfg, student: mllm.MllmConfig, teacher: mllm.MllmConfig, calibrate=None
            ) -> tuple[list[int], list[list[int]]]:
  """(student layers, teacher groups); `calibrate()` -> (s_maps, t_maps) for adaptive."""
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


def build(cfg, workdir: str) -> Setup:
  """Resolves the config into models, data, state and the compiled step."""
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
                               strict=cfg.data.strict)
  per_process = cfg.batch_size // jax.process_count()
  pipe_cfg = pipeline_lib.PipelineConfig(
      batch_size=per_process, max_length=cfg.max_length,
      num_visual_tokens=mllm.num_visual_tokens(model_cfg), template=cfg.data.template,
      image_size=model_cfg.vision.image_size, image_mode=cfg.data.image_mode,
      seed=cfg.seed, shuffle=cfg.data.shuffle, worker_count=cfg.data.worker_count,
      strict=cfg.data.strict)
  make_data = lambda: pipeline_lib.make_pipeline(source, tokenizer, pipe_cfg, pad_id=ids.pad)

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

  objective = step_lib.Objective(
      lm=cfg.loss.lm, kd=cfg.loss.kd if teacher is not None else 0.0,
      attn=cfg.loss.attn if teacher is not None else 0.0, kd_kind=cfg.loss.kd_kind,
      kd_temperature=cfg.loss.kd_temperature, kd_beta=cfg.loss.kd_beta,
      kd_mask=cfg.loss.kd_mask, attn_variant=cfg.loss.attn_variant,
      chunk_size=cfg.loss.chunk_size, student_layers=tuple(student_layers),
      teacher_groups=tuple(tuple(g) for g in groups), taf=cfg.taf)

  # Trainable set: base params by pattern (+ LoRA factors, always trainable).
  rules = tuple(cfg.trainable) + (("llm/.*",) if cfg.lora.full_finetune else ())
  try:
    mask = params_lib.select(params, rules, strict=True)
  except ValueError as e:
    raise UserError(f"trainable: {e}") from None
  trainable, frozen = params_lib.partition(params, mask)
  lora_spec, lora = None, {}
  if cfg.lora.enabled and not cfg.lora.full_finetune:
    lora_spec = step_lib.LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    lora = lora_lib.init_lora(params, tuple(cfg.lora.targets), cfg.lora.rank,
                              cfg.lora.alpha, jax.random.key(cfg.seed + 4))

  total = _total_steps(cfg, len(source))
  tx = optim.make_optimizer(cfg.optim, total, (trainable, lora))
  schedule = optim.learning_rate_schedule(cfg.optim, total)
  state = step_lib.init_state(trainable, lora, tx, jax.random.key(cfg.seed))

  train_step = step_lib.make_train_step(model_cfg, teacher_cfg, objective, tx, schedule,
                                        lora_spec, cfg.micro_batches)
  # Shardings: params by path rules, optimizer moments like their params (step.py).
  step_fn, sh = step_lib.jit_train_step(train_step, mesh, state, frozen, teacher,
                                        axis_map)
  state = parallel.shard_tree(state, sh.state)
  frozen = parallel.shard_tree(frozen, sh.frozen)
  if teacher is not None:
    teacher = parallel.shard_tree(teacher, sh.teacher)

  provenance["tokenizer"] = fingerprint
  return Setup(cfg=cfg, stage_dir=stage_dir, mesh=mesh, model_cfg=model_cfg,
               teacher_cfg=teacher_cfg, objective=objective, lora_spec=lora_spec,
               state=state, frozen=frozen, teacher=teacher, step_fn=step_fn,
               total_steps=total, tokenizer=tokenizer, ids=ids, data=make_data(),
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

  student_layers, groups = _layers(cfg, student_cfg, teacher_cfg, calibrate)
  if lc.strategy == "adaptive" and jax.process_count() > 1:
    # Hosts calibrated on their own rows: all take process 0's matching.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    picks = multihost_utils.broadcast_one_to_all(np.asarray([g[0] for g in groups]))
    groups = [[int(l)] for l in np.asarray(picks)]
  info = {"strategy": lc.strategy, "student_layers": [int(l) for l in student_layers],
          "teacher_groups": [[int(l) for l in g] for g in groups]}
  if lc.strategy == "adaptive":
    info["calibration"] = "first training batch (image rows, at most 8)"
  return info["student_layers"], info["teacher_groups"], info


def final_params(s: Setup) -> dict:
  """The trained student as one tree: trainable + frozen, LoRA merged."""
  params = params_lib.merge(s.state["params"], s.frozen)
  if s.lora_spec is not None:
    params = lora_lib.merge_lora(params, s.state["lora"], s.lora_spec.alpha, s.lora_spec.rank)
  return params


def _check_layout(cfg, stage_dir: str) -> None:
  """Checkpoints hold the params in one layout (`scan_layers`); a resume must match it."""
  previous = (ckpt_lib.read_manifest(stage_dir) or {}).get("config", {})
  was, now = previous.get("scan_layers", False), cfg.get("scan_layers", False)
  if previous and was != now and os.path.isdir(os.path.join(stage_dir, "checkpoints")):
    raise UserError(f"[{cfg.name}] {stage_dir}/checkpoints were written with scan_layers="
                    f"{was}; resume with --config.scan_layers={was}, or use a new workdir.")


def run_stage(cfg, workdir: str) -> dict:
  """Trains one stage to completion (resuming if it has checkpoints); returns the summary."""
  parallel.initialize()
  stage_dir = os.path.join(workdir, cfg.name)
  if ckpt_lib.is_done(stage_dir):
    print(f"[{cfg.name}] already finished (DONE): skipped.")
    path = os.path.join(stage_dir, metrics_lib.SUMMARY_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f)
    return ckpt_lib.read_done(stage_dir) or {}
  os.makedirs(stage_dir, exist_ok=True)
  lock = guard.lock_stage(stage_dir)  # [guard] One run per stage dir (<stage>/LOCK).
  t0 = time.time()
  s = build(cfg, workdir)
  _check_layout(cfg, stage_dir)
  manifest = {"stage": cfg.name, "inputs": s.provenance, "config": cfg.to_dict()}
  if s.layers is not None:
    manifest["layers"] = s.layers
  ckpt_lib.write_manifest(stage_dir, manifest)
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))

  checkpointer = ckpt_lib.StageCheckpointer(
      os.path.join(stage_dir, "checkpoints"), keep=cfg.checkpoint.keep,
      async_save=cfg.checkpoint.async_save,
      save_interval_steps=cfg.checkpoint.every_steps)
  start = checkpointer.latest_step() or 0
  if start > s.total_steps:
    checkpointer.close()
    raise UserError(f"[{cfg.name}] {stage_dir}/checkpoints holds step {start}, past "
                    f"total_steps={s.total_steps}: raise total_steps, or use a new workdir "
                    "to train this stage again.")
  if start:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            s.state)
    # [guard] The newest step that restores intact; damaged newer ones are moved aside.
    start, s.state, data_state, _ = checkpointer.restore_latest_intact(abstract)
    if data_state is not None:
      s.data.set_state(data_state)
    print(f"[{cfg.name}] resumed from step {start} ({stage_dir}/checkpoints/{start}).")
  else:  # [guard] Never overwrite an earlier run's logs/outputs.
    guard.check_fresh_start(stage_dir, cfg.checkpoint.every_steps, cfg.checkpoint.restart)

  writer = metrics_lib.MetricsWriter(stage_dir, total_steps=s.total_steps, resume_step=start,
                                     console=cfg.log.progress)
  last = _last_record(stage_dir) if start else {}  # What a resume with nothing left reports.
  count_tokens = jax.jit(lambda mask: jnp.sum(mask, dtype=jnp.int32))
  tokens = 0  # Global (all hosts) non-pad tokens since the last log, on device.
  stop = guard.StopOnSignal(check_every=cfg.log.every_steps).install()  # [guard] signals
  try:
    for step in range(start, s.total_steps):
      batch = parallel.global_batch_array(next(s.data), s.mesh, cfg.batch_size)
      tokens = tokens + count_tokens(batch["attention_mask"])
      s.state, m = s.step_fn(s.state, s.frozen, s.teacher, batch)
      done = step + 1
      if done % cfg.log.every_steps == 0 or done == s.total_steps:
        m = jax.device_get(m)
        record = {k: v for k, v in m.items() if k != "attn_cos"}
        for i, c in enumerate(np.atleast_1d(m.get("attn_cos", []))):
          record[f"attn_cos_{i}"] = float(c)
        last = writer.log(done, record, tokens=int(jax.device_get(tokens)))
        tokens = 0
        # The state's own counter: right across log intervals and resumes.
        run = int(m["nonfinite_run"])
        if run >= cfg.optim.max_nonfinite or (m["skipped"] and cfg.halt_on_nonfinite):
          raise UserError(f"[{cfg.name}] {run} non-finite step(s) in a row at step "
                          f"{done}: halting (lower optim.lr or check the data).")
      stop_now = stop.agreed(done)  # [guard] SIGTERM/SIGINT: checkpoint now, then exit.
      checkpointer.save(done, s.state, data_state=s.data.get_state(),
                        meta={"stage": cfg.name, "step": done},
                        force=done == s.total_steps or stop_now)
      if stop_now:  # [guard]
        checkpointer.wait()  # [guard]
        raise stop.interrupted(done, checkpointer.directory)  # [guard]
    checkpointer.wait()
  finally:
    stop.restore()  # [guard]
    checkpointer.close()

  outputs = export_stage(s)
  if s.layers is not None:
    outputs["layers"] = os.path.join(stage_dir, ckpt_lib.MANIFEST_FILE)
  summary = writer.summary(outputs=outputs, stage=cfg.name, steps=s.total_steps,
                           seconds=round(time.time() - t0, 1),
                           data=data_report(s.data.stats))
  if writer.last is None and last:  # Resumed at the end: report the logged final step.
    summary["final_step"] = last.get("step")
    summary["final"] = {k: v for k, v in last.items() if k not in metrics_lib._ADDED}
    if jax.process_index() == 0:
      ckpt_lib.write_json_atomic(os.path.join(stage_dir, metrics_lib.SUMMARY_FILE), summary)
  writer.close()
  ckpt_lib.mark_done(stage_dir, {"steps": s.total_steps, "final_loss": last.get("loss")})
  if lock is not None:  # [guard]
    lock.release()  # [guard]
  return summary


def _last_record(stage_dir: str) -> dict:
  """The last whole line of metrics.jsonl ({} when there is none)."""
  path = os.path.join(stage_dir, metrics_lib.METRICS_FILE)
  last = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          last = json.loads(line) if line.endswith("\n") else last
        except json.JSONDecodeError:
          pass
  return last


def data_report(stats: dict) -> dict:
  """Training-data counts of all hosts, keyed like `python -m cdx.data.check --json`.

  They count the samples this run drew (from the start, across resumes): over exactly one
  epoch they equal the checker's counts of the training files.
  """
  per_host = ckpt_lib._gather_per_process(stats)  # pylint: disable=protected-access
  reasons, warnings = {}, {}
  for st in per_host:
    for k, v in st["skipped"].items():
      reasons[k] = reasons.get(k, 0) + v
    for k, v in st["warnings"].items():
      warnings[k] = warnings.get(k, 0) + v
  return {"total": sum(st["seen"] for st in per_host), "ok": sum(st["ok"] for st in per_host),
          "bad": sum(reasons.values()), "reasons": dict(sorted(reasons.items())),
          "warnings": dict(sorted(warnings.items()))}


def export_stage(s: Setup) -> dict:
  """Writes final/ + model.json (for the next stage) and hf/ (an HF LLaVA dir)."""
  model_cfg, params = mllm.unscanned(s.model_cfg, final_params(s))  # Files: unstacked.
  final = ckpt_lib.save_model(s.stage_dir, params, {
      "config": mllm.config_to_dict(model_cfg),
      "tokenizer": s.provenance.get("tokenizer"), "template": s.cfg.data.template})
  outputs = {"final": final, "checkpoints": os.path.join(s.stage_dir, "checkpoints"),
             "metrics": os.path.join(s.stage_dir, "metrics.jsonl")}
  if s.cfg.export_hf and jax.process_index() == 0:
    hf_dir = os.path.join(s.stage_dir, "hf")
    hf.save_llava(model_cfg, jax.device_get(params), hf_dir)
    s.tokenizer.save_pretrained(hf_dir)
    outputs["hf"] = hf_dir
  return outputs


def dry_run(todo: list, workdir: str) -> int:
  """Prints the plan and, per stage, abstract model shapes; reads no weights or data."""
  for cfg in todo:
    print(f"stage {cfg.name}: {cfg.config_file} -> {os.path.join(workdir, cfg.name)}")
    print(f"  inputs: init={cfg.inputs.init or '-'} teacher={cfg.inputs.teacher or '-'}")
    for line in describe(cfg):
      print("  " + line)
  return 0


def describe(cfg) -> list[str]:
  """Abstract (eval_shape) parameter counts of the stage's models and what is missing."""
  ids = tokenizer_lib.TokenIds(image=151646, pad=151647, eos=151643) if cfg.preset != "tiny" \
      else tokenizer_lib.TokenIds(image=3, pad=2, eos=1)
  lines = []
  specs = [("model", cfg.model)] + ([("teacher", cfg.teacher)] if cfg.use_teacher else [])
  for role, spec in specs:
    mc = spec_config(spec, cfg, ids)
    try:
      n = _abstract_counts(mc)
    except ValueError as e:  # e.g. an unknown remat policy: a config problem.
      raise UserError(f"{cfg.config_file}: the {role} does not build: {e}") from None
    lines.append(f"{role}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in n.items()) +
                 f" (Nv={mllm.num_visual_tokens(mc)})")
  missing = [k for k in ("data.train", "data.tokenizer") if not cfg.data.synthetic
             and not cfg.data[k.split(".")[1]]]
  if cfg.preset != "tiny" and not cfg.inputs.init and not cfg.model.hf_path:
    missing.append("model.hf_path")
  if missing:
    lines.append("missing for a real run: " + ", ".join(f"--config.{m}" for m in missing))
  return lines


@functools.lru_cache(maxsize=16)
def _abstract_counts(mc: mllm.MllmConfig) -> dict:
  """{part: parameter count} without allocating (stages of a plan share models)."""
  shapes = jax.eval_shape(lambda: mllm.init_params(mc, jax.random.key(0)))
  return {k: params_lib.count(v) for k, v in shapes.items()}
