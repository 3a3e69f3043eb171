#!/usr/bin/env bash
# Install xobackup: the core and every bundled plugin, into the active Python environment.
#   scripts/install.sh            regular install
#   scripts/install.sh --editable  editable install (a development checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mode=()
extra=""
for arg in "$@"; do
  case "$arg" in
    --editable|-e) mode=(-e) ;;
    --test) extra="[test]" ;;
    *) echo "usage: scripts/install.sh [--editable] [--test]" >&2; exit 2 ;;
  esac
done
targets=("${mode[@]}" ".$extra")
for plugin in plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && targets+=("${mode[@]}" "./${plugin%/}")
done
"$python" -m pip install --disable-pip-version-check -q "${targets[@]}"
"$python" -m xobackup_core.cli plugins >/dev/null 2>&1 || true
echo "installed: xobackup-core and $(ls -d plugins/*/ | wc -l) plugins"
