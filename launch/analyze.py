"""The paper's §3 diagnostics: teacher vs student visual attention on a benchmark.

  python launch/analyze.py --teacher=DIR --student=DIR[,DIR...] --benchmark=NAME[,NAME...]
                           --data=NAME=PATH [--limit=N] [--out=results/analysis]
                           [--layers=8,9,...] [--bins=5] [--heatmaps=3] [--batch_size=8]

Per benchmark, OUT/<benchmark>/ gets (docs/EVALUATION.md, "Diagnostics"):
  similarity.json / .md / .png   cosine of the visual-attention maps per layer pair
                                 (student layer x teacher layer), every student side by
                                 side; the matched pairs (docs/METHOD.md §6) boxed
  bins.json / bins.png           per-sample similarity in the matched band, cut into
                                 --bins quantile bins, the student's accuracy per bin
  intervention.json / .md        CR benchmarks (a likelihood protocol): accuracy with the
                                 student's visual attention in --layers (default: its
                                 matched band) replaced by the teacher-student average
                                 and by the teacher's (cdx/eval/diagnostics.py)
  heatmaps.png                   attention of the prompt's last token over the first
                                 --heatmaps images: teacher and students side by side

--teacher / --student: stage dirs of launch/run.py or HF LLaVA dirs (same number of visual
tokens per image); --data as in launch/eval.py (e.g. --data=synthetic=DIR/data/eval).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--teacher", required=True, help="teacher stage dir or HF LLaVA dir")
  p.add_argument("--student", required=True, help="comma-separated student dirs")
  p.add_argument("--benchmark", required=True, help="comma-separated benchmark names")
  p.add_argument("--data", action="append", default=[], help="NAME=PATH (repeatable)")
  p.add_argument("--limit", type=int, help="items per benchmark (default all)")
  p.add_argument("--out", default=os.path.join("results", "analysis"))
  p.add_argument("--layers", help="student layers to intervene in (default: matched band)")
  p.add_argument("--bins", type=int, default=5, help="similarity quantile bins")
  p.add_argument("--heatmaps", type=int, default=3, help="images in heatmaps.png")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--tokenizer", help="HF tokenizer dir (default: found beside each model)")
  p.add_argument("--image_mode", default="square", choices=("square", "pad"))
  p.add_argument("--missing", default="error", choices=("error", "skip"))
  return p.parse_args(argv)


def _names(dirs: list[str]) -> list[str]:
  """Short display names: the folder names, with the parent added where they clash."""
  base = [os.path.basename(d) for d in dirs]
  return [os.path.join(os.path.basename(os.path.dirname(d)), b) if base.count(b) > 1 else b
          for d, b in zip(dirs, base)]


def _write_json(obj, path: str) -> str:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)
  return path


def _matrix_markdown(name: str, sim: dict) -> list[str]:
  m = sim["matrix"]
  pairs = {(s, t) for s, g in zip(sim["student_layers"], sim["teacher_groups"]) for t in g}
  lines = [f"### {name}", "",
           f"mean matched-band similarity over {len(sim['per_sample'])} samples: "
           f"{float(sim['per_sample'].mean()):.4f} (* = matched pair)", "",
           "| student \\ teacher | " + " | ".join(str(t) for t in range(m.shape[1])) + " |",
           "|---" * (m.shape[1] + 1) + "|"]
  for s in range(m.shape[0]):
    cells = [f"{m[s, t]:.4f}{'*' if (s, t) in pairs else ''}" for t in range(m.shape[1])]
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  return lines + [""]


def analyze(args, benchmark: str, dataset, teacher, students: dict, out_dir: str) -> list:
  from cdx.eval import diagnostics
  from cdx.eval import plots
  os.makedirs(out_dir, exist_ok=True)
  items = dataset.items[:args.limit] if args.limit else dataset.items
  units = diagnostics.units_of(items)
  written = []

  sims, bins, correct_by = {}, {}, {}
  for name, student in students.items():
    sims[name] = diagnostics.layer_similarity(teacher, student, units, args.batch_size)
    ok, protocol = diagnostics.per_item_correct(benchmark, items, student, args.batch_size)
    bins[name] = {"protocol": protocol, "bins": diagnostics.similarity_bins(
        sims[name]["per_sample"], ok, min(args.bins, len(units)))}
    correct_by[name] = ok
  written.append(_write_json({
      "benchmark": benchmark, "teacher": teacher.name, "items": len(units),
      "students": {n: {"matrix": s["matrix"].tolist(), "student_layers": s["student_layers"],
                       "teacher_groups": s["teacher_groups"],
                       "mean_band_similarity": float(s["per_sample"].mean()),
                       "model": students[n].name} for n, s in sims.items()}},
      os.path.join(out_dir, "similarity.json")))
  md = [f"# Teacher-student visual-attention cosine: {benchmark}", "",
        f"teacher: {teacher.name}", ""]
  for name, sim in sims.items():
    md += _matrix_markdown(name, sim)
  with open(os.path.join(out_dir, "similarity.md"), "w") as f:
    f.write("\n".join(md))
  written.append(os.path.join(out_dir, "similarity.md"))
  written.append(plots.similarity_figure(
      {n: s["matrix"] for n, s in sims.items()}, os.path.join(out_dir, "similarity.png"),
      {n: (s["student_layers"], s["teacher_groups"]) for n, s in sims.items()}))
  samples = {n: [{"uid": u["uid"], "id": u["id"], "similarity": float(s), "correct": c} for u, s, c in
                 zip(units, sims[n]["per_sample"], correct_by[n])] for n in students}
  written.append(_write_json({"benchmark": benchmark, "students": bins, "samples": samples},
                             os.path.join(out_dir, "bins.json")))
  written.append(plots.bins_figure({n: b["bins"] for n, b in bins.items()},
                                   os.path.join(out_dir, "bins.png")))

  layers = [int(x) for x in args.layers.split(",")] if args.layers else None
  try:
    result = {n: diagnostics.intervention(benchmark, items, teacher, s, layers,
                                          args.batch_size) for n, s in students.items()}
  except ValueError as e:
    if "no likelihood protocol" not in str(e):
      raise
    print(f"{benchmark}: no intervention ({e})")
  else:
    written.append(_write_json({"benchmark": benchmark, "students": result},
                               os.path.join(out_dir, "intervention.json")))
    md = [f"# Attention intervention: {benchmark}", "",
          "| student | layers | none | average | teacher | delta average | delta teacher |",
          "|---|---|---|---|---|---|---|"]
    for n, r in result.items():
      a, d = r["accuracy"], r["delta"]
      md.append(f"| {n} | {','.join(map(str, r['layers']))} | {a['none']:.2f} | "
                f"{a['average']:.2f} | {a['teacher']:.2f} | {d['average']:+.2f} | "
                f"{d['teacher']:+.2f} |")
    with open(os.path.join(out_dir, "intervention.md"), "w") as f:
      f.write("\n".join(md) + "\n")
    written.append(os.path.join(out_dir, "intervention.md"))

  shown = units[:max(args.heatmaps, 1)]
  grids = {"teacher": diagnostics.question_heatmaps(teacher, shown)}
  grids.update({n: diagnostics.question_heatmaps(s, shown) for n, s in students.items()})
  written.append(plots.heatmaps_figure([u["image"] for u in shown],
                                       [u["prompt"] for u in shown], grids,
                                       os.path.join(out_dir, "heatmaps.png")))
  return written


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  try:
    from cdx.eval import benchmarks as benchmarks_lib
    from cdx.eval import run
    data = benchmarks_lib.parse_data(args.data)
    names = [n for n in args.benchmark.split(",") if n]
    datasets = [benchmarks_lib.load_from_data(n, data, args.missing) for n in names]
    load = lambda d: run.load_model(os.path.normpath(d), tokenizer=args.tokenizer,
                                    image_mode=args.image_mode)
    teacher = load(args.teacher)
    dirs = [os.path.normpath(d) for d in args.student.split(",") if d]
    students = {n: load(d) for n, d in zip(_names(dirs), dirs)}
    for name, ds in zip(names, datasets):
      for path in analyze(args, name, ds, teacher, students, os.path.join(args.out, name)):
        print(f"wrote {path}")
  except (ValueError, FileNotFoundError) as e:  # the user's to fix: no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
