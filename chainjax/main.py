"""Command line: `python -m chainjax.main --config=configs/X.py[:arg] --workdir=DIR [--config.a.b=value]`.

Multi-host: run the same command on every host (the workdir must be shared), adding

    --coordinator_address=HOST:PORT --num_processes=N --process_id=I

(HOST:PORT of process 0), or nothing on a cluster that `jax.distributed.initialize()`
discovers by itself: SLURM, Open MPI, TPU pods (TPU_WORKER_HOSTNAMES) or with
JAX_COORDINATOR_ADDRESS set (`--distributed=auto`, the default). `--distributed=on` calls it
whatever the environment (e.g. a Cloud TPU pod that sets no such variable); `off` never.
Each process feeds its slice of every global batch; only process 0 writes logs and metrics.

Exit codes: 0 done (or already finished), 2 bad config or flags (one line naming the
field; the workdir is not touched), 3 the loss became NaN/inf (the last good
checkpoint is kept), 4 preempted: a SIGTERM (to any one process) stopped every process
at the same step, whose checkpoint is saved; run the same command again to resume.
When a process of a multi-process run dies, JAX's distributed runtime aborts the others
(SIGABRT: status 134, or -6 from Python's subprocess) within --heartbeat_timeout seconds,
logging "Terminating process because the JAX distributed service detected fatal errors".
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/default.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize: auto = when --coordinator_address is given or a cluster "
    "environment (SLURM, Open MPI, TPU pod, JAX_COORDINATOR_ADDRESS) says there are several processes.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, 0 .. num_processes - 1.", lower_bound=0)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as dead.", lower_bound=1)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process to join.", lower_bound=1)

EXIT_BAD_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 4

# Variables by which `jax.distributed.initialize()` finds its peers, with the process count they imply.
_CLUSTER_SIZE_VARS = {
    "SLURM_NTASKS": int,
    "OMPI_COMM_WORLD_SIZE": int,
    "TPU_WORKER_HOSTNAMES": lambda hosts: len(hosts.split(",")),
}


def _fail(message: str, code: int) -> None:
  print(f"chainjax: error: {message}", file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, but a bad flag or config override is one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0] if str(e) else repr(e), EXIT_BAD_CONFIG)
  except (ValueError, TypeError, AttributeError, KeyError, SyntaxError) as e:  # raised by the config file
    _fail(f"--config: {e}", EXIT_BAD_CONFIG)


class _QuietLibraries(py_logging.Filter):
  """Keeps warnings and errors of Orbax/JAX internals, drops their per-save INFO chatter."""

  _NOISY = ("/orbax/", "/jax/_src/")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def _cluster_environment() -> str | None:
  """The variable that says this process is one of several in a cluster, or None (e.g. a laptop)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  for name, size in _CLUSTER_SIZE_VARS.items():
    try:
      if name in os.environ and size(os.environ[name]) > 1:
        return name
    except ValueError:
      pass
  return None


def initialize_distributed(mode: str, coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, heartbeat_timeout: int = 100,
                           initialization_timeout: int = 300) -> bool:
  """Starts `jax.distributed` when `mode` (auto|on|off) and the flags or environment say so; before any JAX call.

  Returns whether it was started. Unset arguments are discovered by JAX from the cluster.
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if mode == "off" or (mode == "auto" and not explicit and _cluster_environment() is None):
    return False
  import jax

  # Cross-process collectives on CPU need an implementation: gloo is JAX's default (0.10), set unless
  # the user chose one (mpi). It is used only by the CPU backend, so setting it costs GPUs/TPUs nothing.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout)
  return True


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}", EXIT_BAD_CONFIG)
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/default.py", EXIT_BAD_CONFIG)
  if not _WORKDIR.value:
    _fail("--workdir is required", EXIT_BAD_CONFIG)

  if (_COORDINATOR.value is None) != (_NUM_PROCESSES.value is None) or (
      (_NUM_PROCESSES.value is None) != (_PROCESS_ID.value is None)):
    _fail("--coordinator_address, --num_processes and --process_id go together", EXIT_BAD_CONFIG)
  if _NUM_PROCESSES.value is not None and _PROCESS_ID.value >= _NUM_PROCESSES.value:
    _fail(f"--process_id={_PROCESS_ID.value} must be below --num_processes={_NUM_PROCESSES.value}",
          EXIT_BAD_CONFIG)
  try:  # before any other JAX call
    initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _HEARTBEAT_TIMEOUT.value, _INIT_TIMEOUT.value)
  except (ValueError, TypeError) as e:  # e.g. --distributed=on where JAX finds no cluster
    _fail(f"jax.distributed.initialize: {e}", EXIT_BAD_CONFIG)

  import jax  # after flag parsing, so --help is fast

  from chainjax import config as config_lib
  from chainjax import preemption
  from chainjax import train

  if jax.process_index() != 0:  # only process 0 logs
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  logging.info("JAX %s on %d %s device(s), process %d of %d.", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, jax.process_index(), jax.process_count())
  try:
    final = train.train_and_evaluate(config, _WORKDIR.value)  # validates config and data first
  except config_lib.ConfigError as e:
    _fail(str(e), EXIT_BAD_CONFIG)
  except train.NonFiniteLossError as e:
    _fail(str(e), EXIT_NONFINITE)
  except preemption.PreemptedError as e:
    print(f"chainjax: {e}", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  logging.info("Final metrics: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
