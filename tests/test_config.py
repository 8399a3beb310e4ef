"""Config loading and the launcher's up-front checks (in process; nothing trains).

Unknown keys name their nearest valid keys; every stage's `paper` preset builds and
validates without weights (`--dry_run`, abstract shapes only); missing inputs, bad meshes
and batches stop with messages that say what to set.
"""
import os
import re

import pytest

from cdx import config as config_lib
from configs import registry
from launch import miniature
from launch import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
# (config file stem, arg): every stage of the graph, both presets.
STAGES = [("pretrain", ""), ("pretrain", ",role=student"), ("finetune", ""),
          ("finetune", ",role=student"), ("dpt", ""), ("dft", ""), ("sft", "")]


def _spec(stem, preset, extra=""):
  return f"{os.path.join(CONFIGS, stem)}.py:{preset}{extra}"


def _main(capsys, *argv):
  """(exit status, stdout, stderr) of launch/run.py main."""
  status = run.main(list(argv))
  out = capsys.readouterr()
  return status, out.out, out.err


@pytest.mark.parametrize("preset", ["tiny", "paper"])
@pytest.mark.parametrize("stem,extra", STAGES)
def test_every_stage_config_loads_locked(stem, extra, preset):
  cfg = config_lib.load(_spec(stem, preset, extra), ["--config.optim.lr=5e-5"])
  assert cfg.preset == preset and cfg.optim.lr == 5e-5
  assert cfg.name.endswith("_student") == (extra == ",role=student")
  with pytest.raises(AttributeError):
    cfg.new_field = 1  # Locked: a typo cannot add a field.


@pytest.mark.parametrize("preset", ["tiny", "paper"])
@pytest.mark.parametrize("folder", sorted(registry.STAGES))
def test_registry_builds_each_folder_from_registered_inputs(folder, preset):
  cfg = config_lib.load(registry.config_spec(folder, preset, CONFIGS))
  assert cfg.name == folder and cfg.preset == preset  # Plans and DONE files agree.
  for up in (cfg.inputs.init, cfg.inputs.teacher):
    assert not up or up in registry.STAGES, (folder, up)


def test_registry_spec_and_unknown_folder():
  assert registry.config_spec("finetune_student", "paper") == \
      "configs/finetune.py:paper,role=student"
  assert registry.config_spec("dft", "tiny", "/x/configs") == "/x/configs/dft.py:tiny"
  with pytest.raises(ValueError, match="'dtf'.*configs/registry.py"):
    registry.config_spec("dtf", "tiny")


def _chain(folder):
  """Configs of `folder` and its init stages, upstream last (tiny preset)."""
  out = []
  while folder:
    out.append(config_lib.load(registry.config_spec(folder, "tiny", CONFIGS)))
    folder = out[-1].inputs.init
  return out


def test_miniature_rows_are_registered_stages():
  assert set(miniature.ROWS.values()) <= set(registry.STAGES)
  novat = config_lib.load(registry.config_spec(miniature.ROWS["taf"], "tiny", CONFIGS))
  up = config_lib.load(registry.config_spec(novat.inputs.init, "tiny", CONFIGS))
  assert (up.name, up.loss.attn, up.loss.kd) == ("dft_novat", 0.0, 1.0)


# row -> (TAF, KD weight of its DFT, attention weight > 0) of the rows that distil.
_ROW_TERMS = {"kd": (False, 1.0, False), "taf": (True, 1.0, False),
              "vat": (False, 1.0, True), "compodistill": (True, 1.0, True)}


@pytest.mark.parametrize("row", sorted(_ROW_TERMS))
def test_miniature_rows_differ_only_in_their_terms(row):
  chain = _chain(miniature.ROWS[row])
  names = [c.name for c in chain]
  assert names[-1] == "pretrain_student" and len(names) == 4, names
  sft, dft, dpt = chain[:3]
  taf, kd, attn = _ROW_TERMS[row]
  # What the miniature trains after stage 0, and where its DPT steps and weight go.
  assert miniature.row_stages(row) == [
      (dpt.name, "dpt"), (dft.name, "attention" if attn else ""), (sft.name, "")]
  assert {sft.taf, dft.taf, dpt.taf} == {taf}
  assert (dft.loss.kd, dft.loss.attn > 0) == (kd, attn)
  assert dpt.loss.attn == 0 and (sft.loss.kd, sft.loss.attn) == (0, 0)
  assert not sft.use_teacher and dft.use_teacher and dpt.use_teacher


def test_miniature_sft_row_is_one_stage():
  assert miniature.row_stages("sft") == [("finetune_student", "")]


def test_miniature_student_rows_are_step_matched():
  """Every student row: the same stage 0 and the same number of instruction steps."""
  steps = {}
  for row in miniature.STUDENTS:
    chain = _chain(miniature.ROWS[row])
    assert chain[-1].name == "pretrain_student"
    steps[row] = sum(c.total_steps for c in chain if c.data.train == "instruct.json")
  assert len(set(steps.values())) == 1, steps


def test_tiny_attention_weight_is_the_papers_on_real_presets():
  tiny = config_lib.load(_spec("dft", "tiny"))
  paper = config_lib.load(_spec("dft", "paper"))
  vat = config_lib.load(_spec("dft_vat", "tiny"))
  assert paper.loss.attn == 1.0 and tiny.loss.attn == vat.loss.attn > 0


def test_role_only_where_a_stage_has_a_student_variant():
  with pytest.raises(ValueError, match="role=student only applies"):
    config_lib.load(_spec("dft", "tiny", ",role=student"))
  with pytest.raises(ValueError, match="role must be 'teacher' or 'student'"):
    config_lib.load(_spec("pretrain", "tiny", ",role=teach"))
  with pytest.raises(ValueError, match="Unknown config arguments"):
    config_lib.load(_spec("pretrain", "tiny", ",rank=3"))


@pytest.mark.parametrize("override,near", [
    ("--config.optim.lrr=1e-4", "optim.lr"),     # Typo in a known group.
    ("--config.lr=1e-4", "optim.lr"),            # Right name, wrong group.
    ("--config.data.tokeniser=/t", "data.tokenizer"),
    ("--config.loss.atn=2", "loss.attn"),
])
def test_unknown_key_names_nearest_valid_keys(override, near):
  key = override.split("=")[0][len("--config."):]
  with pytest.raises(ValueError) as e:
    config_lib.load(_spec("dft", "tiny"), [override])
  msg = str(e.value)
  assert f"'{key}'" in msg and "Did you mean" in msg and near in msg


def test_unknown_key_through_launcher_is_a_one_line_error(capsys, tmp_path):
  status, _, err = _main(capsys, f"--config={_spec('dft', 'tiny')}", f"--workdir={tmp_path}",
                         "--config.optim.lrr=1e-4")
  assert status == 2 and "optim.lr" in err and "Traceback" not in err
  assert not os.listdir(tmp_path)  # Nothing ran.


def test_override_types_follow_the_field():
  cfg = config_lib.load(_spec("dft", "tiny"), [
      "--config.total_steps=7", "--config.optim.lr=1", "--config.data.train=123",
      "--config.layers.student_layers=(1,2)", "--config.lora.enabled=False"])
  assert cfg.total_steps == 7 and isinstance(cfg.optim.lr, float)
  assert cfg.data.train == "123" and cfg.layers.student_layers == (1, 2)
  assert cfg.lora.enabled is False
  with pytest.raises(ValueError, match="total_steps"):
    config_lib.load(_spec("dft", "tiny"), ["--config.total_steps=many"])
  with pytest.raises(ValueError, match="Unknown preset 'papr'.*paper"):
    config_lib.load(_spec("dft", "papr"))


def _counts(text):
  """{(stage, role): {part: millions}} from the dry run's output."""
  counts, stage = {}, None
  for line in text.splitlines():
    if line.startswith("stage "):
      stage = line.split()[1].rstrip(":")
    m = re.match(r"\s+(model|teacher): (.*) \(Nv=(\d+)\)", line)
    if m:
      counts[stage, m.group(1)] = {k: float(v) for k, v in
                                   re.findall(r"(\w+) ([\d.]+)M", m.group(2))}
  return counts


@pytest.mark.slow
def test_paper_dry_run_builds_every_stage_abstractly(capsys, tmp_path):
  # sft's plan holds pretrain, finetune, dpt, dft and sft; the student chain the rest.
  status, out, err = _main(capsys, f"--config={_spec('sft', 'paper')}",
                           f"--workdir={tmp_path}", "--dry_run", "--build_missing")
  assert status == 0, err
  status, out2, err = _main(capsys, f"--config={_spec('finetune', 'paper', ',role=student')}",
                            f"--workdir={tmp_path}", "--dry_run", "--build_missing")
  assert status == 0, err
  counts = _counts(out + out2)
  stages = {s for s, _ in counts}
  assert stages == {"pretrain", "finetune", "dpt", "dft", "sft", "pretrain_student",
                    "finetune_student"}
  # Public sizes: Qwen1.5-1.8B has 1.84B parameters, Qwen1.5-4B 3.95B, SigLIP so400m's
  # vision tower ~0.40B.
  assert counts["dft", "model"]["llm"] == pytest.approx(1836, rel=0.01)
  assert counts["dft", "teacher"]["llm"] == pytest.approx(3950, rel=0.01)
  assert counts["pretrain_student", "model"]["llm"] == pytest.approx(1836, rel=0.01)
  assert counts["pretrain", "model"]["vision"] == pytest.approx(400, rel=0.02)
  assert "Nv=728" in out  # (384 / 14)^2 patches.
  assert "missing for a real run: --config.data.train, --config.data.tokenizer, " \
         "--config.model.hf_path" in out
  assert not os.listdir(tmp_path)  # A dry run writes nothing.


def test_paper_stage_without_its_teacher_names_the_command(capsys, tmp_path):
  status, _, err = _main(capsys, f"--config={_spec('dft', 'paper')}", f"--workdir={tmp_path}")
  assert status == 2
  assert (f"python launch/run.py --config={_spec('finetune', 'paper')} "
          f"--workdir={tmp_path}") in err
  assert "--config.teacher.hf_path" in err and "--build_missing" in err


def test_paper_run_without_data_or_weights_says_what_to_set(capsys, tmp_path):
  argv = [f"--config={_spec('pretrain', 'paper')}", f"--workdir={tmp_path}"]
  status, _, err = _main(capsys, *argv)
  assert status == 2 and "set data.train, data.tokenizer" in err
  # With data (a tiny synthetic export) the weights are next.
  from cdx.data.synthetic import export
  root = str(tmp_path / "data")
  tok = export.ensure(root, 16, 0, vocab_size=1024)
  data = [f"--config.data.train={root}/pretrain.json", f"--config.data.image_root={root}",
          f"--config.data.tokenizer={tok}"]
  status, _, err = _main(capsys, *argv, *data)
  assert status == 2 and "set --config.model.hf_path" in err
  status, _, err = _main(capsys, *argv, *data, f"--config.model.hf_path={tmp_path}/nope")
  assert status == 2 and "model.hf_path" in err and "is not a directory" in err
  status, _, err = _main(capsys, *argv, "--config.data.train=/nowhere.json",
                         f"--config.data.tokenizer={tok}")
  assert status == 2 and "/nowhere.json does not exist" in err


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.data=3", r"mesh .*8 devices"),
    ("--config.mesh.fsdp=3", r"mesh .*8 devices"),
    ("--config.batch_size=12", r"batch_size=12 must be divisible by mesh data\*fsdp=8"),
    ("--config.micro_batches=3", r"batch_size=16 .* micro_batches=3"),
    ("--config.mesh.axis_map.embed=fdsp", r"mesh\.axis_map\.embed='fdsp'"),
])
def test_mesh_or_batch_that_does_not_divide_is_a_clear_error(capsys, tmp_path, override,
                                                            message):
  import jax
  assert jax.device_count() == 8  # conftest
  status, _, err = _main(capsys, f"--config={_spec('pretrain', 'tiny')}",
                         f"--workdir={tmp_path}", override)
  assert status == 2 and re.search(message, err), err
  assert "Traceback" not in err


# Each bad value: the error names the field, the value and what is allowed.
BAD_VALUES = [
    ("optim.lr=-1e-4", r"optim\.lr=-0\.0001 must be > 0"),
    ("optim.lr=0", r"optim\.lr=0\.0 must be > 0"),
    ("optim.schedule=cosin", r"optim\.schedule='cosin' is not one of cosine, linear, constant"),
    ("optim.warmup_ratio=1.5", r"optim\.warmup_ratio=1\.5 must be in \[0, 1\]"),
    ("optim.warmup_ratio=-0.1", r"optim\.warmup_ratio=-0\.1 must be in \[0, 1\]"),
    ("remat=everything", r"remat='everything' is not one of none, full, .*nothing_saveable"),
    ("loss.attn_variant=cos", r"loss\.attn_variant='cos' is not one of official, cosine, mse, kl"),
    ("loss.kd_kind=kl", r"loss\.kd_kind='kl' is not one of forward, reverse, jsd"),
    ("loss.kd_mask=none", r"loss\.kd_mask='none' is not one of shifted, official"),
    ("loss.fidelity=paper", r"loss\.fidelity='paper' is not one of cdx, official"),
    ("loss.kd=-1.0", r"loss\.kd=-1\.0 must be >= 0"),
    ("layers.strategy=middle", r"layers\.strategy='middle' is not one of group, simple, adaptive"),
    ("micro_batches=0", r"micro_batches=0 must be >= 1"),
    ("micro_batches=3", r"batch_size=16 must be divisible by micro_batches=3"),
    ("batch_size=-8", r"batch_size=-8 must be >= 1"),
    ("total_steps=-2", r"total_steps=-2 must be >= 1, or -1"),
    ("total_steps=0", r"total_steps=0 must be >= 1, or -1"),
    ("data.template=chatml", r"data\.template='chatml' is not one of qwen2_base, pretrain"),
    ("data.image_mode=crop", r"data\.image_mode='crop' is not one of square, pad"),
    ("log.every_steps=0", r"log\.every_steps=0 must be >= 1"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_value_is_a_one_line_error_at_load(override, message):
  from cdx.train import setup
  cfg = config_lib.load(_spec("dft", "tiny"), [f"--config.{override}"])
  with pytest.raises(config_lib.UserError, match=message) as e:
    setup.validate(cfg)
  assert str(e.value).startswith(_spec("dft", "tiny") + ": ") and "\n" not in str(e.value)


@pytest.mark.parametrize("override,message", BAD_VALUES[::4])
def test_bad_value_stops_the_dry_run(capsys, tmp_path, override, message):
  status, out, err = _main(capsys, f"--config={_spec('dft', 'tiny')}", f"--workdir={tmp_path}",
                           f"--config.{override}", "--dry_run")
  assert status == 2 and re.search(message, err), err
  assert len(err.strip().splitlines()) == 1 and "stage dft" not in out


def test_bad_upstream_value_is_caught_before_any_stage(capsys, tmp_path):
  status, _, err = _main(capsys, f"--config={_spec('dpt', 'tiny')}", f"--workdir={tmp_path}",
                         "--upstream.optim.lr=-1.0", "--dry_run")
  assert status == 2 and "optim.lr=-1.0 must be > 0" in err and "pretrain" in err
