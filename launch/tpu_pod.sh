#!/usr/bin/env bash
# Cloud TPU VM slices, one command per step: create (or reuse) the slice, set up every worker (code + pinned
# Python stack + jax[tpu]), run `python -m lzn_jax.main` on all workers in the background, stop it (SIGTERM: the
# trainer writes a checkpoint), read a worker's log, delete the slice. The workers join through JAX's own
# runtime: jax.distributed.initialize() finds a Cloud TPU slice by itself.
#
# Usage: launch/tpu_pod.sh create|setup|run|stop|logs|status|delete [FLAGS] [--] [CONFIG OVERRIDES ...]
#
#   export LZN_TPU_PROJECT=my-project LZN_TPU_ZONE=us-west4-a LZN_TPU_NAME=lzn-v5e-64
#   launch/tpu_pod.sh create --accelerator_type=v5litepod-64 --runtime_version=v2-alpha-tpuv5-lite --spot
#   launch/tpu_pod.sh status                     # a --spot/--queued slice is usable once ACTIVE
#   launch/tpu_pod.sh setup                      # copies `git archive HEAD`; or --repo=URL --ref=BRANCH
#   launch/tpu_pod.sh run --config=configs/cifar10_gen.py --workdir=gs://my-bucket/lzn/cifar10 \
#       --config.data.batch_size=512
#   launch/tpu_pod.sh logs --worker=0 --follow
#   launch/tpu_pod.sh stop
#   launch/tpu_pod.sh delete --spot
#   launch/tpu_pod.sh run --dry_run --config=configs/cifar10_gen.py --workdir=gs://b/w   # prints the commands
#
# Run with --help for every flag.
# shellcheck disable=SC2016  # the workers' commands are single-quoted on purpose: $(...) expands there
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
me=launch/tpu_pod.sh
# shellcheck source=SCRIPTDIR/lib/common.bash
source "$repo/launch/lib/common.bash"
libtpu_index=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  cat <<EOF
Usage: $me SUB-COMMAND [FLAGS] [--] [CONFIG OVERRIDES ...]

Sub-commands:
  create   create the TPU VM slice, or reuse it if NAME exists (gcloud compute tpus tpu-vm create); with --spot or
           --queued, request it as a queued resource (gcloud compute tpus queued-resources create [--spot]), usable
           once \`$me status\` says ACTIVE
  setup    on every worker: copy the code (a \`git archive\` of --ref, default HEAD, of this repository; or a
           \`git clone\` of --repo at --ref) into ~/DIR, install the pinned requirements.txt into ~/DIR/.venv with
           launch/setup_local.sh (installing Python 3.12 from the deadsnakes PPA when the image has no Python
           >= 3.12), then jax[tpu] at the version requirements.txt pins, from the libtpu releases index
  run      on every worker, in the background (nohup, so a dropped ssh does not stop it):
           PYTHON -m lzn_jax.main --config=CONFIG --workdir=WORKDIR [OVERRIDES], output appended to ~/DIR/train.log
           of each worker; refuses to start while a previous run is alive
  stop     SIGTERM to the training process on every worker (the trainer writes a checkpoint and exits), then wait
           up to --wait_seconds for it to end
  logs     the last --lines lines of one worker's ~/DIR/train.log (--follow: keep following)
  status   describe the slice (or, with --spot/--queued, its queued resource)
  delete   delete the slice (with --spot/--queued: the queued resource and its slice)

Flags (each as --flag=VALUE or --flag VALUE; the variable in brackets is its default):
  --project=ID               Google Cloud project [LZN_TPU_PROJECT]; every sub-command
  --zone=ZONE                zone, e.g. us-west4-a [LZN_TPU_ZONE]; every sub-command
  --name=NAME                TPU VM (and queued resource) name [LZN_TPU_NAME]; every sub-command
  --accelerator_type=TYPE    e.g. v5litepod-64, v4-32, v6e-16 [LZN_TPU_ACCELERATOR_TYPE]; create
  --runtime_version=VERSION  TPU VM image, e.g. v2-alpha-tpuv5-lite, tpu-ubuntu2204-base
                             [LZN_TPU_RUNTIME_VERSION]; create
  --spot                     create/status/delete: a Spot slice through a queued resource
  --queued                   create/status/delete: an on-demand slice through a queued resource
  --repo=URL                 setup: git clone URL instead of copying this repository [LZN_TPU_REPO]
  --ref=REF                  setup: the branch, tag or commit to copy or check out [LZN_TPU_REF, else HEAD]
  --remote_dir=DIR           the code's directory under each worker's home [LZN_TPU_DIR, else lzn-jax]
  --config=FILE[:VARIANTS]   run: config file, relative to DIR, e.g. configs/cifar10_gen.py [LZN_CONFIG]
  --workdir=gs://BUCKET/DIR  run: run directory, shared by all workers: a gs:// path [LZN_WORKDIR]
  --config.KEY=VALUE         run: a config override (any number); so is every argument after --
  --env=NAME=VALUE           run: an environment variable for the training processes (any number), e.g.
                             --env=LZN_DISTRIBUTED_TIMEOUT_SECONDS=900
  --python=PATH              run: interpreter on the workers, relative to DIR [LZN_TPU_PYTHON, else .venv/bin/python]
  --worker=N                 logs: which worker [0]
  --lines=N                  logs: how many lines [100]
  --follow                   logs: keep following the log
  --wait_seconds=N           stop: how long to wait for the processes to exit [300]
  --dry_run                  print the exact commands, one per line, shell-quoted, and run nothing
  --help                     this text

A missing required flag is an error (exit status 2) that names it. The jax version comes from this checkout's
requirements.txt; the code that setup copies is what is committed at --ref (not uncommitted changes).
EOF
}

# Runs a command, or with --dry_run only prints it.
step() {
  if (( dry_run )); then print_command "$@"; else "$@"; fi
}

subcommand=""
project=${LZN_TPU_PROJECT:-}
zone=${LZN_TPU_ZONE:-}
name=${LZN_TPU_NAME:-}
accelerator_type=${LZN_TPU_ACCELERATOR_TYPE:-}
runtime_version=${LZN_TPU_RUNTIME_VERSION:-}
repo_url=${LZN_TPU_REPO:-}
ref=${LZN_TPU_REF:-HEAD}
remote_dir=${LZN_TPU_DIR:-lzn-jax}
config=${LZN_CONFIG:-}
workdir=${LZN_WORKDIR:-}
python=${LZN_TPU_PYTHON:-.venv/bin/python}
worker=0
lines=100
wait_seconds=300
follow=0
spot=0
queued=0
dry_run=0
environment=()
overrides=()

is_value_flag() {
  case $1 in
    project | zone | name | accelerator_type | runtime_version | repo | ref | remote_dir | config | workdir | \
      python | worker | lines | wait_seconds | env) return 0 ;;
    *) return 1 ;;
  esac
}

set_flag() {
  case $1 in
    repo) repo_url=$2 ;;
    env) environment+=("$2") ;;
    *) printf -v "$1" '%s' "$2" ;;
  esac
}

while [ $# -gt 0 ]; do
  case $1 in
    --help | -h) usage; exit 0 ;;
    --dry_run) dry_run=1 ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --follow) follow=1 ;;
    --config.*) overrides+=("$1") ;;
    --) shift; overrides+=("$@"); break ;;
    --*=*)
      flag=${1%%=*}
      is_value_flag "${flag#--}" || fail_usage "unknown flag $flag (or one that takes no value)"
      set_flag "${flag#--}" "${1#*=}" ;;
    --*)
      is_value_flag "${1#--}" || fail_usage "unknown flag $1"
      [ $# -ge 2 ] || fail_usage "$1 needs a value"
      set_flag "${1#--}" "$2"
      shift ;;
    -*) fail_usage "unknown flag $1" ;;
    *)
      [ -z "$subcommand" ] || fail_usage "unexpected argument '$1' (config overrides look like --config.KEY=VALUE)"
      subcommand=$1
      fail_usage_context="$me $subcommand" ;;
  esac
  shift
done

case $subcommand in
  create | setup | run | stop | logs | status | delete) ;;
  "") fail_usage "missing the sub-command (create, setup, run, stop, logs, status or delete)" ;;
  *) fail_usage "unknown sub-command '$subcommand' (create, setup, run, stop, logs, status or delete)" ;;
esac

# require FLAG ENVIRONMENT-VARIABLE: the flag's variable (its name) must be set.
require() {
  [ -n "${!1}" ] || fail_usage "missing --$1 (or set $2)"
}
require project LZN_TPU_PROJECT
require zone LZN_TPU_ZONE
require name LZN_TPU_NAME
if ! [[ $remote_dir =~ ^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$ ]] || [[ /$remote_dir/ == */../* ]]; then
  fail_usage "--remote_dir must be a relative path under the workers' home, got '$remote_dir'"
fi
if [ "$subcommand" != run ] && [ ${#overrides[@]} -gt 0 ]; then
  fail_usage "config overrides (${overrides[0]} ...) only go with run"
fi

location=("--project=$project" "--zone=$zone")
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all)
qdir=$(quote "$remote_dir")

if (( ! dry_run )) && ! command -v gcloud >/dev/null 2>&1; then
  echo "$me: gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)" >&2
  exit 1
fi

case $subcommand in
  create)
    require accelerator_type LZN_TPU_ACCELERATOR_TYPE
    require runtime_version LZN_TPU_RUNTIME_VERSION
    if (( spot || queued )); then
      describe=(gcloud compute tpus queued-resources describe "$name" "${location[@]}" "--format=value(state)")
      create=(gcloud compute tpus queued-resources create "$name" "--node-id=$name" "${location[@]}"
        "--accelerator-type=$accelerator_type" "--runtime-version=$runtime_version")
      if (( spot )); then create+=(--spot); fi
    else
      describe=(gcloud compute tpus tpu-vm describe "$name" "${location[@]}" "--format=value(state)")
      create=(gcloud compute tpus tpu-vm create "$name" "${location[@]}" "--accelerator-type=$accelerator_type"
        "--version=$runtime_version")
    fi
    # Reuse: the describe command decides; the dry run shows both, the second runs only when the first fails.
    if (( dry_run )); then
      print_command "${describe[@]}"
      print_command "${create[@]}"
    elif state=$("${describe[@]}" 2>/dev/null); then
      echo "$me: $name exists (state ${state:-unknown}); reusing it" >&2
    else
      "${create[@]}"
      if (( spot || queued )); then
        echo "$me: queued; \`$me status\` shows when it is ACTIVE, then run \`$me setup\`" >&2
      fi
    fi
    ;;

  setup)
    jax_version=$(sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p' "$repo/requirements.txt")
    [ -n "$jax_version" ] || { echo "$me setup: no jax==VERSION line in $repo/requirements.txt" >&2; exit 1; }
    python_check="import sys; sys.exit(sys.version_info < (3, 12))"
    install="cd $qdir"
    install+="; if ! command -v python3.13 >/dev/null 2>&1 && ! command -v python3.12 >/dev/null 2>&1"
    install+=" && ! python3 -c $(quote "$python_check") 2>/dev/null; then sudo apt-get update -qq"
    install+=" && sudo apt-get install -y -qq software-properties-common"
    install+=" && sudo add-apt-repository -y ppa:deadsnakes/ppa"
    install+=" && sudo apt-get install -y -qq python3.12 python3.12-venv; fi"
    install+="; bash launch/setup_local.sh"
    install+="; .venv/bin/python -m pip install --quiet $(quote "jax[tpu]==$jax_version") -f $libtpu_index"
    if [ -n "$repo_url" ]; then
      code="set -euo pipefail; [ -d $qdir/.git ] || git clone --quiet $(quote "$repo_url") $qdir"
      code+="; git -C $qdir fetch --quiet origin $(quote "$ref"); git -C $qdir checkout --quiet --detach FETCH_HEAD"
      step "${ssh_all[@]}" "--command=$code; $install"
    else
      tarball=${TMPDIR:-/tmp}/lzn-jax-$name.tar.gz
      if (( ! dry_run )) && [ "$ref" = HEAD ] &&
        [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
        echo "$me setup: uncommitted changes are not copied (a git archive of HEAD is)" >&2
      fi
      code="set -euo pipefail; mkdir -p $qdir"
      # The code is replaced; the environment and the log and pid of a run stay.
      code+="; find $qdir -mindepth 1 -maxdepth 1 ! -name .venv ! -name train.log ! -name train.pid -exec rm -rf {} +"
      code+="; tar -xzf lzn-jax-code.tar.gz -C $qdir; rm -f lzn-jax-code.tar.gz"
      step git -C "$repo" archive --format=tar.gz "--output=$tarball" "$ref"
      step gcloud compute tpus tpu-vm scp "$tarball" "$name:lzn-jax-code.tar.gz" "${location[@]}" --worker=all
      step "${ssh_all[@]}" "--command=$code; $install"
      step rm -f "$tarball"
    fi
    ;;

  run)
    require config LZN_CONFIG
    require workdir LZN_WORKDIR
    if [[ $workdir != gs://* ]]; then
      echo "$me run: warning: --workdir=$workdir is not a gs:// path; on a multi-host slice every worker needs" \
        "to see the same run directory" >&2
    fi
    exports=""
    for assignment in ${environment[@]+"${environment[@]}"}; do
      [[ $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || fail_usage "--env needs NAME=VALUE, got '$assignment'"
      exports+="export ${assignment%%=*}=$(quote "${assignment#*=}"); "
    done
    main=$(quote_words "$python" -m lzn_jax.main "--config=$config" "--workdir=$workdir" \
      ${overrides[@]+"${overrides[@]}"})
    start="cd $qdir || exit 1"
    start+='; if [ -f train.pid ] && kill -0 "$(cat train.pid)" 2>/dev/null; then'
    start+=' echo "$(hostname): training is already running (pid $(cat train.pid)); stop it first" >&2; exit 1; fi'
    start+="; ${exports}setsid nohup $main >> train.log 2>&1 < /dev/null & echo \$! > train.pid"
    start+="; echo \"\$(hostname): started training (pid \$(cat train.pid)); log: ~/$remote_dir/train.log\""
    step "${ssh_all[@]}" "--command=$start"
    ;;

  stop)
    [[ $wait_seconds =~ ^[0-9]+$ ]] || fail_usage "--wait_seconds must be a whole number, got '$wait_seconds'"
    halt='if [ -f train.pid ] && kill -0 "$(cat train.pid)" 2>/dev/null; then pid=$(cat train.pid)'
    halt+='; kill -TERM "$pid"; echo "$(hostname): sent SIGTERM to $pid"'
    halt+="; for _ in \$(seq $((10#$wait_seconds * 5))); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 0.2; done"
    halt+='; if kill -0 "$pid" 2>/dev/null; then echo "$(hostname): $pid is still running" >&2; exit 1; fi'
    halt+='; echo "$(hostname): stopped"; else echo "$(hostname): no training process running"; fi'
    step "${ssh_all[@]}" "--command=cd $qdir 2>/dev/null || exit 0; $halt"
    ;;

  logs)
    [[ $worker =~ ^[0-9]+$ ]] || fail_usage "--worker must be a worker number, got '$worker'"
    [[ $lines =~ ^[0-9]+$ ]] || fail_usage "--lines must be a whole number, got '$lines'"
    tail_command="tail -n $((10#$lines))"
    if (( follow )); then tail_command+=" -f"; fi
    step gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" "--worker=$((10#$worker))" \
      "--command=$tail_command $qdir/train.log"
    ;;

  status)
    if (( spot || queued )); then
      step gcloud compute tpus queued-resources describe "$name" "${location[@]}"
    else
      step gcloud compute tpus tpu-vm describe "$name" "${location[@]}"
    fi
    ;;

  delete)
    if (( spot || queued )); then
      step gcloud compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet
    else
      step gcloud compute tpus tpu-vm delete "$name" "${location[@]}" --quiet
    fi
    ;;
esac
