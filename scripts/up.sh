#!/usr/bin/env bash
# The run command: set up (venv, runtime packages only, redis-server, g++), then run the
# whole stack on loopback until Ctrl-C. Extra arguments go to the launcher (--workers N, --hf-model DIR, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh runtime
exec .venv/bin/python -m services.launcher up "$@"
