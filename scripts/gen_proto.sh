#!/usr/bin/env bash
# The one way generated protobuf code is made. CI runs it and fails on a diff.
# protoc names Python modules after the .proto paths (intentd/v1/*.proto ->
# intentd.v1.*); the code lives apart, in generated/ (import name
# intentd.generated), so its imports of one another are renamed to match. The
# descriptors inside are untouched: the wire still says intentd.v1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/generated/v1"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$root/proto"
python -m grpc_tools.protoc -I . \
  --python_out="$work" --grpc_python_out="$work" \
  --mypy_out="$work" --mypy_grpc_out="$work" \
  intentd/v1/*.proto
sed -i -E \
  -e 's/^(\s*)from intentd\.v1 import/\1from intentd.generated.v1 import/' \
  -e 's/^(\s*)import intentd\.v1\./\1import intentd.generated.v1./' \
  "$work"/intentd/v1/*.py "$work"/intentd/v1/*.pyi
# The stubs carry no descriptor bytes: every module path in them is renamed.
sed -i -E 's/\bintentd\.v1\.([a-z_]+_pb2)/intentd.generated.v1.\1/g' "$work"/intentd/v1/*.pyi
rm -f "$out"/*_pb2*.py "$out"/*_pb2*.pyi
mkdir -p "$out"
cp "$work"/intentd/v1/* "$out"/
touch "$out/__init__.py"
