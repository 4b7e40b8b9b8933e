#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv with the pinned stack of requirements.txt.
# Finds a Python >= 3.12 on its own: $LZN_PYTHON if set, then python3.13/python3.12/python3/python on PATH,
# then any pyenv-installed 3.12+; reinstalls only when requirements.txt changed.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"

is_recent_python() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  local candidate
  for candidate in "${LZN_PYTHON:-}" python3.13 python3.12 python3 python; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && is_recent_python "$candidate"; then
      command -v "$candidate"; return 0
    fi
  done
  local roots=()
  if command -v pyenv >/dev/null 2>&1; then roots+=("$(pyenv root)"); fi
  roots+=("$HOME/.pyenv")
  for root in "${roots[@]}"; do
    # Newest first, so 3.13 wins over 3.12 when both are there (pyenv's version folders have plain names).
    # shellcheck disable=SC2012
    for candidate in $(ls -d "$root"/versions/3.* 2>/dev/null | sort -rV); do
      if [ -x "$candidate/bin/python" ] && is_recent_python "$candidate/bin/python"; then
        echo "$candidate/bin/python"; return 0
      fi
    done
  done
  return 1
}

if [ -x "$venv/bin/python" ] && ! is_recent_python "$venv/bin/python"; then
  echo "setup: $venv holds a Python older than 3.12; recreating it." >&2
  rm -rf "$venv"
fi

if [ ! -x "$venv/bin/python" ]; then
  if ! python=$(find_python); then
    cat >&2 <<'MSG'
setup: no Python >= 3.12 found (tried $LZN_PYTHON, python3.13, python3.12, python3, python and pyenv versions).
Install one, e.g. `pyenv install 3.12` or your distribution's python3.12 + python3.12-venv packages,
or point LZN_PYTHON at its interpreter, then rerun this command.
MSG
    exit 1
  fi
  echo "setup: creating $venv with $python ($("$python" --version 2>&1))" >&2
  "$python" -m venv "$venv"
fi

stamp="$venv/.requirements.sha256"
want=$(sha256sum "$repo/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements.txt into $venv (a few minutes on a fresh machine)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$repo/requirements.txt"
  echo "$want" > "$stamp"
fi

# The project itself, importable from any directory (an editable install without a build step: a .pth file
# that puts the repository on the venv's path; nothing to rebuild when the code changes).
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$(cat "$site/lzn_jax_repo.pth" 2>/dev/null)" != "$repo" ]; then
  echo "$repo" > "$site/lzn_jax_repo.pth"
fi
