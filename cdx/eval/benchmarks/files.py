"""What every benchmark reader shares: the item type, file loading with one-line errors,
dataset fingerprints, parquet tables and the images they embed, the missing-image policy.

Errors are `ValueError`s of one line that name the file, the record and the field, e.g.
  '/d/swap_obj.json': record '12' lacks field 'negative_caption' (has ['caption', ...]).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# One benchmark item: a plain dict, so scorers, records and JSON need no conversion.
# Keys every reader sets:
#   "uid"        "{benchmark}/{subset}/{id}" ("{benchmark}/{id}" without a subset): stable
#                and unique within a read; the key of per-item result records
#   "id"         the item's id as the file writes it, as a string
#   "benchmark"  the reader's benchmark name (see `cdx.eval.benchmarks.BENCHMARKS`)
#   "subset"     SugarCrepe(++) subset, POPE split, MME subtask, ...; None when the
#                benchmark has none
#   "source"     `file_source` of the annotation file(s) the item came from
# and, by kind of benchmark,
#   image items  "image" (path); paired items "image_0", "image_1"
#   prompt parts "question" (as written), "prompt" (ready user turn, without the image
#                placeholder); captions "positive", "negative" (+ "positive2"),
#                "caption_0", "caption_1"
#   gold         "answer" (str) and/or "answers" (list[str])
#   metadata     benchmark-specific keys named in each reader's docstring
Item = dict[str, Any]

MISSING = ("error", "skip")   # what to do with an item whose image file is absent
_ANNOTATION_EXTS = (".txt", ".json", ".jsonl", ".parquet")


# ----------------------------------------------------------------------------- items

def make_item(benchmark: str, item_id: Any, subset: str | None, source: str,
              **fields: Any) -> Item:
  """An item with the keys every reader sets (see `Item`)."""
  item_id = str(item_id)
  uid = f"{benchmark}/{subset}/{item_id}" if subset else f"{benchmark}/{item_id}"
  return {"uid": uid, "id": item_id, "benchmark": benchmark, "subset": subset,
          "source": source, **fields}


IMAGE_KEYS = ("image", "image_0", "image_1")


def check_images(items: Sequence[Item], missing: str = "error"
                 ) -> tuple[list[Item], list[str]]:
  """(items whose image files all exist, uids of the others).

  missing="error" raises on the first absent image, naming the item and the path;
  "skip" drops the item and reports its uid (count them in the results).
  """
  if missing not in MISSING:
    raise ValueError(f"missing={missing!r}; use one of {MISSING}.")
  kept, skipped = [], []
  for item in items:
    absent = [item[k] for k in IMAGE_KEYS if k in item and not os.path.isfile(item[k])]
    if not absent:
      kept.append(item)
    elif missing == "skip":
      skipped.append(item["uid"])
    else:
      raise ValueError(f"{item['uid']}: image {absent[0]!r} (from {item['source']}) does "
                       "not exist; point the image folder at the right place or pass "
                       "missing='skip'.")
  return kept, skipped


def check_unique(items: Sequence[Item], where: str) -> None:
  seen: set[str] = set()
  for item in items:
    if item["uid"] in seen:
      raise ValueError(f"{where}: item id {item['uid']!r} occurs twice; ids must be unique.")
    seen.add(item["uid"])


# ----------------------------------------------------------------------------- hashing

def _hash_file(path: str, h: Any) -> int:
  size = 0
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
      size += len(chunk)
  return size


def annotation_files(path: str) -> list[str]:
  """The file itself, or a folder's annotation files (not images), sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise ValueError(f"benchmark path {path!r} does not exist.")
  out = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames.sort()
    out += [os.path.join(dirpath, n) for n in sorted(filenames)
            if n.endswith(_ANNOTATION_EXTS)]
  return out


def file_source(path: str) -> str:
  """'path (N bytes, sha1 0123456789ab)' for a file; for a directory the size and hash are
  over its annotation files (.txt/.json/.jsonl/.parquet, not images), in sorted order."""
  h, size = hashlib.sha1(), 0
  for full in annotation_files(path):
    if full != path:
      h.update(os.path.relpath(full, path).encode())
    size += _hash_file(full, h)
  return f"{path} ({size} bytes, sha1 {h.hexdigest()[:12]})"


def fingerprint(paths: Iterable[str], n_items: int, skipped: int = 0) -> dict[str, Any]:
  """{"sha1", "files", "bytes", "items", "skipped"} of a read: sha1 over the annotation
  files' base names and bytes (in sorted order), so a result names its dataset version."""
  files = sorted({os.path.abspath(f) for p in paths for f in annotation_files(p)})
  h, size = hashlib.sha1(), 0
  for f in files:
    h.update(os.path.basename(f).encode())
    size += _hash_file(f, h)
  h.update(f"items={n_items}".encode())
  return {"sha1": h.hexdigest(), "files": files, "bytes": size, "items": n_items,
          "skipped": skipped}


# ----------------------------------------------------------------------------- json

def load_json(path: str) -> Any:
  """A .json document, or the list of records of a .jsonl file."""
  if not os.path.isfile(path):
    raise ValueError(f"benchmark file {path!r} does not exist.")
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      return _json_lines(f.read(), path)
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path!r}: not valid JSON (line {e.lineno}: {e.msg}).") from None


def _json_lines(text: str, path: str) -> list[Any]:
  out = []
  for n, line in enumerate(text.splitlines()):
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} line {n + 1}: not valid JSON ({e.msg}).") from None
  return out


def load_json_lines(path: str) -> list[Any]:
  """POPE's files are named .json but hold one object per line; a JSON list (on one line
  or pretty-printed) reads the same."""
  if not os.path.isfile(path):
    raise ValueError(f"benchmark file {path!r} does not exist.")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
  except json.JSONDecodeError:
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path!r}: neither JSON lines nor a JSON list (line {e.lineno}: "
                       f"{e.msg}).") from None
  if len(records) == 1 and isinstance(records[0], list):
    return records[0]
  return records


def records(doc: Any, path: str) -> list[tuple[str, Mapping[str, Any]]]:
  """(id, record) pairs from a list of records (id = position) or an {id: record} map."""
  if isinstance(doc, Mapping):
    pairs = [(str(k), v) for k, v in doc.items()]
  elif isinstance(doc, list):
    pairs = [(str(n), v) for n, v in enumerate(doc)]
  else:
    raise ValueError(f"{path!r}: expected a list or an {{id: record}} object, got "
                     f"{type(doc).__name__}.")
  for key, rec in pairs:
    if not isinstance(rec, Mapping):
      raise ValueError(f"{path!r}: record {key!r} is a {type(rec).__name__}, expected an "
                       "object.")
  return pairs


def field(rec: Mapping[str, Any], name: str, path: str, key: Any = None) -> Any:
  """rec[name], or a one-line error naming the file, the record and the field."""
  where = f"record {str(key)!r}" if key is not None else "the document"
  if not isinstance(rec, Mapping):
    raise ValueError(f"{path!r}: {where} is a {type(rec).__name__}, expected an object "
                     f"with field {name!r}.")
  if name not in rec:
    raise ValueError(f"{path!r}: {where} lacks field {name!r} (has {sorted(rec)}).")
  return rec[name]


def find_file(folder: str, names: Sequence[str], what: str) -> str:
  """The first of names that exists in folder (names may hold sub-paths)."""
  for name in names:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  raise ValueError(f"no {what} in {folder!r} (looked for {list(names)}).")


def find_dir(folder: str, names: Sequence[str]) -> str | None:
  for name in names:
    path = os.path.join(folder, name)
    if os.path.isdir(path):
      return path
  return None


# ----------------------------------------------------------------------------- parquet

def read_parquet(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(rows as dicts, Hugging Face `features` from the schema metadata or {}).

  Uses pyarrow when installed, else pandas (which needs pyarrow or fastparquet itself).
  """
  if not os.path.isfile(path):
    raise ValueError(f"benchmark file {path!r} does not exist.")
  try:
    import pyarrow.parquet as pq
  except ImportError:
    pq = None
  if pq is not None:
    table = pq.read_table(path)
    rows = table.to_pylist()
    meta = table.schema.metadata or {}
  else:
    try:
      import pandas as pd
    except ImportError:
      raise ValueError(f"reading {path!r} needs pyarrow (pip install pyarrow).") from None
    rows, meta = pd.read_parquet(path).to_dict("records"), {}
  features = {}
  if b"huggingface" in meta:
    info = json.loads(meta[b"huggingface"])
    features = info.get("info", {}).get("features", {})
  return rows, features


def parquet_files(path: str) -> list[str]:
  """A .parquet file, or every .parquet under a folder (sorted: shards in order)."""
  if os.path.isfile(path):
    return [path]
  return [f for f in annotation_files(path) if f.endswith(".parquet")]


def save_image(value: Any, cache_dir: str, name: str, path: str, column: str) -> str:
  """Writes an embedded image (an HF Image cell {"bytes", "path"}, or raw bytes) to
  cache_dir/{name}-{sha1 of the bytes}{ext} unless there, and returns that path: the
  content hash keeps a shared cache_dir from serving another file's image."""
  data = value.get("bytes") if isinstance(value, Mapping) else value
  if not isinstance(data, (bytes, bytearray)) or not data:
    raise ValueError(f"{path!r}: column {column!r} of row {name!r} holds no image bytes "
                     f"(got {type(data).__name__}).")
  ext = os.path.splitext(str(value.get("path") or ""))[1] if isinstance(value, Mapping) else ""
  out = os.path.join(cache_dir, f"{name}-{hashlib.sha1(data).hexdigest()[:10]}"
                     f"{ext or _image_ext(data)}")
  if not os.path.isfile(out):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, out)
  return out


def _image_ext(data: bytes) -> str:
  from PIL import Image
  try:
    fmt = Image.open(io.BytesIO(data)).format or "png"
  except OSError:
    fmt = "png"
  return {"jpeg": ".jpg"}.get(fmt.lower(), "." + fmt.lower())


def image_cache(path: str, cache_dir: str | None) -> str:
  """Where a parquet file's embedded images go: cache_dir, else a folder beside the file
  named after it and its content hash."""
  if cache_dir:
    return cache_dir
  stem = os.path.splitext(os.path.basename(path))[0]
  digest = file_source(path).rsplit("sha1 ", 1)[1].rstrip(")")
  return os.path.join(os.path.dirname(os.path.abspath(path)), f"{stem}.images-{digest}")
