#!/usr/bin/env bash
# Fails when the generated protobuf code differs from what gen_proto.sh makes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$root/proto" "$root/scripts" "$work/"
mkdir -p "$work/generated"
(cd "$work" && scripts/gen_proto.sh >/dev/null 2>&1)
if ! diff -r -q "$root/generated/v1" "$work/generated/v1" -x __pycache__; then
  echo "generated code is stale: run scripts/gen_proto.sh and commit the result" >&2
  exit 1
fi
echo "generated code matches proto/"
