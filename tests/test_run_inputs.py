"""A user's own inputs reaching the stage loop: unusable data, synthetic switch, and
weights whose tokenizer is not the data's.

Each case must stop with a one-line error before any training (no hang, no traceback).
"""
import json
import os
import subprocess
import sys
import time

import jax
import pytest

from cdx import config as config_lib
from cdx import hf
from cdx.data import tokenizer as tok_lib
from cdx.models import mllm
from cdx.train import setup
from launch import run
from tests import launcher

CORPUS_A = ["a red cube left of a blue ball", "what shape is it", "two green cones"] * 20
CORPUS_B = ["zebra quartz jumps over wavy yaks", "vexing fjord nymph", "kiwi bison"] * 20


@pytest.fixture(scope="module")
def tok_a(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok_a"))
  tok_lib.build_tokenizer(CORPUS_A, path, vocab_size=300)
  return path


def test_all_unusable_user_data_stops_within_seconds(tmp_path, tok_a):
  """Every sample has ShareGPT roles cdx does not read: a one-line error naming the file
  and the reason, before a model is built; a hang would hit the timeout."""
  path = tmp_path / "chat.jsonl"
  with open(path, "w") as f:
    for i in range(40):
      f.write(json.dumps({"id": i, "conversations": [
          {"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}) + "\n")
  t0 = time.monotonic()
  out = subprocess.run(
      [sys.executable, "launch/run.py", "--config=configs/pretrain.py:tiny",
       f"--workdir={tmp_path}", "--config.data.synthetic=False", f"--config.data.train={path}",
       f"--config.data.tokenizer={tok_a}", f"--config.data.image_root={tmp_path}",
       "--config.log.progress=False"],
      cwd=launcher.ROOT, capture_output=True, text=True, timeout=120,
      env=launcher.subprocess_env())
  seconds = time.monotonic() - t0
  assert out.returncode == 2, out.stderr[-3000:]
  err = out.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: [pretrain] no usable training sample")
  assert str(path) in err[0] and "bad_roles" in err[0]
  assert "Traceback" not in out.stderr
  assert seconds < 60, seconds  # Process start + jax import dominate.


@pytest.mark.parametrize("field", ["train", "image_root", "tokenizer"])
def test_user_data_with_synthetic_on_fails_with_the_override(tmp_path, field, capsys):
  value = str(tmp_path / ("mine.json" if field == "train" else field))
  status = run.main(["--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}",
                     f"--config.data.{field}={value}", "--dry_run"])
  err = capsys.readouterr().err
  assert status == 2
  assert f"data.{field}" in err and "--config.data.synthetic=False" in err
  assert len(err.strip().splitlines()) == 1


def test_world_exported_by_older_code_is_refused_in_one_line(tmp_path, capsys):
  """A workdir whose synthetic world an older cdx exported: one line that names the
  versions and what to do, before anything trains; never reused silently."""
  from cdx.data.synthetic import export
  cfg = config_lib.load("configs/pretrain.py:tiny")
  os.makedirs(tmp_path / "data")
  old = {"num_train": cfg.data.synthetic_train, "seed": cfg.data.world_seed,
         "vocab_size": 1024, "num_eval": 100, "size": 64, "num_cr": cfg.data.num_cr,
         "format_frac": cfg.data.format_frac, "world_version": export.WORLD_VERSION - 1}
  (tmp_path / "data" / "READY").write_text(json.dumps(old))
  status = run.main(["--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}",
                     "--config.vision_pretrain.steps=0", "--config.log.progress=False"])
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" not in err
  line, = [l for l in err.splitlines() if l.startswith("error: ")]
  assert f"version {export.WORLD_VERSION - 1}" in line and "delete that folder" in line
  assert not os.path.exists(tmp_path / "pretrain" / "DONE")


_REFUSED_WORKER = """
from cdx import parallel
parallel.initialize(cpu_collectives="gloo")
import os
from cdx import config as config_lib
from cdx.train import setup
cfg = config_lib.load("configs/pretrain.py:tiny")
try:
  setup.prepare_data(cfg, os.environ["CDX_TEST_WORKDIR"])
  emit("prepared")
except setup.UserError as e:
  emit(str(e))
"""


def test_every_host_stops_when_process_0_refuses_the_world(tmp_path):
  """Two processes: process 0 refuses an old export; the other one, which only waits
  for process 0's world, stops with the same message instead of waiting forever."""
  from tests.multiprocess import run_workers
  os.makedirs(tmp_path / "data")
  (tmp_path / "data" / "READY").write_text(json.dumps({"world_version": 0}))
  messages = run_workers(_REFUSED_WORKER, local_devices=(1, 1), timeout=120,
                         env={"CDX_TEST_WORKDIR": str(tmp_path)})
  assert messages[0] == messages[1]
  assert messages[0].startswith("data: ") and "delete that folder" in messages[0]
  assert not os.path.exists(tmp_path / "data" / "pretrain.json")  # nothing overwritten


def test_synthetic_defaults_pass_validation():
  for spec in ("configs/pretrain.py:tiny", "configs/dft.py:tiny", "configs/sft.py:paper"):
    setup.validate(config_lib.load(spec))


# -------------------------------------------------------------- tokenizer of hf_path

def _llava_dir(path, tokenizer_path, cfg):
  """An HF LLaVA dir of the tiny teacher, with the tokenizer of `tokenizer_path` beside."""
  tokenizer, ids = tok_lib.load_tokenizer(tokenizer_path)
  model_cfg = setup.spec_config(cfg.teacher, cfg, ids)
  params = mllm.init_params(model_cfg, jax.random.key(0))
  hf.save_llava(model_cfg, jax.device_get(params), str(path))
  tokenizer.save_pretrained(str(path))
  return str(path)


def test_hf_teacher_with_another_tokenizer_is_refused(tmp_path, tok_a):
  tok_b = str(tmp_path / "tok_b")
  tok_lib.build_tokenizer(CORPUS_B, tok_b, vocab_size=300)
  cfg = config_lib.load("configs/dpt.py:tiny")
  tokenizer, ids = tok_lib.load_tokenizer(tok_a)
  fingerprint = tok_lib.fingerprint(tokenizer)
  same = _llava_dir(tmp_path / "same", tok_a, cfg)
  other = _llava_dir(tmp_path / "other", tok_b, cfg)
  spec = lambda p: config_lib.load("configs/dpt.py:tiny", [f"--config.teacher.hf_path={p}"])

  model_cfg, _, provenance = setup.load_model(spec(same).teacher, cfg, str(tmp_path), "",
                                              ids, fingerprint, "teacher")
  assert provenance == {"hf": same} and model_cfg.image_token_id == ids.image
  with pytest.raises(config_lib.UserError, match=r"teacher.hf_path .*other comes with "
                     r"another tokenizer .* than data.tokenizer"):
    setup.load_model(spec(other).teacher, cfg, str(tmp_path), "", ids, fingerprint,
                     "teacher")
