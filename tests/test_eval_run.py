"""cdx.eval.run + launch/eval.py on a tiny random model and a tiny synthetic export."""
import json
import math
import os

import jax
import numpy as np
import pytest

from cdx import checkpoint as ckpt_lib
from cdx import hf
from cdx.data import images as images_lib
from cdx.data import templates
from cdx.data import tokenizer as tokenizer_lib
from cdx.data.synthetic import export
from cdx.eval import generate as gen
from cdx.eval import run
from cdx.eval import scoring
from cdx.models import mllm
from launch import eval as eval_cli


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
  """workdir/{data (synthetic export), tiny (a stage dir: final/ + model.json)}."""
  work = tmp_path_factory.mktemp("work")
  tok_dir = export.ensure(str(work / "data"), num_train=8, seed=0, vocab_size=1024,
                          num_eval=2)
  tok, ids = tokenizer_lib.load_tokenizer(tok_dir)
  cfg = mllm.make_config(
      dict(image_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=2,
           mlp_dim=64),
      dict(vocab_size=1024, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
           head_dim=16, mlp_dim=64, rope_theta=10000.0),
      image_token_id=ids.image, pad_token_id=ids.pad, eos_token_id=ids.eos)
  params = mllm.init_params(cfg, jax.random.key(0))
  stage_dir = work / "tiny"
  ckpt_lib.save_params(str(stage_dir / "final"), params)
  with open(stage_dir / "model.json", "w") as f:
    json.dump({"config": mllm.config_to_dict(cfg), "template": "qwen2_base",
               "tokenizer": tokenizer_lib.fingerprint(tok)}, f)
  return dict(work=work, dir=str(stage_dir), data=str(work / "data"), cfg=cfg,
              params=params, tok=tok, ids=ids)


def _leaves(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


@pytest.mark.slow
def test_cli_writes_every_metric(stage, capsys):
  out = str(stage["work"] / "eval.json")
  assert eval_cli.main([f"--model={stage['dir']}", "--limit=1", f"--out={out}",
                        "--batch_size=4"]) == 0
  with open(out) as f:
    results = json.load(f)
  for split in ("seen", "heldout"):
    r = results[split]
    assert set(r) == {"sugarcrepe", "vqa", "winoground"}
    assert set(r["sugarcrepe"]["subsets"]) == set(scoring.SUGARCREPE_SUBSETS)
    assert "overall" in r["sugarcrepe"] and "accuracy" in r["vqa"]
    assert set(r["winoground"]) == {"text", "image", "group"}
    for name, value in _leaves(r):
      assert isinstance(value, float) and 0.0 <= value <= 1.0, (split, name, value)
    assert results["details"][split]["sugarcrepe"]["missing_subsets"] == []
  # 7 SugarCrepe files + vqa + winoground per split, each named with its hash.
  assert len(results["sources"]) == 18 and all("sha1" in s for s in results["sources"])
  assert results["settings"]["limit"] == 1 and results["settings"]["max_new_tokens"] == 32
  assert "records" not in results
  printed = capsys.readouterr().out
  assert "heldout" in printed and out in printed


def _items(stage, n):
  sets = run.benchmarks.read_synthetic(os.path.join(stage["data"], "eval"))
  return sets["vqa"][:n]


def _model(stage):
  return run.load_model(stage["dir"], data_dir=stage["data"])


def _prompt(model, item):
  """ids, mask [1, L] and pixels [1, H, W, 3] of one item, unpadded."""
  ids = templates.encode_prompt(item["prompt"], model.tokenizer, model.template,
                                mllm.num_visual_tokens(model.cfg))["input_ids"][None]
  pixels = images_lib.preprocess(images_lib.load_image(item["image"]),
                                 model.cfg.vision.image_size)[None]
  return ids, np.ones_like(ids), pixels


@pytest.mark.slow
def test_generate_batches_do_not_change_replies(stage):
  model, items = _model(stage), _items(stage, 2)
  items = items + [dict(items[0], prompt="What is it?")]  # a shorter prompt in the batch
  one = run.make_generate(model, batch_size=1, max_new_tokens=5)(items)
  batched = run.make_generate(model, batch_size=2, max_new_tokens=5)(items)  # pads a row
  assert one == batched and len(one) == 3 and all(isinstance(r, str) for r in one)
  # The reply is the tokenizer's decoding of gen.generate on the same prompt.
  ids, mask, pixels = _prompt(model, items[0])
  tokens, lengths = gen.generate(model.cfg, model.params, ids, mask, pixels, 5,
                                 model.ids.eos, model.ids.pad)
  want = model.tokenizer.decode(np.asarray(tokens)[0, :int(lengths[0])].tolist(),
                                skip_special_tokens=True).strip()
  assert one[0] == want


def test_score_is_probability_of_yes(stage):
  model = _model(stage)
  items = [dict(it, prompt=scoring.yes_no_prompt("a red circle")) for it in _items(stage, 2)]
  one = run.make_score(model, batch_size=1)(items)
  batched = run.make_score(model, batch_size=4)(items)
  np.testing.assert_allclose(one, batched, rtol=1e-4)
  assert all(0.0 < p < 1.0 for p in one)
  yes = model.tokenizer(run.YES, add_special_tokens=False)["input_ids"]
  no = model.tokenizer(" No", add_special_tokens=False)["input_ids"]
  ids, mask, pixels = _prompt(model, items[0])
  logp = np.asarray(gen.score_options(model.cfg, model.params, ids, mask, pixels, [yes, no],
                                      pad_id=model.ids.pad))
  assert math.isclose(one[0], float(np.exp(logp[0, 0])), rel_tol=1e-4)
  assert np.exp(logp[0]).sum() <= 1.0 + 1e-6  # two disjoint answers of one distribution


@pytest.mark.slow
def test_hf_dir_gives_the_same_replies(stage, tmp_path):
  hf_dir = str(tmp_path / "hf")
  hf.save_llava(stage["cfg"], stage["params"], hf_dir)
  stage["tok"].save_pretrained(hf_dir)
  items = _items(stage, 1)
  a = run.make_generate(_model(stage), 1, 5)(items)
  b = run.make_generate(run.load_model(hf_dir), 1, 5)(items)
  assert a == b


def test_errors(stage, tmp_path, capsys):
  with pytest.raises(ValueError, match="neither model.json"):
    run.load_model(str(tmp_path), tokenizer=os.path.join(stage["data"], "tokenizer"))
  with pytest.raises(ValueError, match="no tokenizer"):
    run.load_model(str(tmp_path))
  bad = tmp_path / "bad"
  bad.mkdir()
  with open(os.path.join(stage["dir"], "model.json")) as f:
    info = json.load(f)
  with open(bad / "model.json", "w") as f:
    json.dump({**info, "tokenizer": "0123456789abcdef"}, f)
  with pytest.raises(ValueError, match="fingerprint"):
    run.load_model(str(bad), data_dir=stage["data"])
  with pytest.raises(ValueError, match="no eval/"):
    run.evaluate_synthetic(_model(stage), str(tmp_path))
  assert eval_cli.main([f"--model={tmp_path}", f"--data={stage['data']}"]) == 2
  assert "neither model.json" in capsys.readouterr().err


def _numbers_close(a, b, path=""):
  """a == b, floats to 1e-5 relative (a resumed run batches its prompts differently)."""
  if isinstance(a, float) and isinstance(b, float):
    assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (path, a, b)
  elif isinstance(a, dict):
    assert a.keys() == b.keys(), path
    for k in a:
      _numbers_close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for n, (x, y) in enumerate(zip(a, b)):
      _numbers_close(x, y, f"{path}[{n}]")
  else:
    assert a == b, (path, a, b)


def _bench_argv(stage, out, limit, extra=()):
  return [f"--model={stage['dir']}", "--benchmark=synthetic_sugarcrepe,synthetic_paired",
          f"--data=synthetic={os.path.join(stage['data'], 'eval')}", f"--limit={limit}",
          "--protocol=generate,likelihood", "--batch_size=2", "--max_new_tokens=4",
          f"--out={out}", "--name=tiny", "--no_progress", *extra]


@pytest.mark.slow
def test_benchmark_cli_resumes_to_the_uninterrupted_result(stage, tmp_path, monkeypatch,
                                                           capsys):
  from cdx.eval import results
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  assert eval_cli.main(_bench_argv(stage, whole, 2)) == 0
  printed = capsys.readouterr().out
  assert "sugarcrepe/compodistill" in printed and "paired/p_yes" in printed
  # A smaller run first, then a bigger one that dies after two chunks of 2 items ...
  assert eval_cli.main(_bench_argv(stage, resumed, 1)) == 0
  monkeypatch.setattr(results, "CHUNK_BATCHES", 1)
  make_generate, calls = run.make_generate, []

  def dying(*args, **kw):
    generate = make_generate(*args, **kw)

    def call(units):
      calls.append(len(units))
      if len(calls) == 3:
        raise RuntimeError("killed")
      return generate(units)
    return call
  monkeypatch.setattr(run, "make_generate", dying)
  with pytest.raises(RuntimeError, match="killed"):
    eval_cli.main(_bench_argv(stage, resumed, 2))
  log = os.path.join(resumed, "tiny", "synthetic_sugarcrepe.generate.jsonl")
  with open(log) as f:
    assert len(f.read().splitlines()) == 1 + 7 + 2 * 2   # settings, limit=1, two chunks
  # ... and a rerun finishes only the rest, giving what the uninterrupted run gave.
  monkeypatch.setattr(run, "make_generate", make_generate)
  calls.clear()
  assert eval_cli.main(_bench_argv(stage, resumed, 2)) == 0
  for bench in ("synthetic_sugarcrepe", "synthetic_paired"):
    with open(os.path.join(whole, "tiny", f"{bench}.json")) as f:
      a = json.load(f)
    with open(os.path.join(resumed, "tiny", f"{bench}.json")) as f:
      b = json.load(f)
    for key in ("protocols", "headline", "records", "fingerprint", "unsupported"):
      _numbers_close(a[key], b[key], f"{bench}.{key}")
  with open(os.path.join(whole, "tiny", "synthetic_sugarcrepe.json")) as f:
    sc = json.load(f)
  assert set(sc["protocols"]) == {"generate", "likelihood"}
  assert sc["protocols"]["likelihood"]["protocol"] == "sugarcrepe/option_likelihood"
  assert len(sc["records"]) == 14 and all(
      set(r) == {"generate", "likelihood"} for r in sc["records"].values())
  rec = sc["records"]["synthetic_sugarcrepe/swap_obj/0"]
  assert len(rec["generate"]["outputs"]) == 2 and len(rec["likelihood"]["outputs"][0]) == 2
  s = sc["settings"]
  assert (s["batch_size"], s["max_new_tokens"], s["dtype"], s["model"]) == (
      2, 4, "float32", os.path.abspath(stage["dir"]))
  assert sc["fingerprint"]["sha1"] and sc["unsupported"] == []
  with open(os.path.join(whole, "table.md")) as f:
    table = f.read()
  assert table.splitlines()[0].startswith("| model | synthetic_sugarcrepe |")
  assert "| tiny |" in table and "CR avg" in table
  assert os.path.isfile(os.path.join(whole, "tiny", "table.md"))
  # Other settings are refused unless --fresh.
  assert eval_cli.main(_bench_argv(stage, whole, 2, ["--max_new_tokens=5"])) == 2
  assert "--fresh" in capsys.readouterr().err


def _png(path, seed):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), np.uint8)).save(
      path)


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


@pytest.mark.slow
def test_benchmark_cli_on_public_layouts(stage, tmp_path):
  """SugarCrepe (GitHub JSON + COCO), POPE (3 splits) and MME in their public layouts."""
  sc, pope, mme = str(tmp_path / "sc"), str(tmp_path / "pope"), str(tmp_path / "mme")
  _write(os.path.join(sc, "swap_obj.json"), json.dumps(
      {"0": {"filename": "1.jpg", "caption": "a cat on a mat",
             "negative_caption": "a mat on a cat"}}))
  _png(os.path.join(tmp_path, "coco", "1.jpg"), 1)
  for split in ("random", "popular", "adversarial"):
    _write(os.path.join(pope, f"coco_pope_{split}.json"), "\n".join(json.dumps(
        {"question_id": q, "image": "2.jpg", "text": "Is there a dog in the image?",
         "label": label}) for q, label in ((1, "yes"), (2, "no"))) + "\n")
  _png(os.path.join(pope, "val2014", "2.jpg"), 2)
  task = os.path.join(mme, "existence")
  _write(os.path.join(task, "6040.txt"), "Is there a train? Please answer yes or no.\tYes\n"
         "Is there a bed? Please answer yes or no.\tNo\n")
  _png(os.path.join(task, "6040.jpg"), 3)
  out = str(tmp_path / "results")
  assert eval_cli.main([
      f"--model={stage['dir']}", "--benchmark=sugarcrepe,pope,mme",
      f"--data=sugarcrepe={sc}", f"--data=sugarcrepe_images={tmp_path / 'coco'}",
      f"--data=pope={pope}", f"--data=mme={mme}",
      f"--tokenizer={os.path.join(stage['data'], 'tokenizer')}", "--max_new_tokens=3",
      f"--out={out}", "--no_progress"]) == 0
  with open(os.path.join(out, "tiny", "pope.json")) as f:
    r = json.load(f)
  assert set(r["protocols"]) == {"generate"} and r["unsupported"] == []
  assert set(r["protocols"]["generate"]["splits"]) == {"random", "popular", "adversarial"}
  assert set(r["records"]) == {f"pope/{s}/{q}" for s in ("random", "popular", "adversarial")
                               for q in (1, 2)}
  rec = r["records"]["pope/popular/2"]["generate"]
  assert rec["records"][0]["answer"] == "no" and rec["records"][0]["reply"] == \
      rec["outputs"][0]
  with open(os.path.join(out, "tiny", "mme.json")) as f:
    assert "existence" in json.load(f)["protocols"]["generate"]["subtasks"]
  with open(os.path.join(out, "table.md")) as f:
    head, _, row = f.read().strip().split("\n")
  cols = [c.strip() for c in head.strip("|").split("|")]
  cells = dict(zip(cols, [c.strip() for c in row.strip("|").split("|")]))
  assert cols == ["model", "mme", "pope", "sugarcrepe", "sugarcrepe (likelihood)",
                  "VQA avg", "CR avg"]
  assert cells["VQA avg"].endswith("(1/5)") and cells["CR avg"].endswith("(1/3)")


@pytest.mark.slow
def test_bench_reports_items_per_second(stage, capsys):
  assert eval_cli.main([f"--model={stage['dir']}", "--bench=1,2", "--limit=2",
                        "--max_new_tokens=3"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["items"] == 2 and report["same_replies"] is True
  one, two = report["batch_sizes"]["1"], report["batch_sizes"]["2"]
  assert one["speedup"] == 1.0 and one["items_per_s"] > 0 and two["items_per_s"] > 0
  assert 0 < one["prompt_seconds"] and 0 < two["seconds"]
