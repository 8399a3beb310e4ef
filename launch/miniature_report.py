"""The miniature's report (launch/miniature.py): per-row statistics over seeds, paired
bootstrap intervals between rows and the gap closure (cdx/eval/compare.py), the markdown
table and the plots. Pure functions of the scored results; nothing here trains or loads
a model."""
import os

# Pairs of rows compared by a paired bootstrap over items (first minus second).
COMPARE = [("teacher", "sft"), ("kd", "sft"), ("taf", "kd"), ("vat", "kd"),
           ("compodistill", "kd"), ("compodistill", "taf"), ("compodistill", "vat"),
           ("compodistill", "sft")]


def cr_all(result: dict, key: str = "items") -> float:
  """CR over both splits (mean of the per-item scores): the headline (caption likelihood),
  or with key="items_option" the two-choice question's."""
  v = list(result[key].values())
  return sum(v) / len(v)


def summarize(evals: dict, text_only: dict, blind: dict, rounds: int) -> dict:
  """Rows (mean ± std over seeds), paired bootstrap between rows, the gap closure."""
  import numpy as np
  from cdx.eval import compare
  keys = sorted(evals["teacher"][0]["items"])
  for row, runs in evals.items():
    for r in runs:
      if sorted(r["items"]) != keys:
        raise SystemExit(f"row {row}: scored other items than the teacher (rerun with the "
                         "same --cr_limit).")
  item_means = {row: np.mean([[r["items"][k] for k in keys] for r in runs], axis=0)
                for row, runs in evals.items()}
  rows = {}
  for row, runs in evals.items():
    gen = lambda key, split="seen": [r["generate"][split][key] for r in runs]
    rows[row] = {
        "seeds": len(runs),
        "cr": compare.seed_summary([cr_all(r) for r in runs]),
        "cr_seen": compare.seed_summary([r["cr"]["seen"]["overall"] for r in runs]),
        "cr_heldout": compare.seed_summary([r["cr"]["heldout"]["overall"] for r in runs]),
        "cr_se_items": compare.standard_error(item_means[row]),
        "cr_option": compare.seed_summary([cr_all(r, "items_option") for r in runs]),
        "cr_option_by_order": {o: compare.seed_summary(
            [r["cr_option"]["seen"]["by_order"][o] for r in runs])
            for o in ("pos_first", "pos_second")},
        "gen_cr": compare.seed_summary(gen("cr")),
        "gen_unparsed": compare.seed_summary(gen("unparsed_rate")),
        "gen_by_order": {o: compare.seed_summary([r["generate"]["seen"]["by_order"][o]
                                                  for r in runs])
                         for o in ("pos_first", "pos_second")},
        "vqa_seen": compare.seed_summary(gen("vqa")),
        "vqa_heldout": compare.seed_summary(gen("vqa", "heldout")),
        "per_seed_cr": [cr_all(r) for r in runs],
    }
  pairs = {f"{a} - {b}": compare.paired_bootstrap(item_means[a], item_means[b], rounds)
           for a, b in COMPARE if a in item_means and b in item_means}
  closure = None
  if all(r in item_means for r in ("compodistill", "kd", "teacher")):
    closure = compare.gap_closure_bootstrap(item_means["compodistill"], item_means["kd"],
                                            item_means["teacher"], rounds)
    t = cr_all(evals["teacher"][0])
    per_seed = [compare.gap_closure(cr_all(c), cr_all(k), t)
                for c, k in zip(evals["compodistill"], evals["kd"])]
    closure["per_seed"] = per_seed
    closure["seed_summary"] = compare.seed_summary(per_seed)
  return {"rows": rows, "pairs": pairs, "gap_closure": closure, "items": len(keys),
          "blind": {"cr": cr_all(blind), "cr_seen": blind["cr"]["seen"]["overall"],
                    "cr_option": cr_all(blind, "items_option"),
                    "vqa_seen": blind["generate"]["seen"]["vqa"],
                    "unparsed": blind["generate"]["seen"]["unparsed_rate"]},
          "text_only": text_only}


def markdown(summary: dict, meta: dict) -> str:
  pm = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
  smoke = " (SMOKE RUN: --quick, says nothing about the method)" if meta["quick"] else ""
  lines = [f"# Miniature results{smoke}",
           "", f"Command: `{meta['command']}`  ", f"Wall time: {meta['wall_s']:.0f} s; "
           f"items per row: {summary['items']} (CR, both splits); seeds: {meta['seeds']}", "",
           "| row | seeds | CR (caption lik., all) | CR seen | CR held-out | SE items "
           "| CR two-choice (lik., all) | gen CR seen | unparsed | VQA seen | VQA held-out |",
           "|" + "---|" * 11]
  for row, r in summary["rows"].items():
    lines.append(f"| {row} | {r['seeds']} | {pm(r['cr'])} | {pm(r['cr_seen'])} | "
                 f"{pm(r['cr_heldout'])} | {r['cr_se_items']:.4f} | {pm(r['cr_option'])} | "
                 f"{pm(r['gen_cr'])} | {pm(r['gen_unparsed'])} | {pm(r['vqa_seen'])} | "
                 f"{pm(r['vqa_heldout'])} |")
  b, t = summary["blind"], summary["text_only"]
  lines.append(f"| blind (teacher, grey) | 1 | {b['cr']:.3f} | {b['cr_seen']:.3f} | | | "
               f"{b['cr_option']:.3f} | | {b['unparsed']:.3f} | {b['vqa_seen']:.3f} | |")
  best = {s: v["best"] for s, v in t.items()}
  lines.append("| text-only (best heuristic) | - | | " + " | ".join(
      f"{best[s]['overall']:.3f} ({best[s]['name']})" for s in ("seen", "heldout") if s in best)
      + " | | | | | | |")
  lines += ["", "Paired bootstrap over items (scores averaged over seeds), 95 % interval:", "",
            "| comparison | diff | interval | P(diff <= 0) |", "|---|---|---|---|"]
  for name, p in summary["pairs"].items():
    lines.append(f"| {name} | {p['diff']:+.3f} | [{p['lo']:+.3f}, {p['hi']:+.3f}] | "
                 f"{p['p_le_0']:.3f} |")
  g = summary["gap_closure"]
  if g:
    lines += ["", f"Gap closure (compodistill - kd) / (teacher - kd): {g['closure']:.3f} "
              f"[{g['lo']:.3f}, {g['hi']:.3f}] (bootstrap over items); per seed "
              f"{pm(g['seed_summary'])} (the paper: about 0.59)."]
  gate = meta["gate"]
  lines += ["", f"Gate: {'passed' if gate['passed'] else 'FAILED'} " + ", ".join(
      f"{k} = {v:.3f} (>= {gate['thresholds'][k]})" for k, v in gate["checks"].items())]
  if gate.get("ignored"):
    lines.append("The gate FAILED and the rows were trained anyway (--ignore_gate): they "
                 "measure distillation from a teacher short of the gate, not the recipe's.")
  if "teacher_grounding" in gate:
    lines.append("Teacher loss per token, real / grey / another sample's image: " + "; ".join(
        f"{k} {v['real']:.3f} / {v['grey']:.3f} / {v['other']:.3f}"
        for k, v in gate["teacher_grounding"].items()) + ".")
    lines.append("Per target word (captions), real / another image: " + "; ".join(
        f"{c} {v['real']:.3f} / {v['other']:.3f}" for c, v in
        gate["teacher_grounding"]["pretrain"].get("classes", {}).items() if v["tokens"]) + ".")
    rel = gate["teacher_grounding"].get("pretrain_2obj", {}).get("classes", {}).get("relation")
    if rel and rel["tokens"]:
      lines.append(f"Relation word in two-object captions (the image decides it), real / "
                   f"another image: {rel['real']:.3f} / {rel['other']:.3f}.")
  per_type = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in sorted(d.items()))
  seen = gate.get("teacher_vqa_types")
  if seen:
    lines.append(f"Teacher VQA per type, the gate's seen items: {per_type(seen)}.")
  if "teacher_train_vqa" in gate:
    t = gate["teacher_train_vqa"]
    lines.append(f"Teacher VQA on {t['n']} questions about its own training images: "
                 f"{t['accuracy']:.3f} ({per_type(t['by_category'])}); low here and on the "
                 "gate's items = not learnt (steps, sizes); low on the gate's only = not "
                 "carried to new images.")
  share = meta.get("attention_share")
  if share:
    lines.append(f"Attention term at DFT start: |g_attn| / |g_lm+kd| = {share['ratio']:.3f} at "
                 f"weight {share['attn_weight']} (share {share['share']:.3f}).")
  return "\n".join(lines) + "\n"


def plots(summary: dict, similarity: dict | None, out_dir: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  rows = summary["rows"]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  names = list(rows)
  ax.bar(names, [rows[n]["cr"]["mean"] for n in names],
         yerr=[rows[n]["cr"]["std"] for n in names], capsize=4, color="tab:blue")
  ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
  ax.axhline(summary["blind"]["cr"], color="tab:red", ls=":", lw=1, label="teacher, grey")
  ax.set_ylabel("CR accuracy (caption likelihood)")
  ax.set_title("Mean ± std over seeds")
  ax.legend(loc="lower right", fontsize=8)
  paths = [os.path.join(out_dir, "cr_bars.png")]
  fig.tight_layout()
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  if similarity:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for row, s in similarity.items():
      v = s["best_per_student_layer"]
      ax.plot(range(len(v)), v, marker="o", label=row)
    ax.set_xlabel("student layer")
    ax.set_ylabel("best cosine with a teacher layer")
    ax.set_title("Visual-attention similarity by layer (seed 0)")
    ax.legend(fontsize=8)
    paths.append(os.path.join(out_dir, "similarity_by_layer.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths
