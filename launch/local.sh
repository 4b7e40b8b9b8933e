#!/usr/bin/env bash
# Runs `python -m lzn_jax.main` on this machine as N JAX processes with M fake CPU devices each: the multi-host
# code paths (jax.distributed, per-host data, global arrays, checkpoints written by every process) without a cluster.
# The processes join through JAX's own runtime, jax.distributed.initialize(), with process 0 as the coordinator
# on 127.0.0.1; each output line is prefixed with "[i] ", the id of the process that wrote it.
#
# Usage: launch/local.sh [--processes N] [--devices_per_process M] [--port PORT] [--python PYTHON] [--dry_run]
#                        [--] [ARGUMENTS OF lzn_jax.main ...]
#
#   launch/local.sh --processes 2 --devices_per_process 4 -- \
#       --config=configs/digits_joint.py:smoke --workdir=/tmp/lzn_local
#   launch/local.sh --processes 1 --config=configs/digits_joint.py:smoke --workdir=/tmp/lzn_local   # resumes it
#   launch/local.sh --processes 2 --dry_run --config=configs/digits_repr.py:smoke --workdir=/tmp/w
#
# Run with --help for every option.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
me=launch/local.sh
# shellcheck source=SCRIPTDIR/lib/common.bash
source "$repo/launch/lib/common.bash"

usage() {
  cat <<EOF
Usage: $me [OPTIONS] [--] [ARGUMENTS OF lzn_jax.main ...]

Starts N processes of \`python -m lzn_jax.main\` on this machine, CPU only, with M fake devices each
(XLA_FLAGS=--xla_force_host_platform_device_count=M, JAX_PLATFORMS=cpu), joined by JAX's multi-controller
runtime: every process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N and its own
JAX_PROCESS_ID, which lzn_jax.parallel.maybe_initialize passes to jax.distributed.initialize(). Output lines
are prefixed with "[i] " (the process id). Waits for all; when one fails, stops the others (SIGTERM, then
SIGKILL after LZN_STOP_GRACE_SECONDS, default 10) and exits with its status. With --processes 1 it runs one
plain process (no coordinator) in the foreground.

Options (each also as --option=VALUE):
  --processes N            number of processes (default 2; env LZN_PROCESSES)
  --devices_per_process M  fake CPU devices per process (default 1; env LZN_DEVICES_PER_PROCESS)
  --port PORT              coordinator port on 127.0.0.1 (default: a free port; env LZN_PORT)
  --python PYTHON          interpreter (default: \$LZN_PYTHON, else .venv/bin/python of the repository if it
                           exists, else python3)
  --dry_run                print each process's command, with its environment, and run nothing
  --help                   this text

Every other argument (or everything after --) goes to lzn_jax.main, e.g. --config=configs/x.py:smoke
--workdir=DIR --config.key=value. Relative paths are relative to the current directory. An XLA_FLAGS in the
environment is kept (its device-count flag replaced); the repository is put on PYTHONPATH. The job has N*M
devices; a config uses all of them unless its num_devices says fewer.

Examples:
  $me --processes 2 --devices_per_process 4 -- --config=configs/digits_joint.py:smoke --workdir=/tmp/w
  $me --processes 1 --config=configs/digits_joint.py:smoke --workdir=/tmp/w
EOF
}

is_positive_integer() {
  [[ $1 =~ ^[0-9]+$ ]] && (( 10#$1 > 0 ))
}

processes=${LZN_PROCESSES:-2}
devices_per_process=${LZN_DEVICES_PER_PROCESS:-1}
port=${LZN_PORT:-}
python=${LZN_PYTHON:-}
dry_run=0
main_args=()

need_value() {
  [ "$2" -ge 2 ] || fail_usage "$1 needs a value"
}

while [ $# -gt 0 ]; do
  case $1 in
    --processes=*) processes=${1#*=} ;;
    --processes) need_value "$1" $#; processes=$2; shift ;;
    --devices_per_process=*) devices_per_process=${1#*=} ;;
    --devices_per_process) need_value "$1" $#; devices_per_process=$2; shift ;;
    --port=*) port=${1#*=} ;;
    --port) need_value "$1" $#; port=$2; shift ;;
    --python=*) python=${1#*=} ;;
    --python) need_value "$1" $#; python=$2; shift ;;
    --dry_run) dry_run=1 ;;
    --help | -h) usage; exit 0 ;;
    --) shift; main_args+=("$@"); break ;;
    *) main_args+=("$1") ;;
  esac
  shift
done

is_positive_integer "$processes" || fail_usage "--processes must be a positive whole number, got '$processes'"
is_positive_integer "$devices_per_process" ||
  fail_usage "--devices_per_process must be a positive whole number, got '$devices_per_process'"
if [ -n "$port" ] && ! { is_positive_integer "$port" && (( 10#$port < 65536 )); }; then
  fail_usage "--port must be a port number (1-65535), got '$port'"
fi
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi

# The given XLA flags without any device count of theirs, then ours.
xla_flags=""
read -r -a given_flags <<< "${XLA_FLAGS:-}"
for flag in ${given_flags[@]+"${given_flags[@]}"}; do
  case $flag in
    --xla_force_host_platform_device_count=*) ;;
    *) xla_flags+="$flag " ;;
  esac
done
xla_flags+="--xla_force_host_platform_device_count=$devices_per_process"

case ":${PYTHONPATH:-}:" in
  *":$repo:"*) python_path=$PYTHONPATH ;;
  *) python_path=$repo${PYTHONPATH:+:$PYTHONPATH} ;;
esac

# Cluster descriptions inherited from the caller (a SLURM allocation, an earlier export) would make JAX join the
# wrong cluster: they are removed from the processes' environment.
unset_args=()
for name in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID JAX_LOCAL_DEVICE_IDS \
    SLURM_JOB_ID SLURM_STEP_NODELIST SLURM_NTASKS SLURM_PROCID SLURM_LOCALID; do
  if [ -n "${!name+set}" ]; then unset_args+=(-u "$name"); fi
done

base_env=(env ${unset_args[@]+"${unset_args[@]}"} JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags"
  "PYTHONPATH=$python_path" PYTHONUNBUFFERED=1)
main_command=("$python" -m lzn_jax.main ${main_args[@]+"${main_args[@]}"})

if (( 10#$processes == 1 )); then
  if (( dry_run )); then
    print_command "${base_env[@]}" "${main_command[@]}"
    exit 0
  fi
  exec "${base_env[@]}" "${main_command[@]}"
fi

if [ -z "$port" ]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
    fail_usage "could not find a free port with $python; give one with --port"
fi

process_command() {
  argv=("${base_env[@]}" "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$((10#$processes))"
    "JAX_PROCESS_ID=$1" "${main_command[@]}")
}

if (( dry_run )); then
  for (( i = 0; i < 10#$processes; i++ )); do
    process_command "$i"
    print_command "${argv[@]}"
  done
  exit 0
fi

prefix_lines() {
  awk -v prefix="[$1] " '{ print prefix $0; fflush() }'
}

# Each process runs in a background subshell that pipes its output through prefix_lines: the subshell ends with
# the process's status once every line is out. The process itself (its pid in $pid_dir/<id>) is what gets signals.
pid_dir=$(mktemp -d "${TMPDIR:-/tmp}/lzn_local.XXXXXX")
trap 'rm -rf "$pid_dir"' EXIT
subshells=()
finished=()

process_pids() {
  local i
  for i in "${!subshells[@]}"; do
    if [ -z "${finished[$i]:-}" ] && [ -s "$pid_dir/$i" ]; then cat "$pid_dir/$i"; fi
  done
}

# SIGTERM to the processes still running (the trainer writes a checkpoint and exits), SIGKILL to any left after
# the grace period (one blocked in a collective with a dead peer never gets to its handler).
stop_processes() {
  local running subshell
  read -r -d '' -a running < <(process_pids) || true
  if [ ${#running[@]} -gt 0 ]; then
    kill -TERM "${running[@]}" 2>/dev/null || true
    (
      sleeper=""
      trap '[ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null; exit 0' TERM
      sleep "${LZN_STOP_GRACE_SECONDS:-10}" &
      sleeper=$!
      wait "$sleeper"
      kill -KILL "${running[@]}" 2>/dev/null || true
    ) &
    local killer=$!
  fi
  for subshell in "${subshells[@]}"; do wait "$subshell" 2>/dev/null || true; done
  if [ -n "${killer:-}" ]; then
    kill -TERM "$killer" 2>/dev/null || true
    wait "$killer" 2>/dev/null || true
  fi
}

# shellcheck disable=SC2329  # the trap below calls it (shellcheck 0.11 misses traps in scripts ending in exit)
on_signal() {
  trap - INT TERM
  echo "$me: interrupted; stopping the processes" >&2
  stop_processes
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

for (( i = 0; i < 10#$processes; i++ )); do
  process_command "$i"
  (
    { echo "$BASHPID" > "$pid_dir/$i"; exec "${argv[@]}" 2>&1; } | prefix_lines "$i"
    exit "${PIPESTATUS[0]}"
  ) &
  subshells[i]=$!
done

# Each `wait -n` reaps one subshell: the one `kill -0` no longer finds (the others are running or zombies).
status=0
for (( remaining = 10#$processes; remaining > 0; remaining-- )); do
  code=0
  wait -n || code=$?
  for i in "${!subshells[@]}"; do
    if [ -z "${finished[$i]:-}" ] && ! kill -0 "${subshells[$i]}" 2>/dev/null; then
      finished[i]=$code
      if (( code != 0 )); then
        echo "$me: process $i exited with status $code; stopping the others" >&2
        status=$code
      fi
      break
    fi
  done
  if (( status != 0 )); then
    stop_processes
    break
  fi
done
exit "$status"
