"""chainjax.launch builds the right gcloud commands (nothing here runs gcloud or needs a network)."""

import io
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags

from chainjax import config as config_lib
from chainjax import launch
from helpers import REPO

MAIN_ARGS = ["--config=configs/default.py", "--workdir=gs://b/run"]
RUN_PREFIX = ["cd", "~/chainjax", "&&", "python3", "-m", "chainjax.main", "--distributed=on"]


def _launch(*args):
  """`python -m chainjax.launch <args>` from the repository root, as a user would run it."""
  return subprocess.run([sys.executable, "-m", "chainjax.launch", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=60, check=False)


def _remote(command: list[str]) -> str:
  """The shell string a `gcloud ... ssh --command STRING` command runs on the workers."""
  return command[command.index("--command") + 1]


def _run_args(command: list[str]) -> list[str]:
  """The user's chainjax.main arguments of a run command, parsed back as the worker's shell would."""
  words = shlex.split(_remote(command))
  assert words[:len(RUN_PREFIX)] == RUN_PREFIX, words
  return words[len(RUN_PREFIX):]


def _verbs(commands: list[list[str]]) -> list[str]:
  """`create`, `scp`, `ssh` for gcloud commands, `archive` for git."""
  return [c[4] if c[0] == "gcloud" else c[3] for c in commands]


def test_dry_run_prints_create_copy_install_and_run_on_all_workers():
  result = _launch("tpu_vm", "--name=n", "--zone=z", "--dry_run", "--create", "--", *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()]
  assert len(commands) == 5, result.stdout
  create, archive, scp, install, run = commands

  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n"]
  assert "--zone=z" in create and "--accelerator-type=v5litepod-8" in create
  assert "--version=v2-alpha-tpuv5-lite" in create

  assert archive[0] == "git" and archive[-1] == "HEAD" and archive[archive.index("-C") + 1] == REPO
  tarball = next(a.split("=", 1)[1] for a in archive if a.startswith("--output="))
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball]
  assert scp[6] == "n:chainjax.tar.gz" and "--worker=all" in scp and "--zone=z" in scp

  assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n"] and "--worker=all" in install
  remote_install = _remote(install)
  assert "tar -xzf ~/chainjax.tar.gz -C ~/chainjax" in remote_install
  pip = shlex.split(remote_install.split(" && ")[-1])
  assert pip[:6] == ["python3", "-m", "pip", "install", "--quiet", "-e"] and pip[6] == "."
  assert any(p.startswith("jax[tpu]") for p in pip)

  assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n"] and "--worker=all" in run
  assert _run_args(run) == MAIN_ARGS


def test_local_workdir_is_refused_with_one_line_and_exit_code_2():
  for workdir_args in (["--workdir=runs/x"], ["--workdir", "/tmp/x"], []):
    result = _launch("tpu_vm", "--name=n", "--zone=z", "--dry_run", "--create", "--",
                     "--config=configs/default.py", *workdir_args)
    assert result.returncode == 2, (workdir_args, result)
    assert result.stdout == ""  # nothing is planned, not even the create command
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chainjax: error: --workdir"), lines


def test_arguments_with_spaces_and_quotes_survive_the_remote_shell():
  tricky = ["--config=configs/default.py:mode=decoupled,runlocal", "--workdir", "gs://b/run with space",
            "--config.chain.loss_weights=(0.5, 0.5, 1.0)", "--config.name=it's a \"test\"", "--config.x=$HOME;rm -rf /",
            "--", "--trailing"]
  result = _launch("tpu_vm", "--name=n", "--zone=z", "--dry_run", "--", *tricky)
  assert result.returncode == 0, result.stderr
  run = shlex.split(result.stdout.splitlines()[-1])
  assert _run_args(run) == tricky


def test_without_create_there_is_no_create_command():
  result = _launch("tpu_vm", "--name=n", "--zone=z", "--dry_run", "--", *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 4 and not any(" create " in line for line in lines), lines
  vm = launch.TpuVm("n", "z")
  assert _verbs(launch.plan(launch.Launch(vm, tuple(MAIN_ARGS)))) == ["archive", "scp", "ssh", "ssh"]
  assert _verbs(launch.plan(launch.Launch(vm, tuple(MAIN_ARGS), create=True)))[0] == "create"


def test_unknown_target_and_bad_flags_exit_2_with_one_line():
  for args in (["gpu_cluster", "--name=n", "--zone=z", "--dry_run", "--", *MAIN_ARGS],
               ["tpu_vm", "--name=n", "--zone=z", "--no_such_flag", "--", *MAIN_ARGS],
               ["tpu_vm", "--zone=z", "--dry_run", "--", *MAIN_ARGS]):
    result = _launch(*args)
    assert result.returncode == 2, (args, result)
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert "unknown target 'gpu_cluster'" in _launch("gpu_cluster", "--", *MAIN_ARGS).stderr


def test_project_spot_and_version_reach_every_gcloud_command():
  vm = launch.TpuVm("n", "z", project="p", accelerator_type="v4-32")
  commands = launch.plan(launch.Launch(vm, tuple(MAIN_ARGS), create=True, spot=True))
  gcloud = [c for c in commands if c[0] == "gcloud"]
  assert len(gcloud) == 4 and all("--project=p" in c for c in gcloud)
  assert "--spot" in commands[0] and "--version=tpu-ubuntu2204-base" in commands[0]
  pinned = launch.TpuVm("n", "z", accelerator_type="v6e-16", version="my-runtime")
  assert "--version=my-runtime" in launch.create_command(pinned)
  assert launch.software_version("v6e-16") == "v2-alpha-tpuv6e"
  assert launch.software_version("v5p-128") == "v2-alpha-tpuv5"


def test_sweep_run_commands_follow_the_config_sweep():
  module = config_lib.load_file(os.path.join(REPO, "configs", "default.py"))
  points = []
  module.sweep(lambda **overrides: points.append(overrides))
  vm = launch.TpuVm("n", "z")
  runs = [launch.sweep_run_command(vm, "configs/default.py", f"gs://b/sweep/{i}", point)
          for i, point in enumerate(points)]
  assert len(runs) == 15
  for i, (point, run) in enumerate(zip(points, runs)):
    assert _run_args(run) == ["--config=configs/default.py", f"--workdir=gs://b/sweep/{i}",
                              *(f"--config.{k}={v}" for k, v in point.items())]
  assert points[-1] == {"chain.mode": "progressive_finetune", "chain.finetune_steps": 750, "data.d": 128}
  args = launch.main_args_for("c.py", "gs://b", {"chain.loss_weights": (0.5, 1.0), "x": (2,), "flag": True})
  assert args[2:] == ["--config.chain.loss_weights=(0.5,1.0)", "--config.x=(2,)", "--config.flag=True"]
  with pytest.raises(launch.LaunchError, match="gs://"):
    launch.sweep_run_command(vm, "c.py", "runs/local", {})


def test_worker_jax_range_matches_pyproject():
  with open(os.path.join(REPO, "pyproject.toml")) as f:
    pinned = re.search(r'"jax(>=[^"]+)"', f.read()).group(1)
  assert f"jax[tpu]{pinned}" in launch.WORKER_PACKAGES


def test_execute_stops_at_the_first_failure_with_its_exit_code(tmp_path):
  marker = tmp_path / "ran"
  commands = [["true"], [sys.executable, "-c", "raise SystemExit(7)"], ["touch", str(marker)]]
  assert launch.execute(commands) == 7
  assert not marker.exists()
  assert launch.execute([["true"], ["touch", str(marker)]]) == 0 and marker.exists()


def test_importing_the_module_defines_no_flags():
  assert "dry_run" not in flags.FLAGS and "accelerator_type" not in flags.FLAGS


def test_main_defines_the_flags_the_run_command_passes():
  with open(os.path.join(REPO, "chainjax", "main.py")) as f:
    main_source = f.read()
  assert re.search(r'DEFINE_enum\(\s*"distributed",\s*"auto",\s*\[[^]]*"on"', main_source), \
      "chainjax.main lost --distributed=on, which launch.run_command passes on TPU VMs"
  assert launch.DISTRIBUTED_ON == "--distributed=on"


# ---------------------------------------------------------------------------------------------
# tpu_queued: a queued resource, waited for until ACTIVE.


class FakeGcloud:
  """A `describe` for wait_until_active: answers `states` in turn on a fake clock that `sleep` moves.

  An entry is a state, or an int for a describe that fails with that exit code. Nothing sleeps.
  """

  def __init__(self, states):
    self.states = list(states)
    self.now = 1000.0
    self.sleeps = []
    self.calls = []

  def describe(self, command):
    self.calls.append(list(command))
    answer = self.states.pop(0)
    return (answer, "") if isinstance(answer, int) else (0, answer + "\n")

  def clock(self):
    return self.now

  def sleep(self, seconds):
    self.sleeps.append(seconds)
    self.now += seconds

  def options(self, log):
    return {"describe": self.describe, "clock": self.clock, "sleep": self.sleep, "log": log}


def _wait_step(timeout_s=3600, poll_s=30):
  vm = launch.TpuVm("n", "z", project="p")
  return launch.WaitUntilActive(launch.queued_describe_command(vm, "q"), queued_resource="q",
                                delete=launch.queued_delete_command(vm, "q"), timeout_s=timeout_s, poll_s=poll_s)


def test_queued_dry_run_prints_create_wait_copy_install_and_run():
  result = _launch("tpu_queued", "--name=n", "--zone=z", "--project=p", "--spot", "--valid_until_duration=6h",
                   "--dry_run", "--", *MAIN_ARGS)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  commands = [shlex.split(line, comments=True) for line in lines]
  assert len(commands) == 6, result.stdout
  create, describe, archive, scp, install, run = commands
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "n", "--node-id=n", "--zone=z",
                    "--project=p", "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite",
                    "--spot", "--valid-until-duration=6h"]
  assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", "n", "--zone=z", "--project=p",
                      "--format=value(state.state)"]
  assert "# repeated every 30s until ACTIVE, at most 6h00m" in lines[1] and "FAILED" in lines[1]
  assert archive[0] == "git" and scp[4] == "scp" and scp[6] == "n:chainjax.tar.gz"
  assert install[4] == "ssh" and "--worker=all" in install
  assert _run_args(run) == MAIN_ARGS
  assert "--create" not in result.stdout and "tpu-vm create" not in result.stdout


def test_queued_resource_name_tiers_and_version_reach_the_queued_commands():
  vm = launch.TpuVm("node", "z", accelerator_type="v6e-16", version="my-runtime")
  commands = launch.plan(launch.Launch(vm, tuple(MAIN_ARGS), queued=True, queued_resource="req", reserved=True,
                                       wait_timeout_s=0, poll_s=5))
  create, wait = commands[:2]
  assert create[:7] == ["gcloud", "compute", "tpus", "queued-resources", "create", "req", "--node-id=node"]
  assert "--runtime-version=my-runtime" in create and "--reserved" in create and "--spot" not in create
  assert not any(a.startswith("--valid-until") for a in create)  # no time limit unless asked for
  assert isinstance(wait, launch.WaitUntilActive) and wait[5] == "req" and wait.queued_resource == "req"
  assert wait.delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "req", "--zone=z"]
  assert "no time limit" in wait.note() and "every 5s" in wait.note()
  assert _verbs(commands) == ["create", "describe", "archive", "scp", "ssh", "ssh"]
  scp, install, run = commands[3:]
  assert scp[6] == "node:chainjax.tar.gz" and install[5] == run[5] == "node"  # the node, not the request
  on_demand = launch.queued_create_command(launch.TpuVm("n", "z", accelerator_type="v4-8"), "q")
  assert on_demand[-2:] == ["--accelerator-type=v4-8", "--runtime-version=tpu-ubuntu2204-base"]
  with pytest.raises(launch.LaunchError, match="--spot and --reserved"):
    launch.plan(launch.Launch(vm, tuple(MAIN_ARGS), queued=True, spot=True, reserved=True))
  with pytest.raises(launch.LaunchError, match="tier"):
    launch.queued_create_command(vm, "q", tier="best-effort")


def test_queued_only_flags_are_refused_for_tpu_vm_and_spot_with_reserved_exits_2():
  for args in (["tpu_vm", "--reserved"], ["tpu_vm", "--queued_resource=q"], ["tpu_vm", "--wait_timeout=10"],
               ["tpu_vm", "--valid_until_duration=1h"], ["tpu_queued", "--spot", "--reserved"]):
    result = _launch(*args, "--name=n", "--zone=z", "--dry_run", "--", *MAIN_ARGS)
    assert result.returncode == 2, (args, result)
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unknown_accelerator_generation_is_an_error_naming_version():
  with pytest.raises(launch.LaunchError, match="--version=VERSION"):
    launch.software_version("v7x-8")
  for target in (["tpu_vm", "--create"], ["tpu_queued"]):
    result = _launch(*target, "--name=n", "--zone=z", "--accelerator_type=v7x-8", "--dry_run", "--", *MAIN_ARGS)
    assert result.returncode == 2, (target, result)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--accelerator_type=v7x-8" in lines[0] and "--version" in lines[0], lines
    pinned = _launch(*target, "--name=n", "--zone=z", "--accelerator_type=v7x-8", "--version=rt", "--dry_run", "--",
                     *MAIN_ARGS)
    assert pinned.returncode == 0, pinned.stderr
    assert re.search(r"--(runtime-)?version=rt\b", pinned.stdout.splitlines()[0]), pinned.stdout
  # Without --create nothing is created, so no software version is needed.
  assert _launch("tpu_vm", "--name=n", "--zone=z", "--accelerator_type=v7x-8", "--dry_run", "--",
                 *MAIN_ARGS).returncode == 0
  # The known generations keep the versions of cloud.google.com/tpu/docs/runtimes.
  assert {t: launch.software_version(t) for t in ("v2-8", "v3-32", "v4-8", "v5litepod-8", "v5e-4", "v5p-8",
                                                  "v6e-16")} == {
      "v2-8": "tpu-ubuntu2204-base", "v3-32": "tpu-ubuntu2204-base", "v4-8": "tpu-ubuntu2204-base",
      "v5litepod-8": "v2-alpha-tpuv5-lite", "v5e-4": "v2-alpha-tpuv5-lite", "v5p-8": "v2-alpha-tpuv5",
      "v6e-16": "v2-alpha-tpuv6e"}


def test_wait_prints_each_state_change_with_the_time_waited_until_active():
  gcloud = FakeGcloud(["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING",
                       "PROVISIONING", "ACTIVE"])
  log = io.StringIO()
  step = _wait_step()
  assert launch.wait_until_active(step, **gcloud.options(log)) == 0
  assert gcloud.calls == [list(step)] * 6 and gcloud.sleeps == [30] * 5
  assert log.getvalue().splitlines() == [
      "chainjax.launch: queued resource q: WAITING_FOR_RESOURCES after 0s",
      "chainjax.launch: queued resource q: PROVISIONING after 1m30s",
      "chainjax.launch: queued resource q: ACTIVE after 2m30s",
  ]


def test_wait_repeats_an_unchanged_state_every_ten_minutes():
  gcloud = FakeGcloud(["WAITING_FOR_RESOURCES"] * 5 + ["ACTIVE"])
  log = io.StringIO()
  assert launch.wait_until_active(_wait_step(timeout_s=0, poll_s=300), **gcloud.options(log)) == 0
  assert [line.split(": ", 1)[1] for line in log.getvalue().splitlines()] == [
      "queued resource q: WAITING_FOR_RESOURCES after 0s",
      "queued resource q: WAITING_FOR_RESOURCES after 10m00s",
      "queued resource q: WAITING_FOR_RESOURCES after 20m00s",
      "queued resource q: ACTIVE after 25m00s",
  ]


@pytest.mark.parametrize("ended", ["FAILED", "SUSPENDED"])
def test_wait_stops_with_one_error_line_when_the_request_fails(ended):
  gcloud = FakeGcloud(["WAITING_FOR_RESOURCES", "PROVISIONING", ended, "ACTIVE"])
  log = io.StringIO()
  assert launch.wait_until_active(_wait_step(), **gcloud.options(log)) == launch.EXIT_NOT_ACTIVE == 69
  assert len(gcloud.calls) == 3  # it does not poll on after FAILED/SUSPENDED
  errors = [line for line in log.getvalue().splitlines() if line.startswith("chainjax: error:")]
  assert len(errors) == 1 and f"queued resource q is {ended} after 1m00s" in errors[0], log.getvalue()
  assert "`gcloud compute tpus queued-resources describe q --zone=z --project=p`" in errors[0]
  assert "`gcloud compute tpus queued-resources delete q --zone=z --project=p`" in errors[0]


def test_wait_gives_up_at_the_timeout_and_retries_failed_describes():
  gcloud = FakeGcloud(["WAITING_FOR_RESOURCES"] * 10)
  log = io.StringIO()
  assert launch.wait_until_active(_wait_step(timeout_s=100, poll_s=30), **gcloud.options(log)) == 69
  assert gcloud.sleeps == [30, 30, 30, 10] and len(gcloud.calls) == 5  # the last describe is at the timeout
  error = log.getvalue().splitlines()[-1]
  assert error.startswith("chainjax: error: queued resource q is still WAITING_FOR_RESOURCES after 1m40s")
  assert "--wait_timeout" in error and "tpu_vm" in error and "queued-resources delete q" in error

  flaky = FakeGcloud([1, 1, "PROVISIONING", 255, "ACTIVE"])
  assert launch.wait_until_active(_wait_step(), **flaky.options(io.StringIO())) == 0
  broken = FakeGcloud([1, 1, 1, "ACTIVE"])
  log = io.StringIO()
  assert launch.wait_until_active(_wait_step(), **broken.options(log)) == 1
  assert len(broken.calls) == 3 and "exit code 1 from 3 describes in a row" in log.getvalue()


def test_execute_waits_for_active_before_the_next_command(tmp_path):
  marker = tmp_path / "ran"
  commands = [["true"], _wait_step(), ["touch", str(marker)]]
  gcloud = FakeGcloud(["WAITING_FOR_RESOURCES", "FAILED"])
  assert launch.execute(commands, **gcloud.options(io.StringIO())) == 69 and not marker.exists()
  gcloud = FakeGcloud(["PROVISIONING", "ACTIVE"])
  assert launch.execute(commands, **gcloud.options(io.StringIO())) == 0 and marker.exists()
  # The default describe runs the command and reads the state from its stdout.
  real = launch.WaitUntilActive([sys.executable, "-c", "print('ACTIVE')"], queued_resource="q", delete=["false"])
  assert launch.execute([real]) == 0
