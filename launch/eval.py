"""Evaluates a model on benchmarks from local files (or on the synthetic world's eval sets).

Benchmarks (docs/EVALUATION.md has every layout and what each number means):

  python launch/eval.py --model=DIR --benchmark=sugarcrepe,pope,... --data=NAME=PATH
                        [--data=NAME_images=DIR] [--limit=N] [--protocol=generate,...]
                        [--batch_size=16] [--max_new_tokens=32] [--out=results] [--name=NAME]
                        [--missing=error|skip] [--fresh] [--no_progress]

  writes OUT/<name>/<benchmark>.json (scores, per-item records keyed by uid, dataset
  fingerprint, settings), OUT/<name>/<benchmark>.<protocol>.jsonl (the resume log: a
  stopped eval rerun with the same flags skips the items it holds), OUT/<name>/table.md
  and OUT/table.md (every model under OUT, with the paper's VQA and CR averages).
  --name defaults to the model folder's name. Protocols: generate (greedy replies),
  likelihood (P(" A") vs P(" B") for SugarCrepe, P(" Yes") for paired benchmarks),
  caption (caption log-likelihood); each benchmark runs those it supports (default
  generate and likelihood, or caption for SugarCrepe++, which has neither).

Synthetic world, seen and held-out combinations (no --benchmark):

  python launch/eval.py --model=DIR/<stage> [--data=DIR/data] [--limit=N] [--out=FILE]
                        [--records]
  --data: the synthetic export (default <model>/../data); --out: the JSON results
  (default <model>/eval.json). Prints one line per benchmark.

Throughput: add --bench=1,16 to time greedy generation of the first --limit prompts of the
first benchmark (or of the synthetic VQA set) at each batch size, in one process; prints
items/s and whether every batch size gave the same replies (docs/PERFORMANCE.md).

--model: a stage dir of launch/run.py (final/ + model.json) or an HF LLaVA dir;
--tokenizer: an HF tokenizer dir when none is found beside the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True, help="DIR/<stage> or an HF LLaVA dir")
  p.add_argument("--benchmark", help="comma-separated benchmark names (see --help)")
  p.add_argument("--data", action="append", default=[],
                 help="NAME=PATH (repeatable); without --benchmark: the synthetic export")
  p.add_argument("--limit", type=int, help="items per benchmark / eval file (default all)")
  p.add_argument("--protocol",
                 help="comma-separated: generate, likelihood, caption (default: "
                      "generate,likelihood, or caption where neither applies)")
  p.add_argument("--out", help="results folder (default results) / synthetic JSON file")
  p.add_argument("--name", help="model name under --out (default: the model folder name)")
  p.add_argument("--tokenizer", help="HF tokenizer dir (default: found beside the model)")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--image_mode", default="square", choices=("square", "pad"))
  p.add_argument("--missing", default="error", choices=("error", "skip"),
                 help="items whose image file is absent: stop, or skip and count them")
  p.add_argument("--fresh", action="store_true", help="discard earlier per-item records")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument("--records", action="store_true", help="synthetic: per-item records too")
  p.add_argument("--bench", help="batch sizes to time generation at, e.g. 1,16")
  return p.parse_args(argv)


def _names(flag: str) -> list[str]:
  return [x for x in flag.split(",") if x]


def synthetic(args, model_dir: str) -> int:
  from cdx.eval import run
  if len(args.data) > 1 or (args.data and "=" in args.data[0]):
    raise ValueError(f"--data={args.data}: NAME=PATH flags need --benchmark=...; without "
                     "it --data is one synthetic export dir.")
  data = args.data[0] if args.data else os.path.join(os.path.dirname(model_dir), "data")
  out = args.out or os.path.join(model_dir, "eval.json")
  model = run.load_model(model_dir, data_dir=data, tokenizer=args.tokenizer,
                         image_mode=args.image_mode)
  results = run.evaluate_synthetic(model, data, args.limit, args.batch_size,
                                   args.max_new_tokens, records=args.records)
  run.write_results(results, out)
  print("\n".join(run.summary_lines(results)))
  print(f"wrote {out}")
  return 0


def _synthetic_export(eval_dir: str | None, model_dir: str) -> str:
  """The synthetic export whose tokenizer/ a tiny model uses: above --data=synthetic=DIR
  (DIR/eval or DIR/eval/heldout), else <model>/../data where tiny runs put it."""
  candidates = [os.path.dirname(model_dir)]
  if eval_dir:
    d = os.path.abspath(eval_dir)
    candidates = [os.path.dirname(d), os.path.dirname(os.path.dirname(d))] + candidates
  for d in candidates[:-1]:
    if os.path.isdir(os.path.join(d, "tokenizer")):
      return d
  return os.path.join(candidates[-1], "data")


def _protocols(flag: str | None, benchmark: str) -> list[str]:
  from cdx.eval import protocols
  if flag:
    return _names(flag)
  supported = protocols.tasks(benchmark)
  default = [p for p in (protocols.GENERATE, protocols.LIKELIHOOD) if p in supported]
  return default or list(supported)


def benchmarks(args, model_dir: str) -> int:
  from cdx.eval import benchmarks as benchmarks_lib
  from cdx.eval import results
  from cdx.eval import run
  data = benchmarks_lib.parse_data(args.data)
  names = _names(args.benchmark)
  datasets = [benchmarks_lib.load_from_data(n, data, args.missing) for n in names]
  model = run.load_model(model_dir, tokenizer=args.tokenizer, image_mode=args.image_mode,
                         data_dir=_synthetic_export(data.get("synthetic"), model_dir))
  if args.bench:
    return bench(args, model, datasets[0].items)
  name = args.name or os.path.basename(model_dir)
  out_dir = os.path.join(args.out or "results", name)
  for ds in datasets:
    r = results.evaluate_benchmark(model, ds, _protocols(args.protocol, ds.name), out_dir,
                                   args.limit,
                                   args.batch_size, args.max_new_tokens,
                                   progress=not args.no_progress, fresh=args.fresh)
    for protocol, value in r["headline"].items():
      shown = "no score (no answers)" if value is None else f"{value:.2f}"
      print(f"{ds.name:22s} {protocol:10s} {shown}  "
            f"({r['protocols'][protocol]['protocol']})")
    if r["unsupported"]:
      print(f"{ds.name:22s} not scored by {r['unsupported']}")
  for path in results.write_tables(args.out or "results", name):
    print(f"wrote {path}")
  return 0


def bench(args, model, items) -> int:
  from cdx.eval import run
  units = items[:args.limit] if args.limit else items
  if "prompt" not in units[0]:
    raise ValueError("--bench times generation: pick a benchmark whose items carry a "
                     "prompt (a VQA-style one, e.g. synthetic_vqa or gqa).")
  report = run.measure_generation(model, units, [int(b) for b in _names(args.bench)],
                                  args.max_new_tokens)
  print(json.dumps(report, indent=1))
  return 0


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  model_dir = os.path.normpath(args.model)
  try:
    if args.benchmark:
      return benchmarks(args, model_dir)
    if args.bench:
      from cdx.eval import benchmarks as benchmarks_lib
      from cdx.eval import run
      data = args.data[0] if args.data else os.path.join(os.path.dirname(model_dir), "data")
      model = run.load_model(model_dir, data_dir=data, tokenizer=args.tokenizer,
                             image_mode=args.image_mode)
      return bench(args, model, benchmarks_lib.read_synthetic(
          os.path.join(data, "eval"))["vqa"])
    return synthetic(args, model_dir)
  except (ValueError, FileNotFoundError) as e:  # the user's to fix: no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
