"""Generate the gRPC stubs in ``services/pb/`` from ``proto/internlm/v1/*.proto``.

    python -m services.gen_protos          # (re)write the stubs
    python -m services.gen_protos --check  # exit 1 if the checked-in stubs are stale

The stubs are checked in so that a clone runs without grpcio-tools; CI runs ``--check`` so
they can never drift from the protos. protoc writes ``from internlm.v1 import x_pb2``; the
imports are rewritten to ``from . import x_pb2`` so the stubs import as one package.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_DIR = PROTO_ROOT / "internlm" / "v1"
OUT = Path(__file__).resolve().parent / "pb"
PACKAGE_INIT = '"""Generated gRPC stubs for internlm.v1 (python -m services.gen_protos); do not edit."""\n'

_IMPORT = re.compile(r"^from internlm\.v1 import (\w+_pb2)", re.M)


def generate() -> dict[str, str]:
    """{file name: content} of every stub, generated from the protos now on disk."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {PROTO_DIR}")
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *(str(p.relative_to(PROTO_ROOT)) for p in protos)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see the messages above)")
        files = {p.name: _IMPORT.sub(r"from . import \1", p.read_text())
                 for p in sorted((Path(tmp) / "internlm" / "v1").iterdir()) if p.is_file()}
    files["__init__.py"] = PACKAGE_INIT
    return files


def stale(files: dict[str, str]) -> list[str]:
    """Names that differ from what is checked in, including leftovers of deleted protos."""
    have = {p.name for p in OUT.glob("*.py*")} if OUT.is_dir() else set()
    wrong = [n for n, text in files.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text]
    return sorted(wrong + [n for n in have - set(files) if n.endswith((".py", ".pyi"))])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that services/pb is current")
    args = ap.parse_args(argv)
    files = generate()
    diff = stale(files)
    if args.check:
        if diff:
            print(f"stale gRPC stubs in {OUT}: {', '.join(diff)}; run python -m services.gen_protos",
                  file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for name in diff:
        if name in files:
            (OUT / name).write_text(files[name])
        else:
            (OUT / name).unlink()
    if diff:
        print(f"wrote {', '.join(diff)} in {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
