#!/usr/bin/env bash
# mypy over the one import name. The layout keeps server/, client/, sidecar/
# and agent/ at the top level and maps them into `intentd` at install time;
# mypy does not read that mapping, so we show it the same tree through links.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/intentd"
for entry in "$root"/intentd/*; do ln -s "$entry" "$tree/intentd/"; done
for pkg in server client sidecar agent; do ln -s "$root/$pkg" "$tree/intentd/$pkg"; done
cd "$tree"
python -m mypy --config-file "$root/pyproject.toml" -p intentd "$@" 2>&1 | sed "s#$tree/##g"
exit "${PIPESTATUS[0]}"
