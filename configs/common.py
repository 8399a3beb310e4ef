"""Blocks shared by the stage recipes: presets, models, data, optimizer, mesh, logging.

A recipe (`configs/<stage>.py`) states what makes its stage: which model trains and which
teaches, its upstream stages, the trainable patterns and LoRA, the loss weights, the data
kind and lr / batch / steps per preset. `stage()` adds the blocks every stage shares and
returns the full config. configs/registry.py lists the stages and their graph.

Presets:
  tiny   synthetic world, tiny SigLIP/Qwen-shaped models, minutes on a laptop CPU. The tiny
         LLMs start from random weights, so their "pretrain" also trains the LLM and the
         finetune / DFT / SFT stages train the whole LLM instead of a LoRA (there is no
         pretrained base to adapt); every other rule is the paper's.
  paper  SigLIP so400m-patch14-384, Qwen1.5-1.8B student, Qwen1.5-4B teacher, the paper's
         hyperparameters (docs/METHOD.md §7). Weights and data come from local paths given
         as overrides.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cdx import parallel  # The default logical -> mesh axis map.
from cdx.config import parse_arg

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

# Tiny instruction steps of the distillation chain. Every student row of the miniature
# (launch/miniature.py) gets DFT + SFT = TINY_DFT_STEPS + TINY_SFT_STEPS instruction steps:
# the SFT baseline (finetune_student) as one stage, the distilled rows as two.
TINY_DFT_STEPS = 250
TINY_SFT_STEPS = 100
# The attention term's weight on the tiny preset. The paper's weight is 1 (the `paper`
# preset keeps it); on the tiny models the term's gradient at weight 1 is ~6.5e-4 of the
# LM + KD gradient (`cdx.analysis.gradients`, docs/RESULTS.md "Attention weight"), so it
# barely acts; 300 makes it ~0.2 of it. Set once from that measurement, not from results.
TINY_ATTN_WEIGHT = 300.0

PAPER_VISION = "so400m-patch14-384"
PAPER_TEACHER = "qwen1.5-4b"
PAPER_STUDENT = "qwen1.5-1.8b"

# LoRA targets of the paper: every 2-D linear kernel of the LLM except the output head. The
# embedding table is named `embedding`, not `kernel`, so it never matches. Rule syntax: an
# ordered list of full-match regexes, `(regex, False)` excludes (cdx/paths.py).
LLM_LINEARS = (("llm/lm_head/.*", False), r"llm/.*/kernel")


def parse(arg: str | None, roles: tuple[str, ...] = ("teacher",)) -> tuple[str, str]:
  """`PRESET[,role=ROLE]` -> (preset, role); `roles` are those the stage accepts."""
  preset, options = parse_arg(arg, PRESETS)
  role = options.pop("role", "teacher")
  if options:
    raise ValueError(f"Unknown config arguments {sorted(options)}; only role= is accepted.")
  if role not in roles:
    if len(roles) == 1:
      raise ValueError(f"role={role} only applies to pretrain.py and finetune.py.")
    raise ValueError(f"role must be {' or '.join(map(repr, roles))}, got {role!r}.")
  return preset, role


def model(preset: str, which: str) -> ml_collections.ConfigDict:
  """One MLLM (`which` = teacher | student): vision tower, adapter, LLM; its weights."""
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


def optim(lr: float) -> ml_collections.ConfigDict:
  """AdamW with warmup + cosine decay and non-finite step skipping (docs/METHOD.md §7)."""
  return ml_collections.ConfigDict(dict(
      lr=lr, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, skip_nonfinite=True,
      max_nonfinite=100,  # Halt after this many skipped (non-finite) steps in a row.
  ))


def lora(preset: str, targets: tuple, full_finetune: bool) -> ml_collections.ConfigDict:
  """LoRA on `targets` (none: disabled); `full_finetune` trains the whole LLM instead."""
  tiny = preset == "tiny"
  return ml_collections.ConfigDict(dict(
      enabled=bool(targets), rank=32 if tiny else 128, alpha=64.0 if tiny else 256.0,
      # Kept when disabled, so that --config.lora.enabled=True alone turns LoRA on.
      targets=targets or LLM_LINEARS,
      full_finetune=full_finetune,
  ))


def loss(preset: str, lm: float, kd: float, attn: float) -> ml_collections.ConfigDict:
  """The objective (docs/METHOD.md §5): weights of the three terms, 0 where unused."""
  return ml_collections.ConfigDict(dict(
      lm=lm, kd=kd, attn=attn,
      kd_kind="forward", kd_temperature=1.0, kd_beta=0.5, kd_mask="shifted",
      attn_variant="official", chunk_size=128 if preset == "tiny" else 256,
      # cdx | official: official reproduces every departure of docs/METHOD.md §8 in the
      # loss (attention block of 729 positions, text-only rows included, unshifted KD).
      fidelity="cdx",
  ))


def layers() -> ml_collections.ConfigDict:
  """Student layers aligned with teacher layer groups (docs/METHOD.md §6)."""
  return ml_collections.ConfigDict(dict(
      strategy="group",  # group (official) | simple | adaptive
      # Explicit lists override the strategy, e.g. student_layers=(8,9),
      # teacher_groups=((13,14),(15,16)).
      student_layers=(), teacher_groups=(),
  ))


def data(preset: str, kind: str) -> ml_collections.ConfigDict:
  """Training data (docs/METHOD.md §3–4): `kind` = pretrain (captions) | instruct."""
  tiny = preset == "tiny"
  c = ml_collections.ConfigDict(dict(
      train=config_dict.placeholder(str),  # LLaVA json/jsonl; several: "a.json:2,b.json:1"
      image_root=config_dict.placeholder(str),
      tokenizer=config_dict.placeholder(str),
      # Caption data uses the `pretrain` template; instructions qwen2_base.
      template={"pretrain": "pretrain", "instruct": "qwen2_base"}[kind],
      image_mode="square",
      worker_count=0 if tiny else 8,
      strict=False,
      allow_outside_root=False,  # Accept image paths leaving image_root (absolute, "..").
      shuffle=True,
      synthetic=tiny,  # Generate the synthetic world into <workdir>/data when missing.
      synthetic_train=4000,
      # The world's own seed: the same world whatever the training seed (c.seed).
      world_seed=0,
      num_cr=500,  # Items per SugarCrepe-style subset (binomial SE <= 0.022 each).
      format_frac=0.3,  # Share of instruction turns in the two-choice / yes-no formats.
  ))
  if tiny:
    c.train = f"{kind}.json"
  return c


def vision_pretrain(preset: str) -> ml_collections.ConfigDict:
  """The tiny presets' shared frozen vision tower, pretrained once per world
  (cdx/train/vision_pretrain.py, cached in <workdir>/vision; ~2 min once on 2 cores):
  steps=0 keeps a random tower (fast tests), as does data.synthetic=False. Real presets
  load a pretrained SigLIP and ignore this block."""
  return ml_collections.ConfigDict(dict(
      steps=1600 if preset == "tiny" else 0, seed=0, batch_size=24, lr=5e-3,
      dense_weight=2.0, position_weight=1.0))


def stage(name: str, preset: str, *, role: str = "teacher", model_of: str,
          teacher: str = "", taf: bool = False, init: str = "", paper: dict, tiny: dict,
          trainable: tuple, lora_targets: tuple = (), full_finetune: bool = False,
          loss_weights: dict, data_kind: str) -> ml_collections.ConfigDict:
  """The full config of one stage from its recipe.

  Args:
    name: the stage (recipe) name; its folder is `name`, or `<name>_student` for the
      student's role in a teacher stage.
    model_of: which model trains (teacher | student).
    teacher: folder of the teacher stage distilled from ("" = no teacher).
    taf: the student keeps the teacher's adapter and learns a post-connector.
    init: folder of the stage whose output this one starts from ("" = base weights).
    paper, tiny: per preset `lr`, `batch_size` (global samples per step) and either
      `max_length` (paper; one epoch) or `total_steps` (tiny; max_length 256 unless set:
      every synthetic instruction record fits, text.RECORD_CHARS).
    trainable: base-param patterns that train; LoRA factors always do.
    lora_targets: LoRA on these params (() = no LoRA); full_finetune: the whole LLM instead.
    loss_weights: lm, kd, attn.
    data_kind: pretrain (captions) | instruct.
  """
  is_tiny = preset == "tiny"
  hp = dict(total_steps=-1, max_length=256) | (tiny if is_tiny else paper)
  c = ml_collections.ConfigDict()
  c.stage = name
  c.preset = preset
  c.role = role
  c.name = name if role == "teacher" else f"{name}_student"
  c.seed = 42
  c.config_file = ""

  # Which model trains, which (if any) teaches, and the upstream stages read.
  c.model = model(preset, model_of)
  c.teacher = model(preset, "teacher")
  c.use_teacher = bool(teacher)
  c.taf = taf
  c.inputs = ml_collections.ConfigDict(dict(init=init, teacher=teacher))
  c.build_missing = is_tiny  # Tiny runs build their upstream stages themselves.

  # Optimization.
  c.total_steps = hp["total_steps"]  # -1: one epoch over the training data.
  c.epochs = 1.0
  c.batch_size = hp["batch_size"]  # Global, in samples, per optimizer step.
  c.micro_batches = 1  # Gradient accumulation: batch_size / micro_batches per pass.
  c.max_length = hp["max_length"]
  c.trainable = tuple(trainable)
  c.optim = optim(hp["lr"])
  c.lora = lora(preset, tuple(lora_targets), full_finetune)
  c.loss = loss(preset, **loss_weights)
  c.layers = layers()
  c.data = data(preset, data_kind)
  c.vision_pretrain = vision_pretrain(preset)

  # Hardware.
  # Sizes of the mesh axes, and which of them each logical param axis shards over.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          axis_map=dict(parallel.DEFAULT_AXIS_MAP)))
  c.param_dtype = "float32"
  c.compute_dtype = "float32" if is_tiny else "bfloat16"
  # Decoder-layer rematerialization: "none" or a jax.checkpoint_policies name
  # ("nothing_saveable" recomputes the whole layer in the backward pass).
  c.remat = "none" if is_tiny else "nothing_saveable"
  # Decoder layers stacked and run by lax.scan (one compiled layer; see docs/PERFORMANCE.md).
  # Files (final/, hf/) are always unstacked, so stages may differ here.
  c.scan_layers = not is_tiny

  # Outputs.
  # restart: start from step 0 beside an earlier run whose checkpoints are gone (its
  # logs/outputs are moved to <stage>/old-<time>/; docs/CHECKPOINTS.md).
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=20 if is_tiny else 500, keep=2,
                                                async_save=True, restart=False))
  c.log = ml_collections.ConfigDict(dict(every_steps=1 if is_tiny else 10, progress=True))
  c.export_hf = True
  c.halt_on_nonfinite = False
  return c
