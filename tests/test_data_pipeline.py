"""LLaVA sources, the grain pipeline and the checker: batches, determinism, state, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cdx.data import check
from cdx.data import pipeline
from cdx.data import sources
from cdx.data import templates
from cdx.data import tokenizer as tok_lib
from cdx.data.templates import IGNORE, SampleError

NV, SIZE, MAXLEN = 4, 16, 192
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  tok_lib.build_tokenizer(["What is shape number 7?", "It is a red cube.", "sample"], path,
                          vocab_size=320)
  return tok_lib.load_tokenizer(path)


def _png(path, colour):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (10, 7), colour).save(path)


def _sample(i, image=True):
  q = f"What is shape number {i}?"
  rec = {"id": f"s{i}", "conversations": [
      {"from": "human", "value": ("<image>\n" if image else "") + q},
      {"from": "gpt", "value": f"It is sample {i}."}]}
  if image:
    rec["image"] = f"img/{i}.png"
  return rec


def _write_jsonl(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """13 samples (every third text-only) in a JSONL file, images under root."""
  root = tmp_path_factory.mktemp("good")
  recs = [_sample(i, image=i % 3 != 0) for i in range(13)]
  for i, r in enumerate(recs):
    if "image" in r:
      _png(str(root / r["image"]), (i * 19 % 256, 40, 200))
  _write_jsonl(str(root / "data.jsonl"), recs)
  return str(root / "data.jsonl"), str(root)


def _iter(path, root, tok, **kw):
  tok, ids = tok
  pkw = {k: kw.pop(k) for k in ("process_index", "process_count") if k in kw}
  cfg = pipeline.PipelineConfig(**dict(dict(batch_size=4, max_length=MAXLEN,
                                            num_visual_tokens=NV, image_size=SIZE,
                                            read_threads=0), **kw))
  src = sources.LlavaSource(path, root)
  return pipeline.make_pipeline(src, tok, cfg, pad_id=ids.pad, **pkw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _rows(batches):
  """Each real row as a hashable tuple of its ids."""
  return [tuple(b["input_ids"][r][b["attention_mask"][r] == 1])
          for b in batches for r in range(len(b["input_ids"])) if b["attention_mask"][r].any()]


def test_batch_format(good, tok):
  path, root = good
  (batch,) = _take(_iter(path, root, tok), 1)
  _, ids = tok
  assert batch["input_ids"].shape == (4, MAXLEN) and batch["input_ids"].dtype == np.int32
  assert batch["labels"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
  assert batch["pixel_values"].shape == (4, SIZE, SIZE, 3)
  assert batch["pixel_values"].dtype == np.float32 and batch["has_image"].dtype == bool
  for r in range(4):
    m = batch["attention_mask"][r]
    n = int(m.sum())
    assert (m[:n] == 1).all() and (m[n:] == 0).all()  # right padding
    assert (batch["input_ids"][r, n:] == ids.pad).all()
    assert (batch["labels"][r, n:] == IGNORE).all() and (batch["labels"][r, :n] != IGNORE).any()
    n_img = int((batch["input_ids"][r] == ids.image).sum())
    assert n_img == (NV if batch["has_image"][r] else 0)
    assert batch["pixel_values"][r].any() == batch["has_image"][r]


def test_same_seed_same_batches_and_epochs_reshuffle(good, tok):
  path, root = good
  a = _take(_iter(path, root, tok, seed=3), 3)
  b = _take(_iter(path, root, tok, seed=3), 3)
  c = _take(_iter(path, root, tok, seed=4), 3)
  for x, y in zip(a, b):
    for k in x:
      assert np.array_equal(x[k], y[k])
  assert _rows(a) != _rows(c)
  two = _rows(_take(_iter(path, root, tok, seed=3, batch_size=13, num_epochs=2), 2))
  assert sorted(two[:13]) == sorted(two[13:]) and two[:13] != two[13:]


@pytest.mark.parametrize("threads", [0, 2])
def test_state_restores_exact_next_batches(good, tok, threads):
  path, root = good
  it = _iter(path, root, tok, seed=1, read_threads=threads)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
  expected = _take(it, 4)  # crosses the epoch boundary (13 samples, batches of 4)
  resumed = _iter(path, root, tok, seed=1, read_threads=threads)
  resumed.set_state(state)
  got = _take(resumed, 4)
  for x, y in zip(expected, got):
    for k in x:
      assert np.array_equal(x[k], y[k]), k
  assert resumed.stats == it.stats


def test_two_processes_see_disjoint_covering_slices(good, tok):
  path, root = good
  kw = dict(seed=5, num_epochs=1, drop_remainder=False)
  whole = _rows(list(_iter(path, root, tok, **kw)))
  p0 = _rows(list(_iter(path, root, tok, process_index=0, process_count=2, **kw)))
  p1 = _rows(list(_iter(path, root, tok, process_index=1, process_count=2, **kw)))
  assert len(whole) == 13 == len(set(whole))
  assert not set(p0) & set(p1)
  assert sorted(p0 + p1) == sorted(whole)
  with pytest.raises(ValueError, match="process_index"):
    _iter(path, root, tok, process_index=2, process_count=2)


def test_weighted_mix_is_deterministic(good, tmp_path):
  path, root = good
  other = str(tmp_path / "other.json")
  with open(other, "w") as f:
    json.dump([_sample(100 + i, image=False) for i in range(10)], f)
  mix = sources.LlavaSource([path, other], root, weights=[2, 0.5], seed=0)
  assert len(mix) == 2 * 13 + 5
  ids = [mix[i]["record"]["id"] for i in range(len(mix))]
  assert all(ids.count(f"s{i}") == 2 for i in range(13))
  assert len(set(ids[26:])) == 5 and all(i.startswith("s1") for i in ids[26:])
  again = sources.LlavaSource([path, other], root, weights=[2, 0.5], seed=0)
  assert ids == [again[i]["record"]["id"] for i in range(len(again))]
  assert mix[26]["where"].startswith(other + "#")
  with pytest.raises(ValueError, match="weights"):
    sources.LlavaSource([path, other], root, weights=[1])
  not_list = str(tmp_path / "obj.json")
  with open(not_list, "w") as f:
    json.dump({"id": 1}, f)
  with pytest.raises(ValueError, match="expected a list"):
    sources.LlavaSource(not_list, root)
  with pytest.raises(ValueError, match="does not exist"):
    sources.LlavaSource(str(tmp_path / "none.jsonl"), root)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
  """A JSONL file with every bad-input kind, and the counts each should get."""
  root = tmp_path_factory.mktemp("bad")
  _png(str(root / "img/ok.png"), (1, 2, 3))
  (root / "img/corrupt.png").write_bytes(b"not a png at all")
  lines = [
      _sample(0, image=False), _sample(1, image=False),                    # ok
      dict(_sample(2), image="img/ok.png"),                                # ok
      '{"id": "broken", "conversations": [',                               # bad_json
      '["not", "an", "object"]',                                           # bad_record
      {"id": "r", "conversations": [{"from": "gpt", "value": "a"},
                                    {"from": "human", "value": "b"}]},     # bad_roles
      {"id": "r2", "conversations": [{"from": "human", "value": "b"}]},    # bad_roles
      {"id": "e", "conversations": [{"from": "human", "value": "q"},
                                    {"from": "gpt", "value": ""}]},        # empty_answer
      {"id": "m", "image": "img/ok.png", "conversations": [
          {"from": "human", "value": "<image> a <image>"},
          {"from": "gpt", "value": "x"}]},                                 # multiple_image_tokens
      dict(_sample(3), image="img/missing.png"),                           # missing_image
      dict(_sample(4), image="img/corrupt.png"),                           # corrupt_image
      {"id": "p", "image": "img/ok.png", "conversations": [
          {"from": "human", "value": "no placeholder here"},
          {"from": "gpt", "value": "fine"}]},                              # ok, placeholder_inserted
      {"id": "w", "conversations": [{"from": "human", "value": "<image> q"},
                                    {"from": "gpt", "value": "a"}]},       # placeholder_without_image
      {"id": "l", "image": ["a.png", "b.png"], "conversations": [
          {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},  # bad_image_field
      {"id": "long", "conversations": [{"from": "human", "value": "q"},
                                       {"from": "gpt", "value": "sample " * 200}]},  # truncated
  ]
  path = str(root / "bad.jsonl")
  _write_jsonl(path, lines)
  reasons = {"bad_json": 1, "bad_record": 1, "bad_roles": 2, "empty_answer": 1,
             "multiple_image_tokens": 1, "missing_image": 1, "corrupt_image": 1,
             "placeholder_without_image": 1, "bad_image_field": 1}
  warnings = {"placeholder_inserted": 1, "truncated": 1}
  return path, str(root), reasons, warnings, len(lines)


def test_checker_and_pipeline_agree_on_bad_input(bad, tok, tmp_path, capsys):
  path, root, reasons, warnings, total = bad
  tok_dir = tmp_path / "tok"
  tok[0].save_pretrained(str(tok_dir))
  argv = [path, "--image-root", root, "--tokenizer", str(tok_dir), "--max-length",
          str(MAXLEN), "--num-visual-tokens", str(NV)]
  assert check.main(argv + ["--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report == {"total": total, "ok": total - sum(reasons.values()),
                    "bad": sum(reasons.values()), "reasons": reasons, "warnings": warnings}
  it = _iter(path, root, tok, num_epochs=1, drop_remainder=False, batch_size=2)
  n_rows = len(_rows(list(it)))
  assert it.stats == {"seen": total, "ok": report["ok"], "skipped": reasons,
                      "warnings": warnings}
  assert n_rows == report["ok"]
  # The readable report names a location for each problem.
  assert check.main(argv) == 0
  text = capsys.readouterr().out
  assert f"{path}:4" in text and "id='r'" in text and "missing.png" in text


def test_strict_mode_names_file_line_and_field(bad, tok, capsys):
  path, root, *_ = bad
  with pytest.raises(SampleError, match=r"bad\.jsonl:4"):
    _iter(path, root, tok, strict=True)
  with open(path) as f:
    good_lines = f.readlines()[:3]
  strict_file = path.replace("bad.jsonl", "strict.jsonl")
  with open(strict_file, "w") as f:
    f.writelines(good_lines + [json.dumps(
        {"id": "r", "conversations": [{"from": "gpt", "value": "a"}]}) + "\n"])
  it = _iter(strict_file, root, tok, strict=True, num_epochs=1, shuffle=False, batch_size=1)
  with pytest.raises(SampleError, match=r"strict\.jsonl:4 \(id='r'\): field 'conversations'"):
    list(it)
  assert check.main([strict_file, "--image-root", root, "--strict"]) == 1
  assert "strict.jsonl:4" in capsys.readouterr().err


def test_image_block_that_cannot_fit_is_skipped(good, tok):
  path, root = good
  conv = templates.conversation_from_llava(_sample(1)["conversations"], True)
  start = templates.encode(conv, tok[0], "qwen2_base", NV)["image_start"]
  nv = MAXLEN - start + 1  # the image block ends one token past max_length
  it = _iter(path, root, tok, num_visual_tokens=nv, num_epochs=1, drop_remainder=False)
  rows = _rows(list(it))
  assert it.stats["skipped"] == {"image_block_truncated": 8}
  assert len(rows) == 5 and it.stats["ok"] == 5


def test_cli_prints_one_json_object(bad):
  path, root, reasons, _, total = bad
  out = subprocess.run([sys.executable, "-m", "cdx.data.check", path, "--image-root", root,
                        "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
  report = json.loads(out.stdout)
  assert report["total"] == total and report["reasons"] == reasons

