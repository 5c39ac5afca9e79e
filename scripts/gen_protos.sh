#!/usr/bin/env bash
# Regenerates every protobuf/grpclib module from the .proto files.
#
#   pip install -e '.[codegen]'     # grpcio-tools==1.85.1 (bundles protoc), grpclib
#   scripts/gen_protos.sh
#
# Sources (hand-written)                     -> generated package
#   meshid/proto/spire/api/types/*.proto       -> meshid/_gen/spire/api/types/
#   issuer/proto/spire/api/server/...          -> issuer/_gen/spire/api/server/...
#   workload_api/proto/workload.proto          -> workload_api/_gen/workload_*.py
#   workload_api/proto/spire/api/agent/...     -> workload_api/_gen/spire/api/agent/...
#
# protoc writes imports by proto path (`from spire.api.types import entry_pb2`,
# `import workload_pb2`); the post-processing step below rewrites them to the owning
# package (`from meshid._gen.spire.api.types import entry_pb2`). It also moves
# workload.proto into a private descriptor pool (see the note in the Python step).
# The _gen directories are wiped and rebuilt: never edit them by hand.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"

want_tools="1.85.1"
want_grpclib="0.4.9"
have_tools="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)"
have_grpclib="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("grpclib"))' 2>/dev/null || true)"
if [[ "$have_tools" != "$want_tools" || "$have_grpclib" != "$want_grpclib" ]]; then
    echo "gen_protos: need grpcio-tools==$want_tools and grpclib==$want_grpclib" \
        "(have '${have_tools:-none}', '${have_grpclib:-none}'); pip install -e '.[codegen]'" >&2
    exit 1
fi

# The grpclib plugin is a console script installed beside the interpreter.
plugin="$(dirname "$(command -v "$PYTHON")")/protoc-gen-grpclib_python"
if [[ ! -x "$plugin" ]]; then
    plugin="$(command -v protoc-gen-grpclib_python || true)"
fi
if [[ -z "$plugin" ]]; then
    echo "gen_protos: protoc-gen-grpclib_python not found (pip install grpclib)" >&2
    exit 1
fi

protoc() {
    "$PYTHON" -m grpc_tools.protoc --plugin=protoc-gen-grpclib_python="$plugin" "$@"
}

# gen OUT_PACKAGE INCLUDE_DIR... -- PROTO...
gen() {
    local out="$1/_gen"
    shift
    local includes=()
    while [[ "$1" != "--" ]]; do
        includes+=("-I" "$1")
        shift
    done
    shift
    rm -rf "$out"
    mkdir -p "$out"
    protoc "${includes[@]}" --python_out="$out" --pyi_out="$out" --grpclib_python_out="$out" "$@"
}

gen meshid meshid/proto -- meshid/proto/spire/api/types/*.proto
gen issuer issuer/proto meshid/proto -- issuer/proto/spire/api/server/entry/v1/entry.proto
gen workload_api workload_api/proto meshid/proto -- \
    workload_api/proto/workload.proto \
    workload_api/proto/spire/api/agent/delegatedidentity/v1/delegatedidentity.proto

"$PYTHON" - meshid/_gen issuer/_gen workload_api/_gen <<'PY'
"""Post-process the generated trees (see the header of gen_protos.sh)."""

import re
import sys
from pathlib import Path

gen_dirs = [Path(d) for d in sys.argv[1:]]

# Module name as protoc sees it (path under _gen) -> the package that owns it.
owner: dict[str, str] = {}
for gen in gen_dirs:
    prefix = ".".join(gen.parts)  # e.g. "meshid._gen"
    for f in gen.rglob("*_pb2.py"):
        owner[".".join(f.relative_to(gen).with_suffix("").parts)] = prefix


def qualify(module: str) -> str:
    return f"{owner[module]}.{module}" if module in owner else module


def rewrite(text: str) -> str:
    # pb2 / pyi: "from spire.api.types import entry_pb2 as x"
    def from_import(m: re.Match[str]) -> str:
        pkg, name = m.group(1), m.group(2)
        mod = qualify(f"{pkg}.{name}")
        return f"from {mod.rsplit('.', 1)[0]} import {name}"

    text = re.sub(r"^from ([\w.]+) import (\w+_pb2)\b", from_import, text, flags=re.M)
    # pb2: the module name given to the message classes (their __module__).
    text = re.sub(
        r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')([\w.]+)'",
        lambda m: f"{m.group(1)}{qualify(m.group(2))}'",
        text,
    )
    # grpclib: "import spire.api.types.entry_pb2" plus dotted references to it.
    # Method paths ('/spire.api.server.entry.v1.Entry/X') never contain "_pb2".
    for mod in re.findall(r"^import ([\w.]+_pb2)$", text, flags=re.M):
        full = qualify(mod)
        if full != mod:
            text = re.sub(rf"(?<![\w.]){re.escape(mod)}\b", full, text)
    return text


# workload.proto has no package (a wire fact), so its message names are global in
# the default descriptor pool, where any other copy (py-spiffe ships its own as
# spiffe/_proto/workload.proto) collides with "duplicate symbol". Register ours in
# a private pool instead; google/protobuf/struct.proto is added to it for
# ValidateJWTSVIDResponse.claims (a Struct of that pool: use claims.update(dict)).
PRIVATE_POOL = """\
# meshid (scripts/gen_protos.sh): private descriptor pool, because this file has no
# proto package and its names would collide with other copies in the default pool.
_POOL = _descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(google_dot_protobuf_dot_struct__pb2.DESCRIPTOR.serialized_pb)
DESCRIPTOR = _POOL.AddSerializedFile("""

for gen in gen_dirs:
    for f in gen.rglob("*_grpc.py"):
        if "class " not in f.read_text():  # no service in that .proto
            f.unlink()
    for f in sorted(gen.rglob("*.py*")):
        if f.suffix not in (".py", ".pyi"):
            continue
        text = rewrite(f.read_text())
        if f.name == "workload_pb2.py":
            old = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
            assert text.count(old) == 1, "unexpected protoc output for workload.proto"
            text = text.replace(old, PRIVATE_POOL)
        f.write_text(text)
    for d in [gen, *(p for p in gen.rglob("*") if p.is_dir())]:
        if d.name != "__pycache__":
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("# Generated by scripts/gen_protos.sh. DO NOT EDIT.\n")
PY

echo "gen_protos: regenerated meshid/_gen issuer/_gen workload_api/_gen"
