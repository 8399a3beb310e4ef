"""Harness for multi-process JAX tests on localhost (CPU, gloo collectives).

`run_workers(code, local_devices=(2, 2))` starts one Python subprocess per entry of
`local_devices`, each with that many fake CPU devices and the CDX_COORDINATOR /
CDX_NUM_PROCESSES / CDX_PROCESS_ID variables that `cdx.parallel.initialize` reads. The
worker code must call `cdx.parallel.initialize(cpu_collectives="gloo")` before touching
devices and report with `emit(obj)` (defined in the worker's namespace), which prints one
JSON line. Returns the emitted objects, in process order; raises with the workers' output
if any worker fails or times out.
"""
import json
import os
import subprocess
import sys
import textwrap

import portpicker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TAG = "CDX_WORKER_RESULT "

_PRELUDE = f"""
import json, sys
sys.path.insert(0, {ROOT!r})
def emit(obj):
  print({_TAG!r} + json.dumps(obj), flush=True)
"""


def run_workers(code: str, local_devices=(2, 2), timeout: float = 120.0,
                env: dict | None = None) -> list:
  port = portpicker.pick_unused_port()
  script = _PRELUDE + textwrap.dedent(code)
  procs = []
  for pid, n_dev in enumerate(local_devices):
    worker_env = dict(os.environ)
    worker_env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev}",
        JAX_PLATFORMS="cpu",
        CDX_COORDINATOR=f"localhost:{port}",
        CDX_NUM_PROCESSES=str(len(local_devices)),
        CDX_PROCESS_ID=str(pid),
    )
    worker_env.update(env or {})
    procs.append(subprocess.Popen([sys.executable, "-c", script], env=worker_env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, cwd=ROOT))
  outputs, failed = [], False
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      out, _ = p.communicate()
      failed = True
    outputs.append(out)
    failed |= p.returncode != 0
  if failed:
    logs = "\n".join(f"--- worker {i} (rc={p.returncode}) ---\n{o[-3000:]}"
                     for i, (p, o) in enumerate(zip(procs, outputs)))
    raise RuntimeError(f"multi-process workers failed:\n{logs}")
  results = []
  for i, out in enumerate(outputs):
    lines = [l for l in out.splitlines() if l.startswith(_TAG)]
    if not lines:
      raise RuntimeError(f"worker {i} emitted no result; output:\n{out[-3000:]}")
    results.append(json.loads(lines[-1][len(_TAG):]))
  return results
