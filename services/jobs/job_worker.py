"""A jobs worker: ``python -m services.jobs.job_worker --queues convert,export`` (the converter service) or
``--queues preprocess,finetune`` (the trainer service). Settings come from the environment
(``INTERNLM_REDIS_URL``, ``INTERNLM_STORE``, see ``settings.py``).

One job at a time in the worker's own process (Celery's solo pool): jobs are long and CPU-bound,
MindSpore does not survive fork well, and a solo worker is what ``kill -9`` tests and recovers.
Scale by running more workers.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

from .app import make_app
from .kinds import KINDS
from .settings import JobsSettings
from .tasks import install_worker_hooks, register


def build_argv(queues: list[str], hostname: str, loglevel: str) -> list[str]:
    return ["worker", "--pool", "solo", "--concurrency", "1", "-Q", ",".join(queues), "-n", hostname,
            "--loglevel", loglevel, "--without-gossip", "--without-mingle", "--without-heartbeat"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queues", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    ap.add_argument("--hostname", default=None, help="worker name (default: jobs-<queues>-<pid>@<host>)")
    ap.add_argument("--loglevel", default=os.environ.get("INTERNLM_LOGLEVEL", "info"))
    args = ap.parse_args(argv)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(KINDS))
    if unknown or not queues:
        ap.error(f"unknown queue(s) {', '.join(unknown) or '(none)'}; known: {', '.join(KINDS)}")
    settings = JobsSettings.from_env()
    app = make_app(settings)
    runtime = register(app)
    runtime.beacon.start()  # the lock keeper runs before the first job is taken
    install_worker_hooks(app, runtime)
    hostname = args.hostname or f"jobs-{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(build_argv(queues, hostname, args.loglevel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
