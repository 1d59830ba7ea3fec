"""Real parts for the jobs tests: redis-server, Celery worker processes, a gRPC server with the Jobs API."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from services.launcher import terminate
from tests.helpers import REPO, RedisServer

# Short enough that a lost worker is noticed within a couple of seconds in tests.
HEARTBEAT_S, LOCK_TTL_S = 0.25, 3.0


@pytest.fixture
def redis_server(tmp_path):
    """As the shared fixture, but its data folder is created first (redis-server needs it to exist)."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder).start()
    yield server
    server.stop()


@pytest.fixture
def jobs_settings(tmp_path, redis_server):
    from services.jobs.settings import JobsSettings

    return JobsSettings(redis_url=redis_server.url, store_root=str(tmp_path / "store"),
                        heartbeat_s=HEARTBEAT_S, lock_ttl_s=LOCK_TTL_S)


class Worker:
    """``python -m services.jobs.job_worker`` as a child process, its log in a file."""

    def __init__(self, settings, queues: str, log: Path, name: str):
        self.log = log
        env = {**os.environ, **settings.env(), "PYTHONUNBUFFERED": "1"}
        self.out = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.jobs.job_worker", "--queues", queues,
                                      "--hostname", f"{name}@test"], cwd=REPO, env=env,
                                     stdout=self.out, stderr=subprocess.STDOUT)
        self.name = f"{name}@test"

    def wait_ready(self, timeout: float = 60) -> "Worker":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if f"{self.name} ready." in self.log.read_text(errors="replace"):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        terminate(self.proc, 20)
        self.out.close()


@pytest.fixture
def workers(tmp_path, jobs_settings):
    """start(queues) -> a ready Worker; every worker started is stopped at the end."""
    started = []

    def start(queues: str = "convert,export", wait: bool = True) -> Worker:
        n = len(started)
        w = Worker(jobs_settings, queues, tmp_path / f"worker{n}.log", f"w{n}")
        started.append(w)
        return w.wait_ready() if wait else w

    yield start
    for w in started:
        w.stop()
        # shown by pytest only when the test failed
        print(f"---- {w.name} log (last lines) ----\n" + "\n".join(w.log.read_text(errors="replace").splitlines()[-25:]))


@pytest.fixture
def jobs_api(jobs_settings):
    """(stub, servicer) of a real gRPC server on loopback hosting the Jobs API."""
    from services.jobs.api import add_to_server
    from services.pb import jobs_pb2_grpc
    from services.server_common import ErrorInterceptor

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[ErrorInterceptor()])
    servicer = add_to_server(server, jobs_settings)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = jobs_pb2_grpc.JobsStub(channel)
    stub.address = f"127.0.0.1:{port}"
    yield stub, servicer
    channel.close()
    server.stop(0)


@pytest.fixture
def hf_source(jobs_settings, tiny_hf):
    """The tiny HF folder copied into the store root; its source path as a request names it."""
    dst = Path(jobs_settings.store_root) / "imports" / "tiny-hf"
    shutil.copytree(tiny_hf[1], dst)
    return "imports/tiny-hf"


def watch_until_done(stub, job_id: str, timeout: float = 60) -> list:
    """Every message WatchJob streams until the job ends."""
    from services.pb import jobs_pb2

    return list(stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id), timeout=timeout))


def wait_for(predicate, timeout: float = 30, every: float = 0.05, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not met within {timeout:.0f}s")


@pytest.fixture(scope="session")
def alpaca_small(tmp_path_factory):
    """The first 48 records of the shared Alpaca (en) sample, as a source file."""
    import json

    from tests.helpers import DATA

    records = json.loads((DATA / "alpaca" / "alpaca_en.json").read_text())[:48]
    path = tmp_path_factory.mktemp("alpaca") / "alpaca48.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def alpaca_dataset(tmp_path_factory, alpaca_small):
    """A preprocessed dataset folder (seq_length 32) made by the core directly."""
    from internlm_core.data import preprocess

    dst = tmp_path_factory.mktemp("ds") / "alpaca32"
    preprocess("alpaca", alpaca_small, dst, seq_length=32)
    return dst


@pytest.fixture
def trainer_store(jobs_settings, chat_model_dir, alpaca_small):
    """A store holding a tiny real-vocabulary model ("base") and the raw Alpaca sample."""
    root = Path(jobs_settings.store_root)
    shutil.copytree(chat_model_dir, root / "models" / "base")
    (root / "imports").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(alpaca_small, root / "imports" / "alpaca.json")
    return root
