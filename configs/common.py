"""Pieces shared by every stage config: model presets, data, optimizer, mesh, logging.

Stages and the graph between them (SPEC §7). `<dir>` names the folder under --workdir:

  pretrain  (teacher)  adapter          LM            ─┐
  finetune  (teacher)  LoRA + adapter   LM             ├─► dpt ─► dft ─► sft
  pretrain_student     adapter          LM            ─┘   (student LLM weights for DPT)
  finetune_student     LoRA + adapter   LM   (the "SFT 2B" baseline)
  dpt                  post-connector   LM + KD              (TAF: teacher adapter, frozen)
  dft                  LoRA + post      LM + KD + attention
  sft                  LoRA + post      LM                   (after merging DFT's LoRA)

Presets:
  tiny   synthetic world, tiny SigLIP/Qwen-shaped models, minutes on a laptop CPU. The tiny
         LLMs start from random weights, so their "pretrain" also trains the LLM and the
         finetune / DFT / SFT stages train the whole LLM instead of a LoRA (there is no
         pretrained base to adapt); every other rule is the paper's.
  paper  SigLIP so400m-patch14-384, Qwen1.5-1.8B student, Qwen1.5-4B teacher, SPEC §7
         hyperparameters. Weights and data come from local paths given as overrides.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cdx import parallel  # The default logical -> mesh axis map.
from cdx.config import parse_arg
from cdx.train import params as params_lib  # Trainable patterns per stage (SPEC §7).

PRESETS = ("tiny", "paper")

# ---------------------------------------------------------------------------------------
# Architectures. Tiny ones keep the paper's shapes in miniature: the teacher is deeper and
# wider, has MHA and an untied head and a slightly larger (padded) vocab than the GQA,
# tied-embedding student, exactly the kinds of mismatch real checkpoints have.
TINY_VISION = dict(image_size=64, patch_size=8, hidden_size=64, num_layers=3,
                   num_heads=4, mlp_dim=128)
TINY_TEACHER = dict(vocab_size=1088, hidden_size=128, num_layers=8, num_heads=4,
                    num_kv_heads=4, head_dim=32, mlp_dim=256, rope_theta=10000.0,
                    tie_embeddings=False)
TINY_STUDENT = dict(vocab_size=1024, hidden_size=64, num_layers=6, num_heads=4,
                    num_kv_heads=2, head_dim=16, mlp_dim=128, rope_theta=10000.0,
                    tie_embeddings=True)
TINY_VOCAB = 1024  # The synthetic tokenizer's size: fits both tiny models.

PAPER_VISION = "so400m-patch14-384"
PAPER_TEACHER = "qwen1.5-4b"
PAPER_STUDENT = "qwen1.5-1.8b"


# SPEC §7: (lr, global batch, max length) per stage in the paper.
PAPER_STAGE = {
    "pretrain": (1e-3, 256, 2048),
    "finetune": (2e-4, 128, 2048),
    "dpt": (2e-4, 256, 1536),
    "dft": (2e-4, 128, 1536),
    "sft": (2e-4, 192, 1536),
}
TINY_STAGE = {  # (lr, global batch, steps)
    "pretrain": (3e-3, 16, 120),
    "finetune": (1e-3, 16, 120),
    "dpt": (2e-3, 16, 40),
    "dft": (1e-3, 16, 250),
    "sft": (1e-3, 16, 100),
}


def model_spec(preset: str, which: str) -> ml_collections.ConfigDict:
  """One MLLM: vision tower, adapter, LLM; where its weights come from."""
  tiny = preset == "tiny"
  text = {"teacher": TINY_TEACHER, "student": TINY_STUDENT}[which] if tiny else (
      {"teacher": PAPER_TEACHER, "student": PAPER_STUDENT}[which])
  return ml_collections.ConfigDict(dict(
      vision=dict(TINY_VISION) if tiny else PAPER_VISION,
      text=dict(text) if tiny else text,
      adapter_depth=2,
      feature_layer=-2,
      feature_select="default",
      # Weights (real presets): an HF LLaVA dir, or a Qwen2 dir + a SigLIP dir for stage 0.
      hf_path=config_dict.placeholder(str),
      vision_path=config_dict.placeholder(str),
  ))


def get_config(stage: str, preset: str, role: str = "teacher") -> ml_collections.ConfigDict:
  """The full config of one stage. `role` is which model trains in pretrain/finetune."""
  if role not in ("teacher", "student"):
    raise ValueError(f"role must be 'teacher' or 'student', got {role!r}.")
  tiny = preset == "tiny"
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.preset = preset
  c.role = role
  c.name = stage if role == "teacher" or stage in ("dpt", "dft", "sft") else f"{stage}_student"
  c.seed = 42
  c.config_file = ""

  # Which model trains, which (if any) teaches, and where their weights come from.
  distill = stage in ("dpt", "dft")
  c.model = model_spec(preset, "student" if stage in ("dpt", "dft", "sft") else role)
  c.teacher = model_spec(preset, "teacher")
  c.use_teacher = distill
  c.taf = stage in ("dpt", "dft", "sft")  # TAF students keep the teacher adapter + post.
  # Upstream stages (folder names under --workdir) whose outputs this stage reads.
  # DPT starts from the base student LLM (frozen in pretrain, so the paper needs no student
  # pretrain for it); the tiny LLMs have no base, so there DPT reads pretrain_student.
  c.inputs = ml_collections.ConfigDict(dict(
      init={"pretrain": "", "finetune": c.name.replace("finetune", "pretrain"),
            "dpt": "pretrain_student" if tiny else "", "dft": "dpt", "sft": "dft"}[stage],
      teacher="finetune" if distill else "",
  ))
  c.build_missing = tiny  # Tiny runs build their upstream stages themselves.

  # Optimization (SPEC §7).
  lr, batch, max_len = PAPER_STAGE[stage]
  steps = -1  # -1: one epoch over the training data.
  if tiny:
    lr, batch, steps = TINY_STAGE[stage]
    max_len = 192
  c.total_steps = steps
  c.epochs = 1.0
  c.batch_size = batch        # Global, in samples, per optimizer step.
  c.micro_batches = 1         # Gradient accumulation: batch_size / micro_batches per pass.
  c.max_length = max_len
  rules = params_lib.stage_rules(stage)
  c.trainable = rules["trainable"]
  if tiny and stage == "pretrain":
    c.trainable = ("adapter/.*", "llm/.*")  # No pretrained LLM to keep frozen (see above).
  c.optim = ml_collections.ConfigDict(dict(
      lr=lr, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, skip_nonfinite=True,
      max_nonfinite=100,  # Halt after this many skipped (non-finite) steps in a row.
  ))
  c.lora = ml_collections.ConfigDict(dict(
      enabled=bool(rules["lora_targets"]), rank=32 if tiny else 128,
      alpha=64.0 if tiny else 256.0,
      targets=params_lib.DEFAULT_LORA_TARGETS,  # Every linear of the LLM but lm_head.
      # True: the whole LLM trains, no LoRA (tiny: there is no pretrained base to adapt).
      full_finetune=tiny and stage in ("finetune", "dft", "sft"),
  ))

  # Objective (SPEC §5). Weights are 0 where a stage does not use a term.
  c.loss = ml_collections.ConfigDict(dict(
      lm=1.0, kd=1.0 if distill else 0.0, attn=1.0 if stage == "dft" else 0.0,
      kd_kind="forward", kd_temperature=1.0, kd_beta=0.5, kd_mask="shifted",
      attn_variant="official", chunk_size=128 if tiny else 256,
  ))
  c.layers = ml_collections.ConfigDict(dict(
      strategy="group",  # group (official, SPEC §6) | simple | adaptive
      # Explicit lists override the strategy, e.g. student_layers=(8,9),
      # teacher_groups=((13,14),(15,16)).
      student_layers=(), teacher_groups=(),
  ))

  # Data (SPEC §3–4).
  c.data = ml_collections.ConfigDict(dict(
      train=config_dict.placeholder(str),  # LLaVA json/jsonl; several: "a.json:2,b.json:1"
      image_root=config_dict.placeholder(str),
      tokenizer=config_dict.placeholder(str),
      # Caption data (pretrain, DPT) uses the `pretrain` template; instructions qwen2_base.
      template="pretrain" if stage in ("pretrain", "dpt") else "qwen2_base",
      image_mode="square",
      worker_count=0 if tiny else 8,
      strict=False,
      shuffle=True,
      synthetic=tiny,  # Generate the synthetic world into <workdir>/data when missing.
      synthetic_train=4000,
  ))
  if tiny:
    c.data.train = "pretrain.json" if stage in ("pretrain", "dpt") else "instruct.json"

  # Hardware.
  # Sizes of the mesh axes, and which of them each logical param axis shards over.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          axis_map=dict(parallel.DEFAULT_AXIS_MAP)))
  c.param_dtype = "float32"
  c.compute_dtype = "float32" if tiny else "bfloat16"
  # Decoder-layer rematerialization: "none" or a jax.checkpoint_policies name
  # ("nothing_saveable" recomputes the whole layer in the backward pass).
  c.remat = "none" if tiny else "nothing_saveable"
  # Decoder layers stacked and run by lax.scan (one compiled layer; see docs/PERFORMANCE.md).
  # Files (final/, hf/) are always unstacked, so stages may differ here.
  c.scan_layers = not tiny

  # Outputs.
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=20 if tiny else 500, keep=2,
                                                async_save=True))
  c.log = ml_collections.ConfigDict(dict(every_steps=1 if tiny else 10, progress=True))
  c.export_hf = True
  c.halt_on_nonfinite = False

  return c


def from_arg(stage: str, arg: str | None) -> ml_collections.ConfigDict:
  """`configs/<stage>.py:ARG` -> config; ARG = PRESET[,role=student]."""
  preset, options = parse_arg(arg, PRESETS)
  role = options.pop("role", "teacher")
  if options:
    raise ValueError(f"Unknown config arguments {sorted(options)}; only role= is accepted.")
  if role != "teacher" and stage not in ("pretrain", "finetune"):
    raise ValueError(f"role={role} only applies to pretrain.py and finetune.py.")
  return get_config(stage, preset, role)
