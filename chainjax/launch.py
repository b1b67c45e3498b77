"""Launch chainjax runs on Cloud TPU VMs: `python -m chainjax.launch TARGET --name=NAME --zone=ZONE -- <main args>`.

  python -m chainjax.launch tpu_vm --name=my-tpu --zone=us-west4-a --create --dry_run -- \
      --config=configs/default.py --workdir=gs://my-bucket/runs/default
  python -m chainjax.launch tpu_queued --name=my-tpu --zone=us-west4-a --spot --dry_run -- \
      --config=configs/default.py --workdir=gs://my-bucket/runs/default

The plan, each step one command (printed with `--dry_run`, otherwise run in order, stopping at
the first failure with its exit code):

  1. `tpu_vm`: `gcloud compute tpus tpu-vm create` (only with `--create`);
     `tpu_queued`: `gcloud compute tpus queued-resources create` (Cloud TPU's recommended way to
     ask for capacity, Spot included), then `gcloud compute tpus queued-resources describe`
     repeated until the request is ACTIVE, printing each state and the time waited;
  2. `git archive` of the checkout's HEAD to a tarball, `gcloud ... tpu-vm scp` to every worker;
  3. on every worker: unpack to ~/chainjax, `pip install -e .` plus `jax[tpu]` and `gcsfs`;
  4. on every worker at once: `cd ~/chainjax && python3 -m chainjax.main --distributed=on <main args>`.

Every worker of a pod runs the same command; `jax.distributed.initialize()` without arguments
finds the other workers on a TPU VM (`--distributed=on` makes chainjax.main call it). They
must share one workdir, so it must be a `gs://` path. Only committed code is shipped
(`git archive HEAD`): commit before launching.

The command builders are pure functions returning argument lists, so the experiments runner
reuses them for sweeps (`sweep_run_command`). This module imports neither jax nor the rest of
chainjax, and defines its absl flags only when run as a program, so importing it is free.

Exit codes: 0 done; 2 bad flags, unknown target, a workdir that is not `gs://`, or an
accelerator type whose TPU software version is not known and no `--version` (one line); 69
(sysexits' EX_UNAVAILABLE) a queued resource that ended FAILED or SUSPENDED, or was not ACTIVE
within `--wait_timeout`; otherwise the exit code of the first command that failed.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

from absl import app, flags

EXIT_BAD_ARGS = 2
EXIT_NOT_ACTIVE = 69  # sysexits' EX_UNAVAILABLE: far from chainjax.main's own codes, which ssh passes on
TARGETS = ("tpu_vm", "tpu_queued")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/chainjax"  # unquoted in remote commands, so that the remote shell expands `~`
REMOTE_TARBALL = "chainjax.tar.gz"  # relative to the worker's home directory
# Installed next to `pip install -e .` on every worker: the TPU build of jax in the range pinned
# in pyproject.toml (tests/test_launch.py checks they agree), and gcsfs, which etils.epath (used
# by Orbax for checkpoint directories) needs to read and write gs:// paths.
WORKER_PACKAGES = ("jax[tpu]>=0.10.2,<0.11", "gcsfs")
DISTRIBUTED_ON = "--distributed=on"  # see run_command

_SOFTWARE_VERSIONS = (
    ("v6e", "v2-alpha-tpuv6e"),
    ("v5p", "v2-alpha-tpuv5"),
    ("v5litepod", "v2-alpha-tpuv5-lite"),
    ("v5e", "v2-alpha-tpuv5-lite"),
    ("v4", "tpu-ubuntu2204-base"),
    ("v3", "tpu-ubuntu2204-base"),
    ("v2", "tpu-ubuntu2204-base"),
)

# Queued resources (tpu_queued): how often the state is polled, how long to wait for ACTIVE by
# default, how often an unchanged state is repeated, how many failed describes in a row end it.
POLL_S = 30
WAIT_TIMEOUT_S = 6 * 3600
HEARTBEAT_S = 600
DESCRIBE_ATTEMPTS = 3
ACTIVE = "ACTIVE"
ENDED_STATES = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")
QUEUED_TIERS = ("spot", "reserved")


class LaunchError(ValueError):
  """A launch that must not start (e.g. a local workdir); the message is one line."""


@dataclasses.dataclass(frozen=True)
class TpuVm:
  """A Cloud TPU VM (one host or a multi-host pod slice) addressed by gcloud."""

  name: str
  zone: str
  project: str = ""
  accelerator_type: str = "v5litepod-8"
  version: str = ""  # TPU software version; "" picks the one recommended for the accelerator

  def gcloud_scope(self) -> list[str]:
    """The `--zone` (and `--project`) arguments every gcloud command about this VM carries."""
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def software_version(accelerator_type: str) -> str:
  """The TPU software version recommended for JAX on `accelerator_type` (e.g. v5litepod-8, v4-32).

  The table is the "PyTorch and JAX" one of cloud.google.com/tpu/docs/runtimes: v6e
  v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e (`v5litepod-*`) v2-alpha-tpuv5-lite, v4 and older
  tpu-ubuntu2204-base. A generation not in it (a newer TPU, a typo) raises LaunchError naming
  `--version`, rather than guessing a version that may not suit that hardware.
  """
  generation = accelerator_type.split("-")[0]
  versions = dict(_SOFTWARE_VERSIONS)
  if generation not in versions:
    raise LaunchError(f"no TPU software version is known for --accelerator_type={accelerator_type}: set it with "
                      f"--version=VERSION (cloud.google.com/tpu/docs/runtimes); known generations: "
                      f"{', '.join(versions)}")
  return versions[generation]


def create_command(vm: TpuVm, *, spot: bool = False) -> list[str]:
  """`gcloud compute tpus tpu-vm create` for `vm`; `spot` asks for a preemptible Spot VM."""
  version = vm.version or software_version(vm.accelerator_type)
  return (["gcloud", "compute", "tpus", "tpu-vm", "create", vm.name] + vm.gcloud_scope()
          + [f"--accelerator-type={vm.accelerator_type}", f"--version={version}"]
          + (["--spot"] if spot else []))


def queued_create_command(vm: TpuVm, queued_resource: str, *, tier: str = "",
                          valid_until_duration: str = "") -> list[str]:
  """`gcloud compute tpus queued-resources create` asking for the TPU VM `vm` (its `--node-id`).

  `tier` "" is on-demand capacity, "spot" a Spot VM (preemptible, cheaper), "reserved" capacity
  from the project's reservation. `valid_until_duration` (e.g. "6h") makes the request FAILED if
  it is not filled by then; without it, it waits in the queue until deleted. Syntax:
  cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create.
  """
  if tier not in ("",) + QUEUED_TIERS:
    raise LaunchError(f"unknown queued-resource tier {tier!r}; known: {', '.join(QUEUED_TIERS)} (or none: on-demand)")
  version = vm.version or software_version(vm.accelerator_type)
  return (["gcloud", "compute", "tpus", "queued-resources", "create", queued_resource, f"--node-id={vm.name}"]
          + vm.gcloud_scope() + [f"--accelerator-type={vm.accelerator_type}", f"--runtime-version={version}"]
          + ([f"--{tier}"] if tier else [])
          + ([f"--valid-until-duration={valid_until_duration}"] if valid_until_duration else []))


def queued_describe_command(vm: TpuVm, queued_resource: str) -> list[str]:
  """Prints the state of the queued resource alone (e.g. WAITING_FOR_RESOURCES, ACTIVE) on stdout."""
  return (["gcloud", "compute", "tpus", "queued-resources", "describe", queued_resource] + vm.gcloud_scope()
          + ["--format=value(state.state)"])


def queued_delete_command(vm: TpuVm, queued_resource: str) -> list[str]:
  """Removes a queued resource; a FAILED request stays in the queue (and its name taken) until then."""
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", queued_resource] + vm.gcloud_scope()


class WaitUntilActive(list):
  """A `queued_describe_command` that execute() repeats until the queued resource is ACTIVE.

  A list (the describe command's arguments), so that a plan stays a list of argument lists that
  prints, compares and is inspected as one; execute() recognises it and polls it every `poll_s`
  seconds for at most `timeout_s` (0: no limit). `delete` is named in the error messages.
  """

  def __init__(self, describe: Sequence[str], *, queued_resource: str, delete: Sequence[str],
               timeout_s: float = WAIT_TIMEOUT_S, poll_s: float = POLL_S):
    super().__init__(describe)
    self.queued_resource = queued_resource
    self.delete = list(delete)
    self.timeout_s = timeout_s
    self.poll_s = poll_s

  def note(self) -> str:
    """What `--dry_run` prints after the describe command: it is repeated, not run once."""
    limit = f"at most {format_duration(self.timeout_s)}" if self.timeout_s else "with no time limit"
    return (f"# repeated every {format_duration(self.poll_s)} until {ACTIVE}, {limit}; "
            f"{', '.join(ENDED_STATES)} stops the launch")


def wait_until_active(step: WaitUntilActive, *,
                      describe: Callable[[Sequence[str]], tuple[int, str]] | None = None,
                      clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                      log: TextIO | None = None) -> int:
  """Polls `step` until the queued resource is ACTIVE: 0, or EXIT_NOT_ACTIVE / describe's exit code.

  Prints every change of state, and an unchanged state every HEARTBEAT_S seconds, with the time
  waited, so a long queue shows it is alive. A state in ENDED_STATES or the timeout is one error
  line that says how to see why and how to delete the request (which otherwise stays queued).
  `describe` (default: run the command, return its exit code and stdout), `clock`, `sleep` and
  `log` are parameters so tests can feed states without waiting.
  """
  describe = describe or _describe_state
  log = log or sys.stderr
  name = step.queued_resource
  start = clock()
  last_state, last_print, failures = None, start, 0

  def say(message: str) -> None:
    print(f"chainjax.launch: {message}", file=log, flush=True)

  def fail(message: str) -> None:
    print(f"chainjax: error: {message}", file=log, flush=True)

  while True:
    code, state = describe(step)
    state = state.strip()
    now = clock()
    waited = format_duration(now - start)
    if code != 0:
      failures += 1
      if failures >= DESCRIBE_ATTEMPTS:
        fail(f"exit code {code} from {failures} describes in a row of queued resource {name}: {shlex.join(step)}")
        return code
      say(f"describe of queued resource {name} failed (exit code {code}), retrying")
    else:
      failures = 0
      if state != last_state or now - last_print >= HEARTBEAT_S:
        say(f"queued resource {name}: {state or '(no state)'} after {waited}")
        last_state, last_print = state, now
      if state == ACTIVE:
        return 0
      if state in ENDED_STATES:
        fail(f"queued resource {name} is {state} after {waited}; see why with "
             f"`{shlex.join(step[:-1])}` and remove it with `{shlex.join(step.delete)}`")
        return EXIT_NOT_ACTIVE
    if step.timeout_s and now - start >= step.timeout_s:
      fail(f"queued resource {name} is still {last_state or 'not ACTIVE'} after {waited} (--wait_timeout); "
           f"it stays queued: when it is {ACTIVE}, launch with target tpu_vm (no --create), "
           f"or remove it with `{shlex.join(step.delete)}`")
      return EXIT_NOT_ACTIVE
    remaining = step.timeout_s - (now - start) if step.timeout_s else step.poll_s
    sleep(max(0.0, min(step.poll_s, remaining)))


def _describe_state(command: Sequence[str]) -> tuple[int, str]:
  """Runs a describe command: its exit code and its stdout (gcloud's stderr passes through)."""
  result = subprocess.run(list(command), stdout=subprocess.PIPE, text=True, check=False)
  return result.returncode, result.stdout or ""


def format_duration(seconds: float) -> str:
  """`45s`, `12m03s`, `2h05m`: short enough for a progress line."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def ssh_command(vm: TpuVm, remote_command: str) -> list[str]:
  """Runs the shell string `remote_command` on every worker of `vm` at once."""
  return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", vm.name] + vm.gcloud_scope()
          + ["--worker=all", "--command", remote_command])


def copy_commands(vm: TpuVm, *, repo: str = REPO, tarball: str | None = None) -> list[list[str]]:
  """Packs the committed HEAD of `repo` into `tarball` and copies it to every worker's home."""
  tarball = tarball or default_tarball(vm)
  return [
      ["git", "-C", repo, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
      (["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{vm.name}:{REMOTE_TARBALL}"]
       + vm.gcloud_scope() + ["--worker=all"]),
  ]


def default_tarball(vm: TpuVm) -> str:
  """Where the local tarball goes: one per VM name, so that two launches do not share one."""
  return os.path.join(tempfile.gettempdir(), f"chainjax-{vm.name}.tar.gz")


def install_command(vm: TpuVm, *, packages: Sequence[str] = WORKER_PACKAGES, extras: Sequence[str] = ()) -> list[str]:
  """On every worker: replaces ~/chainjax by the copied tarball and pip-installs it editable."""
  target = "." + (f"[{','.join(extras)}]" if extras else "")
  steps = [
      f"rm -rf {REMOTE_DIR}",
      f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf ~/{REMOTE_TARBALL} -C {REMOTE_DIR}",
      f"cd {REMOTE_DIR}",
      "python3 -m pip install --quiet --upgrade pip",
      shlex.join(["python3", "-m", "pip", "install", "--quiet", "-e", target, *packages]),
  ]
  return ssh_command(vm, " && ".join(steps))


def run_command(vm: TpuVm, main_args: Sequence[str]) -> list[str]:
  """On every worker at once: `python3 -m chainjax.main --distributed=on <main_args>`, shell-quoted.

  `--distributed=on` because a Cloud TPU VM sets none of the variables by which chainjax.main's
  `--distributed=auto` recognises a cluster, while `jax.distributed.initialize()` finds the pod's
  workers by itself (and on one host it is harmless). It comes first, so a `--distributed` in
  `main_args` wins (absl keeps the last value). Raises LaunchError unless `main_args` has a
  `--workdir` on `gs://`: every worker of a pod must read and write the same workdir.
  """
  check_workdir(main_args)
  python = ["python3", "-m", "chainjax.main", DISTRIBUTED_ON, *main_args]
  return ssh_command(vm, f"cd {REMOTE_DIR} && " + shlex.join(python))


def main_args_for(config: str, workdir: str, overrides: Mapping[str, Any] | None = None,
                  extra_args: Iterable[str] = ()) -> list[str]:
  """chainjax.main arguments for one config and one override set, e.g. from a config's `sweep`.

  `main_args_for("configs/default.py", "gs://b/r", {"chain.mode": "decoupled"})` ->
  `["--config=configs/default.py", "--workdir=gs://b/r", "--config.chain.mode=decoupled"]`.
  """
  args = [f"--config={config}", f"--workdir={workdir}"]
  args += [f"--config.{key}={_override_value(value)}" for key, value in (overrides or {}).items()]
  return args + list(extra_args)


def sweep_run_command(vm: TpuVm, config: str, workdir: str, overrides: Mapping[str, Any] | None = None,
                      extra_args: Iterable[str] = ()) -> list[str]:
  """The run command of one sweep point: `run_command(vm, main_args_for(...))`.

  The experiments runner calls `copy_commands`/`install_command` once, then this per point
  (each point with its own `gs://` workdir).
  """
  return run_command(vm, main_args_for(config, workdir, overrides, extra_args))


def _override_value(value: Any) -> str:
  """A config override as ml_collections parses it: tuples and lists without spaces."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_override_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def check_workdir(main_args: Sequence[str]) -> str:
  """The `--workdir` of `main_args` (the last one, as absl does); LaunchError unless it is gs://."""
  workdir = None
  for i, arg in enumerate(main_args):
    for name in ("--workdir", "-workdir"):
      if arg.startswith(name + "="):
        workdir = arg[len(name) + 1:]
      elif arg == name and i + 1 < len(main_args):
        workdir = main_args[i + 1]
  if workdir is None:
    raise LaunchError("--workdir=gs://BUCKET/PATH is required after `--` (every worker must see the same workdir)")
  if not workdir.startswith("gs://"):
    raise LaunchError(f"--workdir must be a gs:// path on a TPU VM (every worker of a pod must see the same "
                      f"workdir), got {workdir!r}")
  return workdir


@dataclasses.dataclass(frozen=True)
class Launch:
  """Everything one `chainjax.launch tpu_vm` invocation asks for."""

  vm: TpuVm
  main_args: tuple[str, ...]
  create: bool = False
  spot: bool = False
  repo: str = REPO
  tarball: str | None = None
  # tpu_queued: ask for the VM as a queued resource (named `queued_resource`, default the VM's
  # name) and wait until it is ACTIVE; `create` is then not used.
  queued: bool = False
  queued_resource: str = ""
  reserved: bool = False
  valid_until_duration: str = ""
  wait_timeout_s: float = WAIT_TIMEOUT_S
  poll_s: float = POLL_S


def plan(launch: Launch) -> list[list[str]]:
  """The commands of `launch`, in order: [create | queued create, wait], archive, scp, install, run.

  The wait of a queued launch is a WaitUntilActive (a list: its describe command). Raises
  LaunchError (before anything is created or copied) for a workdir that is not gs://, an
  accelerator type with no known software version and no `vm.version`, or Spot and reserved
  together.
  """
  run = run_command(launch.vm, launch.main_args)
  if launch.queued:
    if launch.spot and launch.reserved:
      raise LaunchError("--spot and --reserved exclude each other: a queued resource has one tier")
    name = launch.queued_resource or launch.vm.name
    tier = "spot" if launch.spot else "reserved" if launch.reserved else ""
    commands = [
        queued_create_command(launch.vm, name, tier=tier, valid_until_duration=launch.valid_until_duration),
        WaitUntilActive(queued_describe_command(launch.vm, name), queued_resource=name,
                        delete=queued_delete_command(launch.vm, name), timeout_s=launch.wait_timeout_s,
                        poll_s=launch.poll_s),
    ]
  else:
    commands = [create_command(launch.vm, spot=launch.spot)] if launch.create else []
  commands += copy_commands(launch.vm, repo=launch.repo, tarball=launch.tarball)
  commands.append(install_command(launch.vm))
  commands.append(run)
  return commands


def format_command(command: Sequence[str]) -> str:
  """One line, shell-quoted; a WaitUntilActive adds its `# repeated ...` note (a shell comment)."""
  line = shlex.join(command)
  return f"{line}  {command.note()}" if isinstance(command, WaitUntilActive) else line


def execute(commands: Sequence[Sequence[str]], **wait_options: Any) -> int:
  """Runs `commands` in order; returns 0, or the exit code of the first one that fails.

  A WaitUntilActive is polled by `wait_until_active(command, **wait_options)` instead of run once.
  """
  for command in commands:
    print(f"chainjax.launch: {format_command(command)}", file=sys.stderr, flush=True)
    if isinstance(command, WaitUntilActive):
      code = wait_until_active(command, **wait_options)
      if code != 0:
        return code
      continue
    code = subprocess.run(list(command), check=False).returncode
    if code != 0:
      print(f"chainjax: error: exit code {code} from: {shlex.join(command)}", file=sys.stderr)
      return code
  return 0


# ---------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
  """Defined here, not at import, so that importing this module adds no flags to a program."""
  flags.DEFINE_string("name", None, "TPU VM name.")
  flags.DEFINE_string("zone", None, "Zone of the TPU VM, e.g. us-west4-a.")
  flags.DEFINE_string("project", "", "Google Cloud project (default: gcloud's configured one).")
  flags.DEFINE_string("accelerator_type", "v5litepod-8", "TPU type and size for --create and tpu_queued, "
                      "e.g. v5litepod-8, v4-32.")
  flags.DEFINE_string("version", "", "TPU software version for --create and tpu_queued (default: the one "
                      "recommended for JAX on --accelerator_type, e.g. v2-alpha-tpuv5-lite; tpu-ubuntu2204-base for "
                      "v4 and older; a generation not in that table needs --version).")
  flags.DEFINE_bool("create", False, "tpu_vm: create the TPU VM first (tpu_queued always asks for one).")
  flags.DEFINE_bool("spot", False, "With --create or tpu_queued: a Spot (preemptible) TPU VM.")
  flags.DEFINE_string("queued_resource", "", "tpu_queued: ID of the queued resource (default: --name).")
  flags.DEFINE_bool("reserved", False, "tpu_queued: take the capacity from the project's reservation.")
  flags.DEFINE_string("valid_until_duration", "", "tpu_queued: the request fails unless filled within this "
                      "duration, e.g. 6h (gcloud's --valid-until-duration); default: it waits until deleted.")
  flags.DEFINE_integer("wait_timeout", WAIT_TIMEOUT_S, "tpu_queued: seconds to wait for the queued resource to "
                       "be ACTIVE before giving up (it stays queued); 0 = no limit.", lower_bound=0)
  flags.DEFINE_bool("dry_run", False, "Print every command (one per line, shell-quoted) instead of running it.")


QUEUED_ONLY_FLAGS = ("queued_resource", "reserved", "valid_until_duration", "wait_timeout")


def _fail(message: str) -> None:
  print(f"chainjax: error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_ARGS)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, but a bad flag is one line and exit code 2 (as in chainjax.main)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0] if str(e) else repr(e))


def main(argv: list[str]) -> None:
  # argv: [program, target, <everything after `--`>]; absl keeps the arguments after `--` as they are.
  if len(argv) < 2:
    _fail(f"a target is required: python -m chainjax.launch {{{','.join(TARGETS)}}} [flags] -- <chainjax.main args>")
  target, main_args = argv[1], argv[2:]
  if target not in TARGETS:
    _fail(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
  values = flags.FLAGS
  for required in ("name", "zone"):
    if not values[required].value:
      _fail(f"--{required} is required for target {target}")
  queued = target == "tpu_queued"
  if not queued:
    for name in QUEUED_ONLY_FLAGS:
      if values[name].present:
        _fail(f"--{name} is only for target tpu_queued")
  vm = TpuVm(name=values.name, zone=values.zone, project=values.project, accelerator_type=values.accelerator_type,
             version=values.version)
  launch = Launch(vm=vm, main_args=tuple(main_args), create=values.create, spot=values.spot, queued=queued,
                  queued_resource=values.queued_resource, reserved=values.reserved,
                  valid_until_duration=values.valid_until_duration, wait_timeout_s=values.wait_timeout)
  try:
    commands = plan(launch)
  except LaunchError as e:
    _fail(str(e))
  if values.dry_run:
    for command in commands:
      print(format_command(command))
    return
  sys.exit(execute(commands))


def run() -> None:
  _define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
