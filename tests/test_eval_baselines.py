"""Text-only baselines and blind copies of the synthetic CR sets (cdx/eval/baselines.py)."""
import json
import math
import os

import numpy as np
from PIL import Image
import pytest

from cdx.data.synthetic import export
from cdx.data.synthetic import text
from cdx.data.synthetic import world
from cdx.eval import baselines
from cdx.eval import benchmarks

HELD_PHRASES = [f"{c} {s}" for c, s in world.heldout_combos()]


def test_heuristics_find_a_length_shortcut_and_score_ties_half():
  # The old add_obj: the negative is the positive plus a false object.
  items = [{"positive": "a red circle", "negative": "a red circle and a blue star"},
           {"positive": "a large green square", "negative": "a large green square and a cross"}]
  h = baselines.make_heuristics()
  assert baselines.item_scores(items, h["shorter"]).tolist() == [1.0, 1.0]
  assert baselines.item_scores(items, h["more_words"]).tolist() == [0.0, 0.0]
  same = [{"positive": "a red star", "negative": "a red star"}]
  assert baselines.item_scores(same, h["longer"]).tolist() == [0.5]
  r = baselines.text_baselines({"add_obj": items}, h)
  assert r["best"]["overall"] == 1.0 and r["best"]["name"] in ("shorter", "fewer_words")


def test_heldout_and_language_model_heuristics():
  h = baselines.make_heuristics(["a red circle", "a blue star and a red circle"],
                                ["yellow circle"])
  items = [{"positive": "a yellow circle", "negative": "a red circle"}]
  assert baselines.item_scores(items, h["names_heldout"]).tolist() == [1.0]
  assert baselines.item_scores(items, h["avoids_heldout"]).tolist() == [0.0]
  assert baselines.item_scores(items, h["lm_likelier"]).tolist() == [0.0]  # unseen bigram
  lm = baselines.BigramLM(["a red circle"])
  assert lm.logprob("a red circle") > lm.logprob("a circle red")


@pytest.mark.parametrize("pool", [text.Pool.seen(), text.Pool.heldout()],
                         ids=["seen", "heldout"])
def test_every_text_heuristic_is_near_chance_on_500_item_sets(pool):
  """Balanced by construction (contrast.py): no heuristic departs from 0.5 by more than
  3.5 binomial SEs of a 500-item set (sqrt(0.25 / 500) = 0.022: +-0.078)."""
  n, seed = 500, 0
  train = []
  for i in range(1500):
    for rec, _ in (text.pretrain_record(i, seed, text.Pool.seen()),
                   text.instruct_record(i, seed, text.Pool.seen())):
      train += [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
  heuristics = baselines.make_heuristics(train, HELD_PHRASES)
  sets = {}
  for subset in text.SUGARCREPE_SUBSETS:
    items = [text.sugarcrepe_item(subset, i, seed, pool, "x")[0] for i in range(n)]
    sets[subset] = [{"positive": it["caption"], "negative": it["negative_caption"]}
                    for it in items]
  r = baselines.text_baselines(sets, heuristics)
  tol = 3.5 * math.sqrt(0.25 / n)
  for name, row in r["heuristics"].items():
    for subset, acc in row["subsets"].items():
      assert abs(acc - 0.5) <= tol, (name, subset, acc)
  assert abs(r["best"]["overall"] - 0.5) <= tol / math.sqrt(len(sets))


def test_blind_copy_and_text_baselines_of_an_export(tmp_path):
  data = str(tmp_path / "data")
  export.export(data, num_train=16, seed=1, num_eval=4, images=True)
  blind = baselines.blind_export(data, str(tmp_path / "blind"))
  img = np.asarray(Image.open(os.path.join(blind, baselines.BLIND_IMAGE)))
  assert img.shape == (64, 64, 3) and (img == world.BACKGROUND).all()
  for sub in ("eval", "eval/heldout"):
    orig = benchmarks.read_synthetic(os.path.join(data, sub))
    sets = benchmarks.read_synthetic(os.path.join(blind, sub))
    assert sets["sugarcrepe"].keys() == orig["sugarcrepe"].keys()
    for subset, items in sets["sugarcrepe"].items():
      assert [it["positive"] for it in items] == [
          it["positive"] for it in orig["sugarcrepe"][subset]]
      assert {os.path.relpath(it["image"], blind) for it in items} == {baselines.BLIND_IMAGE}
    assert {os.path.basename(it["image"]) for it in sets["vqa"]} == {"blind.png"}
  rows = baselines.synthetic_text_baselines(data)
  assert set(rows) == {"seen", "heldout"}
  assert rows["seen"]["n"] == {s: 4 for s in text.SUGARCREPE_SUBSETS}
  assert {"shorter", "names_heldout", "lm_likelier"} <= set(rows["heldout"]["heuristics"])
  json.dumps(rows)  # report-ready
  prior = baselines.vqa_prior(data)
  assert set(prior) == {"seen", "heldout"}
  assert 0.0 <= prior["seen"]["accuracy"] <= 1.0 and prior["seen"]["by_category"]
  assert baselines.question_template("What color is the large circle?" + text.VQA_SUFFIX) \
      == "what color is the <size> <shape>"
  with pytest.raises(ValueError, match="eval/"):
    baselines.blind_export(str(tmp_path), str(tmp_path / "x"))
