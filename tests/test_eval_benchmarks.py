"""Tests of cdx.eval.benchmarks: every reader on tiny files in its public layout."""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cdx.eval import benchmarks
from cdx.eval import scoring

SUFFIX = "\nAnswer the question using a single word or phrase."


def _write(path, obj, lines=False):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, "w") as f:
    if lines:
      f.write("\n".join(json.dumps(o) for o in obj) + "\n")
    elif isinstance(obj, str):
      f.write(obj)
    else:
      json.dump(obj, f)


def _png(path, seed=0, size=(4, 3)):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)
  Image.fromarray(pixels).save(path)


def _png_bytes(seed):
  buf = io.BytesIO()
  Image.fromarray(np.full((3, 4, 3), seed, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _hf_parquet(path, columns, features):
  """A parquet file as `datasets` writes it: columns + features in the schema metadata."""
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  table = pa.table(columns)
  meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
  pq.write_table(table.replace_schema_metadata(meta), path)


# ----------------------------------------------------------------------------- SugarCrepe

def _sugarcrepe_json(root):
  _write(root / "swap_obj.json", {
      "0": {"filename": "000000000001.jpg", "caption": "a cat on a mat",
            "negative_caption": "a mat on a cat"},
      "7": {"filename": "000000000002.jpg", "caption": "a dog by a car",
            "negative_caption": "a car by a dog"}})
  _write(root / "add_att.json", {"0": {"filename": "000000000001.jpg", "caption": "a cup",
                                       "negative_caption": "a blue cup"}})
  _png(root / "val2017" / "000000000001.jpg", 1)
  _png(root / "val2017" / "000000000002.jpg", 2)


def test_sugarcrepe_github_json_layout(tmp_path):
  root = tmp_path / "sugarcrepe"
  _sugarcrepe_json(root)
  ds = benchmarks.load("sugarcrepe", str(root))
  # Subsets in the canonical order, ids from the file, uid unique across subsets.
  assert [it["uid"] for it in ds.items] == ["sugarcrepe/swap_obj/0", "sugarcrepe/swap_obj/7",
                                            "sugarcrepe/add_att/0"]
  first = ds.items[0]
  assert first["image"] == str(root / "val2017" / "000000000001.jpg")
  assert (first["positive"], first["negative"]) == ("a cat on a mat", "a mat on a cat")
  assert first["benchmark"] == "sugarcrepe" and first["subset"] == "swap_obj"
  assert sorted(ds.by_subset()) == ["add_att", "swap_obj"]
  assert ds.fingerprint["items"] == 3 and ds.fingerprint["skipped"] == 0
  assert len(ds.fingerprint["files"]) == 2
  out = scoring.evaluate_sugarcrepe(ds.by_subset(), lambda ps: [
      "A" if any(f"(A) {c}" in p["prompt"] for c in ("a cat on", "a dog by", "a cup"))
      else "B" for p in ps])
  assert out["overall"] == 1.0


def test_sugarcrepe_missing_image_error_or_skip(tmp_path):
  root = tmp_path / "sugarcrepe"
  _sugarcrepe_json(root)
  os.remove(root / "val2017" / "000000000002.jpg")
  with pytest.raises(ValueError, match=r"sugarcrepe/swap_obj/7: image .*000000000002.jpg"):
    benchmarks.load("sugarcrepe", str(root))
  ds = benchmarks.load("sugarcrepe", str(root), missing="skip")
  assert ds.skipped == ["sugarcrepe/swap_obj/7"] and len(ds.items) == 2
  assert ds.fingerprint["skipped"] == 1 and ds.fingerprint["items"] == 2
  with pytest.raises(ValueError, match="missing='maybe'"):
    benchmarks.load("sugarcrepe", str(root), missing="maybe")


def test_sugarcrepe_images_folder_elsewhere(tmp_path):
  root = tmp_path / "sugarcrepe"
  _sugarcrepe_json(root)
  os.rename(root / "val2017", tmp_path / "coco")
  with pytest.raises(ValueError, match="--data=sugarcrepe_images=DIR"):
    benchmarks.load("sugarcrepe", str(root))
  ds = benchmarks.load("sugarcrepe", str(root), images=str(tmp_path / "coco"))
  assert os.path.isfile(ds.items[0]["image"])


def test_fingerprint_follows_content_and_count(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _sugarcrepe_json(a)
  _sugarcrepe_json(b)
  fa = benchmarks.load("sugarcrepe", str(a)).fingerprint
  assert benchmarks.load("sugarcrepe", str(b)).fingerprint["sha1"] == fa["sha1"]  # a copy
  _write(b / "add_att.json", {"0": {"filename": "000000000001.jpg", "caption": "a mug",
                                    "negative_caption": "a blue mug"}})
  assert benchmarks.load("sugarcrepe", str(b)).fingerprint["sha1"] != fa["sha1"]
  os.remove(a / "val2017" / "000000000002.jpg")   # same files, fewer items
  assert benchmarks.load("sugarcrepe", str(a), missing="skip").fingerprint["sha1"] != fa["sha1"]


def test_sugarcrepe_hf_parquet_layout(tmp_path):
  """HuggingFaceM4/SugarCrepe_{subset}: image, tested_labels, true_label (ClassLabel)."""
  root = tmp_path / "hf"
  labels = [["a red cube", "a blue cube"], ["a dog left of a cat", "a cat left of a dog"]]
  names = sorted({c for pair in labels for c in pair})
  features = {"image": {"_type": "Image"},
              "tested_labels": {"feature": {"dtype": "string", "_type": "Value"},
                                "_type": "Sequence"},
              "true_label": {"names": names, "_type": "ClassLabel"}}
  path = root / "SugarCrepe_swap_att" / "data" / "test-00000-of-00001-abc.parquet"
  _hf_parquet(path, {
      "image": pa.array([{"bytes": _png_bytes(10), "path": "000000000005.jpg"},
                         {"bytes": _png_bytes(20), "path": None}], _IMAGE),
      "tested_labels": labels,
      "true_label": [names.index(pair[0]) for pair in labels]}, features)
  ds = benchmarks.load("sugarcrepe", str(root), cache_dir=str(tmp_path / "cache"))
  assert [it["uid"] for it in ds.items] == ["sugarcrepe/swap_att/0", "sugarcrepe/swap_att/1"]
  assert ds.items[1]["positive"] == "a dog left of a cat"
  assert ds.items[1]["negative"] == "a cat left of a dog"
  assert ds.items[0]["image"].endswith(".jpg")       # extension from the stored name
  assert ds.items[0]["filename"] == "000000000005.jpg" and "filename" not in ds.items[1]
  assert ds.items[1]["image"].endswith(".png")       # sniffed from the bytes
  with Image.open(ds.items[1]["image"]) as im:
    assert np.asarray(im)[0, 0, 0] == 20
  assert ds.fingerprint["files"] == [str(path)]

  # A true_label that is not tested_labels[0] means the layout is not what we read.
  _hf_parquet(path, {"image": pa.array([{"bytes": _png_bytes(1), "path": None}], _IMAGE),
                     "tested_labels": [labels[0]],
                     "true_label": [names.index(labels[0][1])]}, features)
  with pytest.raises(ValueError, match="row 0 field 'true_label'"):
    benchmarks.load("sugarcrepe", str(root), cache_dir=str(tmp_path / "cache"))


def test_sugarcrepe_parquet_shards_share_a_cache(tmp_path):
  root = tmp_path / "hf" / "SugarCrepe_add_obj" / "data"
  for shard in (0, 1):   # same row number, same image size, different pixels
    _hf_parquet(root / f"test-0000{shard}-of-00002.parquet", {
        "image": pa.array([{"bytes": _png_bytes(shard + 1), "path": None}], _IMAGE),
        "caption": [f"caption {shard}"], "negative_caption": [f"negative {shard}"]}, {})
  ds = benchmarks.load("sugarcrepe", str(tmp_path / "hf"), cache_dir=str(tmp_path / "c"))
  assert [it["uid"] for it in ds.items] == ["sugarcrepe/add_obj/0", "sugarcrepe/add_obj/1"]
  assert ds.items[1]["positive"] == "caption 1"
  for n, item in enumerate(ds.items):
    with Image.open(item["image"]) as im:
      assert np.asarray(im)[0, 0, 0] == n + 1


def test_sugarcrepe_flat_parquet_file(tmp_path):
  path = tmp_path / "replace_rel.parquet"
  _hf_parquet(path, {"images": pa.array([{"bytes": _png_bytes(3), "path": None}], _IMAGE),
                     "caption": ["a man on a horse"],
                     "negative_caption": ["a man under a horse"]}, {})
  items = benchmarks.read_sugarcrepe_parquet(str(path), cache_dir=str(tmp_path / "c"))
  assert items[0]["subset"] == "replace_rel" and os.path.isfile(items[0]["image"])
  assert items[0]["negative"] == "a man under a horse"
  # The default image cache sits beside the file and is named after its content.
  default = benchmarks.read_sugarcrepe_parquet(str(path))
  assert os.path.dirname(default[0]["image"]).startswith(str(tmp_path / "replace_rel.images-"))
  with pytest.raises(ValueError, match="cannot tell the SugarCrepe subset"):
    os.rename(path, tmp_path / "data.parquet")
    benchmarks.read_sugarcrepe_parquet(str(tmp_path / "data.parquet"))


def test_read_sugarcrepe_dir(tmp_path):
  """The folder reader: one subset per file, images from the folder it is given."""
  root = tmp_path / "sugarcrepe"
  _sugarcrepe_json(root)
  got = benchmarks.read_sugarcrepe_dir(str(root), "/coco/val2017")
  assert sorted(got) == ["add_att", "swap_obj"]
  item = got["swap_obj"][1]
  assert item["id"] == "7" and item["image"] == "/coco/val2017/000000000002.jpg"
  assert "swap_obj.json" in item["source"] and "add_att.json" in got["add_att"][0]["source"]
  with pytest.raises(ValueError, match="no SugarCrepe subset files"):
    benchmarks.read_sugarcrepe_dir(str(tmp_path), "/coco")
  _write(tmp_path / "bad" / "swap_att.json", {"1": {"filename": "x", "caption": "y"}})
  with pytest.raises(ValueError, match="lacks field 'negative_caption'"):
    benchmarks.read_sugarcrepe(str(tmp_path / "bad" / "swap_att.json"), "/coco")


def test_file_source_tracks_content(tmp_path):
  path = str(tmp_path / "a.json")
  _write(path, {"x": 1})
  first = benchmarks.file_source(path)
  assert first.startswith(path) and f"({os.path.getsize(path)} bytes, sha1 " in first
  _write(path, {"x": 2})
  assert benchmarks.file_source(path) != first
  with pytest.raises(ValueError, match="does not exist"):
    benchmarks.file_source(str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------- SugarCrepe++

def test_sugarcrepe_pp_layout(tmp_path):
  root = tmp_path / "scpp"
  rec = {"id": 0, "filename": "000000000003.jpg", "caption": "a zebra stands in a field",
         "caption2": "in a field stands a zebra", "negative_caption": "a zebra runs in a field"}
  _write(root / "data" / "replace_rel.json", [rec, {**rec, "id": 1}])   # GitHub file name
  _write(root / "data" / "swap_atribute.json", [rec])                  # HF config name
  _png(root / "val2017" / "000000000003.jpg")
  ds = benchmarks.load("sugarcrepe_pp", str(root))
  assert sorted(ds.by_subset()) == ["replace_relation", "swap_atribute"]
  item = ds.by_subset()["replace_relation"][1]
  assert item["uid"] == "sugarcrepe_pp/replace_relation/1"
  assert (item["positive"], item["positive2"], item["negative"]) == (
      rec["caption"], rec["caption2"], rec["negative_caption"])
  _write(root / "data" / "replace_rel.json", [{k: v for k, v in rec.items() if k != "caption2"}])
  with pytest.raises(ValueError, match=r"replace_rel.json': record '0' lacks field 'caption2'"):
    benchmarks.load("sugarcrepe_pp", str(root))


# ----------------------------------------------------------------------------- paired

def test_winoground_layout(tmp_path):
  root = tmp_path / "winoground"
  _write(root / "data" / "examples.jsonl", [
      {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1",
       "caption_0": "an old person kisses a young person",
       "caption_1": "a young person kisses an old person", "tag": "Noun",
       "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": "Object"}], lines=True)
  for k in (0, 1):
    _png(root / "data" / "images" / f"ex_0_img_{k}.png", k)
  ds = benchmarks.load("winoground", str(root))
  item = ds.items[0]
  assert item["uid"] == "winoground/0" and item["tag"] == "Noun"
  assert item["image_1"] == str(root / "data" / "images" / "ex_0_img_1.png")
  assert item["caption_0"] == "an old person kisses a young person"
  out = scoring.evaluate_paired(ds.items, lambda ps: [
      1.0 if p["image_index"] == p["caption_index"] else 0.0 for p in ps])
  assert out["group"] == 1.0


def test_bivlc_parquet_layout(tmp_path):
  path = tmp_path / "BiVLC" / "data" / "test-00000-of-00002.parquet"
  _hf_parquet(path, {
      "image": pa.array([{"bytes": _png_bytes(1), "path": "a.jpg"}], _IMAGE),
      "caption": ["a man on a bike"],
      "negative_caption": ["a bike on a man"],
      "negative_image": pa.array([{"bytes": _png_bytes(2), "path": None}], _IMAGE),
      "type": ["swap"], "subtype": ["object"]}, {})
  path2 = tmp_path / "BiVLC" / "data" / "test-00001-of-00002.parquet"
  _hf_parquet(path2, {
      "image": pa.array([{"bytes": _png_bytes(3), "path": None}], _IMAGE),
      "caption": ["a red car"], "negative_caption": ["a blue car"],
      "negative_image": pa.array([{"bytes": _png_bytes(4), "path": None}], _IMAGE),
      "type": ["replace"], "subtype": ["attribute"]}, {})
  ds = benchmarks.load("bivlc", str(tmp_path / "BiVLC"), cache_dir=str(tmp_path / "c"))
  assert [it["uid"] for it in ds.items] == ["bivlc/0", "bivlc/1"]   # ids run across shards
  first = ds.items[0]
  assert (first["caption_0"], first["caption_1"]) == ("a man on a bike", "a bike on a man")
  assert first["type"] == "swap" and first["subtype"] == "object"
  with Image.open(first["image_1"]) as im:
    assert np.asarray(im)[0, 0, 0] == 2
  assert ds.fingerprint["files"] == [str(path), str(path2)]


# ----------------------------------------------------------------------------- POPE

def test_pope_three_splits(tmp_path):
  root = tmp_path / "pope"
  for n, split in enumerate(benchmarks.POPE_SPLITS):
    _write(root / "coco" / f"coco_pope_{split}.json", [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
         "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000001.jpg",
         "text": "Is there a cat in the image?", "label": "no"}], lines=True)
  _png(root / "val2014" / "COCO_val2014_000000000001.jpg")
  ds = benchmarks.load("pope", str(root))
  assert list(ds.by_subset()) == ["random", "popular", "adversarial"]
  assert ds.items[-1]["uid"] == "pope/adversarial/2" and ds.items[-1]["answer"] == "no"
  assert ds.items[0]["split"] == "random" and ds.items[0]["prompt"] == (
      "Is there a dog in the image?")
  _write(root / "coco" / "coco_pope_popular.json", '{"question_id": 1, "image": "x.jpg"\n')
  with pytest.raises(ValueError, match="coco_pope_popular.json'"):
    benchmarks.load("pope", str(root))


def test_read_pope(tmp_path):
  """One file (one record a line is read through load above): split from its name or given."""
  recs = [{"question_id": n, "image": f"{n}.jpg", "text": "Is there a dog in the image?",
           "label": label} for n, label in enumerate(("yes", "no"))]
  path = str(tmp_path / "coco_pope_adversarial.json")
  _write(path, json.dumps(recs, indent=1))   # a pretty-printed list reads the same
  items = benchmarks.read_pope(path, "/coco")
  assert [it["split"] for it in items] == ["adversarial"] * 2
  assert items[1]["answer"] == "no" and items[1]["image"] == "/coco/1.jpg"
  assert benchmarks.read_pope(path, "/coco", split="random")[1]["split"] == "random"
  _write(path, [{**recs[0], "label": "maybe"}], lines=True)
  with pytest.raises(ValueError, match="expected yes/no"):
    benchmarks.read_pope(path, "/coco")


# ----------------------------------------------------------------------------- VQA

def test_vqav2_layout_and_splits(tmp_path):
  root = tmp_path / "vqav2"
  _write(root / "v2_OpenEnded_mscoco_val2014_questions.json", {
      "data_subtype": "val2014",
      "questions": [{"image_id": 42, "question": "What color?", "question_id": 420}]})
  _write(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
      {"question_id": 420, "image_id": 42, "answer_type": "other", "question_type": "what",
       "multiple_choice_answer": "red",
       "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": k}
                   for k in range(10)]}]})
  _png(root / "val2014" / "COCO_val2014_000000000042.jpg")
  ds = benchmarks.load("vqav2", str(root))
  item = ds.items[0]
  assert item["uid"] == "vqav2/420" and item["answers"] == ["red"] * 10
  assert item["prompt"] == "What color?" + SUFFIX and item["category"] == "other"
  assert item["question_type"] == "what" and len(ds.fingerprint["files"]) == 2
  _write(root / "v2_mscoco_val2014_annotations.json", [])
  with pytest.raises(ValueError, match="annotations.json': the document is a list, "
                                       "expected an object with field 'annotations'"):
    benchmarks.load("vqav2", str(root))
  os.remove(root / "v2_mscoco_val2014_annotations.json")

  # Test-dev: no annotations; its images are named and stored as test2015.
  _write(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {
      "data_subtype": "test-dev2015",
      "questions": [{"image_id": 7, "question": "Why?", "question_id": 70}]})
  _png(root / "test2015" / "COCO_test2015_000000000007.jpg")
  with pytest.raises(ValueError, match=r"found splits \['test-dev2015', 'val2014'\]"):
    benchmarks.load("vqav2", str(root))
  dev = benchmarks.load("vqav2", str(root), split="test-dev2015")
  assert "answers" not in dev.items[0]
  assert dev.items[0]["image"].endswith(os.path.join("test2015",
                                                     "COCO_test2015_000000000007.jpg"))


def test_gqa_layout(tmp_path):
  root = tmp_path / "gqa"
  _write(root / "testdev_balanced_questions.json", {"201": {
      "imageId": "n123", "question": "Is the cup left of the plate?", "answer": "yes",
      "fullAnswer": "Yes, the cup is left of the plate.",
      "types": {"structural": "verify", "semantic": "rel", "detailed": "relVerify"}}})
  _png(root / "images" / "n123.jpg")
  item = benchmarks.load("gqa", str(root)).items[0]
  assert item["uid"] == "gqa/201" and item["answer"] == "yes"
  assert item["category"] == "verify" and item["full_answer"].startswith("Yes, the cup")
  _write(root / "testdev_balanced_questions.json", {"201": {"imageId": "n123",
                                                            "question": "Is it?"}})
  with pytest.raises(ValueError, match="record '201' lacks field 'answer'"):
    benchmarks.load("gqa", str(root))


def _textvqa(root, llava=True, rosetta=False):
  _write(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
      {"question_id": 3, "image_id": "abc", "question": "what brand is it?",
       "answers": ["nikon"] * 10, "set_name": "val"}]})
  if llava:
    _write(root / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": 3, "image": "abc.jpg",
         "text": "what brand is it?\nReference OCR token: NIKON, D90" + SUFFIX}], lines=True)
  if rosetta:
    _write(root / "TextVQA_Rosetta_OCR_v0.2_val.json", {"data": [
        {"image_id": "abc", "ocr_tokens": ["nikon", "camera"]}]})
  _png(root / "train_images" / "abc.jpg")


def test_textvqa_with_and_without_ocr_line(tmp_path):
  root = tmp_path / "textvqa"
  _textvqa(root)
  with_ocr = benchmarks.load("textvqa_ocr", str(root)).items[0]
  assert with_ocr["prompt"] == "what brand is it?\nReference OCR token: NIKON, D90" + SUFFIX
  assert with_ocr["ocr"] is True and with_ocr["ocr_tokens"] == ["NIKON", "D90"]
  assert with_ocr["uid"] == "textvqa/ocr/3" and with_ocr["answers"] == ["nikon"] * 10
  plain = benchmarks.load("textvqa", str(root)).items[0]
  assert plain["prompt"] == "what brand is it?" + SUFFIX and plain["ocr"] is False
  assert plain["ocr_tokens"] == []
  assert plain["uid"] == "textvqa/plain/3"

  # Without LLaVA's question file the line is built from Rosetta tokens.
  other = tmp_path / "rosetta"
  _textvqa(other, llava=False, rosetta=True)
  built = benchmarks.load("textvqa_ocr", str(other))
  assert built.items[0]["prompt"] == (
      "what brand is it?\nReference OCR token: nikon, camera" + SUFFIX)
  assert len(built.fingerprint["files"]) == 2
  bare = tmp_path / "bare"
  _textvqa(bare, llava=False)
  with pytest.raises(ValueError, match="ocr=True but question_id 3 has no OCR tokens"):
    benchmarks.load("textvqa_ocr", str(bare))


def test_vizwiz_layout(tmp_path):
  root = tmp_path / "vizwiz"
  _write(root / "val.json", [
      {"image": "VizWiz_val_00000001.jpg", "question": "What is this?",
       "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 9
       + [{"answer": "soup", "answer_confidence": "maybe"}],
       "answerable": 0, "answer_type": "unanswerable"}])
  _png(root / "val" / "VizWiz_val_00000001.jpg")
  item = benchmarks.load("vizwiz", str(root)).items[0]
  assert item["uid"] == "vizwiz/VizWiz_val_00000001.jpg"
  assert item["answers"][-1] == "soup" and item["answer_confidence"][-1] == "maybe"
  assert item["answerable"] == 0 and item["category"] == "unanswerable"
  assert item["prompt"] == ("What is this?\nWhen the provided information is insufficient, "
                            "respond with 'Unanswerable'." + SUFFIX)
  _write(root / "val.json", {"image": "x.jpg"})
  with pytest.raises(ValueError, match="val.json': expected a list of questions"):
    benchmarks.load("vizwiz", str(root))
  _write(root / "val.json", [{"image": "x.jpg", "question": "Why?", "answers": ["soup"]}])
  with pytest.raises(ValueError, match="record 'x.jpg' is a str, expected an object with "
                                       "field 'answer'"):
    benchmarks.load("vizwiz", str(root))


def test_mme_release_layout(tmp_path):
  root = tmp_path / "MME_Benchmark_release_version"
  task = root / "MME_Benchmark"
  _write(task / "existence" / "000000006040.txt",
         "Is there a train? Please answer yes or no.\tYes\n"
         "Is there a bed? Please answer yes or no.\tNo\n")
  _png(task / "existence" / "000000006040.jpg")
  _write(task / "artwork" / "questions_answers_YN" / "10002.txt",
         "Is this by Monet? Please answer yes or no.\tNo\r\n")
  _png(task / "artwork" / "images" / "10002.jpg")
  ds = benchmarks.load("mme", str(root))
  assert [it["uid"] for it in ds.items] == ["mme/artwork/10002/0",
                                            "mme/existence/000000006040/0",
                                            "mme/existence/000000006040/1"]
  assert ds.items[0]["answer"] == "no" and ds.items[0]["subtask"] == "artwork"
  assert ds.items[1]["prompt"] == "Is there a train? Please answer yes or no."
  assert ds.items[1]["image_name"] == "000000006040.jpg"
  os.remove(task / "artwork" / "images" / "10002.jpg")
  with pytest.raises(ValueError, match=r"10002.txt': no image '10002'"):
    benchmarks.load("mme", str(root))


def test_read_vqav2_and_gqa(tmp_path):
  _write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
      {"image_id": 42, "question": "What color?", "question_id": 420}]})
  items = benchmarks.read_vqav2(str(tmp_path / "q.json"), "/img")
  assert items[0]["image"] == "/img/COCO_val2014_000000000042.jpg"
  assert "answers" not in items[0] and "q.json" in items[0]["source"]

  _write(tmp_path / "gqa.json", {"201": {"imageId": "n123", "question": "Is it left?",
                                         "answer": "yes"}})
  g = benchmarks.read_gqa(str(tmp_path / "gqa.json"), "/gqa")
  assert g[0]["id"] == "201" and g[0]["image"] == "/gqa/n123.jpg" and g[0]["answer"] == "yes"
  assert scoring.evaluate_vqa(g, lambda it: ["Yes"])["accuracy"] == 1.0


def test_read_textvqa_records_ocr_and_vizwiz(tmp_path):
  _textvqa(tmp_path, llava=False, rosetta=True)
  questions = str(tmp_path / "TextVQA_0.5.1_val.json")
  plain = benchmarks.read_textvqa(questions, "/tv")
  assert plain[0]["ocr"] is False and plain[0]["image"] == "/tv/abc.jpg"
  with_ocr = benchmarks.read_textvqa(questions, "/tv",
                                     str(tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json"))
  assert with_ocr[0]["ocr"] is True and "Rosetta" in with_ocr[0]["source"]
  assert scoring.evaluate_vqa(with_ocr, lambda it: ["Nikon"])["accuracy"] == 1.0

  # VizWiz's test split has no answers (val.json is read through load above).
  _write(tmp_path / "test.json", [{"image": "VizWiz_test_00000001.jpg", "question": "What?"}])
  vw = benchmarks.read_vizwiz(str(tmp_path / "test.json"), "/vw")
  assert vw[0]["image"] == "/vw/VizWiz_test_00000001.jpg" and "answers" not in vw[0]


def test_read_mme_bare_folder(tmp_path):
  """Subtask folders without the release's top folders; other folders are passed over."""
  root = tmp_path / "MME"
  _write(root / "existence" / "000.txt",
         "Is there a dog? Please answer yes or no.\tYes\n"
         "Is there a cat? Please answer yes or no.\tNo\n")
  _write(root / "existence" / "000.png", "png")
  _write(root / "notes" / "readme.txt", "not a subtask")
  items = benchmarks.read_mme(str(root))
  assert [it["answer"] for it in items] == ["yes", "no"]
  assert items[0]["image"] == str(root / "existence" / "000.png")
  out = scoring.evaluate_mme(items, lambda it: ["Yes"] * len(it))
  # The cat question is wrong -> acc 1/2, acc+ 0 -> 50.
  assert out["subtasks"]["existence"]["score"] == pytest.approx(50.0)
  assert out["perception"] == pytest.approx(50.0)
  _write(root / "count" / "1.txt", "How many? Please answer yes or no.\tTwo\n")
  _write(root / "count" / "1.jpg", "jpg")
  with pytest.raises(ValueError, match="question<TAB>Yes|No"):
    benchmarks.read_mme(str(root))


# ----------------------------------------------------------------------------- synthetic

def _synthetic_export(out_dir):
  """The layout of cdx.data.synthetic.export: DIR/eval/*.json, image paths relative to DIR."""
  _write(out_dir / "eval" / "vqa.json", [
      {"question_id": 0, "image": "images/eval/vqa_000000.png",
       "text": "What shape is red?" + SUFFIX, "answer": "cube", "category": "shape"}])
  _write(out_dir / "eval" / "sugarcrepe_swap_att.json", {"0": {
      "filename": "images/eval/swap_att_000000.png", "caption": "a red cube and a blue ball",
      "negative_caption": "a blue cube and a red ball"}})
  _write(out_dir / "eval" / "winoground.json", [
      {"id": 0, "image_0": "images/eval/winoground_000000_0.png",
       "image_1": "images/eval/winoground_000000_1.png", "caption_0": "a cube left of a ball",
       "caption_1": "a ball left of a cube", "tag": "relation"}])
  for k, name in enumerate(("vqa_000000", "swap_att_000000", "winoground_000000_0",
                            "winoground_000000_1")):
    _png(out_dir / "images" / "eval" / f"{name}.png", k)


def test_synthetic_through_load(tmp_path):
  eval_dir = tmp_path / "world" / "eval"
  _synthetic_export(tmp_path / "world")
  ds = benchmarks.load("synthetic_vqa", str(eval_dir))
  assert ds.items[0]["uid"] == "synthetic_vqa/0" and ds.items[0]["answer"] == "cube"
  assert ds.items[0]["prompt"] == "What shape is red?" + SUFFIX
  os.remove(eval_dir / "winoground.json")
  with pytest.raises(ValueError, match="no synthetic paired files"):
    benchmarks.load("synthetic_paired", str(eval_dir))


def test_read_synthetic_export_layout(tmp_path):
  _synthetic_export(tmp_path / "world")
  got = benchmarks.read_synthetic(str(tmp_path / "world" / "eval"))
  vqa = got["vqa"][0]
  assert vqa["question"] == "What shape is red?"
  assert vqa["prompt"] == "What shape is red?" + SUFFIX   # suffix not doubled
  assert os.path.isfile(vqa["image"]) and vqa["answer"] == "cube"
  sc = got["sugarcrepe"]["swap_att"][0]
  assert os.path.isfile(sc["image"]) and sc["negative"] == "a blue cube and a red ball"
  pair = got["paired"][0]
  assert os.path.isfile(pair["image_1"]) and pair["tag"] == "relation"
  assert scoring.evaluate_vqa(got["vqa"], lambda it: ["Cube"])["accuracy"] == 1.0

  # The json without its images: the root cannot be found and must be given.
  bare = tmp_path / "bare" / "eval"
  _write(bare / "vqa.json", [{"question_id": 0, "image": "images/eval/vqa_000000.png",
                              "text": "Which?", "answer": "cube"}])
  with pytest.raises(ValueError, match="pass root="):
    benchmarks.read_synthetic(str(bare))
  given = benchmarks.read_synthetic(str(bare), root="/data/world")
  assert given["vqa"][0]["image"] == "/data/world/images/eval/vqa_000000.png"
  with pytest.raises(ValueError, match="no synthetic eval files"):
    benchmarks.read_synthetic(str(tmp_path))


# ----------------------------------------------------------------------------- errors

def test_malformed_files_and_bad_arguments(tmp_path):
  root = tmp_path / "sugarcrepe"
  _sugarcrepe_json(root)
  _write(root / "swap_obj.json", '{"0": {"filename": "a.jpg",\n "caption": }')
  with pytest.raises(ValueError, match=r"swap_obj.json': not valid JSON \(line 2"):
    benchmarks.load("sugarcrepe", str(root))
  _write(root / "swap_obj.json", ["not a record"])
  with pytest.raises(ValueError, match="swap_obj.json': record '0' is a str"):
    benchmarks.load("sugarcrepe", str(root))
  _write(tmp_path / "w" / "examples.jsonl", '{"id": 0}\n{"id": 1,\n')
  with pytest.raises(ValueError, match=r"examples.jsonl' line 2: not valid JSON"):
    benchmarks.load("winoground", str(tmp_path / "w"), images=str(tmp_path))
  _write(tmp_path / "w" / "examples.jsonl", [{"id": 0, "image_0": "a", "image_1": "b",
                                              "caption_0": "x", "caption_1": "y"}] * 2,
         lines=True)
  with pytest.raises(ValueError, match="'winoground/0' occurs twice"):
    benchmarks.load("winoground", str(tmp_path / "w"), images=str(tmp_path))
  with pytest.raises(ValueError, match=r"sugarcrepe: unknown option\(s\) \['split'\]"):
    benchmarks.load("sugarcrepe", str(root), split="val")
  with pytest.raises(ValueError, match="unknown benchmark 'sugarcrep'"):
    benchmarks.load("sugarcrep", str(root))
  with pytest.raises(ValueError, match="does not exist"):
    benchmarks.load("pope", str(tmp_path / "nowhere"))


def test_data_flags(tmp_path):
  root = tmp_path / "sugarcrepe"
  _sugarcrepe_json(root)
  os.rename(root / "val2017", tmp_path / "coco")
  data = benchmarks.parse_data([f"sugarcrepe={root}", f"sugarcrepe_images={tmp_path}/coco",
                                f"textvqa={tmp_path}/tv"])
  assert data["sugarcrepe_images"] == f"{tmp_path}/coco"
  ds = benchmarks.load_from_data("sugarcrepe", data)
  assert len(ds.items) == 3 and os.path.isfile(ds.items[0]["image"])
  with pytest.raises(ValueError, match="reads its files from --data=pope=PATH"):
    benchmarks.load_from_data("pope", data)
  with pytest.raises(ValueError, match="unknown NAME 'sugar'"):
    benchmarks.parse_data(["sugar=/x"])
  with pytest.raises(ValueError, match="expected NAME=PATH"):
    benchmarks.parse_data(["pope"])
  with pytest.raises(ValueError, match="'pope' given twice"):
    benchmarks.parse_data(["pope=/a", "pope=/b"])
