"""chainjax.launch builds the right gcloud commands (nothing here runs gcloud or needs a network)."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags

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
  spec = importlib.util.spec_from_file_location("default_config", os.path.join(REPO, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  points = []
  module.sweep(lambda **overrides: points.append(overrides))
  vm = launch.TpuVm("n", "z")
  runs = [launch.sweep_run_command(vm, "configs/default.py", f"gs://b/sweep/{i}", point)
          for i, point in enumerate(points)]
  assert len(runs) == 5
  for i, (point, run) in enumerate(zip(points, runs)):
    assert _run_args(run) == ["--config=configs/default.py", f"--workdir=gs://b/sweep/{i}",
                              *(f"--config.{k}={v}" for k, v in point.items())]
  assert points[-1] == {"chain.mode": "progressive_finetune", "chain.finetune_steps": 750}
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
