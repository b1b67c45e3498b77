"""Test setup: 8 fake CPU devices, configured before anything imports jax."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
      _flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# With 8 fake devices on 2 cores, several programs in flight at once can starve one device's
# thread at an all-reduce rendezvous (XLA aborts after 40 s: "only 7 of them arrived"). Running
# each CPU program to completion before the next is dispatched avoids it; it only costs speed.
os.environ.setdefault("JAX_CPU_ENABLE_ASYNC_DISPATCH", "false")
