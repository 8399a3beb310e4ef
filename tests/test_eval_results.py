"""cdx.eval.protocols and cdx.eval.results without a model: likelihood protocols on fake
log-probs, unit extraction, the resume log and the results table."""
import json
import math

import pytest

from cdx.eval import protocols
from cdx.eval import results
from cdx.eval import run
from cdx.eval import scoring


def _sc(n, subset="swap_obj", benchmark="sugarcrepe", **extra):
  return {"uid": f"{benchmark}/{subset}/{n}", "id": str(n), "benchmark": benchmark,
          "subset": subset, "source": "f.json", "image": f"im{n}.jpg",
          "positive": f"pos {n}", "negative": f"neg {n}", **extra}


def _pair(n):
  return {"uid": f"winoground/{n}", "id": str(n), "benchmark": "winoground", "subset": None,
          "source": "w.jsonl", "image_0": f"a{n}.png", "image_1": f"b{n}.png",
          "caption_0": f"cap0 {n}", "caption_1": f"cap1 {n}"}


def test_option_likelihood_answers_by_the_likelier_letter():
  seen = []

  def logprob(units):   # always prefers " A"; ties on item 1
    seen.extend(units)
    return [[-1.0, -1.0] if u["id"] == "1" else [-0.5, -2.0] for u in units]
  r = protocols.sugarcrepe_option_likelihood([_sc(0), _sc(1)], logprob)
  assert r["protocol"] == "sugarcrepe/option_likelihood"
  assert all(u["options"] == [" A", " B"] for u in seen) and len(seen) == 4
  assert seen[0]["prompt"] == scoring.sugarcrepe_question("pos 0", "neg 0")
  # Item 0: right as (A), wrong as (B); item 1: a tie answers nothing.
  assert r["by_order"] == {"pos_first": 0.5, "pos_second": 0.0}
  assert r["overall"] == 0.25 and r["unparsed"] == 2


def test_caption_likelihood_sugarcrepe_and_pp():
  def logprob(units):   # log P = minus the caption length in characters
    assert all(u["prompt"] == protocols.CAPTION_PROMPT for u in units)
    return [[-float(len(u["options"][0]))] for u in units]
  items = [_sc(0, negative="a much longer negative"), _sc(1, positive="a very long positive"),
           _sc(2, "add_obj")]
  r = protocols.caption_likelihood(items, logprob)
  assert r["subsets"] == {"swap_obj": 0.5, "add_obj": 0.0} and r["overall"] == 0.25
  assert r["protocol"] == "sugarcrepe/caption_likelihood"
  pp = [_sc(0, "swap_object", "sugarcrepe_pp", positive2="p2", negative="long negative"),
        _sc(1, "swap_object", "sugarcrepe_pp", positive2="a long second positive")]
  r = protocols.caption_likelihood(pp, logprob)
  assert r["subsets"] == {"swap_object": 0.5}   # item 1: its second positive loses
  assert r["protocol"] == "sugarcrepe_pp/caption_likelihood"


def test_paired_p_yes_and_caption():
  def p_yes(units):   # each image "says yes" to its own caption only
    assert all(u["options"] == [" Yes"] for u in units)
    return [[math.log(0.9 if u["image"][0] == "ab"[int(u["caption"][3])] else 0.1)]
            for u in units]
  r = protocols.paired_p_yes([_pair(0), _pair(1)], p_yes)
  assert (r["text"], r["image"], r["group"]) == (1.0, 1.0, 1.0)
  assert r["protocol"] == "paired/p_yes"
  assert r["records"][0]["scores"][0][0] == pytest.approx(0.9)
  r = protocols.paired_caption([_pair(0)], lambda units: [[0.0] for _ in units])
  assert r["group"] == 0.0 and r["protocol"] == "paired/caption_likelihood"  # ties fail


def test_units_of_each_task():
  sc, pair = _sc(0), _pair(0)
  vqa = {"uid": "gqa/1", "id": "1", "benchmark": "gqa", "subset": None, "source": "q.json",
         "image": "i.jpg", "prompt": "Q?", "answer": "yes"}
  assert len(results.units_of(protocols.tasks("sugarcrepe")["generate"], sc)) == 2
  assert len(results.units_of(protocols.tasks("sugarcrepe")["caption"], sc)) == 2
  assert len(results.units_of(protocols.tasks("winoground")["likelihood"], pair)) == 4
  assert results.units_of(protocols.tasks("gqa")["generate"], vqa)[0]["prompt"] == "Q?"
  with pytest.raises(ValueError, match="no protocols"):
    protocols.tasks("sade")


def test_take_limits_each_subset():
  items = [_sc(n, s) for s in ("swap_obj", "add_obj") for n in range(3)]
  assert [it["uid"] for it in results.take(items, 1)] == [
      "sugarcrepe/swap_obj/0", "sugarcrepe/add_obj/0"]
  assert results.take(items, None) == items


def test_resume_log(tmp_path):
  path = str(tmp_path / "x.generate.jsonl")
  settings = {"model": "m", "protocol": "generate"}
  assert results.read_log(path, settings) == {}
  with open(path, "a") as f:
    f.write(json.dumps({"uid": "a", "outputs": ["r"]}) + "\n" + '{"uid": "b", "outp')
  assert results.read_log(path, settings) == {"a": ["r"]}   # torn line cut off
  with open(path) as f:
    assert f.read().endswith('["r"]}\n')
  with pytest.raises(ValueError, match="other settings.*--fresh"):
    results.read_log(path, {**settings, "model": "other"})
  assert results.read_log(path, {**settings, "model": "other"}, fresh=True) == {}


def test_table_averages():
  full = {("vqav2", "generate"): 80.0, ("vizwiz", "generate"): 50.0,
          ("gqa", "generate"): 60.0, ("textvqa_ocr", "generate"): 55.0,
          ("mme", "generate"): 1500.0, ("pope", "generate"): 85.0,
          ("sugarcrepe", "generate"): 85.0, ("sugarcrepe", "likelihood"): 10.0,
          ("bivlc", "likelihood"): 40.0, ("winoground", "likelihood"): 30.0}
  partial = {k: v for k, v in full.items() if k[0] not in ("vizwiz", "winoground")}
  table = results.markdown_table({"a": full, "b": partial})
  head, _, row_a, row_b = table.strip().split("\n")
  cols = [c.strip() for c in head.strip("|").split("|")]
  assert cols[-2:] == ["VQA avg", "CR avg"] and "sugarcrepe (likelihood)" in cols
  assert "sugarcrepe" in cols and "SADE" not in table
  a = dict(zip(cols, [c.strip() for c in row_a.strip("|").split("|")]))
  b = dict(zip(cols, [c.strip() for c in row_b.strip("|").split("|")]))
  # (80 + 50 + 60 + 55 + 1500 / 2000 * 100) / 5 and (85 + 40 + 30) / 3.
  assert a["VQA avg"] == "64.0" and a["CR avg"] == "51.7"
  assert b["VQA avg"] == "67.5 (4/5)" and b["CR avg"] == "62.5 (2/3)"
  assert b["vizwiz"] == "—" and a["mme"] == "1500.0"


def test_entry_points_check_limit_and_batch_size():
  """Both evaluate_* entry points refuse bad sizes before touching the model or data."""
  with pytest.raises(ValueError, match=r"limit=0 must be >= 1 \(or None"):
    results.evaluate_benchmark(None, None, ["option_likelihood"], "/nowhere", limit=0)
  with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
    run.evaluate_synthetic(None, "/nowhere", batch_size=0)
