"""Running one stage: train what cdx/train/setup.py builds, checkpoint, export.

  run_stage(cfg, workdir)   # cfg: a locked ConfigDict of configs/<stage>.py

Layout of `<workdir>/<cfg.name>/`:
  checkpoints/<step>/   orbax: trainable params + LoRA + optimizer state + step + rng,
                        the data iterator state and the config (frozen weights are not
                        copied: manifest.json says where they come from)
  metrics.jsonl, tb/    one JSON object per logged step; TensorBoard events
  final/, model.json    the trained model (LoRA merged), read by downstream stages
  hf/                   the same model as an HF LLaVA dir (+ tokenizer)
  summary.json, DONE    written last

The attention matching of layers.strategy=adaptive is calibrated by the build
(cdx/train/setup.py) and recorded in manifest.json ("layers"); a resume reuses it.

Resume: rerunning the same command continues from the newest checkpoint; the losses of
every later step are bitwise identical to an uninterrupted run (same data order, same rng,
same compiled step).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cdx import checkpoint as ckpt_lib
from cdx import hf
from cdx import parallel
from cdx import paths as paths_lib
from cdx.config import UserError
from cdx.data import pipeline as pipeline_lib
from cdx.data import tokenizer as tokenizer_lib
from cdx.models import mllm
from cdx.train import guard
from cdx.train import lora as lora_lib
from cdx.train import metrics as metrics_lib
from cdx.train import setup as setup_lib


def final_params(s: setup_lib.Setup) -> dict:
  """The trained student as one tree: trainable + frozen, LoRA merged."""
  params = paths_lib.merge(s.state["params"], s.frozen)
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
  """Trains one stage to completion (resuming if it has checkpoints); returns the summary.

  Training data without a usable sample (`pipeline.NoUsableData`: every sample skipped
  for a whole epoch) stops the stage with a one-line UserError naming the files and the
  top skip reasons. On several hosts each host stops on its own slice; the slices are
  interleaved draws of one shuffled order, so unusable data stops all of them within the
  same epoch (a host whose slice alone were unusable would leave the others waiting in
  the next collective until the job is torn down)."""
  try:
    return _run_stage(cfg, workdir)
  except pipeline_lib.NoUsableData as e:
    raise UserError(f"[{cfg.name}] {e}") from None


def _run_stage(cfg, workdir: str) -> dict:
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
  s = setup_lib.build(cfg, workdir)
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
                                     console=cfg.log.progress, name=cfg.name)
  last = _last_record(stage_dir) if start else {}  # What a resume with nothing left reports.
  count_tokens = jax.jit(lambda mask: jnp.sum(mask, dtype=jnp.int32))
  tokens = 0  # Global (all hosts) non-pad tokens since the last log, on device.
  nonfinite = 0  # Steps skipped for a non-finite loss/gradient since the last log, on device.
  stop = guard.StopOnSignal(check_every=cfg.log.every_steps).install()  # [guard] signals
  try:
    for step in range(start, s.total_steps):
      batch = parallel.global_batch_array(next(s.data), s.mesh, cfg.batch_size)
      tokens = tokens + count_tokens(batch["attention_mask"])
      s.state, m = s.step_fn(s.state, s.frozen, s.teacher, batch)
      nonfinite = nonfinite + m["nonfinite"]
      done = step + 1
      if done % cfg.log.every_steps == 0 or done == s.total_steps:
        m = jax.device_get(m)
        record = {k: v for k, v in m.items() if k != "attn_cos"}
        record["nonfinite"] = int(jax.device_get(nonfinite))  # Since the previous line.
        for i, c in enumerate(np.atleast_1d(m.get("attn_cos", []))):
          record[f"attn_cos_{i}"] = float(c)
        last = writer.log(done, record, tokens=int(jax.device_get(tokens)))
        tokens = nonfinite = 0
        # The state's own counter: right across log intervals and resumes.
        run = int(m["nonfinite_run"])
        if run >= cfg.optim.max_nonfinite or (record["nonfinite"] and cfg.halt_on_nonfinite):
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

  report = data_report(s.data.stats)
  outputs = export_stage(s)
  if s.layers is not None:
    outputs["layers"] = os.path.join(stage_dir, ckpt_lib.MANIFEST_FILE)
  summary = writer.summary(outputs=outputs, stage=cfg.name, steps=s.total_steps,
                           seconds=round(time.time() - t0, 1),
                           data=report)
  if jax.process_index() == 0:  # Skipped samples, and a warning above 5 %.
    print("\n".join(pipeline_lib.skip_lines(report, cfg.name)), file=sys.stderr)
  if writer.last is None and last:  # Resumed at the end: report the logged final step.
    summary["final_step"] = last.get("step")
    summary["final"] = {k: v for k, v in last.items() if k not in metrics_lib.ADDED_FIELDS}
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
  return pipeline_lib.merge_stats(ckpt_lib.gather_per_process(stats))


def export_stage(s: setup_lib.Setup) -> dict:
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
    mc = setup_lib.spec_config(spec, cfg, ids)
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
  return {k: paths_lib.count(v) for k, v in shapes.items()}
