"""The paper's experiment in miniature: the teacher, the SFT student, KD, +TAF, +VAT and
CompoDistill on the synthetic world, several seeds, with a gate, baselines and statistics.

  python launch/miniature.py [--workdir=workdir_miniature] [--seeds=0,1,2] [--rows=...]
                             [--cr_limit=250] [--gen_limit=50] [--quick]

Rows (configs/registry.py builds each final stage folder with its upstream stages):
  teacher       pretrain -> finetune                              LM only, the larger model
  sft           pretrain_student -> finetune_student              LM only ("SFT" row)
  kd            pretrain_student -> dpt_kd -> dft_kd -> sft_kd    LM + logit KD, own adapter
                                                                  (LLaVA-KD style)
  taf           pretrain_student -> dpt -> dft_novat -> sft_novat  + TAF, no attention term
  vat           pretrain_student -> dpt_kd -> dft_vat -> sft_vat  + attention term, no TAF
  compodistill  pretrain_student -> dpt -> dft -> sft             TAF + VAT (the method)
Every student row gets the same instruction steps (STUDENT_STEPS: DFT then SFT, or their
sum in the SFT row's one stage) and the same stage 0; the distilled rows add DPT's caption
steps (its KD needs a teacher, so the SFT row has none). Longer than the tiny preset's
defaults, which only check the pipeline: a student's stage 0 (captions) takes
STAGE0_STEPS, the teacher's TEACHER_STAGE0_STEPS at TEACHER_STAGE0_LR, its instruction
stage TEACHER_STEPS, a distilled row's DPT DPT_STEPS, the shared tower TOWER_STEPS, the
world WORLD_IMAGES training images; the students' LLM is STUDENT_TEXT wide
(docs/RESULTS.md says why each was changed; --quick keeps the presets').

Layout: DIR/teacher/ holds the world (data/), the pretrained vision tower (vision/) and the
teacher chain, trained once with the config's seed; DIR/seed<S>/ holds one seed's student
stages (`--config.seed=S`: init, data order, dropout-free noise; the world's seed is
data.world_seed, unchanged) with links to the shared folders. Everything is resumable:
finished stages (DONE) and scores (miniature_eval*.json, the gate's too) are reused;
DIR/recipe.json keeps the steps and widths, and a run with others refuses the folder.

The GATE runs before any student row but the first seed's SFT student: the teacher's seen
VQA >= 0.85, its VQA on images >= 0.4 above its VQA on grey images (the blind row), and its
CR >= 0.10 above the step-matched SFT student's. A failed gate stops the run (exit 3) and
says which check failed; `--quick` reports it without stopping, and `--ignore_gate` trains
the rows anyway, marking the gate as ignored in the table and miniature.json (for a
teacher that fails a check but still leads the students, e.g. on VQA alone).

Scoring (docs/RESULTS.md, "Statistics"): CR by caption likelihood (right iff the true
caption is likelier than the false one given the image, `cdx.eval.protocols` "caption") on
`--cr_limit` items per subset and split is the headline; the paper's two-choice question
scored by likelihood (the likelier of " A" / " B", both orders) is beside it, and
generation on `--gen_limit` items checks it (unparsed rate, per-order accuracy) and scores
VQA. Rows are mean ± std over seeds; paired bootstrap intervals over items (scores averaged
over seeds) between rows; the gap closure (compodistill - kd) / (teacher - kd). The
text-only row is the best text heuristic (`cdx.eval.baselines`); the blind row is the
teacher on grey images.

Ablations are overrides of every student stage, in their own seed folders and outputs
(the world, the teacher and the gate's SFT student of the main run are reused; the
student rows are retrained with the overrides), e.g.
  --student_override=loss.attn_variant=mse --tag=mse          (cosine | mse | kl)
  --student_override=layers.strategy=simple --tag=simple      (group | simple | adaptive)
  --student_override=layers.student_layers=0,1 \
      --student_override=layers.teacher_groups=0,1 --tag=early  (the default is the middle)

Writes DIR/miniature[-TAG].json, DIR/miniature[-TAG].md and DIR/plots[-TAG]/*.png.
`--quick` runs every row for 2 steps on 64 samples with a random tower and 20 CR items per
subset (3 scored): it checks the pipeline and says nothing about the method.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import registry  # noqa: E402
from launch import run  # noqa: E402
from launch.miniature_report import cr_all, markdown, plots, summarize  # noqa: E402

ROWS = {  # row -> the stage folder of its final model
    "teacher": "finetune",
    "sft": "finetune_student",
    "kd": "sft_kd",
    "taf": "sft_novat",
    "vat": "sft_vat",
    "compodistill": "sft",
}
STUDENTS = [r for r in ROWS if r != "teacher"]
SHARED = ("data", "vision", "pretrain", "finetune")  # linked into every seed's workdir
# Steps that the tiny preset keeps short for the main command's pipeline. With them the
# models do not read the image (docs/RESULTS.md, "Results"): the tower's 1,600 steps leave
# shape linearly readable from an object's patches 72 % of the time (6,000: 97 %), and a
# 120-step stage 0 barely connects the LLM to the image (1,000 steps do). The teacher,
# trained once for every seed, gets 3,000 caption steps (its captions kept improving up to
# there, docs/RESULTS.md 7., T2 and T3) and 5,000 instruction steps: after 3,000 it
# answered questions about its own training images 69 % of the time (colour 0.62, exist
# 0.50, relation 0.48; `train_vqa`, docs/RESULTS.md 12.): it had not learnt them yet.
TOWER_STEPS = 6000    # the shared frozen SigLIP (vision_pretrain.steps)
# Images in the world's training export (data.synthetic_train; the tiny preset's 4,000):
# the teacher's 3,000 instruction steps memorize 4,000 images (training loss 0.05 while its
# VQA stops rising), and relations need many distinct scenes (docs/RESULTS.md 7.-8.).
WORLD_IMAGES = 16000
STAGE0_STEPS = 3000   # pretrain_student, every seed; 1,000 left shapes unread (RESULTS 13.-14.)
TEACHER_STAGE0_STEPS = 3000  # the teacher's pretrain (captions)
# The wider teacher fits its captions better at a third of the tiny preset's stage-0 lr,
# the student worse (docs/RESULTS.md 7., TL1 and SL1: each model measured at both).
TEACHER_STAGE0_LR = 1e-3
TEACHER_STEPS = 5000  # the teacher's instruction stage (finetune)
# Distilled pre-training of the rows that distil (dpt, dpt_kd; the tiny preset's 40 steps).
# With TAF it learns a new post-connector from scratch; after 40 steps its caption loss is
# 0.99 (the student's own adapter: 0.50), it levels off at about 0.60 by step 150
# (docs/RESULTS.md 8., DPT). dpt_kd gets the same steps, so the distilled rows stay matched.
DPT_STEPS = 200
# The students' instruction steps per stage kind (the tiny preset's DFT 250 + SFT 100 =
# 350, kept in that ratio); the SFT row's one stage gets their sum. After 350 steps a
# 32-wide student answers the two-choice question with an empty reply (docs/RESULTS.md
# 10.); after 700 the seed-0 SFT student answers all of them (1,400 was also tried: its
# loss ends at 0.41 against 0.84, at twice the cost). Chosen on the training loss and the
# unparsed rate only, never on CR (docs/RESULTS.md 11.).
STUDENT_STEPS = {"dft": 500, "sft": 200}
# The attention term's weight in the rows that have it (the tiny preset's 300 suits its
# barely trained models). On trained ones the term's gradient at weight 1 is 0.0145 of the
# LM + KD gradient, so 300 makes it 4.3 times that and the update mostly attention; 15
# makes it ~0.2, the share the tiny preset's weight was chosen for (docs/RESULTS.md,
# "Attention weight").
ATTN_WEIGHT = 15.0
# The students' LLM width (the tiny preset's is 64; layers, heads and vocabulary stay). At
# 64 a student learns what this world teaches about as well as the 128-wide teacher:
# relations exactly as well, CR by caption likelihood within 0.03-0.06 of it. At 32 it
# binds attributes worse (swap_att 0.60 against the teacher's 0.97): a gap for
# distillation to close (docs/RESULTS.md 8., S4-S6 and SZ).
STUDENT_TEXT = {"hidden_size": 32, "head_dim": 8, "mlp_dim": 64}
GATE = {"teacher_vqa": 0.85, "image_worth": 0.40, "cr_lead": 0.10}
QUICK = ["--config.total_steps=2", "--upstream.total_steps=2",
         "--config.data.synthetic_train=64", "--upstream.data.synthetic_train=64",
         "--config.vision_pretrain.steps=0", "--upstream.vision_pretrain.steps=0",
         "--config.data.num_cr=20", "--upstream.data.num_cr=20"]


# ----------------------------------------------------------------------------- training

def spec(folder: str) -> str:
  """The `--config=` of stage folder `folder` on the tiny preset, from any directory."""
  return registry.config_spec(folder, "tiny", os.path.join(ROOT, "configs"))


def check_recipe(work: str, quick: bool) -> dict:
  """Writes the recipe (steps, widths) to work/recipe.json on the first run; refuses a
  workdir whose finished stages were trained with another one, since they would be
  reused as they are."""
  want = {"quick": quick, "tower_steps": TOWER_STEPS, "world_images": WORLD_IMAGES,
          "stage0_steps": STAGE0_STEPS,
          "teacher_stage0_steps": TEACHER_STAGE0_STEPS, "teacher_stage0_lr": TEACHER_STAGE0_LR,
          "teacher_steps": TEACHER_STEPS, "dpt_steps": DPT_STEPS, "attn_weight": ATTN_WEIGHT,
          "student_text": STUDENT_TEXT, "student_steps": STUDENT_STEPS}
  path = os.path.join(work, "recipe.json")
  if os.path.isfile(path):
    with open(path) as f:
      have = json.load(f)
    diff = sorted(k for k in {*have, *want} if have.get(k) != want.get(k))
    if diff:
      what = ", ".join(f"{k}: {have.get(k)} there, {want.get(k)} now" for k in diff)
      raise SystemExit(
          f"error: {work} was trained with another recipe ({what}); its finished stages "
          f"would be reused as they are. Use another --workdir, or delete the stages that "
          f"differ and {path}.")
  else:
    os.makedirs(work, exist_ok=True)
    with open(path, "w") as f:
      json.dump(want, f, indent=1)
  return want


def row_stages(row: str) -> list[tuple[str, str]]:
  """A student row's stage folders after its stage 0, upstream first, from the stage graph,
  each with its kind: "dpt" (captions with a teacher), "attention" (a stage with the
  attention term) or ""."""
  from cdx import config as config_lib
  out, folder = [], ROWS[row]
  while folder != "pretrain_student":
    cfg = config_lib.load(spec(folder))
    kind = ("dpt" if cfg.use_teacher and cfg.data.train != "instruct.json" else
            "attention" if cfg.loss.attn > 0 else "")
    out.insert(0, (folder, kind))
    folder = cfg.inputs.init
  return out


def student_steps(folder: str) -> int:
  """The recipe's steps of a student stage folder, by its stage kind: stage 0, a DPT, a
  DFT, an SFT, or the SFT row's finetune_student (DFT + SFT)."""
  from cdx import config as config_lib
  stage = config_lib.load(spec(folder)).stage
  return {"pretrain": STAGE0_STEPS, "dpt": DPT_STEPS, **STUDENT_STEPS,
          "finetune": sum(STUDENT_STEPS.values())}[stage]


def student_size_flags() -> list[str]:
  """Overrides that give every student stage (and the student stages built on the way)
  the recipe's width; the teacher, built first, is never rebuilt by a student's run."""
  return [f"--{scope}.model.text.{k}={v}" for k, v in STUDENT_TEXT.items()
          for scope in ("config", "upstream")]


def _link_shared(teacher_dir: str, seed_dir: str) -> None:
  os.makedirs(seed_dir, exist_ok=True)
  for name in SHARED:
    link = os.path.join(seed_dir, name)
    if not os.path.lexists(link):
      os.symlink(os.path.relpath(os.path.join(teacher_dir, name), seed_dir), link)


def train(stage: str, workdir: str, common: list[str]) -> str:
  """Builds stage folder `stage` (and its missing upstream) in workdir; returns its path."""
  config = spec(stage)
  t0 = time.time()
  if run.main([f"--config={config}", f"--workdir={workdir}", *common]) != 0:
    raise SystemExit(f"{config} in {workdir} failed (see above).")
  print(f"[miniature] {workdir}/{stage} ready ({time.time() - t0:.0f} s)", flush=True)
  return os.path.join(workdir, stage)


# ------------------------------------------------------------------------------ scoring

def cached(path: str, settings: dict, compute) -> dict:
  """compute() (a dict) with "settings" added, kept in `path`: a later call with the same
  settings reads it back, so a resumed run never scores the same model twice."""
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("settings") == settings:
      return old
  t0 = time.time()
  out = {"settings": settings, **compute()}
  out["seconds"] = round(time.time() - t0, 1)
  with open(path + ".tmp", "w") as f:
    json.dump(out, f)
  os.replace(path + ".tmp", path)
  return out


def evaluate(model_dir: str, data: str, tokenizer: str, cr_limit: int, gen_limit: int,
             batch_size: int, generate: bool = True) -> dict:
  """CR by likelihood (per-item scores) and the generative check of one model on the eval
  sets of `data`; cached in model_dir/miniature_eval.json (miniature_eval_blind.json for a
  grey-image copy, a folder ending in _blind)."""
  settings = {"data": os.path.abspath(data), "cr_limit": cr_limit, "gen_limit": gen_limit,
              "generate": generate, "headline": "caption"}
  name = "miniature_eval_blind.json" if data.rstrip("/").endswith("_blind") else (
      "miniature_eval.json")
  return cached(os.path.join(model_dir, name), settings,
                lambda: _evaluate(model_dir, data, tokenizer, cr_limit, gen_limit,
                                  batch_size, generate))


def _evaluate(model_dir, data, tokenizer, cr_limit, gen_limit, batch_size, generate):
  from cdx.eval import benchmarks, protocols
  from cdx.eval import run as eval_run
  model = eval_run.load_model(model_dir, tokenizer=tokenizer)
  logprob = eval_run.make_logprob(model, batch_size)
  tasks = protocols.tasks("synthetic_sugarcrepe")
  out = {"cr": {}, "items": {}, "cr_option": {}, "items_option": {}}
  for split, sub in eval_run.SPLITS.items():
    sets = benchmarks.read_synthetic(os.path.join(data, sub), root=data)
    items = [it for subset in sorted(sets["sugarcrepe"])
             for it in sets["sugarcrepe"][subset][:cr_limit]]
    for key, protocol in (("", "caption"), ("_option", "likelihood")):
      r = tasks[protocol].evaluate(items, logprob)
      per_item: dict[str, list] = {}  # the option protocol scores each item in two orders
      for rec in r["records"]:
        per_item.setdefault(f"{split}/{rec['subset']}/{rec['id']}", []).append(
            rec["correct"])
      out["items" + key].update({k: sum(v) / len(v) for k, v in per_item.items()})
      out["cr" + key][split] = {"overall": r["overall"], "subsets": r["subsets"],
                                "by_order": r.get("by_order"), "n": len(items)}
  if generate:
    g = eval_run.evaluate_synthetic(model, data, limit=gen_limit, batch_size=batch_size)
    out["generate"] = {}
    for split in eval_run.SPLITS:
      if split not in g:
        continue
      sc = g["details"][split]["sugarcrepe"]
      prompts = 2 * sum(min(gen_limit, len(v)) for v in benchmarks.read_synthetic(
          os.path.join(data, eval_run.SPLITS[split]), root=data)["sugarcrepe"].values())
      out["generate"][split] = {
          "cr": g[split]["sugarcrepe"]["overall"], "unparsed_rate": sc["unparsed"] / prompts,
          "by_order": sc["by_order"], "vqa": g[split]["vqa"]["accuracy"],
          "vqa_by_category": g["details"][split]["vqa"]["by_category"],
          "winoground_group": g[split].get("winoground", {}).get("group")}
  return out


def check_gate(teacher: dict, blind: dict, sft: dict) -> dict:
  """The three gate checks: values, thresholds, pass / fail and why."""
  vqa = teacher["generate"]["seen"]["vqa"]
  worth = vqa - blind["generate"]["seen"]["vqa"]
  lead = cr_all(teacher) - cr_all(sft)
  checks = {"teacher_vqa": vqa, "image_worth": worth, "cr_lead": lead}
  failed = [f"{k} = {v:.3f} < {GATE[k]}" for k, v in checks.items() if not v >= GATE[k]]
  return {"checks": checks, "thresholds": GATE, "passed": not failed, "failed": failed,
          "teacher_vqa_types": teacher["generate"]["seen"].get("vqa_by_category")}


def teacher_diagnostics(model_dir: str, data: str, n_grounding: int, n_vqa: int,
                        batch_size: int) -> dict:
  """The gate's report on the teacher beside its checks: `grounding` and `train_vqa`,
  cached in model_dir/miniature_eval_gate.json."""
  settings = {"data": os.path.abspath(data), "grounding": n_grounding, "train_vqa": n_vqa}
  out = cached(os.path.join(model_dir, "miniature_eval_gate.json"), settings, lambda: {
      "teacher_grounding": grounding(model_dir, data, n_grounding),
      "teacher_train_vqa": train_vqa(model_dir, data, n_vqa, batch_size)})
  return {k: out[k] for k in ("teacher_grounding", "teacher_train_vqa")}


def grounding(model_dir: str, data: str, n: int) -> dict:
  """The model's loss per token with real / grey / another sample's image
  (`cdx.analysis.grounding`) on the last n captions (stage 0's template) and instruction
  samples of the world, overall and per word class (colour, shape, size, relation, count
  words as targets): whether it reads the image at all, and which attributes. Also on the
  last n captions of two-object scenes ("pretrain_2obj"), where the image alone decides the
  relation word (with 3-4 objects it also depends on which object the caption names next)."""
  from cdx.analysis import grounding as grounding_lib
  from cdx.data import pipeline, templates
  from cdx.data.synthetic import text
  from cdx.eval import run as eval_run
  m = eval_run.load_model(model_dir, data_dir=data)
  load = eval_run._pixels_loader(m)  # pylint: disable=protected-access
  nv = eval_run.mllm.num_visual_tokens(m.cfg)
  words = {i: m.tokenizer.decode([i]).strip() for i in range(len(m.tokenizer))}
  classes = {c: [i for i, w in words.items() if w in names]
             for c, names in text.WORD_CLASSES.items()}
  with open(os.path.join(data, "scenes.json")) as f:
    two = {image for image, objects in json.load(f).items() if len(objects) == 2}
  out = {}
  for kind, source, template, keep in (
      ("pretrain", "pretrain.json", "pretrain", None),
      ("instruct", "instruct.json", m.template, None),
      ("pretrain_2obj", "pretrain.json", "pretrain", two)):
    with open(os.path.join(data, source)) as f:
      records = [r for r in json.load(f)
                 if r.get("image") and (keep is None or r["image"] in keep)][-n:]
    if not records:
      continue
    examples = [{**templates.encode(templates.conversation_from_llava(r["conversations"], True),
                                    m.tokenizer, template, nv),
                 "pixel_values": load(os.path.join(data, r["image"])), "has_image": True}
                for r in records]
    length = max(len(e["input_ids"]) for e in examples)
    batch = pipeline.pad_batch(examples, len(examples), length, m.ids.pad,
                               m.cfg.vision.image_size)
    out[kind] = grounding_lib.image_reliance(m.cfg, m.params, batch, token_classes=classes)
  return out


def train_vqa(model_dir: str, data: str, n: int, batch_size: int) -> dict:
  """VQA by generation on the model's own training images: the gate's balanced question
  types (`text.train_vqa_item`) about the first instruction images they apply to, n items.
  Beside the gate's seen VQA it tells a teacher that has not learnt a question type
  (low on both: more steps or a larger model) from one that does not carry it to new
  images (low on the eval set only). Returns {"accuracy", "by_category", "n"}."""
  from cdx.data.synthetic import text, world
  from cdx.eval import run as eval_run
  from cdx.eval import scoring
  with open(os.path.join(data, "scenes.json")) as f:
    scenes = json.load(f)
  with open(os.path.join(data, "world.json")) as f:
    pool = text.Pool.seen(frozenset(tuple(c) for c in json.load(f)["heldout_combos"]))
  items = []
  for image in sorted(p for p in scenes if p.startswith("images/instruct/")):
    rec = text.train_vqa_item(len(items), world.Scene.from_json(scenes[image]), image, 0, pool)
    if rec is not None:
      items.append({"id": rec["question_id"], "image": os.path.join(data, image),
                    "prompt": rec["text"], "answer": rec["answer"],
                    "category": rec["category"]})
    if len(items) == n:
      break
  model = eval_run.load_model(model_dir, data_dir=data)
  r = scoring.evaluate_vqa(items, eval_run.make_generate(model, batch_size), rule="cdx")
  return {"accuracy": r["accuracy"], "by_category": r["by_category"], "n": len(items)}


# ------------------------------------------------------------------ gradient share, layers

def attention_share(workdir: str, common: list[str], batches: int) -> dict:
  """The attention term's gradient norm vs the LM + KD terms' at the start of DFT (the
  finished DPT student, the teacher), on the first `batches` training batches."""
  import numpy as np
  from cdx import config as config_lib
  from cdx import paths as paths_lib
  from cdx.analysis import gradients
  from cdx.train import setup
  cfg = config_lib.load(spec("dft"),
                        [a for a in common if a.startswith("--config.")])
  s = setup.build(cfg, workdir)
  params = paths_lib.merge(s.state["params"], s.frozen)
  trains = set(paths_lib.leaf_paths(s.state["params"]))  # Frozen leaves are None there.
  data = [next(s.data) for _ in range(batches)]
  teacher = s.teacher
  out = gradients.term_gradient_norms(
      s.model_cfg, s.teacher_cfg, s.objective, params, teacher, data,
      trainable=lambda path: path in trains)
  out["share"] = out["attn"] / (out["attn"] + out["lm_kd"])
  out["ratio_at_weight_1"] = float(np.mean([r["ratio"] for r in out["per_batch"]])
                                   / max(cfg.loss.attn, 1e-12))
  return out


def layer_similarity(rows_dirs: dict, teacher_dir: str, data: str, n: int = 8) -> dict:
  """Per student layer, the best cosine of its visual attention with any teacher layer's,
  on `n` seen VQA images (as in the paper's analysis, cdx/analysis/attention.py)."""
  import numpy as np
  from cdx.analysis import attention
  from cdx.data import templates
  from cdx.distill import layers as layers_lib
  from cdx.eval import benchmarks
  from cdx.eval import run as eval_run
  teacher = eval_run.load_model(teacher_dir, data_dir=data)
  items = benchmarks.read_synthetic(os.path.join(data, "eval"), root=data)["vqa"][:n]
  out = {}
  for row, model_dir in rows_dirs.items():
    m = eval_run.load_model(model_dir, data_dir=data)
    nv = eval_run.mllm.num_visual_tokens(m.cfg)
    enc = [templates.encode_prompt(it["prompt"], m.tokenizer, m.template, nv)["input_ids"]
           for it in items]
    length = max(len(e) for e in enc)
    ids = np.full((len(enc), length), m.ids.pad, np.int32)
    for i, e in enumerate(enc):
      ids[i, :len(e)] = e
    load = eval_run._pixels_loader(m)  # pylint: disable=protected-access
    batch = {"input_ids": ids, "attention_mask": (ids != m.ids.pad).astype(np.int32),
             "pixel_values": np.stack([load(it["image"]) for it in items]),
             "has_image": np.ones(len(items), bool)}
    s_layers = tuple(range(m.cfg.text.num_layers))
    t_layers = tuple(range(teacher.cfg.text.num_layers))
    s_maps, t_maps = attention.visual_attention(m.cfg, m.params, teacher.cfg, teacher.params,
                                                batch, s_layers, t_layers, max_rows=n)
    sim = layers_lib.similarity_matrix(s_maps, t_maps)
    out[row] = {"best_per_student_layer": [float(x) for x in sim.max(1)],
                "matrix": sim.tolist()}
  return out


def attention_heatmaps(rows_dirs: dict, teacher_dir: str, data: str, path: str,
                       n: int = 3) -> str:
  """heatmaps.png: where the teacher and each row's model look when asked the first `n`
  seen VQA questions (the last prompt token's attention over the image patches, heads and
  the middle layers averaged, `cdx.eval.diagnostics.question_heatmaps`)."""
  from cdx.eval import benchmarks, diagnostics
  from cdx.eval import plots as plots_lib
  from cdx.eval import run as eval_run
  items = benchmarks.read_synthetic(os.path.join(data, "eval"), root=data)["vqa"][:n]
  units = diagnostics.units_of(items)
  grids = {row: diagnostics.question_heatmaps(eval_run.load_model(d, data_dir=data), units)
           for row, d in {"teacher": teacher_dir, **rows_dirs}.items()}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return plots_lib.heatmaps_figure([u["image"] for u in units], [u["prompt"] for u in units],
                                   grids, path)


# -------------------------------------------------------------------------------- main

def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="workdir_miniature")
  p.add_argument("--rows", default=",".join(ROWS))
  p.add_argument("--seeds", default=None, help="student seeds (default 0,1,2; --quick 0,1)")
  p.add_argument("--cr_limit", type=int, default=None, help="CR items per subset and split")
  p.add_argument("--gen_limit", type=int, default=None,
                 help="items per set for the generative check (VQA, CR, paired)")
  p.add_argument("--batch_size", type=int, default=32, help="eval batch size")
  p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap rounds")
  p.add_argument("--share_batches", type=int, default=4,
                 help="batches for the attention term's gradient share")
  p.add_argument("--student_override", action="append", default=[], metavar="KEY=VALUE",
                 help="config override of every student stage (an ablation, e.g. "
                      "loss.attn_variant=mse); needs --tag")
  p.add_argument("--tag", default="", help="names an ablation's seed folders and outputs")
  p.add_argument("--quick", action="store_true", help="2 steps per stage: a pipeline check")
  p.add_argument("--ignore_gate", action="store_true",
                 help="train the student rows even if the gate fails; the outputs say so")
  args = p.parse_args(argv)
  if args.student_override and not args.tag:
    p.error("--student_override needs --tag (its students go to seed<S>-<tag>/).")
  rows = [r for r in args.rows.split(",") if r]
  student_rows = [r for r in rows if r != "teacher"]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown or "teacher" not in rows or "sft" not in rows:
    p.error(f"rows must include teacher and sft and come from {list(ROWS)}; got {rows}")
  seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
  cr_limit = args.cr_limit or (3 if args.quick else 250)
  gen_limit = args.gen_limit or (2 if args.quick else 50)
  common = ["--config.log.progress=False", "--upstream.log.progress=False",
            "--config.export_hf=False", "--upstream.export_hf=False"]
  common += QUICK if args.quick else [
      f"--{scope}.{key}={value}" for scope in ("config", "upstream") for key, value in (
          ("vision_pretrain.steps", TOWER_STEPS), ("data.synthetic_train", WORLD_IMAGES))]
  recipe = lambda *flags: [] if args.quick else list(flags)  # --quick keeps the presets'
  steps = lambda n: recipe(f"--config.total_steps={n}")
  student = lambda folder: steps(student_steps(folder))  # A student stage's steps.
  attn = recipe(f"--config.loss.attn={ATTN_WEIGHT}")
  t_start = time.time()
  from cdx.eval import baselines
  work = os.path.abspath(args.workdir)
  recipe_used = check_recipe(work, args.quick)
  teacher_dir = os.path.join(work, "teacher")
  data = os.path.join(teacher_dir, "data")
  tokenizer = os.path.join(data, "tokenizer")
  score = lambda d, gen=True: evaluate(d, data, tokenizer, cr_limit, gen_limit,
                                       args.batch_size, gen)

  # The teacher chain, once; the blind copy of the eval sets; the baselines without a model.
  train("pretrain", teacher_dir, common + steps(TEACHER_STAGE0_STEPS) + recipe(
      f"--config.optim.lr={TEACHER_STAGE0_LR}"))
  teacher = score(train("finetune", teacher_dir, common + steps(TEACHER_STEPS)))
  blind_data = baselines.blind_export(data, data + "_blind")
  blind = evaluate(os.path.join(teacher_dir, "finetune"), blind_data, tokenizer, cr_limit,
                   gen_limit, args.batch_size)
  text_only = baselines.synthetic_text_baselines(data)
  seed_dir = lambda s: os.path.join(work, f"seed{s}" + (f"-{args.tag}" if args.tag else ""))
  plain_seed = lambda s: [f"--config.seed={s}", f"--upstream.seed={s}",
                          *recipe(*student_size_flags())]
  seed_args = lambda s: plain_seed(s) + [
      f"--{scope}.{o}" for o in args.student_override for scope in ("config", "upstream")]
  out_name = "miniature" + (f"-{args.tag}" if args.tag else "")

  # The gate: the teacher against the first seed's step-matched SFT student.
  main_dir = os.path.join(work, f"seed{seeds[0]}")  # An ablation's gate is the main run's.
  _link_shared(teacher_dir, main_dir)
  train("pretrain_student", main_dir, common + plain_seed(seeds[0]) + student("pretrain_student"))
  sft0 = score(train(ROWS["sft"], main_dir,
                     common + plain_seed(seeds[0]) + student(ROWS["sft"])))
  gate = check_gate(teacher, blind, sft0)
  gate.update(teacher_diagnostics(os.path.join(teacher_dir, "finetune"), data,
                                  16 if args.quick else 256, 14 if args.quick else 350,
                                  args.batch_size))
  meta = {"command": "python launch/miniature.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
          "quick": args.quick, "seeds": seeds, "rows": rows, "cr_limit": cr_limit,
          "gen_limit": gen_limit, "gate": gate, "student_overrides": args.student_override,
          "recipe": recipe_used}
  print(f"[miniature] gate: {'passed' if gate['passed'] else 'FAILED'} {gate['checks']}; "
        f"teacher loss per token with real / grey / another image: " + ", ".join(
            f"{k} {v['real']:.3f} / {v['grey']:.3f} / {v['other']:.3f}"
            for k, v in gate["teacher_grounding"].items())
        + f"; VQA on its training images {gate['teacher_train_vqa']['accuracy']:.3f}",
        flush=True)
  gate["ignored"] = not gate["passed"] and args.ignore_gate
  if not gate["passed"] and not args.quick and not args.ignore_gate:
    meta["wall_s"] = time.time() - t_start
    with open(os.path.join(work, out_name + ".json"), "w") as f:
      json.dump({"meta": meta, "teacher": teacher["cr"], "blind": blind["cr"]}, f, indent=1)
    print("[miniature] GATE FAILED, no student row was trained: " + "; ".join(gate["failed"])
          + ". Adjust the world or the teacher's steps/sizes first (docs/RESULTS.md).",
          file=sys.stderr)
    return 3
  if gate["ignored"]:
    print("[miniature] GATE FAILED, the student rows are trained anyway (--ignore_gate): "
          + "; ".join(gate["failed"]), file=sys.stderr)

  for s in seeds:  # Every student row of a seed starts from its one stage 0 (and DPT).
    _link_shared(teacher_dir, seed_dir(s))
    train("pretrain_student", seed_dir(s), common + seed_args(s) + student("pretrain_student"))
    for dpt in sorted({f for r in student_rows for f, kind in row_stages(r) if kind == "dpt"}):
      train(dpt, seed_dir(s), common + seed_args(s) + student(dpt))
  if "compodistill" in rows:  # The attention term's share of the gradient at DFT start.
    share_args = common + seed_args(seeds[0]) + attn
    meta["attention_share"] = cached(
        os.path.join(seed_dir(seeds[0]), "dpt", "attention_share.json"),
        {"args": share_args, "batches": args.share_batches},
        lambda: attention_share(seed_dir(seeds[0]), share_args, args.share_batches))
    print(f"[miniature] attention share: {meta['attention_share']['share']:.3f}", flush=True)

  evals = {"teacher": [teacher]}
  finals = {}
  for row in student_rows:
    evals[row] = []
    for s in seeds:
      for folder, kind in row_stages(row):  # The DPTs are done; "attention": the weight.
        final = train(folder, seed_dir(s), common + seed_args(s) + student(folder) + (
            attn if kind == "attention" else []))
      evals[row].append(score(final))
      if s == seeds[0]:
        finals[row] = final
  shown = {r: finals[r] for r in ("sft", "kd", "compodistill") if r in finals}
  similarity = layer_similarity(shown, os.path.join(teacher_dir, "finetune"), data)
  summary = summarize(evals, text_only, blind, args.bootstrap)
  meta["wall_s"] = time.time() - t_start
  plot_dir = os.path.join(work, "plots" + out_name[10:])
  figures = plots(summary, similarity, plot_dir)
  figures.append(attention_heatmaps(shown, os.path.join(teacher_dir, "finetune"), data,
                                    os.path.join(plot_dir, "heatmaps.png")))
  result = {"meta": meta, "summary": summary, "similarity": similarity, "plots": figures,
            "vqa_prior": baselines.vqa_prior(data)}
  with open(os.path.join(work, out_name + ".json"), "w") as f:
    json.dump(result, f, indent=1)
  table = markdown(summary, meta)
  with open(os.path.join(work, out_name + ".md"), "w") as f:
    f.write(table)
  print(table)
  print(f"results: {os.path.join(work, out_name)}.json, .md, plots{out_name[10:]}/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
