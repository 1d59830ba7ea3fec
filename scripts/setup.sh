#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtual environment, packages, generated gRPC stubs,
# and a real redis-server (Debian package) when none is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if ! command -v redis-server >/dev/null; then
    echo "setup: installing redis-server" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    rm -f .venv/.installed-*; touch "$stamp"
fi
if [ -f services/gen_protos.py ]; then
    .venv/bin/python -m services.gen_protos
fi
