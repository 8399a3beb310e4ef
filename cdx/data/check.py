"""Dataset checker: counts usable and bad samples with the pipeline's own validation.

  python -m cdx.data.check FILE [FILE ...] --image-root DIR [--json] [--strict]
         [--allow-outside-root]
         [--tokenizer DIR --max-length N --num-visual-tokens N --template NAME]

Every sample goes through `sources.parse_sample` (structure, roles, placeholder, image
decoding), and with --tokenizer also through `ExampleBuilder.tokenize` (template, length):
exactly what the pipeline does, so the counts agree with a pipeline pass over one epoch.

--json prints one object: {"total", "ok", "bad", "reasons": {reason: n}, "warnings":
{reason: n}}; `bad` = sum of `reasons`; warnings (fixed samples) are among `ok`. Without
--json a readable report lists an example location (file:line or file#index, id) of each
problem. --strict stops at the first bad sample with its error (exit status 1).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from typing import Any, Sequence

from cdx.data import sources
from cdx.data.templates import SampleError


@dataclasses.dataclass
class Report:
  total: int = 0
  ok: int = 0
  reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  warnings: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> message

  @property
  def bad(self) -> int:
    return sum(self.reasons.values())

  def to_json(self) -> dict[str, Any]:
    return {"total": self.total, "ok": self.ok, "bad": self.bad,
            "reasons": dict(sorted(self.reasons.items())),
            "warnings": dict(sorted(self.warnings.items()))}

  def to_text(self) -> str:
    lines = [f"total {self.total}  ok {self.ok}  bad {self.bad}"]
    for kind, counts in (("skip", self.reasons), ("warn", self.warnings)):
      for reason, n in sorted(counts.items()):
        lines.append(f"  {kind} {reason:26s} {n:8d}   e.g. {self.examples[reason]}")
    return "\n".join(lines)


def check_source(source: sources.LlavaSource, builder=None, strict: bool = False) -> Report:
  """Validates every sample; `builder` (a pipeline.ExampleBuilder) adds the length checks.

  strict: re-raise the first SampleError (it names file, line/id and field).
  """
  report = Report()
  for issue in source.issues:
    report.total += 1
    report.reasons[issue.reason] += 1
    report.examples.setdefault(issue.reason, issue.message)
  for i in range(len(source)):
    report.total += 1
    try:
      parsed = sources.parse_sample(source[i])
      warnings = parsed.warnings
      if builder is not None:
        warnings = builder.tokenize(parsed)["_warnings"]
    except SampleError as e:
      if strict:
        raise
      report.reasons[e.reason] += 1
      report.examples.setdefault(e.reason, str(e))
      continue
    report.ok += 1
    for w in warnings:
      report.warnings[w] += 1
      report.examples.setdefault(w, parsed.where)
  return report


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m cdx.data.check", description=__doc__.split(
      "\n")[0])
  ap.add_argument("files", nargs="+", help="LLaVA .json or .jsonl files")
  ap.add_argument("--image-root", default=None, help="folder the 'image' paths are under")
  ap.add_argument("--json", action="store_true", help="print one JSON object")
  ap.add_argument("--strict", action="store_true", help="stop at the first bad sample")
  ap.add_argument("--allow-outside-root", action="store_true",
                  help="accept image paths that leave --image-root (absolute or '..')")
  ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir: also check lengths")
  ap.add_argument("--max-length", type=int, default=2048)
  ap.add_argument("--num-visual-tokens", type=int, default=728)
  ap.add_argument("--template", default="qwen2_base")
  args = ap.parse_args(argv)
  try:
    source = sources.LlavaSource(args.files, args.image_root, strict=args.strict,
                                 allow_outside_root=args.allow_outside_root)
    builder = None
    if args.tokenizer:
      from cdx.data import pipeline, tokenizer  # pylint: disable=g-import-not-at-top
      tok, _ = tokenizer.load_tokenizer(args.tokenizer)
      cfg = pipeline.PipelineConfig(batch_size=1, max_length=args.max_length,
                                    num_visual_tokens=args.num_visual_tokens,
                                    template=args.template, strict=True)
      builder = pipeline.ExampleBuilder(tok, cfg)
    report = check_source(source, builder, strict=args.strict)
  except ValueError as e:  # SampleError is a ValueError: strict mode's first bad sample
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(report.to_json()) if args.json else report.to_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
