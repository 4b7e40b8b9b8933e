# shellcheck shell=bash
# Helpers of the launch scripts, sourced by them (not a command): usage errors, and word quoting for the dry runs.
# The sourcing script sets `me` (its name in messages) before calling them, and may set `fail_usage_context` (e.g.
# "launch/tpu_pod.sh run") to name what failed more precisely.

# Prints the problem and where to read the usage; exit status 2.
fail_usage() {
  # shellcheck disable=SC2154  # me is the sourcing script's
  echo "${fail_usage_context:-$me}: $*" >&2
  echo "Run $me --help for usage." >&2
  exit 2
}

# One word, quoted for a POSIX shell only when it needs it (the dry run's lines can be pasted into a shell).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The words, each quoted as needed, joined by spaces (no newline).
quote_words() {
  local line="" word
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s' "$line"
}

# One command line, quoted as needed.
print_command() {
  printf '%s\n' "$(quote_words "$@")"
}
