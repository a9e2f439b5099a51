#!/usr/bin/env bash
# Regenerate sparkplug_b_pb2.py and its type stubs sparkplug_b_pb2.pyi from sparkplug_b.proto.
# protoc comes from the grpcio-tools pinned in constraints.txt and the stubs from the pinned
# mypy-protobuf, so the committed output only changes when those pins do. The gencode demands a
# protobuf runtime at least as new as that protoc: raise the lower bound in pyproject.toml with them.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
bin="${VENV:-.venv}/bin"

# From the repository root, so the module registers its schema in the default descriptor pool as
# meterflow/sparkplug/sparkplug_b.proto rather than a bare name another package could also use.
"$bin/python" -m grpc_tools.protoc \
    --proto_path=. \
    --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
    --python_out=. \
    --mypy_out=. \
    meterflow/sparkplug/sparkplug_b.proto
