#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtual environment, packages (the gRPC stubs are committed),
# a real redis-server and g++ (Debian packages) when none is installed, and for tests Debian's chromium.
#
#   setup.sh runtime   what serving, jobs and training need: the package plus its build extra
#                      (grpcio-tools, to regenerate the stubs after a proto change); used by scripts/up.sh
#   setup.sh test      runtime plus the test extra (torch, transformers, mindformers, pytest, ...);
#                      used by scripts/test.sh
#
# Each mode leaves its own stamp (keyed by pyproject.toml), so a mode whose packages are already
# installed does nothing; a test install covers runtime, so `up` after `test` installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-runtime}
case "$MODE" in
    runtime) extras="build" ;;
    test) extras="build,test" ;;
    *) echo "usage: $0 [runtime|test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
need=()
command -v redis-server >/dev/null || need+=(redis-server)
# The serving and training kernels are compiled on first use (internlm_core/kernels.py); without a
# C++ compiler the engine falls back to MindSpore's slower ops, so install one (a slim Debian has none).
command -v g++ >/dev/null || need+=(g++)
# The console's browser tests drive Debian's chromium (Playwright's own browser download is not used).
[ "$MODE" = test ] && ! command -v chromium >/dev/null && need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
key=$(sha1sum pyproject.toml | cut -c1-12)
stamp=.venv/.installed-$MODE-$key
if [ ! -f "$stamp" ] && ! { [ "$MODE" = runtime ] && [ -f ".venv/.installed-test-$key" ]; }; then
    echo "setup: installing the $MODE packages (.[$extras])" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extras]"
    rm -f .venv/.installed-"$MODE"-* .venv/.installed-????????????  # this mode's stale stamps, old-style ones
    touch "$stamp"
fi
# The stubs in services/pb are committed and tested against the protos (tests/services/
# test_gen_protos.py); regenerating them here would make that test compare fresh stubs with
# themselves. A proto change is followed by `python -m services.gen_protos` and a commit.
