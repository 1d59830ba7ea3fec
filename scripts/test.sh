#!/usr/bin/env bash
# The test command: set up (runtime + test packages), then run the whole suite (real
# redis-server, gRPC servers and Celery workers are started by the tests themselves, on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
set +e
.venv/bin/python -m pytest "$@"
rc=$?
[ $rc -eq 5 ] && { echo "no tests ran" >&2; exit 1; }
exit $rc
