#!/usr/bin/env bash
# Multi-host training without a cluster manager: run this script once on every host, each with the same
# coordinator and process count and its own process id; the processes join through JAX's own runtime
# (jax.distributed.initialize() with the coordinator, count and id that lzn_jax.parallel.maybe_initialize reads
# from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID). Every host uses all of its local devices.
#
# Usage: [VARIABLES] launch/multinode.sh [--dry_run] [--help] [--] [MORE ARGUMENTS OF lzn_jax.main ...]
#
#   # on host 0 (10.0.0.1), then the same on host 1 with JAX_PROCESS_ID=1:
#   JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \
#   LZN_CONFIG=configs/cifar10_gen.py LZN_WORKDIR=/shared/runs/cifar10 \
#   LZN_OVERRIDES="--config.data.batch_size=256" launch/multinode.sh
#
#   LZN_DRY_RUN=1 JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \
#   LZN_CONFIG=configs/cifar10_gen.py LZN_WORKDIR=/shared/runs/cifar10 launch/multinode.sh
#
# Run with --help for every variable.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
me=launch/multinode.sh
# shellcheck source=SCRIPTDIR/lib/common.bash
source "$repo/launch/lib/common.bash"

usage() {
  cat <<EOF
Usage: [VARIABLES] $me [--dry_run] [--help] [--] [MORE ARGUMENTS OF lzn_jax.main ...]

Runs \`python -m lzn_jax.main --config=\$LZN_CONFIG --workdir=\$LZN_WORKDIR \$LZN_OVERRIDES [ARGUMENTS]\` as one
process of a multi-host JAX job. Run it once on every host. Each process uses all devices of its host.

Required variables:
  JAX_COORDINATOR_ADDRESS  host:port of process 0, reachable from every host (the same everywhere)
  JAX_NUM_PROCESSES        number of processes (hosts) in the job (the same everywhere)
  JAX_PROCESS_ID           this process's id, 0 .. JAX_NUM_PROCESSES-1 (0 on the coordinator's host)
  LZN_CONFIG               config file and variants, e.g. configs/cifar10_gen.py or configs/digits_joint.py:smoke
  LZN_WORKDIR              run directory on storage that every host sees (shared file system or gs://...)

Optional variables:
  LZN_OVERRIDES            config overrides, separated by spaces, e.g. "--config.seed=1 --config.data.batch_size=256"
  LZN_PYTHON               interpreter (default: .venv/bin/python of the repository if it exists, else python3)
  LZN_DISTRIBUTED_TIMEOUT_SECONDS  how long to wait for every process to join (default 300)
  LZN_DRY_RUN=1            same as --dry_run

Options:
  --dry_run                print the command, with the environment it sets, and run nothing
  --help                   this text

Relative paths are relative to the current directory; the repository is put on PYTHONPATH.
EOF
}

require() {
  [ -n "${!1:-}" ] || fail_usage "missing $1 ($2)"
}

dry_run=0
[ "${LZN_DRY_RUN:-0}" = 1 ] && dry_run=1
extra_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry_run) dry_run=1 ;;
    --help | -h) usage; exit 0 ;;
    --) shift; extra_args+=("$@"); break ;;
    *) extra_args+=("$1") ;;
  esac
  shift
done

require JAX_COORDINATOR_ADDRESS "host:port of process 0"
require JAX_NUM_PROCESSES "the number of processes"
require JAX_PROCESS_ID "this process's id"
require LZN_CONFIG "the config file, e.g. configs/cifar10_gen.py"
require LZN_WORKDIR "the run directory that every host sees"

[[ $JAX_COORDINATOR_ADDRESS =~ ^[^:[:space:]]+:[0-9]+$ || $JAX_COORDINATOR_ADDRESS =~ ^\[[0-9A-Fa-f:]+\]:[0-9]+$ ]] ||
  fail_usage "JAX_COORDINATOR_ADDRESS must be host:port, got '$JAX_COORDINATOR_ADDRESS'"
if ! [[ $JAX_NUM_PROCESSES =~ ^[0-9]+$ ]] || (( 10#$JAX_NUM_PROCESSES == 0 )); then
  fail_usage "JAX_NUM_PROCESSES must be a positive whole number, got '$JAX_NUM_PROCESSES'"
fi
if ! [[ $JAX_PROCESS_ID =~ ^[0-9]+$ ]] || (( 10#$JAX_PROCESS_ID >= 10#$JAX_NUM_PROCESSES )); then
  fail_usage "JAX_PROCESS_ID must be a whole number below JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES, got '$JAX_PROCESS_ID'"
fi

python=${LZN_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
case ":${PYTHONPATH:-}:" in
  *":$repo:"*) python_path=$PYTHONPATH ;;
  *) python_path=$repo${PYTHONPATH:+:$PYTHONPATH} ;;
esac
read -r -a overrides <<< "${LZN_OVERRIDES:-}"

argv=(env "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS" "JAX_NUM_PROCESSES=$((10#$JAX_NUM_PROCESSES))"
  "JAX_PROCESS_ID=$((10#$JAX_PROCESS_ID))" "PYTHONPATH=$python_path"
  "$python" -m lzn_jax.main "--config=$LZN_CONFIG" "--workdir=$LZN_WORKDIR"
  ${overrides[@]+"${overrides[@]}"} ${extra_args[@]+"${extra_args[@]}"})

if (( dry_run )); then
  print_command "${argv[@]}"
  exit 0
fi
exec "${argv[@]}"
