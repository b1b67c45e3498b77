"""Test setup: 8 fake CPU devices, configured before anything imports jax."""

import atexit
import os
import shutil
import tempfile

# 8 fake CPU devices. On 2 cores, 8 device threads per program can be starved long enough at an
# all-reduce rendezvous that XLA aborts the process after its default 40 s ("only 7 of them
# arrived"), above all on a loaded machine: give collectives 10 minutes instead.
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in ("--xla_force_host_platform_device_count=8",
              "--xla_cpu_collective_call_terminate_timeout_seconds=600",
              "--xla_cpu_collective_timeout_seconds=600"):
  if _flag.split("=")[0] not in _flags:
    _flags += " " + _flag
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session: the test process and every process it starts
# (they inherit this environment) compile each program once; a hit returns the same executable.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="chainjax-test-jit-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# Single-device CPU programs run inline, in program order (determinism; multi-device programs are
# always dispatched asynchronously: chainjax bounds how many run ahead with
# `parallel.DispatchWindow`, which is what keeps 8 fake devices from deadlocking).
os.environ.setdefault("JAX_CPU_ENABLE_ASYNC_DISPATCH", "false")

import logging  # noqa: E402  (after the environment above, which must come before anything imports jax)

import pytest  # noqa: E402
from absl import logging as absl_logging  # noqa: E402


def _log_levels():
  return absl_logging.get_verbosity(), absl_logging.get_absl_logger().level, logging.getLogger().level


@pytest.fixture(autouse=True)
def _log_levels_unchanged():
  """Fails the test that leaves absl's verbosity or a logger level changed (TensorFlow's SavedModel walk
  did): every later test that reads INFO lines through caplog would fail instead, far from the cause."""
  before = _log_levels()
  yield
  after = _log_levels()
  assert after == before, f"logging levels (absl verbosity, absl logger, root) changed from {before} to {after}"


def pytest_collection_modifyitems(config, items):
  """Files with end-to-end (`slow`) tests first: the workers take whole files in this order, so the
  long ones start early and both workers finish at about the same time."""
  del config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)
