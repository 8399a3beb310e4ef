"""Evaluates a trained model on the synthetic world's eval sets (seen and held-out).

  python launch/eval.py --model=DIR/<stage> [--data=DIR/data] [--limit=N] [--out=FILE]
                        [--tokenizer=DIR] [--batch_size=8] [--max_new_tokens=32]
                        [--image_mode=square] [--records]

--model: a stage dir of launch/run.py (final/ + model.json) or an HF LLaVA dir.
--data: the synthetic export (default: <model>/../data, where tiny runs put it).
--out: the JSON results (default: <model>/eval.json). Prints one line per benchmark.

Timing: `python launch/eval.py --model=WD/dft --limit=4 --out=/tmp/e.json` on a tiny-chain
dft stage (3 training steps) took 56 s wall, 18 s user CPU, on the shared 2-core CPU box
(load ~10): 2 splits x (56 SugarCrepe + 4 VQA generations + 16 yes/no scores).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True, help="DIR/<stage> or an HF LLaVA dir")
  p.add_argument("--data", help="synthetic export dir (default <model>/../data)")
  p.add_argument("--limit", type=int, help="items per eval file (default all)")
  p.add_argument("--out", help="results JSON (default <model>/eval.json)")
  p.add_argument("--tokenizer", help="HF tokenizer dir (default: found beside the model)")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--image_mode", default="square", choices=("square", "pad"))
  p.add_argument("--records", action="store_true", help="also write per-item records")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  from cdx.eval import run  # Imported late so that --help is instant.
  model_dir = os.path.normpath(args.model)
  data = args.data or os.path.join(os.path.dirname(model_dir), "data")
  out = args.out or os.path.join(model_dir, "eval.json")
  try:
    model = run.load_model(model_dir, data_dir=data, tokenizer=args.tokenizer,
                           image_mode=args.image_mode)
    results = run.evaluate_synthetic(model, data, args.limit, args.batch_size,
                                     args.max_new_tokens, records=args.records)
  except (ValueError, FileNotFoundError) as e:  # the user's to fix: no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  run.write_results(results, out)
  print("\n".join(run.summary_lines(results)))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
