"""Command line: `python -m chainjax.main --config=configs/X.py[:arg] --workdir=DIR [--config.a.b=value]`.

`--mode=train` (the default) trains, resuming from the workdir's newest good checkpoint;
`--mode=compress` quantizes the trained checkpoint of the workdir after training (int8 and int4
weights), evaluates every variant and writes `DIR/compress/report.json` (`chainjax.compression`).
`--mode=export` writes the trained chain for serving to `DIR/export/` (`chainjax.export`);
`--mode=early_exit_report` sweeps the early-exit thresholds on the eval set (`chainjax.early_exit`).
`--mode=diagnose` writes the signal-to-noise ratio of every stage's gradient under each chain mode, at
initialization or at a checkpoint, to `DIR/diagnostics/snr.json` (`chainjax.diagnostics`).

Multi-host: run the same command on every host (the workdir must be shared), adding

    --coordinator_address=HOST:PORT --num_processes=N --process_id=I

(HOST:PORT of process 0), or nothing on a cluster that `jax.distributed.initialize()`
discovers by itself: SLURM, Open MPI, TPU pods (TPU_WORKER_HOSTNAMES) or with
JAX_COORDINATOR_ADDRESS set (`--distributed=auto`, the default). `--distributed=on` calls it
whatever the environment (e.g. a Cloud TPU pod that sets no such variable); `off` never.
Each process feeds its slice of every global batch; only process 0 writes logs and metrics.

Exit codes: 0 done (or already finished), 2 bad config or flags (one line naming the
field, the config file or the workdir; the workdir is not touched): a config file that does
not load or a bad variant, an override of a field that does not exist, a workdir that cannot
be created or written (checked before JAX starts; gs:// is not probed), a value out of range,
or a batch or train state larger than the host or device memory (estimated from shapes).
3 the loss became NaN/inf (the last good checkpoint is kept), 4 preempted: a SIGTERM (to any
one process) stopped every process at the same step, whose checkpoint is saved; run the same
command again to resume.
5 a checkpoint could not be written (e.g. the disk is full: "checkpoint save failed at
step N: No space left on device"); the run stops at the next step, the last good
checkpoint is kept and is where a rerun resumes once the cause is fixed.
6 hung: no train step or eval batch completed within --step_timeout seconds (default 1800;
0 = never); every thread's stack is written to stderr, then one line, and the process
exits at once (the other processes of a multi-process run are then aborted by JAX, see
below). A scheduler should relaunch the same command: it resumes from the last checkpoint;
the stacks say where it hung (a collective waiting for a dead or slow peer, a stuck read).
The first interval also covers start-up, restore and compiling the first step, and every
interval covers checkpoint saves (which do not count as progress): keep the timeout
above them. 7 the processes of a multi-process run did not all join within
--initialization_timeout seconds (one line naming this process, the count and the
coordinator); a scheduler should relaunch when every host is up.
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

from chainjax import watchdog

DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "chainjax", "jax")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/default.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "compress", "export", "early_exit_report", "diagnose"],
    "train: train (or resume) in --workdir. compress: post-training quantization of --workdir's trained "
    "checkpoint, evaluated and reported in <workdir>/compress/ (config.compress.* choose the widths and "
    "the per-stage sensitivity scan). export: the trained chain as StableHLO, a TensorFlow SavedModel and "
    "TFLite models in <workdir>/export/ with a manifest.json. early_exit_report: accuracy against stages "
    "computed and latency over a sweep of early-exit thresholds on the eval set, in <workdir>/early_exit/. "
    "diagnose: the signal-to-noise ratio of every stage's gradient under each chain mode (config.diagnostics.* "
    "choose the modes, batches and checkpoint), in <workdir>/diagnostics/snr.json.")
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
    "initialization_timeout", 300, "Seconds to wait for every process to join; then exit with code 7.",
    lower_bound=1)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a workdir whose checkpoint was saved with a different config (other than its length and "
    "eval/log/checkpoint intervals, which may always change); the change is logged and recorded in the "
    "checkpoints. Without it such a relaunch stops with exit code 2, listing the fields.")
_STEP_TIMEOUT = flags.DEFINE_float(
    "step_timeout", 1800,
    "Seconds without a completed train step or eval batch (counted from start-up, so it must exceed start-up, "
    "restore and compiling the first step) after which every thread's stack is logged and the process exits "
    "with code 6. 0 = never.", lower_bound=0)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", DEFAULT_COMPILATION_CACHE,
    "JAX's persistent compilation cache: a rerun, a resume or another run of the same model loads its "
    "compiled programs from here instead of compiling them again. '' turns it off. Where this flag is not "
    "given and JAX_COMPILATION_CACHE_DIR is set, that directory is used.")

EXIT_BAD_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 4
EXIT_SAVE_FAILED = 5
EXIT_STEP_TIMEOUT = 6
EXIT_INIT_TIMEOUT = 7

# JAX's own deadline for joining is this much later than ours: when it passes, JAX aborts the
# process (LOG(FATAL) in C++: SIGABRT and a native stack trace, in JAX 0.10.2), so ours must come first.
_JAX_INIT_TIMEOUT_MARGIN_S = 60

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
  """absl flag parsing, but a bad flag, config file, variant or override is one line and exit code 2.

  Runs before JAX starts (absl's config_flags loads the config file while flags are parsed),
  so a config that cannot load costs no JAX start-up and never touches the workdir.
  """
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # flags.Error, or whatever the config file itself raised
    _fail(_flag_error_message(e, argv), EXIT_BAD_CONFIG)
  load_error = _config_load_error(argv)
  if load_error:
    _fail(load_error, EXIT_BAD_CONFIG)
  return rest


def _config_arg(argv: list[str]) -> str:
  """The `--config` value of the command line ("" when absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.partition("=")[2]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _config_load_error(argv: list[str]) -> str | None:
  """The reason the config file could not be loaded, as one line; None when it loaded (or was not given).

  config_flags keeps an IOError (no such file) as a placeholder config that raises on first use.
  """
  try:
    value = flags.FLAGS["config"].value
    if value is not None:
      getattr(value, "keys")
  except OSError as e:
    cause = e.__cause__ or e
    return f"--config={_config_arg(argv)}: cannot load the config file: {_last_line(str(cause))}"
  except Exception:  # noqa: BLE001 - nothing else is a load error
    return None
  return None


def _bad_override(argv: list[str]) -> str | None:
  """The first `--config.<path>=...` whose path is not in the loaded config, as one line (None: all exist)."""
  try:
    config = flags.FLAGS["config"].value
    if config is None:  # an override failed before the flag kept its value: load the file as config_flags does
      from chainjax import config as config_lib  # pylint: disable=import-outside-toplevel

      path, colon, variant = _config_arg(argv).partition(":")
      module = config_lib.load_file(path)
      config = module.get_config(variant) if colon else module.get_config()
    config.keys()
  except Exception:  # noqa: BLE001 - no config to compare with: the caller reports the error itself
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--"):].partition("=")[0]
    parts = path.split(".")[1:]
    if any("[" in part for part in parts):
      continue
    node, seen = config, "config"
    for part in parts:
      if not hasattr(node, "keys"):
        break
      if part not in node.keys():
        known = ", ".join(sorted(node.keys()))
        if seen == "config.optim.per_stage":
          return f"--{path}: {part!r} is not a stage name; stages: {known}"
        return f"--{path}: {part!r} is not a field of {seen}; known fields: {known}"
      node, seen = node[part], f"{seen}.{part}"
  return None


def _flag_error_message(error: Exception, argv: list[str]) -> str:
  """One line for an error of flag parsing: the config file's own reason, a bad override, or absl's line."""
  load_error = _config_load_error(argv)
  if load_error:
    return load_error
  if "Error whilst parsing config file" not in str(error):
    bad_override = _bad_override(argv)
    if bad_override:
      return bad_override
    if isinstance(error, flags.Error):
      return str(error).splitlines()[0] if str(error) else repr(error)
  # The config file raised: absl wraps config_flags' wrapper around the real error (the __context__ chain).
  original, seen = error, set()
  while original.__context__ is not None and id(original) not in seen:
    seen.add(id(original))
    original = original.__context__
  reason = _last_line(str(original)) or type(original).__name__
  if isinstance(original, OSError):
    reason = f"cannot load the config file: {reason}"
  elif not isinstance(original, (ValueError, TypeError)) or isinstance(original, UnicodeError):
    reason = f"{type(original).__name__}: {reason}"
  return f"--config={_config_arg(argv)}: {reason}"


def workdir_problem(workdir: str, _attempt: int = 0) -> str | None:
  """Why `workdir` cannot be used, as one line, or None: it is (or can be made) a folder we can write.

  Probes for real (creates the missing folders and a file, then removes exactly those), since
  permissions say little for root, a read-only mount or a pseudo-filesystem such as /proc.
  Paths with a scheme (gs://...) are not probed: epath reaches them only once the run starts.
  """
  if "://" in workdir:
    return None
  path = os.path.abspath(workdir)  # as the run will use it (epath does not expand ~ either)
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "it" if existing == path else existing
    return f"--workdir={workdir}: {what} exists and is not a directory"
  created = []
  probe = os.path.join(path, f".chainjax-write-probe-{os.uname().nodename}-{os.getpid()}")
  try:
    missing = []
    parent = path
    while parent != existing:
      missing.append(parent)
      parent = os.path.dirname(parent)
    for folder in reversed(missing):
      try:
        os.mkdir(folder)
        created.append(folder)
      except FileExistsError:  # another process of the same run made it
        pass
      except OSError as e:
        return f"--workdir={workdir}: cannot create directory {folder}: {e.strerror or e}"
    try:
      with open(probe, "w") as f:
        f.write("probe")
      os.remove(probe)
    except FileNotFoundError:  # a peer process removed the folder it had made to probe: probe again
      if _attempt < 3:
        return workdir_problem(workdir, _attempt + 1)
      return f"--workdir={workdir}: cannot write in it: it keeps disappearing"
    except OSError as e:
      return f"--workdir={workdir}: cannot write in it: {e.strerror or e}"
  finally:
    for folder in reversed(created):  # leave the disk as found; a folder another process now uses stays
      try:
        os.rmdir(folder)
      except OSError:
        pass
  return None


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


def _init_timeout_message(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                           timeout: int) -> str:
  """The one line for processes that did not all join: who we are, how many were expected, what to do."""
  who = "this process" if process_id is None or num_processes is None else f"process {process_id} of {num_processes}"
  at = f" at {coordinator_address}" if coordinator_address else ""
  if process_id == 0 and num_processes == 2:
    missing = f"the other process did not join{at}"
  elif process_id == 0 and num_processes is not None:
    missing = f"not all of the other {num_processes - 1} processes joined{at}"
  else:
    missing = f"not all {num_processes or 'the'} processes joined{at}"
  return (f"{who}: {missing} within {timeout} s (--initialization_timeout); start every process with the "
          "same --coordinator_address and --num_processes (a distinct --process_id each) and relaunch")


def initialize_distributed(mode: str, coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, heartbeat_timeout: int = 100,
                           initialization_timeout: int = 300) -> bool:
  """Starts `jax.distributed` when `mode` (auto|on|off) and the flags or environment say so; before any JAX call.

  Returns whether it was started. Unset arguments are discovered by JAX from the cluster.
  If the processes have not all joined within `initialization_timeout` seconds, it writes one
  line to stderr and ends the process with EXIT_INIT_TIMEOUT (`os._exit`, from a watchdog
  thread: the main thread is blocked in JAX's C++ connect). JAX's own deadline is set later,
  because when it passes JAX aborts the process (SIGABRT, a C++ stack trace) instead of raising.
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if mode == "off" or (mode == "auto" and not explicit and _cluster_environment() is None):
    return False
  import jax

  # Cross-process collectives on CPU need an implementation: gloo is JAX's default (0.10), set unless
  # the user chose one (mpi). It is used only by the CPU backend, so setting it costs GPUs/TPUs nothing.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  message = _init_timeout_message(coordinator_address, num_processes, process_id, initialization_timeout)
  with watchdog.Watchdog(initialization_timeout, lambda: watchdog.exit_with_message(message, EXIT_INIT_TIMEOUT),
                         name="chainjax-initialization-timeout"):
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout + _JAX_INIT_TIMEOUT_MARGIN_S,
                               heartbeat_timeout_seconds=heartbeat_timeout)
  return True


def set_compilation_cache(path: str, explicit: bool = True) -> str | None:
  """Points JAX's persistent compilation cache at `path` (`~` expanded; "" turns it off); returns the
  directory in use, or None when off.

  Every compiled program that took longer than JAX's `jax_persistent_cache_min_compile_time_secs`
  (1 s by default) to compile is stored, keyed by the program, the JAX and XLA versions, the devices and
  the compile options, so a cache entry is never used for another program. Where `explicit` is False (the
  flag left at its default) and JAX_COMPILATION_CACHE_DIR is set, JAX's own setting is kept.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if not explicit and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return jax.config.jax_compilation_cache_dir
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}", EXIT_BAD_CONFIG)
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/default.py", EXIT_BAD_CONFIG)
  if not _WORKDIR.value:
    _fail("--workdir is required", EXIT_BAD_CONFIG)
  problem = workdir_problem(_WORKDIR.value)  # before JAX starts: a bad path costs no start-up
  if problem:
    _fail(problem, EXIT_BAD_CONFIG)

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

  cache_dir = set_compilation_cache(_COMPILATION_CACHE.value, explicit=_COMPILATION_CACHE.present)

  from chainjax import checkpoint as checkpoint_lib
  from chainjax import compression
  from chainjax import errors
  from chainjax import preemption
  from chainjax import train

  if jax.process_index() != 0:  # only process 0 logs
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  logging.info("JAX %s on %d %s device(s), process %d of %d; compilation cache: %s.", jax.__version__,
               jax.device_count(), jax.devices()[0].platform, jax.process_index(), jax.process_count(),
               cache_dir or "off")
  step_timeout = _STEP_TIMEOUT.value

  def on_hang() -> None:  # from the watchdog thread: the main thread may be blocked in native code
    watchdog.dump_stacks_and_exit(
        f"no train step or eval batch completed in {step_timeout:g} s (--step_timeout); thread stacks above",
        EXIT_STEP_TIMEOUT)

  try:
    # Stopped (never fires) once training returns or raises; counts from here, so it covers start-up.
    with watchdog.Watchdog(step_timeout, on_hang, name="chainjax-step-timeout") as step_watchdog:
      if _MODE.value == "compress":
        compression.compress(config, _WORKDIR.value, heartbeat=step_watchdog.beat)
        return
      if _MODE.value == "export":
        from chainjax import export  # pylint: disable=import-outside-toplevel
        step_watchdog.stop()  # TensorFlow's converters run long between heartbeats
        export.export_workdir(config, _WORKDIR.value)
        return
      if _MODE.value == "early_exit_report":
        from chainjax import early_exit  # pylint: disable=import-outside-toplevel
        early_exit.report(config, _WORKDIR.value, heartbeat=step_watchdog.beat)
        return
      if _MODE.value == "diagnose":
        from chainjax import diagnostics  # pylint: disable=import-outside-toplevel
        diagnostics.diagnose(config, _WORKDIR.value, heartbeat=step_watchdog.beat)
        return
      final = train.train_and_evaluate(config, _WORKDIR.value,  # validates config and data first
                                       heartbeat=step_watchdog.beat,
                                       allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except (errors.ConfigError, errors.WorkdirError) as e:
    _fail(str(e), EXIT_BAD_CONFIG)
  except ValueError as e:  # export, early_exit_report, diagnose: a workdir or request that cannot be served
    if _MODE.value in ("train", "compress"):
      raise
    _fail(str(e), EXIT_BAD_CONFIG)
  except errors.NonFiniteLossError as e:
    _fail(str(e), EXIT_NONFINITE)
  except checkpoint_lib.CheckpointSaveError as e:
    _fail(str(e), EXIT_SAVE_FAILED)
  except preemption.PreemptedError as e:
    print(f"chainjax: {e}", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  logging.info("Final metrics: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
