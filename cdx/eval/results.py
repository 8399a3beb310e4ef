"""Runs benchmarks on a model, resumably, and writes their results and tables.

  model = run.load_model("DIR/dft")
  ds = benchmarks.load("sugarcrepe", "/data/sugarcrepe", images="/data/coco/val2017")
  out = evaluate_benchmark(model, ds, ["generate", "likelihood"], "results/dft")
  write_tables("results")          # results/<model>/table.md and results/table.md

Files under OUT = results/<model name>/:
  <benchmark>.<protocol>.jsonl   the resume log: a settings line, then one line per
                                 finished item {"uid", "outputs"} (the model's raw
                                 outputs for the item's units: replies or log-probs),
                                 appended as chunks of items finish
  <benchmark>.json               {"benchmark", "fingerprint", "skipped", "settings",
                                 "protocols": {protocol: scores (with the scorer's
                                 "protocol")}, "headline": {protocol: number},
                                 "unsupported": [protocols], "records": {uid: {protocol:
                                 {"outputs", "records"}}}}
A rerun reads the log, skips the uids it holds and scores the union, so a stopped eval
resumes; its settings line must match (model, template, image mode, dtypes, dataset
fingerprint, max_new_tokens; not batch size or limit), else `fresh=True` starts over.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax

from cdx.eval import protocols as protocols_lib
from cdx.eval import run

CHUNK_BATCHES = 8   # items per log append = batch_size * CHUNK_BATCHES


class _Units(Exception):
  """Carries the units a task hands to its model callable (see `units_of`)."""

  def __init__(self, units):
    super().__init__("units")
    self.units = units


def units_of(task: protocols_lib.Task, item: dict) -> list[dict]:
  """The units one item gives the model under `task`, in order.

  Runs the task's scorer on [item] with a model callable that stops it on its (only)
  call, so the scorer stays the one place that builds prompts.
  """
  def grab(units):
    raise _Units(list(units))
  try:
    task.evaluate([item], grab)
  except _Units as u:
    return u.units
  raise AssertionError(f"{item['uid']}: the scorer never called the model.")


def _key(unit: dict) -> str:
  """What determines a unit's output: its image, prompt and options."""
  return json.dumps([unit.get("image"), unit["prompt"], unit.get("options")])


def _settings(model: run.Model, dataset, protocol: str, max_new_tokens: int) -> dict:
  """The settings a resumed log must share (they change the outputs)."""
  return {"model": model.name, "template": model.template,
          "image_mode": model.image_mode, "dtype": model.cfg.dtype,
          "param_dtype": model.cfg.param_dtype, "protocol": protocol,
          "dataset_sha1": dataset.fingerprint["sha1"],
          "max_new_tokens": (max_new_tokens if protocols_lib.tasks(dataset.name)[protocol]
                             .kind == "generate" else None),
          "caption_prompt": protocols_lib.CAPTION_PROMPT if protocol == "caption" else None}


def read_log(path: str, settings: dict, fresh: bool = False) -> dict[str, list]:
  """{uid: outputs} of a resume log. A torn last line (a kill while writing) is cut off:
  its item is redone."""
  if fresh or not os.path.isfile(path):
    with open(path, "w") as f:
      f.write(json.dumps({"settings": settings}) + "\n")
    return {}
  with open(path) as f:
    lines = f.read().split("\n")
  head = json.loads(lines[0])["settings"]
  if head != settings:
    diff = {k: (head.get(k), v) for k, v in settings.items() if head.get(k) != v}
    raise ValueError(f"{path} holds results made with other settings {diff} (was, now); "
                     "pass --fresh to discard them, or another --out.")
  done, whole = {}, lines[:-1]   # a complete log ends with a newline: lines[-1] == ""
  for n, line in enumerate(whole[1:], 2):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      raise ValueError(f"{path}:{n} is not JSON; delete the file or pass --fresh.") from None
    done[rec["uid"]] = rec["outputs"]
  if lines[-1]:
    with open(path, "w") as f:
      f.write("\n".join(whole) + "\n")
  return done


def _progress_bar(total: int, desc: str, show: bool):
  from tqdm import auto as tqdm   # only the CLI shows bars
  return tqdm.tqdm(total=total, desc=desc, unit="item", disable=not show, leave=True,
                   smoothing=0.1, bar_format="{l_bar}{bar}| {n:.0f}/{total} "
                   "[{elapsed}<{remaining}, {rate_fmt}]")


def run_protocol(model: run.Model, dataset, items: list[dict], protocol: str, out_dir: str,
                 batch_size: int, max_new_tokens: int, progress: bool = False,
                 fresh: bool = False) -> tuple[dict, dict[str, dict]]:
  """(scorer result, {uid: {"outputs", "records"}}) of one benchmark and protocol."""
  task = protocols_lib.tasks(dataset.name)[protocol]
  log = os.path.join(out_dir, f"{dataset.name}.{protocol}.jsonl")
  done = read_log(log, _settings(model, dataset, protocol, max_new_tokens), fresh)
  units = {it["uid"]: units_of(task, it) for it in items}
  pending = [it for it in items if it["uid"] not in done]
  bar = _progress_bar(len(items), f"{dataset.name}/{protocol}", progress)
  bar.update(len(items) - len(pending))
  rate = {"items_per_unit": 1.0}
  tick = lambda n: bar.update(n * rate["items_per_unit"])
  fn = (run.make_generate(model, batch_size, max_new_tokens, tick) if task.kind == "generate"
        else run.make_logprob(model, batch_size, tick))
  step = batch_size * CHUNK_BATCHES
  try:
    for start in range(0, len(pending), step):
      chunk = pending[start:start + step]
      flat = [u for it in chunk for u in units[it["uid"]]]
      rate["items_per_unit"] = len(chunk) / len(flat)
      outputs = fn(flat)
      lines, at = [], 0
      for it in chunk:
        n = len(units[it["uid"]])
        done[it["uid"]] = outputs[at:at + n]
        lines.append(json.dumps({"uid": it["uid"], "outputs": outputs[at:at + n]}))
        at += n
      with open(log, "a") as f:
        f.write("\n".join(lines) + "\n")
  finally:
    bar.close()
  table = {_key(u): out for it in items for u, out in zip(units[it["uid"]], done[it["uid"]])}
  result = task.evaluate(items, lambda us: [table[_key(u)] for u in us])
  return result, _item_records(items, result.pop("records"), done)


def _item_records(items, records, done) -> dict[str, dict]:
  """{uid: {"outputs", "records"}}: the scorer's records of each item."""
  if len(records) == len(items):   # one record per item, in order
    mine = {it["uid"]: [r] for it, r in zip(items, records)}
  else:                            # SugarCrepe: one per question order
    uid = {(it["id"], it["subset"]): it["uid"] for it in items}
    mine = {it["uid"]: [] for it in items}
    for r in records:
      mine[uid[(r["id"], r["subset"])]].append(r)
  return {it["uid"]: {"outputs": done[it["uid"]], "records": mine[it["uid"]]}
          for it in items}


def take(items: list[dict], limit: int | None) -> list[dict]:
  """The first `limit` items of each subset (SugarCrepe subset, POPE split, MME subtask),
  or of the whole list when items have no subset; None keeps every item."""
  if limit is None:
    return list(items)
  seen: dict[Any, int] = {}
  out = []
  for it in items:
    seen[it["subset"]] = seen.get(it["subset"], 0) + 1
    if seen[it["subset"]] <= limit:
      out.append(it)
  return out


def evaluate_benchmark(model: run.Model, dataset, protocols: list[str], out_dir: str,
                       limit: int | None = None, batch_size: int = 16,
                       max_new_tokens: int = run.MAX_NEW_TOKENS, progress: bool = False,
                       fresh: bool = False) -> dict[str, Any]:
  """Scores `dataset` (a `benchmarks.Dataset`) with each of `protocols` it supports and
  writes OUT/<benchmark>.json (see the module docstring); returns its content."""
  run.check_sizes(limit, batch_size)
  unknown = sorted(set(protocols) - set(protocols_lib.PROTOCOLS))
  if unknown:
    raise ValueError(f"unknown protocols {unknown}; expected some of "
                     f"{list(protocols_lib.PROTOCOLS)}.")
  supported = protocols_lib.tasks(dataset.name)
  chosen = [p for p in protocols if p in supported]
  if not chosen:
    raise ValueError(f"{dataset.name} has none of the protocols {protocols}; it is scored "
                     f"by {sorted(supported)} (--protocol=...).")
  items = take(dataset.items, limit)
  os.makedirs(out_dir, exist_ok=True)
  out: dict[str, Any] = {
      "benchmark": dataset.name, "fingerprint": dataset.fingerprint,
      "skipped": dataset.skipped,
      "settings": {"model": model.name, "protocols": chosen, "limit": limit,
                   "items": len(items), "batch_size": batch_size,
                   "max_new_tokens": max_new_tokens, "decoding": "greedy",
                   "template": model.template, "image_mode": model.image_mode,
                   "dtype": model.cfg.dtype, "param_dtype": model.cfg.param_dtype,
                   "caption_prompt": protocols_lib.CAPTION_PROMPT,
                   "backend": jax.default_backend(), "jax": jax.__version__},
      "protocols": {}, "headline": {},
      "unsupported": [p for p in protocols if p not in supported], "records": {}}
  for protocol in chosen:
    result, records = run_protocol(model, dataset, items, protocol, out_dir, batch_size,
                                   max_new_tokens, progress, fresh)
    out["protocols"][protocol] = result
    out["headline"][protocol] = protocols_lib.headline(dataset.name, result)
    for uid, rec in records.items():
      out["records"].setdefault(uid, {})[protocol] = rec
  path = os.path.join(out_dir, f"{dataset.name}.json")
  _keep_earlier(out, path)
  run.write_results(out, path)
  return out


def _keep_earlier(out: dict, path: str) -> None:
  """Adds the protocols of an earlier run of the same items that this run did not redo,
  so `--protocol=generate` then `--protocol=likelihood` leaves both in the file."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    old = json.load(f)
  same = (old.get("fingerprint", {}).get("sha1") == out["fingerprint"]["sha1"]
          and set(old.get("records", {})) == set(out["records"])
          and old.get("settings", {}).get("model") == out["settings"]["model"])
  if not same:
    return
  for protocol in old["protocols"]:
    if protocol not in out["protocols"]:
      out["protocols"][protocol] = old["protocols"][protocol]
      out["headline"][protocol] = old["headline"][protocol]
      out["settings"]["protocols"].append(protocol)
      for uid, rec in old["records"].items():
        out["records"][uid][protocol] = rec[protocol]


# ------------------------------------------------------------------------------- tables

# The paper's averages (docs/EVALUATION.md, "Results table"): (benchmark, protocol, scale).
VQA_AVERAGE = (("vqav2", "generate", 1.0), ("vizwiz", "generate", 1.0),
               ("gqa", "generate", 1.0), ("textvqa_ocr", "generate", 1.0),
               ("mme", "generate", 100 / 2000))
CR_AVERAGE = (("sugarcrepe", "generate", 1.0), ("bivlc", "likelihood", 1.0),
              ("winoground", "likelihood", 1.0))   # SADE: no reader, left out
COLUMN_ORDER = ("vqav2", "vizwiz", "gqa", "textvqa", "textvqa_ocr", "mme", "pope",
                "sugarcrepe", "sugarcrepe_pp", "bivlc", "winoground", "synthetic_vqa",
                "synthetic_sugarcrepe", "synthetic_paired")


def _paper_protocol(benchmark: str) -> str:
  supported = protocols_lib.tasks(benchmark)
  return protocols_lib.GENERATE if protocols_lib.GENERATE in supported else \
      protocols_lib.LIKELIHOOD if protocols_lib.LIKELIHOOD in supported else \
      protocols_lib.CAPTION


def _average(row: dict, parts) -> str:
  values = [row[(b, p)] * scale for b, p, scale in parts
            if row.get((b, p)) is not None]
  if not values:
    return "—"
  mean = f"{sum(values) / len(values):.1f}"
  return mean if len(values) == len(parts) else f"{mean} ({len(values)}/{len(parts)})"


def read_model_results(model_dir: str) -> dict[tuple[str, str], float | None]:
  """{(benchmark, protocol): headline} of one OUT folder's <benchmark>.json files."""
  row = {}
  for path in sorted(glob.glob(os.path.join(model_dir, "*.json"))):
    with open(path) as f:
      r = json.load(f)
    if "headline" in r and "benchmark" in r:
      for protocol, value in r["headline"].items():
        row[(r["benchmark"], protocol)] = value
  return row


def markdown_table(rows: dict[str, dict]) -> str:
  """A markdown table, one row per model: every (benchmark, protocol) present, then the
  paper's VQA and CR averages. A partial average says how many of its parts it has."""
  present = {k for row in rows.values() for k in row}
  order = {b: n for n, b in enumerate(COLUMN_ORDER)}
  columns = sorted(present, key=lambda k: (order.get(k[0], len(order)), k[0],
                                           k[1] != _paper_protocol(k[0]), k[1]))
  head = ["model"] + [b if p == _paper_protocol(b) else f"{b} ({p})" for b, p in columns]
  lines = ["| " + " | ".join(head + ["VQA avg", "CR avg"]) + " |",
           "|" + "---|" * (len(head) + 2)]
  for name, row in sorted(rows.items()):
    cells = [name] + ["—" if row.get(k) is None else f"{row[k]:.1f}" for k in columns]
    cells += [_average(row, VQA_AVERAGE), _average(row, CR_AVERAGE)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_tables(results_dir: str, model_name: str | None = None) -> list[str]:
  """results/<model>/table.md (for model_name, or every model) and results/table.md over
  every model folder; returns the paths written."""
  rows = {os.path.basename(d): read_model_results(d)
          for d in sorted(glob.glob(os.path.join(results_dir, "*")))
          if os.path.isdir(d)}
  rows = {k: v for k, v in rows.items() if v}
  written = []
  for name, row in rows.items():
    if model_name in (None, name):
      path = os.path.join(results_dir, name, "table.md")
      with open(path, "w") as f:
        f.write(markdown_table({name: row}))
      written.append(path)
  path = os.path.join(results_dir, "table.md")
  with open(path, "w") as f:
    f.write(markdown_table(rows))
  return written + [path]

