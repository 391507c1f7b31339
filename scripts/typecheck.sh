#!/usr/bin/env bash
# mypy over the one import name. Each top-level folder F is the package
# intentd.F (see the README's Layout table); mypy does not read setuptools'
# package-dir, so we show it the same tree through links.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/intentd"
for pkg in core generated client agent sidecar server testing commands; do ln -s "$root/$pkg" "$tree/intentd/$pkg"; done
cd "$tree"
python -m mypy --config-file "$root/pyproject.toml" --namespace-packages --explicit-package-bases -p intentd "$@" 2>&1 | sed "s#$tree/##g"
exit "${PIPESTATUS[0]}"
