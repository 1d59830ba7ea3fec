"""Job queue figures: submit-to-start latency with an idle worker, jobs/s for no-op-sized jobs, and
recovery time after ``kill -9`` of the worker running a job.

    .venv/bin/python bench/jobs_bench.py [--jobs 100] [--latency-jobs 20] [--no-recovery]

Starts its own redis-server (AOF, fsync always, as in production), one converter worker (Celery,
solo pool) and the Jobs gRPC API on loopback. The jobs are conversions of a tiny (0.6 MB) model,
the smallest real job there is. Reference in the same run: the same conversions called in-process,
without queue, records or gRPC, so the difference is what the queue costs per job.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")  # as MindSpore needs; see tests/jobs

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from internlm_core.checkpoint import DTYPE_TO_ST, SafetensorsWriter, cast  # noqa: E402
from internlm_core.config import Config  # noqa: E402
from internlm_core.convert import _MS_RE, hf_to_ms, rename  # noqa: E402
from services.jobs.api import add_to_server  # noqa: E402
from services.jobs.records import JobRecords  # noqa: E402
from services.jobs.settings import JobsSettings  # noqa: E402
from services.pb import jobs_pb2, jobs_pb2_grpc  # noqa: E402
from services.server_common import ErrorInterceptor  # noqa: E402
from tests.helpers import RedisServer  # noqa: E402

S = jobs_pb2.JobState
FINAL = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}


def write_hf_folder(cfg: Config, folder: Path, dtype: str = "float32", seed: int = 0) -> Path:
    """A random HF InternLM folder (config.json + model.safetensors), written tensor by tensor."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shapes = {rename(k, _MS_RE): s for k, s in cfg.param_shapes().items()}
    st = DTYPE_TO_ST[dtype]
    w = SafetensorsWriter(folder / "model.safetensors", [(k, st, s) for k, s in shapes.items()], {"format": "pt"})
    for k, s in shapes.items():
        w.write(k, cast(rng.standard_normal(s, dtype=np.float32) * 0.02, "F32", st))
    w.close()
    (folder / "config.json").write_text(json.dumps(cfg.replace(dtype=dtype).to_hf_config(), indent=2))
    return folder


class Worker:
    def __init__(self, settings: JobsSettings, log: Path, name: str):
        self.name = f"{name}@bench"
        self.log = log
        env = {**os.environ, **settings.env(), "PYTHONUNBUFFERED": "1", "INTERNLM_LOGLEVEL": "warning"}
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "services.jobs.job_worker", "--queues", "convert",
                                      "--hostname", self.name, "--loglevel", "info"], cwd=REPO, env=env,
                                     stdout=open(log, "ab"), stderr=subprocess.STDOUT)

    def wait_ready(self) -> float:
        while f"{self.name} ready." not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text()[-2000:])
            time.sleep(0.02)
        return time.time() - self.t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def wait_done(stub, job_id: str, timeout: float = 600):
    for m in stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id), timeout=timeout):
        if m.state in FINAL:
            return m
    raise RuntimeError(f"job {job_id} did not end")


def submit(stub, src: str, out: str, **kw):
    return stub.SubmitJob(jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source=src, output=out, **kw)))


def pct(xs, q):
    return float(np.percentile(xs, q)) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100, help="jobs for the throughput run")
    ap.add_argument("--latency-jobs", type=int, default=20)
    ap.add_argument("--no-recovery", action="store_true")
    ap.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat_s for this run (production: 5)")
    ap.add_argument("--lock-ttl", type=float, default=5.0, help="lock_ttl_s for this run (production: 30)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    (tmp / "redis").mkdir()
    redis = RedisServer(tmp / "redis").start()
    settings = JobsSettings(redis_url=redis.url, store_root=str(tmp / "store"), heartbeat_s=args.heartbeat,
                            lock_ttl_s=args.lock_ttl)
    src = write_hf_folder(Config.from_name("tiny"), tmp / "store" / "imports" / "tiny")
    server = grpc.server(futures.ThreadPoolExecutor(16), interceptors=[ErrorInterceptor()])
    add_to_server(server, settings)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stub = jobs_pb2_grpc.JobsStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    records = JobRecords(settings.redis_url)
    workers = []
    try:
        w = Worker(settings, tmp / "w0.log", "w0")
        workers.append(w)
        print(f"worker start to ready: {w.wait_ready():.2f}s")
        wait_done(stub, submit(stub, "imports/tiny", "warmup").id)  # first job pays the worker's imports

        # 1. latency with an idle worker: one job at a time
        start_lat, done_lat, client_lat = [], [], []
        for i in range(args.latency_jobs):
            t0 = time.time()
            job = submit(stub, "imports/tiny", f"lat{i}")
            last = wait_done(stub, job.id)
            t1 = time.time()
            start_lat.append(last.started_at - last.created_at)
            done_lat.append(last.finished_at - last.created_at)
            client_lat.append(t1 - t0)
        print(f"\n[latency, idle worker, {args.latency_jobs} jobs one at a time]")
        print(f"  submit -> started (worker picked it up): median {pct(start_lat, 50):.1f} ms, p90 {pct(start_lat, 90):.1f} ms")
        print(f"  submit -> succeeded (record):            median {pct(done_lat, 50):.1f} ms, p90 {pct(done_lat, 90):.1f} ms")
        print(f"  client: SubmitJob + WatchJob to the end: median {pct(client_lat, 50):.1f} ms")

        # 2. throughput: all submitted at once, one worker
        t0 = time.time()
        ids = [submit(stub, "imports/tiny", f"tp{i}").id for i in range(args.jobs)]
        t_submitted = time.time() - t0
        for job_id in ids:
            assert wait_done(stub, job_id).state == S.JOB_STATE_SUCCEEDED
        t_queue = time.time() - t0
        # reference: the same conversions in this process, no queue
        t1 = time.time()
        for i in range(args.jobs):
            hf_to_ms(src, tmp / "direct" / f"d{i}")
        t_direct = time.time() - t1
        print(f"\n[throughput, {args.jobs} tiny conversions, one solo worker]")
        print(f"  submit rate (gRPC SubmitJob, checks + record + enqueue): {args.jobs / t_submitted:.0f} jobs/s")
        print(f"  through the queue, submit of the first to end of the last: {args.jobs / t_queue:.1f} jobs/s")
        print(f"  reference, the same conversions in-process: {args.jobs / t_direct:.1f} jobs/s")
        print(f"  queue cost per job: {(t_queue - t_direct) / args.jobs * 1000:.1f} ms")

        if not args.no_recovery:
            # 3. recovery after kill -9: a conversion long enough to kill mid-way
            big = write_hf_folder(Config.from_name("bench-100m"), tmp / "store" / "imports" / "big", dtype="float16")
            size = sum(p.stat().st_size for p in big.iterdir()) / 2**20
            t0 = time.time()
            ref = wait_done(stub, submit(stub, "imports/big", "big-ref", dtype="float32").id)
            t_ref = time.time() - t0
            job = submit(stub, "imports/big", "big", dtype="float32")
            while True:
                m = stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))
                if m.progress.bytes_total and m.progress.bytes_done >= 0.3 * m.progress.bytes_total:
                    break
                time.sleep(0.01)
            w.proc.send_signal(signal.SIGKILL)
            w.proc.wait()
            t_kill = time.time()
            w2 = Worker(settings, tmp / "w1.log", "w1")
            workers.append(w2)
            ready = w2.wait_ready()
            while records.get(job.id).get("executions") != "2":
                time.sleep(0.01)
            t_resume = float(records.get(job.id)["exec:2:start"])
            last = wait_done(stub, job.id)
            t_done = last.finished_at
            assert last.state == S.JOB_STATE_SUCCEEDED and last.executions == 2, last
            print(f"\n[recovery after kill -9, bench-100m conversion ({size:.0f} MB fp16 -> fp32), "
                  f"heartbeat {args.heartbeat}s, lock TTL {args.lock_ttl}s]")
            print(f"  uninterrupted conversion job: {ref.finished_at - ref.started_at:.2f}s running "
                  f"({t_ref:.2f}s submit to done)")
            print(f"  killed at {m.progress.bytes_done / m.progress.bytes_total:.0%}; new worker ready after {ready:.2f}s")
            print(f"  kill -> job running again: {t_resume - t_kill:.2f}s (lock expiry + sweep; the worker start overlaps)")
            print(f"  kill -> job succeeded: {t_done - t_kill:.2f}s (conversion restarts from scratch)")
    finally:
        for w in workers:
            w.stop()
        server.stop(0)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
