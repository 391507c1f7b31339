#!/usr/bin/env bash
# The one way generated protobuf code is made. CI runs it and fails on a diff.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/intentd/v1"
rm -f "$out"/*_pb2*.py "$out"/*_pb2*.pyi
mkdir -p "$out"
cd "$root/proto"
python -m grpc_tools.protoc -I . \
  --python_out="$root" --grpc_python_out="$root" \
  --mypy_out="$root" --mypy_grpc_out="$root" \
  intentd/v1/*.proto
touch "$out/__init__.py"
