"""The real Qwen1.5/Qwen2 tokenizer, rebuilt offline from the BPE ranks `dashscope` ships.

`dashscope` (a test dependency) carries `resources/qwen.tiktoken`: 151,643 lines
`base64(token bytes) rank`. A byte-level BPE is fully determined by its ranks, so the HF
tokenizer is rebuilt from them:
  vocab   token bytes mapped to printable characters with GPT-2's byte-to-unicode table;
  merges  one per multi-byte token, in rank order: the pair that BPE restricted to lower
          ranks leaves when it encodes the token's own bytes;
  pre-tokenizer Qwen2's split regex, then byte-level (no prefix space); normalizer NFC;
  specials `<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645.
Like Qwen1.5's own tokenizer_config, eos = pad = `<|endoftext|>` and there is no BOS;
`cdx.data.tokenizer.load_tokenizer` then adds `<image>` and a pad `<|extra_0|>`.
"""
from __future__ import annotations

import base64
import os

import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers
import transformers

# Qwen2's pre-tokenizer split (the same as Qwen1's tiktoken pattern).
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
NUM_RANKS = 151643


def ranks_file() -> str:
  import dashscope  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(dashscope.__file__), "resources", "qwen.tiktoken")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: the installed dashscope no longer ships "
                            "qwen.tiktoken; pin the version in requirements-test.txt")
  return path


def read_ranks(path: str) -> dict[bytes, int]:
  ranks = {}
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
  return ranks


def byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte → printable character table.

  Printable Latin-1 bytes keep their own character; the other 68 bytes (controls, space,
  soft hyphen, ...) take the characters from U+0100 on, in byte order.
  """
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
  """The two pieces BPE joins last to form `token` (merges of lower rank only)."""
  splits = [(token[:i], token[i:]) for i in range(1, len(token))
            if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
  if len(splits) == 1:  # The common case: only one split into two known pieces.
    return splits[0]
  parts = [token[i:i + 1] for i in range(len(token))]
  while len(parts) > 2:
    best = min(((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)))
    if best[0] >= rank:
      break
    i = best[1]
    parts[i:i + 2] = [parts[i] + parts[i + 1]]
  if len(parts) != 2:
    raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE merges")
  return parts[0], parts[1]


def build(path: str) -> transformers.PreTrainedTokenizerFast:
  """Builds the Qwen2 tokenizer from dashscope's ranks and saves it to `path`."""
  ranks = read_ranks(ranks_file())
  if len(ranks) != NUM_RANKS or sorted(ranks.values()) != list(range(NUM_RANKS)):
    raise ValueError(f"{ranks_file()}: expected ranks 0..{NUM_RANKS - 1}")
  to_char = byte_to_unicode()
  spell = lambda b: "".join(to_char[x] for x in b)
  vocab = {spell(t): r for t, r in ranks.items()}
  merges = [(spell(a), spell(b)) for t, r in sorted(ranks.items(), key=lambda kv: kv[1])
            if len(t) > 1 for a, b in [_last_merge(t, r, ranks)]]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges,
                                                   fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                          for s in SPECIALS])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
      model_max_length=32768)
  fast.save_pretrained(path)
  return fast
