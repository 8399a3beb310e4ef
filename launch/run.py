"""Runs one cdx stage (and, if allowed, the upstream stages it needs).

  python launch/run.py --config=configs/dft.py[:PRESET] [--workdir=DIR] [--config.a.b=v ...]
                       [--upstream.a.b=v ...] [--build_missing | --no_build_missing]
                       [--dry_run]

Each stage writes DIR/<stage>/: checkpoints/, metrics.jsonl, tb/, final/ (params for the
next stage), hf/ (an HF LLaVA export), summary.json and DONE. `--upstream.k=v` overrides
apply to the upstream stages built on the way (e.g. `--upstream.total_steps=5`).
`--dry_run` resolves and validates the configs and the plan, builds the models abstractly
(`jax.eval_shape`), prints the plan and exits: no weights or data are read.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cdx import config as config_lib  # noqa: E402
from configs import registry  # noqa: E402


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="configs/<stage>.py[:PRESET[,role=student]]")
  p.add_argument("--workdir", default="workdir", help="where stages write (default ./workdir)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--build_missing", dest="build_missing", action="store_true", default=None,
                 help="build missing upstream stages first (default for tiny)")
  g.add_argument("--no_build_missing", dest="build_missing", action="store_false")
  p.add_argument("--dry_run", action="store_true", help="validate and print the plan only")
  args, rest = p.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  upstream = ["--config." + a[len("--upstream."):] for a in rest if a.startswith("--upstream.")]
  unknown = [a for a in rest if not a.startswith(("--config.", "--upstream."))]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  return args, overrides, upstream


def main(argv=None) -> int:
  args, overrides, upstream = parse(sys.argv[1:] if argv is None else argv)
  # Imported late so that --help and config errors are instant.
  from cdx.data.templates import SampleError
  from cdx.checkpoint import CheckpointError
  from cdx.train import guard, loop, setup, stages
  try:
    try:  # Config problems are the user's to fix: no traceback.
      cfg = config_lib.load(args.config, overrides)
      config_dir = os.path.dirname(args.config.partition(":")[0]) or "."
      load_upstream = lambda spec: config_lib.load(
          os.path.join(config_dir, os.path.basename(spec)), upstream)
      todo = stages.plan(cfg, args.workdir, load_upstream, registry.config_spec,
                         args.build_missing)
      for stage_cfg in [cfg, *todo]:  # Values in range: one line naming the field.
        setup.validate(stage_cfg)
    except (ValueError, FileNotFoundError) as e:
      raise config_lib.UserError(str(e)) from None
    if args.dry_run:
      return loop.dry_run(todo, args.workdir)
    if not todo:
      print(f"Stage '{cfg.name}' is already finished in {args.workdir}/{cfg.name} (DONE).")
    for stage_cfg in todo:
      loop.run_stage(stage_cfg, args.workdir)
  except (stages.MissingInputError, config_lib.UserError, SampleError, CheckpointError,
          guard.GuardError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except guard.Interrupted as e:  # SIGTERM/SIGINT: checkpointed, resumable.
    print(e, file=sys.stderr)
    return e.exit_code
  return 0


if __name__ == "__main__":
  sys.exit(main())
