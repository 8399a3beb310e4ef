"""Test set-up shared by every test.

Eight fake CPU devices are created before JAX is imported so that sharding tests can
build 8-device meshes; unsharded tests simply run on device 0. Launcher subprocesses
(tests/launcher.py) run on one device.
"""
import os
import sys

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
