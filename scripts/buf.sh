#!/usr/bin/env bash
# buf (from npm @bufbuild/buf, pinned) on proto/. `lint`, or `breaking` against
# the image of the last released contracts in proto/releases/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${INTENTD_TOOLS_DIR:-$root/.tools}"
if [ ! -x "$tools/node_modules/.bin/buf" ]; then
  mkdir -p "$tools"
  (cd "$tools" && npm install --silent --no-audit --no-fund @bufbuild/buf@1.75.0 >/dev/null)
fi
buf="$tools/node_modules/.bin/buf"
cd "$root/proto"
case "${1:-lint}" in
  lint) "$buf" lint && echo "buf lint: ok" ;;
  breaking)
    latest="$(find releases -name "*.binpb" 2>/dev/null | sort -V | tail -1 || true)"
    if [ -z "$latest" ]; then echo "buf breaking: no release image yet"; exit 0; fi
    "$buf" breaking . --against "$latest" && echo "buf breaking: ok against $latest" ;;
  release)
    mkdir -p releases
    "$buf" build -o "releases/${2:?version}.binpb" --exclude-source-info && echo "wrote releases/$2.binpb" ;;
  *) echo "usage: scripts/buf.sh lint|breaking|release VERSION" >&2; exit 2 ;;
esac
