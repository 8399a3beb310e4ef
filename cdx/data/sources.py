"""LLaVA-format data files as random-access sources, and per-sample validation.

A file is JSON (a list of records) or JSONL (one record a line). A record is
  {"id": str, "image": "relative/path.png" (optional), "conversations":
   [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
with images under an image root folder. Files are read once, when the source is built;
`LlavaSource[i]` is then a plain dict (`RawSample`) that pickles cheaply to grain workers.

Several files mix with weights: weight w uses every record of that file ⌊w⌋ times plus a
seeded subset of round(frac(w)·n) records, so a mix is deterministic and random-access.

`parse_sample` is the one validation used by the pipeline and by `cdx.data.check`. A bad
sample raises `SampleError` whose `reason` is one of REASONS; a JSONL line that is not
UTF-8 or not JSON becomes a load issue (`bad_encoding`, `bad_json`) naming file and line,
and the other lines are kept (a leading byte-order mark is accepted). A sample with an
image but no `<image>` in its text is fixed (the template inserts it) and reported as
warning `placeholder_inserted`.

Image paths are relative to the image root and must stay inside it: with a root set, an
absolute path or one whose `..` parts leave the root is refused (`image_outside_root`)
unless the source is built with `allow_outside_root=True`. Paths are compared after
normalization, not after resolving symlinks, so a root that links to image folders
elsewhere keeps working.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from cdx.data import images
from cdx.data import templates
from cdx.data.templates import SampleError

REASONS = (
    "bad_encoding",               # a JSONL line that is not UTF-8 (load time)
    "bad_json",                   # a JSONL line that does not parse (load time)
    "bad_record",                 # not an object, or no 'conversations' list
    "bad_roles",                  # roles not human, gpt, human, gpt, ... ending on gpt
    "bad_text",                   # text that is not valid Unicode (a lone surrogate)
    "empty_answer",               # a gpt turn with empty text
    "multiple_image_tokens",      # <image> more than once
    "placeholder_without_image",  # <image> in the text but no 'image' field
    "bad_image_field",            # 'image' is not a non-empty string (e.g. a list)
    "image_outside_root",         # absolute or `..` image path leaving the image root
    "missing_image",              # image file not found
    "corrupt_image",              # image file does not decode
    "image_block_truncated",      # the visual block does not fit in max_length
    "no_supervised_tokens",       # nothing to learn within max_length
)
WARNINGS = ("placeholder_inserted", "truncated")


@dataclasses.dataclass(frozen=True)
class Issue:
  """A sample problem found at load time (the sample never enters the source)."""
  reason: str
  where: str
  message: str


@dataclasses.dataclass
class Parsed:
  """A validated sample: its conversation, its decoded image (or None), its warnings."""
  conversation: templates.Conversation
  image: Image.Image | None
  warnings: list[str]
  where: str


def _where(path: str, line: int | None, index: int) -> str:
  return f"{path}:{line}" if line is not None else f"{path}#{index}"


def read_records(path: str, strict: bool = False) -> tuple[list[tuple[str, Any]], list[Issue]]:
  """Reads a .json or .jsonl file → ([(where, record)], [load issues])."""
  if not os.path.isfile(path):
    raise ValueError(f"data file {path!r} does not exist")
  records, issues = [], []
  if path.endswith(".jsonl"):
    with open(path, "rb") as f:  # Bytes: one bad line must not refuse the whole file.
      for line_no, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        where = _where(path, line_no, len(records))
        try:
          records.append((where, json.loads(raw.decode("utf-8-sig"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          if isinstance(e, UnicodeDecodeError):
            reason = "bad_encoding"
            msg = (f"{where}: line is not UTF-8 (byte {raw[e.start:e.start + 1]!r} at "
                   f"column {e.start + 1}); re-encode the file as UTF-8 or remove the line")
          else:
            reason, msg = "bad_json", (f"{where}: line is not valid JSON ({e.msg}); fix or "
                                       "remove the line")
          if strict:
            raise SampleError(reason, msg) from None
          issues.append(Issue(reason, where, msg))
    return records, issues
  with open(path, "rb") as f:
    data = f.read()
  try:
    data = json.loads(data.decode("utf-8-sig"))
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}:{line}: not UTF-8 (byte {data[e.start:e.start + 1]!r} at "
                     f"offset {e.start}); re-encode the file as UTF-8") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); a .json file must hold one list "
                     "of records (use .jsonl for one record a line)") from None
  if not isinstance(data, list):
    raise ValueError(f"{path}: top level is {type(data).__name__}, expected a list of records")
  return [(_where(path, None, i), r) for i, r in enumerate(data)], issues


def _fail(reason: str, where: str, sample_id: Any, message: str) -> SampleError:
  return SampleError(reason, f"{where} (id={sample_id!r}): {message}")


def parse_sample(raw: dict[str, Any]) -> Parsed:
  """Validates a RawSample and decodes its image; raises SampleError naming where/field."""
  record, where, root = raw["record"], raw["where"], raw["image_root"]
  if not isinstance(record, dict) or "conversations" not in record:
    raise _fail("bad_record", where, None, "record must be an object with a 'conversations' "
                "list")
  sample_id = record.get("id")
  image_rel = record.get("image")
  has_image = image_rel is not None
  if has_image and (not isinstance(image_rel, str) or not image_rel):
    raise _fail("bad_image_field", where, sample_id, f"field 'image' must be one relative "
                f"path string, got {image_rel!r}")
  try:
    if has_image:
      templates.check_text(image_rel, "field 'image'")
  except SampleError as e:
    raise _fail(e.reason, where, sample_id, str(e)) from None
  try:
    conv = templates.conversation_from_llava(record["conversations"], has_image)
  except SampleError as e:
    raise _fail(e.reason, where, sample_id, f"field 'conversations': {e}") from e
  warnings = []
  if has_image and not any(templates.IMAGE in m["value"] for m in record["conversations"]):
    warnings.append("placeholder_inserted")
  image = None
  if has_image:
    path = os.path.join(root or "", image_rel)
    if root and not raw.get("allow_outside_root", False) and not _inside(root, path):
      raise _fail("image_outside_root", where, sample_id, f"field 'image': {image_rel!r} "
                  f"leaves the image root {root!r}; use a path inside it (or allow it "
                  "explicitly: data.allow_outside_root)")
    if not os.path.isfile(path):
      raise _fail("missing_image", where, sample_id, f"field 'image': file {path!r} not found "
                  "(check --image-root)")
    try:
      image = images.load_image(path)
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
      raise _fail("corrupt_image", where, sample_id,
                  f"field 'image': {path!r} does not decode ({e})") from e
  return Parsed(conv, image, warnings, where)


def _inside(root: str, path: str) -> bool:
  root = os.path.abspath(root)
  return os.path.commonpath([root, os.path.abspath(path)]) == root


def _mix_counts(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
  whole = int(np.floor(weight))
  extra = int(round((weight - whole) * n))
  picks = [np.tile(np.arange(n), whole)]
  if extra:
    picks.append(np.sort(rng.choice(n, size=extra, replace=False)))
  return np.concatenate(picks).astype(np.int64)


class LlavaSource:
  """Random-access view of one or more LLaVA files (grain `RandomAccessDataSource`).

  Args:
    files: one path or a list of .json/.jsonl paths.
    image_root: folder that `image` paths are relative to; one for all files or one each.
    weights: per-file use count per epoch (default 1 each); fractions take a seeded subset.
    seed: seed of the fractional subsets.
    strict: raise on a bad JSONL line instead of recording it in `issues`.
    allow_outside_root: accept image paths that leave the image root (absolute, `..`).
  """

  def __init__(self, files: str | Sequence[str], image_root: str | Sequence[str] | None = None,
               weights: Sequence[float] | None = None, seed: int = 0, strict: bool = False,
               allow_outside_root: bool = False):
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not files:
      raise ValueError("files is empty; pass at least one LLaVA .json/.jsonl path")
    roots = (list(image_root) if isinstance(image_root, (list, tuple))
             else [image_root] * len(files))
    weights = [1.0] * len(files) if weights is None else [float(w) for w in weights]
    if len(roots) != len(files) or len(weights) != len(files):
      raise ValueError(f"got {len(files)} files, {len(roots)} image roots and {len(weights)} "
                       "weights; give one root (or one per file) and one weight per file")
    if any(w < 0 for w in weights):
      raise ValueError(f"weights={weights} must be >= 0")
    self.files = [os.fspath(f) for f in files]
    self.image_roots = roots
    self.allow_outside_root = bool(allow_outside_root)
    self.issues: list[Issue] = []
    self._records: list[list[tuple[str, Any]]] = []
    rng = np.random.default_rng(seed)
    file_idx, rec_idx = [], []
    for i, (path, weight) in enumerate(zip(self.files, weights)):
      records, issues = read_records(path, strict=strict)
      self._records.append(records)
      self.issues.extend(issues)
      idx = _mix_counts(len(records), weight, rng)
      file_idx.append(np.full(len(idx), i, np.int64))
      rec_idx.append(idx)
    self._file_idx = np.concatenate(file_idx)
    self._rec_idx = np.concatenate(rec_idx)

  def __len__(self) -> int:
    return len(self._rec_idx)

  def __getitem__(self, index: int) -> dict[str, Any]:
    f = int(self._file_idx[index])
    where, record = self._records[f][int(self._rec_idx[index])]
    return {"record": record, "where": where, "image_root": self.image_roots[f],
            "allow_outside_root": self.allow_outside_root}

  def __repr__(self) -> str:
    return f"LlavaSource(files={self.files}, len={len(self)})"
