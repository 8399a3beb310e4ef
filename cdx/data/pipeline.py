"""grain pipeline: LLaVA source → fixed-shape training batches (docs/ARCHITECTURE.md).

  source ─► shuffle(seed, reshuffled every epoch, over the global data)
         ─► repeat(num_epochs | forever)
         ─► this process's slice [process_index::process_count]
         ─► ExampleBuilder: validate, tokenize + labels, truncate, decode + preprocess image
            (threads, or `worker_count` processes)
         ─► BatchIterator: count skips/warnings, collect batch_size examples, right-pad

A batch is a dict of numpy arrays:
  input_ids int32 [B, L], labels int32 [B, L] (-100 masked), attention_mask int32 [B, L],
  pixel_values float32 [B, S, S, 3], has_image bool [B]
with L = max_length. Bad samples never stop an epoch: the builder turns them into skip
markers that the iterator counts in `stats` (strict mode raises instead). But a whole
epoch's worth of samples in a row without a usable one (every sample broken, every image
missing) raises `NoUsableData`, naming the files and the top skip reasons, instead of
searching forever. The iterator state (`get_state()`, JSON-able) taken between batches
restores the exact next batches.

`merge_stats` adds up the per-process `stats` into the checker's report format and
`skip_lines` renders it for the console: one count line, plus a warning line when more
than 5 % of the samples were skipped.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

from absl import flags
import grain
import jax
import numpy as np

from cdx.data import images
from cdx.data import sources
from cdx.data import templates
from cdx.data.templates import SampleError

SKIP = "_skip"
WARN = "_warnings"
WARN_FRACTION = 0.05  # skip_lines warns above this fraction of skipped samples


class NoUsableData(ValueError):
  """A whole epoch of samples without a usable one."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What a batch looks like and how samples are drawn."""
  batch_size: int                 # per process
  max_length: int
  num_visual_tokens: int
  template: str = "qwen2_base"
  image_size: int = 384
  image_mode: str = "square"
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None   # None = repeat forever
  drop_remainder: bool = True     # False: last partial batch padded with empty rows
  worker_count: int = 0           # grain worker processes (0 = in this process)
  read_threads: int = 2           # threads per process for sample preparation
  strict: bool = False            # raise on the first bad sample instead of skipping

  def __post_init__(self):
    for name in ("batch_size", "max_length", "num_visual_tokens", "image_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"PipelineConfig.{name}={getattr(self, name)} must be >= 1")
    if self.template not in templates.TEMPLATES:
      raise ValueError(f"PipelineConfig.template={self.template!r}; use one of "
                       f"{templates.TEMPLATES}")
    if self.image_mode not in images.MODES:
      raise ValueError(f"PipelineConfig.image_mode={self.image_mode!r}; use one of "
                       f"{images.MODES}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"PipelineConfig.num_epochs={self.num_epochs} must be >= 1 or None")


class ExampleBuilder:
  """RawSample → example dict, or a skip marker {"_skip": reason, "where": ...}.

  Example: input_ids/labels int32 [l <= max_length], pixel_values float32 [S, S, 3],
  has_image bool, "_warnings": [reason, ...]. Picklable (sent to grain workers).
  """

  def __init__(self, tokenizer, config: PipelineConfig):
    self.tokenizer = tokenizer
    self.config = config

  def tokenize(self, parsed: sources.Parsed) -> dict[str, Any]:
    """Encodes and truncates a parsed sample (raises SampleError naming where)."""
    c = self.config
    try:
      example = templates.encode(parsed.conversation, self.tokenizer, c.template,
                                 c.num_visual_tokens)
      too_long = len(example["input_ids"]) > c.max_length
      example = templates.truncate(example, c.max_length)
    except SampleError as e:
      raise SampleError(e.reason, f"{parsed.where}: {e}") from e
    example[WARN] = parsed.warnings + (["truncated"] if too_long else [])
    return example

  def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
    c = self.config
    try:
      parsed = sources.parse_sample(raw)
      example = self.tokenize(parsed)
    except SampleError as e:
      if c.strict:
        raise
      return {SKIP: e.reason, "where": raw["where"], "message": str(e)}
    if parsed.image is None:
      example["pixel_values"] = images.zero_image(c.image_size)
    else:
      example["pixel_values"] = images.preprocess(parsed.image, c.image_size, c.image_mode)
    example["has_image"] = parsed.image is not None
    return example


def pad_batch(examples: list[dict[str, Any]], batch_size: int, max_length: int,
              pad_id: int, image_size: int) -> dict[str, np.ndarray]:
  """Right-pads examples to [batch_size, max_length]; missing rows are empty (mask 0)."""
  if len(examples) > batch_size:
    raise ValueError(f"{len(examples)} examples exceed batch_size={batch_size}")
  ids = np.full((batch_size, max_length), pad_id, np.int32)
  labels = np.full((batch_size, max_length), templates.IGNORE, np.int32)
  mask = np.zeros((batch_size, max_length), np.int32)
  pixels = np.zeros((batch_size, image_size, image_size, 3), np.float32)
  has_image = np.zeros((batch_size,), bool)
  for b, ex in enumerate(examples):
    n = len(ex["input_ids"])
    ids[b, :n] = ex["input_ids"]
    labels[b, :n] = ex["labels"]
    mask[b, :n] = 1
    pixels[b] = ex["pixel_values"]
    has_image[b] = ex["has_image"]
  return dict(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=pixels,
              has_image=has_image)


def _new_stats(issues: list[sources.Issue]) -> dict[str, Any]:
  skipped = collections.Counter(i.reason for i in issues)
  return {"seen": len(issues), "ok": 0, "skipped": dict(skipped), "warnings": {}}


class BatchIterator:
  """Iterator of padded batches with exact, JSON-able state and skip statistics.

  `stats`: {"seen": samples looked at (load issues included), "ok": usable samples,
            "skipped": {reason: n}, "warnings": {reason: n}} for this process.
  """

  def __init__(self, dataset: grain.IterDataset, config: PipelineConfig, pad_id: int,
               issues: list[sources.Issue], epoch_size: int | None = None,
               name: str = "the data"):
    self.config = config
    self.pad_id = pad_id
    self._it = iter(dataset)
    self.stats = _new_stats(issues)
    self._done = False
    self._epoch_size = epoch_size  # samples of one epoch on this process
    self._name = name
    self._since_ok = 0  # samples in a row without a usable one
    self._examples = {i.reason: i.message for i in issues}  # reason -> first message

  def __iter__(self) -> "BatchIterator":
    return self

  def _count(self, key: str, reason: str) -> None:
    self.stats[key][reason] = self.stats[key].get(reason, 0) + 1

  def __next__(self) -> dict[str, np.ndarray]:
    c = self.config
    examples = []
    while len(examples) < c.batch_size and not self._done:
      try:
        ex = next(self._it)
      except StopIteration:
        self._done = True
        break
      self.stats["seen"] += 1
      if SKIP in ex:
        self._count("skipped", ex[SKIP])
        self._examples.setdefault(ex[SKIP], ex.get("message", ex["where"]))
        self._since_ok += 1
        if self._epoch_size and self._since_ok >= self._epoch_size:
          raise self._no_usable_data(f"{self._since_ok} samples in a row (a whole epoch)")
        continue
      self._since_ok = 0
      self.stats["ok"] += 1
      for w in ex[WARN]:
        self._count("warnings", w)
      examples.append(ex)
    if self._done and self.stats["ok"] == 0 and self.stats["seen"]:
      raise self._no_usable_data(f"all {self.stats['seen']} samples")
    if not examples or (len(examples) < c.batch_size and c.drop_remainder):
      raise StopIteration
    return pad_batch(examples, c.batch_size, c.max_length, self.pad_id, c.image_size)

  def _no_usable_data(self, how_many: str) -> NoUsableData:
    top = sorted(self.stats["skipped"].items(), key=lambda kv: -kv[1])[:3]
    reasons = "; ".join(f"{r} x{n}, e.g. {self._examples.get(r, '?')}" for r, n in top)
    return NoUsableData(f"no usable training sample in {self._name}: {how_many} skipped. "
                        f"Top reasons: {reasons}. Run `python -m cdx.data.check FILE "
                        "--image-root DIR` for a full report.")

  def get_state(self) -> dict[str, Any]:
    """JSON-able state; take it between batches."""
    return {"grain": self._it.get_state(), "stats": _copy_stats(self.stats),
            "done": self._done}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ("grain", "stats", "done"):
      if key not in state:
        raise ValueError(f"iterator state lacks {key!r}; pass a dict from get_state()")
    self._it.set_state(state["grain"])
    self.stats = _copy_stats(state["stats"])
    self._done = bool(state["done"])


def _copy_stats(stats: dict[str, Any]) -> dict[str, Any]:
  return {"seen": int(stats["seen"]), "ok": int(stats["ok"]),
          "skipped": dict(stats["skipped"]), "warnings": dict(stats["warnings"])}


def merge_stats(per_process: list[dict[str, Any]]) -> dict[str, Any]:
  """Per-process `BatchIterator.stats` → one report keyed like `cdx.data.check --json`:
  {"total", "ok", "bad", "reasons": {reason: n}, "warnings": {reason: n}}."""
  reasons, warnings = collections.Counter(), collections.Counter()
  for st in per_process:
    reasons.update(st["skipped"])
    warnings.update(st["warnings"])
  return {"total": sum(st["seen"] for st in per_process),
          "ok": sum(st["ok"] for st in per_process), "bad": sum(reasons.values()),
          "reasons": dict(sorted(reasons.items())), "warnings": dict(sorted(warnings.items()))}


def skip_lines(report: dict[str, Any], stage: str,
               warn_fraction: float = WARN_FRACTION) -> list[str]:
  """Console lines of a `merge_stats` report: the counts, and a warning above the limit.

  e.g. ["[sft] data: 447 samples, 12 ok, 435 skipped (97.3%): bad_roles 400, ...",
        "[sft] WARNING: 97.3% of the training samples were skipped (> 5%); ..."]
  """
  total, bad = report["total"], report["bad"]
  frac = bad / total if total else 0.0
  top = ", ".join(f"{r} {n}" for r, n in sorted(report["reasons"].items(),
                                                  key=lambda kv: -kv[1]))
  line = f"[{stage}] data: {total} samples, {report['ok']} ok, {bad} skipped ({frac:.1%})"
  line += f": {top}" if top else ""
  if report["warnings"]:
    line += "; fixed: " + ", ".join(f"{w} {n}" for w, n in report["warnings"].items())
  lines = [line]
  if frac > warn_fraction:
    lines.append(f"[{stage}] WARNING: {frac:.1%} of the training samples were skipped "
                 f"(> {warn_fraction:.0%}); run `python -m cdx.data.check` on the training "
                 "files to see why.")
  return lines


def make_pipeline(source: sources.LlavaSource, tokenizer, config: PipelineConfig, *,
                  pad_id: int, process_index: int | None = None,
                  process_count: int | None = None) -> BatchIterator:
  """Builds the batch iterator of this process (defaults: jax's process index/count).

  Args:
    source: random-access LLaVA samples (`LlavaSource`, or any source of RawSamples).
    tokenizer: an HF tokenizer holding `<image>` (see `cdx.data.tokenizer.load_tokenizer`).
    config: batch shape and sampling.
    pad_id: the id written into padding (`TokenIds.pad`).
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
  issues = list(getattr(source, "issues", []))
  if len(source) == 0:
    why = f"; e.g. {issues[0].message}" if issues else ""
    raise NoUsableData(f"{source!r} holds no samples ({len(issues)} unreadable lines{why})")
  if config.strict and issues:
    raise SampleError(issues[0].reason, issues[0].message)
  ds = grain.MapDataset.source(source)
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(config.num_epochs)
  ds = ds[pi::pc]
  ds = ds.map(ExampleBuilder(tokenizer, config))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                               prefetch_buffer_size=max(1, 4 * config.read_threads)))
  if config.worker_count > 0:
    # grain's worker processes read absl flags; programs not started by absl.app have
    # not parsed them, so mark them parsed (defaults) instead of failing.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
  files = getattr(source, "files", None)
  name = ", ".join(files) if files else repr(source)
  # Load issues are counted once, by process 0.
  return BatchIterator(it_ds, config, pad_id, issues if pi == 0 else [],
                       epoch_size=-(-len(source) // pc), name=name)

