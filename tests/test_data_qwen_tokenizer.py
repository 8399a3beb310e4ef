"""The qwen2_base template and labels with the real Qwen tokenizer, against the official
algorithm (docs/METHOD.md §3).

The tokenizer is rebuilt offline from the BPE ranks the `dashscope` package ships
(tests/qwen_tokenizer.py). The official algorithm is re-derived below from its description:
it renders the whole conversation as one string, tokenizes it in chunks split at `<image>`
(one placeholder id in between), and derives labels round by round: rounds are split at
`<|endoftext|>`, each round at " ASSISTANT: "; the instruction (up to and including
" ASSISTANT:") is masked, the rest of the round and its `<|endoftext|>` are supervised, and
a length mismatch masks the whole sample.
"""
import numpy as np
import pytest
import tiktoken
import transformers

from cdx.data import templates
from cdx.data import tokenizer as tokenizer_lib
from tests import qwen_tokenizer

SEP, EOS, IMAGE = " ASSISTANT: ", "<|endoftext|>", "<image>"
PLACEHOLDER = -200  # the official code's image id before expansion


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen_tokenizer")
  qwen_tokenizer.build(str(path))
  return str(path)


@pytest.fixture(scope="session")
def qwen(qwen_dir):
  return tokenizer_lib.load_tokenizer(qwen_dir)


# ------------------------------------------------------------ the official algorithm

def official_prompt(pairs):
  """[(question, answer | None)] -> the prompt string of the official qwen2_base template."""
  text = templates.SYSTEM + " "
  for question, answer in pairs:
    if IMAGE in question:
      question = ("<image>\n" + question.replace(IMAGE, "").strip()).strip()
    text += f"USER: {question} "
    text += "ASSISTANT:" if answer is None else f"ASSISTANT: {answer}{EOS}"
  return text


def official_ids(text, tok):
  ids = []
  for i, chunk in enumerate(text.split(IMAGE)):
    if i:
      ids.append(PLACEHOLDER)
    ids.extend(tok(chunk)["input_ids"])
  return ids


def official_labels(ids, prompt, tok):
  labels = list(ids)
  cur = 0
  for rnd in prompt.split(EOS):
    parts = rnd.split(SEP)
    if rnd == "" or len(parts) != 2:
      break
    instruction = len(official_ids(parts[0] + SEP, tok)) - 1
    labels[cur:cur + instruction] = [templates.IGNORE] * instruction
    cur += len(official_ids(rnd, tok)) + 1
  labels[cur:] = [templates.IGNORE] * (len(labels) - cur)
  if cur != len(ids):  # "tokenization mismatch": the whole sample is masked
    labels = [templates.IGNORE] * len(ids)
  return labels


def ours(messages, has_image, tok):
  """cdx's ids/labels with one visual token, the image id spelled as the placeholder."""
  conv = templates.conversation_from_llava(messages, has_image)
  ex = templates.encode(conv, tok, "qwen2_base", num_visual_tokens=1)
  image_id = tok.convert_tokens_to_ids(IMAGE)
  ids = [PLACEHOLDER if i == image_id else int(i) for i in ex["input_ids"]]
  return ids, [int(x) for x in ex["labels"]]


def _messages(*pairs):
  out = []
  for q, a in pairs:
    out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  return out


CASES = {
    "image_first": (True, [("<image>\nWhat is in the picture?", "A red cube on a table.")]),
    "image_last": (True, [("Describe the scene.\n<image>", "Two cats and a dog.")]),
    "image_only_turn": (True, [("<image>", "A photo of a small dog.")]),
    "image_only_padded": (True, [("  <image>\n  ", "Grass.")]),
    "whitespace_around": (True, [("  <image>\n  Spaces around?  ", "Yes, 3 of them.")]),
    "multi_turn": (True, [("<image>\nHow many cubes?", "Three."),
                          ("And spheres?", "Two spheres, one café-coloured."),
                          ("Total?", " 5 objects ")]),
    "text_only": (False, [("What is 12+30?", "42."), ("And 7*6?", "Also 42 — naïve?")]),
    "unicode": (True, [("<image>\n图里有什么？", "一只猫。👍")]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_and_labels_match_the_official_algorithm(qwen, name):
  tok, _ = qwen
  has_image, pairs = CASES[name]
  prompt = official_prompt(pairs)
  want_ids = official_ids(prompt, tok)
  want_labels = official_labels(want_ids, prompt, tok)
  assert (np.asarray(want_labels) != templates.IGNORE).any()  # the reference is sane
  got_ids, got_labels = ours(_messages(*pairs), has_image, tok)
  assert tok.decode([i for i in got_ids if i >= 0]) == tok.decode(
      [i for i in want_ids if i >= 0])
  assert got_ids == want_ids
  assert got_labels == want_labels


def test_image_only_turn_has_no_newline_before_assistant(qwen):
  tok, ids = qwen
  conv = templates.conversation_from_llava(_messages(("<image>", "A dog.")), True)
  ex = templates.encode(conv, tok, "qwen2_base", num_visual_tokens=3)
  after = tok.decode(ex["input_ids"][ex["image_start"] + 3:])
  assert after == " ASSISTANT: A dog.<|endoftext|>"
  assert (ex["input_ids"][ex["image_start"]:ex["image_start"] + 3] == ids.image).all()


@pytest.mark.parametrize("question", ["What colour is the cube?",
                                      "  What colour is the cube? \n",
                                      "<image>\n What colour is the cube?\n"])
@pytest.mark.parametrize("has_image", [True, False])
def test_generation_prompt_strips_like_the_official_eval(qwen, question, has_image):
  tok, _ = qwen
  got = templates.encode_prompt(question, tok, "qwen2_base", 1, has_image=has_image)
  got_ids = [PLACEHOLDER if t == tok.convert_tokens_to_ids(IMAGE) else int(t)
             for t in got["input_ids"]]
  # The official eval prepends "<image>\n" to the question and strips it.
  q = question.replace(IMAGE, "").strip()
  want = official_prompt([("<image>\n" + q if has_image else q, None)])
  assert want.endswith(" ASSISTANT:")
  assert got_ids == official_ids(want, tok)
  assert (got["labels"] == templates.IGNORE).all()


def test_prefix_before_the_image_is_31_tokens_and_block_ends_before_newline(qwen):
  tok, ids = qwen
  conv = templates.conversation_from_llava(_messages(("<image>\nWhat?", "A cube.")), True)
  ex = templates.encode(conv, tok, "qwen2_base", num_visual_tokens=728)
  assert ex["image_start"] == 31
  assert (ex["input_ids"][31:759] == ids.image).all()
  assert tok.decode(ex["input_ids"][759:760]) == "\n"
  assert (ex["labels"][:ex["input_ids"].tolist().index(ids.eos) - 3] == -100).all()
  assert ex["labels"][-1] == ids.eos


def test_rebuilt_tokenizer_equals_tiktoken_on_the_same_ranks(qwen_dir):
  tok = transformers.AutoTokenizer.from_pretrained(qwen_dir)
  ranks = qwen_tokenizer.read_ranks(qwen_tokenizer.ranks_file())
  enc = tiktoken.Encoding("qwen_ranks", pat_str=qwen_tokenizer.PATTERN,
                          mergeable_ranks=ranks, special_tokens={})
  texts = ["Hello world!  How are you?\n\n  fine\r\n", "In 2024: 12345 apples; don't, I'LL",
           "你好，世界。日本語のテキスト", "tabs\t\tand   spaces   \n end ",
           "émigré naïve café 👍🏽 ∑x² → ∞", templates.SYSTEM,
           "a" * 300 + " " + "ab" * 50]
  for text in texts:
    assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(text), text
  assert tok.convert_tokens_to_ids(list(qwen_tokenizer.SPECIALS)) == [151643, 151644, 151645]
  assert len(tok) == 151646


def test_load_tokenizer_sets_pad_token_to_the_pad_id_and_it_survives_saving(qwen, tmp_path):
  tok, ids = qwen
  assert (ids.image, ids.pad, ids.eos) == (151646, 151647, 151643)
  assert tok.pad_token == tokenizer_lib.PAD and tok.pad_token_id == ids.pad
  tok.save_pretrained(tmp_path)  # what the HF export writes next to the model
  again = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert again.pad_token_id == ids.pad and again.eos_token_id == ids.eos
  assert tokenizer_lib.load_tokenizer(str(tmp_path))[1] == ids
