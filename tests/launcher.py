"""Shared machinery of the tests that run `launch/run.py` end to end.

* `shared_dir`: a folder of this test run shared by its xdist workers, held under a lock:
  the first holder builds what is missing, later ones reuse it.
* `compile_cache_env`: one persistent XLA compilation cache for every launcher subprocess of
  the run, so each distinct step compiles once.
* `tiny_chain`: the tiny chain pretrain -> finetune -> pretrain_student -> dpt -> dft
  (2 steps each, 64 synthetic samples, dft with `layers.strategy=adaptive`), built once per
  run; tests read it and never change it (copy what you need to change).
"""
import contextlib
import fcntl
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--config.total_steps=2", "--upstream.total_steps=2",
         "--config.data.synthetic_train=64", "--upstream.data.synthetic_train=64",
         "--config.log.progress=False", "--upstream.log.progress=False",
         # A random frozen vision tower (the pretrained one costs ~2 min once) and small
         # SugarCrepe-style sets (500 items x 7 subsets x 2 splits take a while to render).
         "--config.vision_pretrain.steps=0", "--upstream.vision_pretrain.steps=0",
         "--config.data.num_cr=20", "--upstream.data.num_cr=20"]


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name):
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  base = tmp_path_factory.getbasetemp()
  path = base.parent / f"{name}-{run}" if run else base / name
  path.mkdir(exist_ok=True)
  with open(path / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield str(path)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def compile_cache_env(tmp_path_factory):
  with shared_dir(tmp_path_factory, "jax_cache") as path:
    pass
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_COMPILATION_CACHE_DIR", path)
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    yield path


def subprocess_env() -> dict:
  """The environment of launcher subprocesses: one CPU device (the stages under test need
  no mesh, and one device has no cross-device collectives to stall on a loaded machine)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
  return env


def launch(*argv, timeout=600):
  """Runs launch/run.py in a subprocess; asserts success."""
  out = subprocess.run([sys.executable, "launch/run.py", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env=subprocess_env())
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def dft_argv(workdir):
  return ["--config=configs/dft.py", f"--workdir={workdir}", *SHORT,
          "--config.layers.strategy=adaptive"]


def tiny_chain(tmp_path_factory):
  """Workdir of the shared tiny chain (built on first use)."""
  with compile_cache_env(tmp_path_factory):
    with shared_dir(tmp_path_factory, "chain") as workdir:
      if not os.path.isfile(os.path.join(workdir, "dft", "DONE")):
        launch(*dft_argv(workdir))
  return workdir
