"""Export of the synthetic world (LLaVA json + PNG) and its TFDS array_record builder."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from cdx.data.synthetic import export
from cdx.data.synthetic import text
from cdx.data.synthetic import world


def _files(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("world"))
  export.main(["--out", out, "--num-train", "24", "--num-eval", "3", "--seed", "5",
               "--text-only-frac", "0.2", "--num-cr", "3"])
  return out


def test_export_is_byte_identical_for_a_seed(exported, tmp_path):
  again, other = str(tmp_path / "again"), str(tmp_path / "other")
  export.export(again, num_train=24, seed=5, num_eval=3, text_only_frac=0.2)
  export.export(other, num_train=24, seed=6, num_eval=3, text_only_frac=0.2, images=False)
  a, b = _files(exported), _files(again)
  assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
  c = _files(other)
  assert a["pretrain.json"] != c["pretrain.json"]


def _check_conversations(rec):
  conv = rec["conversations"]
  assert conv and len(conv) % 2 == 0
  assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
  assert all(isinstance(t["value"], str) and t["value"] for t in conv)
  assert conv[0]["value"].startswith("<image>") == ("image" in rec)


def _check_image(root, rel, scenes, size=64):
  img = np.asarray(Image.open(os.path.join(root, rel)))
  assert img.shape == (size, size, 3) and img.dtype == np.uint8
  for o in world.Scene.from_json(scenes[rel]).objects:  # scenes.json matches the pixels
    assert tuple(img[world.pixel_of(o, size)]) == world.COLORS[o.color]


def test_export_writes_valid_llava_json_with_existing_images(exported):
  root = exported
  scenes = json.load(open(os.path.join(root, "scenes.json")))
  meta = json.load(open(os.path.join(root, "world.json")))
  assert meta["num_train"] == 24 and len(meta["heldout_combos"]) == len(world.SHAPES)
  pretrain = json.load(open(os.path.join(root, "pretrain.json")))
  instruct = json.load(open(os.path.join(root, "instruct.json")))
  assert len(pretrain) == len(instruct) == 24
  assert len({r["id"] for r in pretrain + instruct}) == 48
  for rec in pretrain:
    _check_conversations(rec)
    assert rec["conversations"][0]["value"] == "<image>"
    _check_image(root, rec["image"], scenes)
  assert any("image" not in r for r in instruct) and any("image" in r for r in instruct)
  for rec in instruct:
    _check_conversations(rec)
    if "image" in rec:
      _check_image(root, rec["image"], scenes)
  for sub in ("eval", "eval/heldout"):
    vqa = json.load(open(os.path.join(root, sub, "vqa.json")))
    assert len(vqa) == 3
    for item in vqa:
      assert item["text"].endswith(text.VQA_SUFFIX) and item["answer"]
      _check_image(root, item["image"], scenes)
    for subset in text.SUGARCREPE_SUBSETS:
      items = json.load(open(os.path.join(root, sub, f"sugarcrepe_{subset}.json")))
      assert sorted(items) == ["0", "1", "2"]
      for item in items.values():
        assert item["caption"] != item["negative_caption"]
        _check_image(root, item["filename"], scenes)
    for item in json.load(open(os.path.join(root, sub, "winoground.json"))):
      _check_image(root, item["image_0"], scenes)
      _check_image(root, item["image_1"], scenes)
  held = {tuple(c) for c in meta["heldout_combos"]}
  for rel, objs in scenes.items():
    combos = {(o["color"], o["shape"]) for o in objs}
    if rel.startswith(("images/pretrain", "images/instruct", "images/eval/")):
      assert not combos & held, rel
    else:  # the second image of a Winoground attribute pair has the held-out pair swapped
      assert rel.startswith("images/eval_heldout/")
      assert combos & held or rel.endswith("_1.png"), rel


def test_export_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="num_train"):
    export.export(str(tmp_path), num_train=0, seed=0)
  with pytest.raises(ValueError, match="text_only_frac"):
    export.export(str(tmp_path), num_train=2, seed=0, text_only_frac=1.5)


def test_tfds_builder_round_trips(tmp_path):
  from cdx.data.synthetic import tfds_builder
  sources = tfds_builder.load(str(tmp_path), num_train=12, seed=3, size=32,
                              text_only_frac=0.3)
  assert sorted(sources) == ["instruct", "pretrain"]
  assert any(p.name.endswith(".array_record-00000-of-00001")
             for p in (tmp_path).rglob("*"))
  pool = text.Pool.seen()
  for split in ("pretrain", "instruct"):
    src = sources[split]
    assert len(src) == 12
    for i in (0, 5, 11):
      ex = src[i]
      make = text.pretrain_record if split == "pretrain" else text.instruct_record
      args = (i, 3, pool) if split == "pretrain" else (i, 3, pool, 0.3)
      rec, scene = make(*args)
      assert ex["id"].decode() == rec["id"]
      assert json.loads(ex["conversations"]) == rec["conversations"]
      assert bool(ex["has_image"]) == (scene is not None)
      want = world.render([scene], 32)[0] if scene is not None else np.zeros((32, 32, 3))
      np.testing.assert_array_equal(ex["image"], want)
  # A second load reuses the prepared files.
  again = tfds_builder.load(str(tmp_path), num_train=12, seed=3, size=32,
                            text_only_frac=0.3)
  assert again["pretrain"][4]["id"] == sources["pretrain"][4]["id"]


def test_export_teaches_the_formats_and_never_on_an_evaluation_caption(tmp_path):
  out = str(tmp_path / "w")
  export.export(out, num_train=120, seed=2, num_eval=3, num_cr=30, images=False)
  meta = json.load(open(os.path.join(out, "world.json")))
  assert meta["num_cr"] == 30 and meta["world_version"] == export.WORLD_VERSION
  evaluated = set()
  for sub in ("eval", "eval/heldout"):
    for subset in text.SUGARCREPE_SUBSETS:
      items = json.load(open(os.path.join(out, sub, f"sugarcrepe_{subset}.json")))
      assert len(items) == 30
      evaluated |= {c for it in items.values() for c in (it["caption"], it["negative_caption"])}
    for it in json.load(open(os.path.join(out, sub, "winoground.json"))):
      evaluated |= {it["caption_0"], it["caption_1"]}
  questions = [t["value"] for rec in json.load(open(os.path.join(out, "instruct.json")))
               for t in rec["conversations"][::2]]
  choice = [q for q in questions if "Which caption best describes the image?" in q]
  yesno = [q for q in questions if q.removeprefix("<image>\n").startswith("Does this figure")]
  assert len(choice) > 10 and len(yesno) > 10
  for q in choice + yesno:
    assert not any(f"(A) {c}\n" in q or f"(B) {c}\n" in q or f'"{c}"' in q for c in evaluated)
