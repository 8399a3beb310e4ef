"""The paper's experiment in miniature: SFT baseline vs CompoDistill (and its ablations).

  python launch/miniature.py --workdir=DIR [--arms=baseline,compodistill,no_vat]
                             [--eval_limit=100] [--steps=N]

On the tiny preset (synthetic world, CPU), every arm shares the teacher chain
(pretrain -> finetune) and the student's stage 0 (pretrain_student), then:

  baseline       finetune_student                   LM only (the paper's "SFT" row)
  compodistill   dpt -> dft -> sft                  LM + KD + attention (the full method)
  no_vat         dpt -> dft_novat -> sft_novat      DFT without the attention term
  teacher        (the finetuned teacher itself)

An arm is the stage folder of its final model (`ARMS`); a new arm that varies a stage is a
variant recipe in configs/ (e.g. configs/dft_novat.py) plus its rows in configs/registry.py
and `ARMS`.

Each arm's final model is scored by `cdx.eval.run` on the synthetic SugarCrepe-style,
VQA and Winoground-style sets, seen and held-out combinations. The table goes to stdout and
DIR/miniature.json. `--steps` shortens every stage (a smoke run); results from such a run
say nothing about the method.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import registry  # noqa: E402
from launch import run  # noqa: E402

# arm -> the stage folder holding its final model. Each is built with its upstream stages
# (configs/registry.py says which config builds which folder); shared ones are built once.
ARMS = {
    "teacher": "finetune",
    "baseline": "finetune_student",
    "compodistill": "sft",
    "no_vat": "sft_novat",
}


def train_arm(arm: str, workdir: str, common: list[str]) -> str:
  final = ARMS[arm]
  config = registry.config_spec(final, "tiny")  # Tiny runs build their missing upstream.
  if run.main([f"--config={config}", f"--workdir={workdir}", *common]) != 0:
    raise SystemExit(f"arm {arm}: {config} failed")
  return os.path.join(workdir, final)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="workdir_miniature")
  p.add_argument("--arms", default="teacher,baseline,compodistill,no_vat")
  p.add_argument("--eval_limit", type=int, default=100, help="items per eval set")
  p.add_argument("--steps", type=int, default=0, help="shorten every stage (smoke runs)")
  args = p.parse_args(argv)
  arms = [a for a in args.arms.split(",") if a]
  unknown = sorted(set(arms) - set(ARMS))
  if unknown:
    p.error(f"unknown arms {unknown}; choose from {sorted(ARMS)}")
  common = ["--config.log.progress=False", "--upstream.log.progress=False"]
  if args.steps:
    common += [f"--config.total_steps={args.steps}", f"--upstream.total_steps={args.steps}"]

  from cdx.eval import run as eval_run  # After training: the eval stack is lighter to load.
  data = os.path.join(args.workdir, "data")
  results = {}
  for arm in arms:
    model_dir = train_arm(arm, args.workdir, common)
    model = eval_run.load_model(model_dir, data_dir=data)
    results[arm] = eval_run.evaluate_synthetic(model, data, limit=args.eval_limit)
    results[arm].pop("records", None)

  rows = [("arm", "CR seen", "CR held-out", "VQA seen", "Wino group seen")]
  for arm, r in results.items():
    get = lambda split, bench, key: r.get(split, {}).get(bench, {}).get(key, float("nan"))
    rows.append((arm, f"{get('seen', 'sugarcrepe', 'overall'):.3f}",
                 f"{get('heldout', 'sugarcrepe', 'overall'):.3f}",
                 f"{get('seen', 'vqa', 'accuracy'):.3f}",
                 f"{get('seen', 'winoground', 'group'):.3f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  for row in rows:
    print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
  out = os.path.join(args.workdir, "miniature.json")
  with open(out, "w") as f:
    json.dump({"arms": results, "eval_limit": args.eval_limit, "steps": args.steps}, f,
              indent=2)
  print(f"results: {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
