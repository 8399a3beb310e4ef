"""Tokenizer training/loading and chat templates: ids, labels, image block placement."""
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers
import transformers

from cdx.data import templates
from cdx.data import tokenizer as tok_lib
from cdx.data.templates import EOS, IGNORE, SampleError, SYSTEM

CORPUS = ["What colour is the cube?", "The cube is red.", "Is the ball left of the cube?",
          "Yes, it is.", "a small green sphere on a wooden table", "How many objects?"]
NV = 5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  tok_lib.build_tokenizer(CORPUS * 3, path, vocab_size=400)
  return tok_lib.load_tokenizer(path)


def human(v):
  return {"from": "human", "value": v}


def gpt(v):
  return {"from": "gpt", "value": v}


def supervised_runs(ex):
  """Contiguous runs of supervised ids."""
  runs, cur = [], []
  for i, l in zip(ex["input_ids"], ex["labels"]):
    if l != IGNORE:
      assert l == i
      cur.append(int(i))
    elif cur:
      runs.append(cur)
      cur = []
  return runs + ([cur] if cur else [])


def test_tokenizer_is_deterministic_with_qwen_specials(tmp_path):
  a = tok_lib.build_tokenizer(CORPUS, tmp_path / "a", vocab_size=350)
  tok_lib.build_tokenizer(CORPUS, tmp_path / "b", vocab_size=350)
  ja = json.load(open(tmp_path / "a" / "tokenizer.json"))
  jb = json.load(open(tmp_path / "b" / "tokenizer.json"))
  assert ja["model"] == jb["model"]
  tok, ids = tok_lib.load_tokenizer(tmp_path / "a")
  assert len({ids.image, ids.pad, ids.eos}) == 3
  assert tok("<image>", add_special_tokens=False)["input_ids"] == [ids.image]
  assert tok(EOS, add_special_tokens=False)["input_ids"] == [ids.eos]
  # No BOS: even with special tokens on, nothing is prepended.
  assert tok("cube", add_special_tokens=True)["input_ids"] == a("cube",
                                                                add_special_tokens=False)[
                                                                    "input_ids"]
  assert tok.bos_token is None
  # Template text was part of training, so the system prompt is compact.
  assert len(tok(SYSTEM, add_special_tokens=False)["input_ids"]) < len(SYSTEM) // 3


def test_load_tokenizer_adds_missing_image_token(tmp_path):
  raw = tokenizers.Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=[EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS,
                                       pad_token=EOS).save_pretrained(str(tmp_path))
  tok, ids = tok_lib.load_tokenizer(tmp_path)
  assert tok("a <image> b", add_special_tokens=False)["input_ids"].count(ids.image) == 1
  assert ids.pad != ids.eos
  assert ids.image >= 300 - 1 and ids.pad >= 300 - 1  # appended after the trained vocab
  with pytest.raises(ValueError, match="not a directory"):
    tok_lib.load_tokenizer(tmp_path / "nope")


def test_multi_turn_labels_are_exactly_answers(tok):
  tok, ids = tok
  msgs = [human("What colour is the cube?\n<image>"), gpt("The cube is red."),
          human("Is the ball left of the cube?"), gpt("Yes, it is."),
          human("How many objects?"), gpt("3")]
  conv = templates.conversation_from_llava(msgs, has_image=True)
  ex = templates.encode(conv, tok, "qwen2_base", NV)
  runs = [tok.decode(r) for r in supervised_runs(ex)]
  assert runs == [" The cube is red." + EOS, " Yes, it is." + EOS, " 3" + EOS]
  # The image block lands where the ids say, at the start of the first user turn.
  pos = np.flatnonzero(ex["input_ids"] == ids.image)
  assert list(pos) == list(range(ex["image_start"], ex["image_start"] + NV))
  assert (ex["labels"][pos] == IGNORE).all()
  assert tok.decode(ex["input_ids"][:pos[0]]) == SYSTEM + " USER: "
  after = tok.decode(ex["input_ids"][pos[-1] + 1:])
  assert after.startswith("\nWhat colour is the cube? ASSISTANT: The cube")
  # Cutting segments only at natural BPE boundaries: same ids as the whole string.
  whole = "".join(t for t, _ in templates.segments(conv, "qwen2_base"))
  whole_ids = tok(whole, add_special_tokens=False)["input_ids"]
  assert np.array_equal(np.repeat(whole_ids, [NV if i == ids.image else 1
                                              for i in whole_ids]), ex["input_ids"])


def test_image_placeholder_moves_to_first_user_turn(tok):
  tok, ids = tok
  msgs = [human("How many objects?"), gpt("3"), human("What colour <image> is the cube?"),
          gpt("red")]
  ex = templates.encode(templates.conversation_from_llava(msgs, True), tok, "qwen2_base", NV)
  text = tok.decode(ex["input_ids"])
  assert text.count("<image>") == NV
  assert text.startswith(SYSTEM + " USER: " + "<image>" * NV + "\nHow many objects?")
  assert "USER: What colour  is the cube? ASSISTANT:" in text


def test_generation_prompt_and_text_only(tok):
  tok, ids = tok
  conv = templates.Conversation((templates.Turn("What colour is the cube?", None),), True)
  ex = templates.encode(conv, tok, "qwen2_base", NV)
  assert tok.decode(ex["input_ids"]).endswith(" ASSISTANT:")
  assert (ex["labels"] == IGNORE).all()
  same = templates.encode_prompt("<image>\nWhat colour is the cube?", tok, "qwen2_base", NV)
  assert np.array_equal(same["input_ids"], ex["input_ids"])
  full = templates.encode(templates.conversation_from_llava(
      [human("<image>\nWhat colour is the cube?"), gpt("red")], True), tok, "qwen2_base", NV)
  n = len(ex["input_ids"])
  assert np.array_equal(full["input_ids"][:n], ex["input_ids"])  # prompt prefixes training
  text_only = templates.conversation_from_llava([human("How many objects?"), gpt("3")], False)
  ex = templates.encode(text_only, tok, "qwen2_base", NV)
  assert ex["image_start"] == -1 and ex["num_image_tokens"] == 0
  assert ids.image not in ex["input_ids"]
  assert [tok.decode(r) for r in supervised_runs(ex)] == [" 3" + EOS]


def test_pretrain_template(tok):
  tok, ids = tok
  msgs = [human("<image>\nDescribe."), gpt("a small green sphere")]
  ex = templates.encode(templates.conversation_from_llava(msgs, True), tok, "pretrain", NV)
  assert list(ex["input_ids"][:NV]) == [ids.image] * NV and ex["image_start"] == 0
  assert (ex["labels"][:NV] == IGNORE).all() and (ex["labels"][NV:] != IGNORE).all()
  assert tok.decode(ex["input_ids"][NV:]) == "a small green sphere\n"
  assert ids.eos not in ex["input_ids"]


def test_truncation_keeps_image_block(tok):
  tok, _ = tok
  msgs = [human("<image>\nHow many objects?"), gpt("The cube is red. " * 20)]
  ex = templates.encode(templates.conversation_from_llava(msgs, True), tok, "qwen2_base", NV)
  cut = templates.truncate(ex, ex["image_start"] + NV + 20)
  assert len(cut["input_ids"]) == ex["image_start"] + NV + 20
  assert np.array_equal(cut["labels"], ex["labels"][:len(cut["labels"])])
  with pytest.raises(SampleError) as e:
    templates.truncate(ex, ex["image_start"] + NV - 1)
  assert e.value.reason == "image_block_truncated"
  with pytest.raises(SampleError) as e:
    templates.truncate(ex, ex["image_start"] + NV + 3)  # the question fills the rest
  assert e.value.reason == "no_supervised_tokens"


@pytest.mark.parametrize("msgs,has_image,reason", [
    ([gpt("x"), human("y")], False, "bad_roles"),
    ([human("x")], False, "bad_roles"),
    ([human("x"), gpt("y"), {"from": "system", "value": "z"}, gpt("w")], False, "bad_roles"),
    ([human("x"), gpt("  ")], False, "empty_answer"),
    ([human("<image> x <image>"), gpt("y")], True, "multiple_image_tokens"),
    ([human("<image> x"), gpt("y"), human("<image>"), gpt("z")], True,
     "multiple_image_tokens"),
    ([human("<image> x"), gpt("y")], False, "placeholder_without_image"),
])
def test_conversation_errors(msgs, has_image, reason):
  with pytest.raises(SampleError) as e:
    templates.conversation_from_llava(msgs, has_image)
  assert e.value.reason == reason


def test_unknown_template(tok):
  conv = templates.conversation_from_llava([human("x"), gpt("y")], False)
  with pytest.raises(ValueError, match="template"):
    templates.encode(conv, tok[0], "llama3", NV)
