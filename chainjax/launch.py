"""Launch chainjax runs on Cloud TPU VMs: `python -m chainjax.launch tpu_vm --name=NAME --zone=ZONE -- <main args>`.

  python -m chainjax.launch tpu_vm --name=my-tpu --zone=us-west4-a --create --dry_run -- \
      --config=configs/default.py --workdir=gs://my-bucket/runs/default

The plan, each step one command (printed with `--dry_run`, otherwise run in order, stopping at
the first failure with its exit code):

  1. `gcloud compute tpus tpu-vm create` (only with `--create`);
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

Exit codes: 0 done, 2 bad flags, unknown target or a workdir that is not `gs://` (one line),
otherwise the exit code of the first command that failed.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import app, flags

EXIT_BAD_ARGS = 2
TARGETS = ("tpu_vm",)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/chainjax"  # unquoted in remote commands, so that the remote shell expands `~`
REMOTE_TARBALL = "chainjax.tar.gz"  # relative to the worker's home directory
# Installed next to `pip install -e .` on every worker: the TPU build of jax in the range pinned
# in pyproject.toml (tests/test_launch.py checks they agree), and gcsfs, which etils.epath (used
# by Orbax for checkpoint directories) needs to read and write gs:// paths.
WORKER_PACKAGES = ("jax[tpu]>=0.10.2,<0.11", "gcsfs")
DISTRIBUTED_ON = "--distributed=on"  # see run_command

# TPU software (runtime) versions recommended for JAX, by accelerator generation
# (cloud.google.com/tpu/docs/runtimes). Accelerator types look like `v5litepod-8`, `v4-32`.
_SOFTWARE_VERSIONS = (
    ("v6e", "v2-alpha-tpuv6e"),
    ("v5p", "v2-alpha-tpuv5"),
    ("v5litepod", "v2-alpha-tpuv5-lite"),
    ("v5e", "v2-alpha-tpuv5-lite"),
)
_DEFAULT_SOFTWARE_VERSION = "tpu-ubuntu2204-base"  # v4 and older


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
  """The TPU software version recommended for JAX on `accelerator_type` (e.g. v5litepod-8)."""
  generation = accelerator_type.split("-")[0]
  return dict(_SOFTWARE_VERSIONS).get(generation, _DEFAULT_SOFTWARE_VERSION)


def create_command(vm: TpuVm, *, spot: bool = False) -> list[str]:
  """`gcloud compute tpus tpu-vm create` for `vm`; `spot` asks for a preemptible Spot VM."""
  version = vm.version or software_version(vm.accelerator_type)
  return (["gcloud", "compute", "tpus", "tpu-vm", "create", vm.name] + vm.gcloud_scope()
          + [f"--accelerator-type={vm.accelerator_type}", f"--version={version}"]
          + (["--spot"] if spot else []))


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


def plan(launch: Launch) -> list[list[str]]:
  """The commands of `launch`, in order: [create], archive, scp, install, run.

  Raises LaunchError (before anything is created or copied) for a workdir that is not gs://.
  """
  run = run_command(launch.vm, launch.main_args)
  commands = [create_command(launch.vm, spot=launch.spot)] if launch.create else []
  commands += copy_commands(launch.vm, repo=launch.repo, tarball=launch.tarball)
  commands.append(install_command(launch.vm))
  commands.append(run)
  return commands


def execute(commands: Sequence[Sequence[str]]) -> int:
  """Runs `commands` in order; returns 0, or the exit code of the first one that fails."""
  for command in commands:
    print(f"chainjax.launch: {shlex.join(command)}", file=sys.stderr, flush=True)
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
  flags.DEFINE_string("accelerator_type", "v5litepod-8", "TPU type and size for --create, e.g. v5litepod-8, v4-32.")
  flags.DEFINE_string("version", "", "TPU software version for --create (default: the one recommended for JAX "
                      "on --accelerator_type, e.g. v2-alpha-tpuv5-lite; tpu-ubuntu2204-base for v4).")
  flags.DEFINE_bool("create", False, "Create the TPU VM first.")
  flags.DEFINE_bool("spot", False, "With --create: a Spot (preemptible) TPU VM.")
  flags.DEFINE_bool("dry_run", False, "Print every command (one per line, shell-quoted) instead of running it.")


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
  vm = TpuVm(name=values.name, zone=values.zone, project=values.project, accelerator_type=values.accelerator_type,
             version=values.version)
  try:
    commands = plan(Launch(vm=vm, main_args=tuple(main_args), create=values.create, spot=values.spot))
  except LaunchError as e:
    _fail(str(e))
  if values.dry_run:
    for command in commands:
      print(shlex.join(command))
    return
  sys.exit(execute(commands))


def run() -> None:
  _define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
