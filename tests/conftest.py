"""Test set-up shared by every test.

Eight fake CPU devices are created before JAX is imported so that sharding tests can
build 8-device meshes; unsharded tests simply run on device 0. Launcher subprocesses
(tests/launcher.py) run on one device.
"""
import os
import sys

import pytest

# Fake devices are threads of one process; on a loaded 2-core machine one can be starved
# for longer than XLA's default 40 s collective rendezvous, which aborts the process.
os.environ.setdefault("XLA_FLAGS", " ".join([
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_collective_call_terminate_timeout_seconds=900",
    "--xla_cpu_collective_timeout_seconds=900"]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def _persistent_compile_cache(tmp_path_factory):
  """The run's persistent XLA compilation cache (tests/launcher.py), used in-process too:
  many tests compile the same step or forward (test_step's setup, the tiny presets), and
  with it each distinct program compiles once per run, not once per test and xdist worker.
  Only compiles over a second are stored; cached executables run as compiled ones."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  from tests import launcher
  with launcher.shared_dir(tmp_path_factory, "jax_cache") as path:
    pass
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  compilation_cache.reset_cache()
  yield
