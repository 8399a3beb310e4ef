"""Hostile training data: a zoo of broken files through the pipeline and the checker.

Each file holds one kind of damage a real user's data has: foreign roles, missing images,
lone surrogates, bytes that are not UTF-8, 16-bit images, image paths leaving the root.
The pipeline must skip and count what it cannot use, name file and line, and stop with a
clear error instead of searching forever when nothing is usable; the checker must report
every file without a traceback.
"""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from cdx.data import check
from cdx.data import images
from cdx.data import pipeline
from cdx.data import sources
from cdx.data import tokenizer as tok_lib

NV, SIZE, MAXLEN = 4, 16, 160
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(q, a, image=None, roles=("human", "gpt"), i=0):
  rec = {"id": f"s{i}", "conversations": [{"from": roles[0], "value": q},
                                          {"from": roles[1], "value": a}]}
  if image:
    rec["image"] = image
  return rec


def _good(i):
  return _pair(f"<image>\nWhat is shape {i}?", f"Shape {i} is a cube.", f"img/{i}.png", i=i)


def _gradient16() -> np.ndarray:
  return np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))


def _dump(path, records):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(records, f)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  """{name: data file} with images under <zoo>/root and one image beside the root."""
  base = tmp_path_factory.mktemp("zoo")
  root = base / "root"
  (root / "img").mkdir(parents=True)
  for i in range(6):
    Image.new("RGB", (12, 9), (40 * i, 90, 200)).save(root / "img" / f"{i}.png")
  Image.fromarray(_gradient16()).save(root / "img" / "gray16.png")  # mode I;16
  Image.new("RGB", (8, 8), (1, 2, 3)).save(base / "outside.png")
  files = {}

  files["sharegpt"] = base / "sharegpt.jsonl"  # every sample unusable: foreign roles
  with open(files["sharegpt"], "w") as f:
    for i in range(5):
      f.write(json.dumps(_pair(f"Q{i}?", f"A{i}.", roles=("user", "assistant"), i=i)) + "\n")

  files["missing_images"] = base / "missing_images.json"
  _dump(files["missing_images"], [_pair("<image>\nWhat?", "A cube.", f"img/nope{i}.png", i=i)
                                  for i in range(5)])

  files["surrogate"] = base / "surrogate.json"  # "\ud800" escapes decode to a lone surrogate
  recs = [_good(i) for i in range(4)]
  recs[1]["conversations"][1]["value"] = "broken \ud800 text"
  recs[2]["image"] = "img/\udc80.png"
  with open(files["surrogate"], "w", encoding="ascii") as f:
    json.dump(recs, f)  # ensure_ascii writes the surrogates as \\ud800 escapes

  files["bad_utf8"] = base / "bad_utf8.jsonl"
  with open(files["bad_utf8"], "wb") as f:
    f.write(json.dumps(_good(0)).encode() + b"\n")
    f.write(b'{"id": "x", "conversations": [{"from": "human", "value": "caf\xe9"}]}\n')
    f.write(json.dumps(_good(1)).encode() + b"\n")
    f.write(json.dumps(_good(2)).encode() + b"\n")

  files["bad_utf8_json"] = base / "bad_utf8.json"
  with open(files["bad_utf8_json"], "wb") as f:
    f.write(b'[\n{"id": "x",\n "conversations": []},\n{"id": "caf\xe9"}]\n')

  files["bom"] = base / "bom.json"  # written by editors that put a byte-order mark first
  with open(files["bom"], "w", encoding="utf-8-sig") as f:
    json.dump([_good(0), _good(1)], f)

  files["chat_messages"] = base / "chat_messages.jsonl"  # {role, content}: not LLaVA
  with open(files["chat_messages"], "w") as f:
    f.write(json.dumps({"id": "m", "conversations": [{"role": "user", "content": "Q?"},
                                                      {"role": "assistant", "content": "A"}]}))

  files["gray16"] = base / "gray16.json"
  _dump(files["gray16"], [_pair("<image>\nDescribe.", "A gradient.", "img/gray16.png")])

  files["escape"] = base / "escape.json"
  _dump(files["escape"], [_good(0),
                          _pair("<image>\nQ?", "A.", "../outside.png", i=1),
                          _pair("<image>\nQ?", "A.", str(base / "outside.png"), i=2),
                          _pair("<image>\nQ?", "A.", "img/../img/3.png", i=3)])
  return {k: str(v) for k, v in files.items()}, str(root)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  tok_lib.build_tokenizer(["What is shape 7?", "Shape 7 is a cube.", "A gradient."], path,
                          vocab_size=320)
  return tok_lib.load_tokenizer(path)


def _pipe(files, root, tok, allow=False, **kw):
  tok, ids = tok
  cfg = pipeline.PipelineConfig(**dict(dict(batch_size=2, max_length=MAXLEN,
                                            num_visual_tokens=NV, image_size=SIZE,
                                            read_threads=0), **kw))
  src = sources.LlavaSource(files, root, allow_outside_root=allow)
  return pipeline.make_pipeline(src, tok, cfg, pad_id=ids.pad, process_index=0,
                                process_count=1)


def _next_within(it, seconds=120):
  """next(it) in a thread: a hang fails the test instead of blocking the suite."""
  out = {}

  def run():
    try:
      out["batch"] = next(it)
    except BaseException as e:  # pylint: disable=broad-except
      out["error"] = e
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"no batch and no error within {seconds} s (a hang)"
  return out


@pytest.mark.parametrize("name,reason", [("sharegpt", "bad_roles"),
                                         ("missing_images", "missing_image")])
@pytest.mark.parametrize("num_epochs", [None, 1])
def test_all_unusable_stops_with_an_error_naming_file_and_reasons(zoo, tok, name, reason,
                                                                  num_epochs):
  files, root = zoo
  out = _next_within(_pipe(files[name], root, tok, num_epochs=num_epochs))
  err = out.get("error")
  assert isinstance(err, pipeline.NoUsableData), out
  msg = str(err)
  assert files[name] in msg and reason in msg and "cdx.data.check" in msg
  assert "\n" not in msg
  if name == "sharegpt":
    assert "'user'" in msg and "rename" in msg


def test_lone_surrogates_are_skipped_and_counted(zoo, tok):
  files, root = zoo
  it = _pipe(files["surrogate"], root, tok, num_epochs=1, drop_remainder=False)
  rows = sum(int(b["attention_mask"].any(1).sum()) for b in it)
  assert rows == 2
  assert it.stats["skipped"] == {"bad_text": 2}
  report = check.check_source(sources.LlavaSource(files["surrogate"], root))
  assert report.to_json()["reasons"] == {"bad_text": 2}
  assert "\\ud800" in report.examples["bad_text"] or "\\udc80" in report.examples["bad_text"]


def test_non_utf8_jsonl_line_is_skipped_and_named(zoo, tok):
  files, root = zoo
  src = sources.LlavaSource(files["bad_utf8"], root)
  assert len(src) == 3
  (issue,) = src.issues
  assert issue.reason == "bad_encoding" and issue.where == f"{files['bad_utf8']}:2"
  assert f"{files['bad_utf8']}:2" in issue.message and "\\xe9" in issue.message
  it = _pipe(files["bad_utf8"], root, tok, num_epochs=1, drop_remainder=False)
  assert sum(int(b["attention_mask"].any(1).sum()) for b in it) == 3
  assert it.stats["skipped"] == {"bad_encoding": 1}
  with pytest.raises(ValueError, match=r"bad_utf8\.jsonl:2.*not UTF-8"):
    sources.LlavaSource(files["bad_utf8"], root, strict=True)


def test_non_utf8_json_file_error_names_file_and_line(zoo):
  files, root = zoo
  with pytest.raises(ValueError, match=r"bad_utf8\.json:4: not UTF-8"):
    sources.LlavaSource(files["bad_utf8_json"], root)


def test_byte_order_mark_is_accepted_and_chat_messages_get_a_hint(zoo):
  files, root = zoo
  assert check.check_source(sources.LlavaSource(files["bom"], root)).ok == 2
  report = check.check_source(sources.LlavaSource(files["chat_messages"], root))
  assert dict(report.reasons) == {"bad_roles": 1}
  assert "{from: human|gpt, value}" in report.examples["bad_roles"]


def test_16_bit_png_keeps_its_gradient(zoo, tok):
  files, root = zoo
  path = os.path.join(root, "img", "gray16.png")
  assert Image.open(path).mode.startswith("I;16")
  rgb = np.asarray(images.load_image(path), np.float64)
  want = _gradient16() / 257
  assert np.abs(rgb - want[..., None]).max() <= 0.5 + 1e-9
  assert (rgb == 255).mean() < 0.05
  batch = next(_pipe(files["gray16"], root, tok, num_epochs=1, drop_remainder=False,
                     image_size=64))
  x = batch["pixel_values"][0]
  assert -0.6 < x.mean() < 0.6 and x.min() < -0.9 and x.max() > 0.9


def test_32_bit_and_float_grey_images_are_rescaled(tmp_path):
  grad = _gradient16()
  Image.fromarray(grad.astype(np.int32)).save(tmp_path / "i32.tif")    # mode I
  Image.fromarray((grad / 65535).astype(np.float32)).save(tmp_path / "f.tif")  # mode F
  for name in ("i32.tif", "f.tif"):
    rgb = np.asarray(images.load_image(str(tmp_path / name)), np.float64)[..., 0]
    assert np.abs(rgb - grad / 257).max() <= 1, name


def test_image_paths_leaving_the_root_are_refused_unless_allowed(zoo, tok):
  files, root = zoo
  report = check.check_source(sources.LlavaSource(files["escape"], root))
  assert report.ok == 2 and dict(report.reasons) == {"image_outside_root": 2}
  assert "allow_outside_root" in report.examples["image_outside_root"]
  allowed = check.check_source(sources.LlavaSource(files["escape"], root,
                                                   allow_outside_root=True))
  assert allowed.ok == 4 and not allowed.reasons
  it = _pipe(files["escape"], root, tok, num_epochs=1, drop_remainder=False)
  list(it)
  assert it.stats["skipped"] == {"image_outside_root": 2} and it.stats["ok"] == 2


@pytest.mark.parametrize("name", ["sharegpt", "missing_images", "surrogate", "bad_utf8",
                                  "bad_utf8_json", "bom", "chat_messages", "gray16",
                                  "escape"])
def test_checker_cli_reports_every_zoo_file_without_a_traceback(zoo, name):
  files, root = zoo
  for extra in ([], ["--json"]):
    proc = subprocess.run([sys.executable, "-m", "cdx.data.check", files[name],
                           "--image-root", root, *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    if name == "bad_utf8_json":
      assert proc.returncode == 1 and files[name] in proc.stderr
      continue
    assert proc.returncode == 0, proc.stderr
    if extra:
      report = json.loads(proc.stdout)
      assert report["total"] == report["ok"] + report["bad"]


def test_skip_lines_warn_above_five_percent():
  per_process = [{"seen": 60, "ok": 58, "skipped": {"bad_roles": 2}, "warnings": {}},
                 {"seen": 40, "ok": 37, "skipped": {"bad_roles": 1, "missing_image": 2},
                  "warnings": {"truncated": 4}}]
  report = pipeline.merge_stats(per_process)
  assert report == {"total": 100, "ok": 95, "bad": 5,
                    "reasons": {"bad_roles": 3, "missing_image": 2},
                    "warnings": {"truncated": 4}}
  (line,) = pipeline.skip_lines(report, "sft")  # exactly 5 %: no warning
  assert line.startswith("[sft] data: 100 samples, 95 ok, 5 skipped (5.0%)")
  assert "bad_roles 3, missing_image 2" in line and "truncated 4" in line
  report = pipeline.merge_stats(per_process + [{"seen": 10, "ok": 9, "skipped":
                                                {"bad_text": 1}, "warnings": {}}])
  lines = pipeline.skip_lines(report, "dft")
  assert len(lines) == 2 and lines[1].startswith("[dft] WARNING: 5.5% of the training")
