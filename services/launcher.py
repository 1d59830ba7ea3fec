"""The whole stack on one machine, on loopback: ``python -m services.launcher up``.

    up [--workers N] [--hf-model DIR | --model DIR] [--models-root DIR]   run everything until Ctrl-C
    prepare-model [--hf-model DIR | --model DIR] [--models-root DIR]     only make the model folder
    health ADDRESS                                                        exit 0 if a server is SERVING

``up`` starts a real redis-server (AOF persistence, data in ``var/redis``), the tokenizer
service, the endpoint, the converter and trainer Celery workers (when ``services.jobs`` is
present), then prepares the model and starts N inference workers; it restarts any part that
dies and stops them all, in order, on Ctrl-C or SIGTERM. The model is the self-trained demo
model (trained from the bundled WikiText text on first use, then cached), or an HF InternLM
folder converted once with ``--hf-model``, or a ready model folder with ``--model``.

The commands and settings of each part come from ``role_command`` and ``stack_env``, which
``compose.yaml`` repeats (a test keeps the two the same).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from internlm_core.checkpoint import TOKENIZER_FILE
from internlm_core.config import CONFIG_FILE
from services.server_common import GRACE_S

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VAR = REPO / "var"
JOBS_QUEUES = {"converter": "convert,export", "trainer": "preprocess,finetune"}
# How long a stopped child may take: its own grace for running streams (server_common.GRACE_S)
# and a margin to close; then it is killed.
STOP_WAIT_S = GRACE_S + 10


# ---- what each part runs: shared with compose.yaml -----------------------------------------------

def role_command(role: str, port: int | None = None, metrics_port: int | None = None,
                 model: str | None = None, tokenizer_address: str | None = None,
                 http_port: int | None = None, tokenizer: str | None = None) -> list[str]:
    """The arguments after ``python`` for one part of the stack."""
    ports = ["--port", str(port), "--metrics-port", str(metrics_port)]
    if role == "tokenizer":
        return ["-m", "services.tokenizer_service", *ports, *(["--tokenizer", tokenizer] if tokenizer else [])]
    if role == "inference":
        return ["-m", "services.inference_worker", "--model", model, *ports]
    if role == "endpoint":
        http = ["--http-port", str(http_port)] if http_port else []
        return ["-m", "services.endpoint", *ports, "--tokenizer-address", tokenizer_address, *http]
    if role in JOBS_QUEUES:
        return ["-m", "services.jobs.job_worker", "--queues", JOBS_QUEUES[role]]
    raise ValueError(f"unknown role {role!r}")


# How often Redis forces its append-only file to disk (``--appendfsync``). everysec: a crash of the
# Redis process loses nothing it acknowledged (the file is written before the reply), a crash of the
# machine up to the last second; always: not even that, at ~7x fewer writes a second (measured here:
# 48-59k/s at p50 0.055 ms vs 6.4-6.9k/s at 0.55 ms, redis-benchmark SET/HSET); no: the OS decides.
REDIS_FSYNC = ("everysec", "always", "no")


def redis_command(port: int, data_dir: Path | str, bind: str = "127.0.0.1", fsync: str = "everysec") -> list[str]:
    """A Redis fit for a job queue: AOF persistence, never evict (what Celery's docs ask)."""
    if fsync not in REDIS_FSYNC:
        raise ValueError(f"appendfsync must be one of {', '.join(REDIS_FSYNC)}, got {fsync!r}")
    return ["redis-server", "--port", str(port), "--bind", bind, "--dir", str(data_dir), "--appendonly", "yes",
            "--appendfsync", fsync, "--maxmemory-policy", "noeviction", "--save", ""]


def stack_env(redis_url: str, store: Path | str, host: str) -> dict[str, str]:
    """Settings every part reads from its environment (the same names in compose.yaml)."""
    return {"INTERNLM_REDIS_URL": redis_url, "INTERNLM_STORE": str(store), "INTERNLM_HOST": host,
            "INTERNLM_MAX_BATCH": os.environ.get("INTERNLM_MAX_BATCH", "0"),  # 0: sized by the memory available
            "INTERNLM_MAX_QUEUE": os.environ.get("INTERNLM_MAX_QUEUE", "32"),
            "PYTHONUNBUFFERED": "1"}


def memory_shares(workers: int) -> dict[str, str]:
    """Workers started together each size themselves by the memory available at their start, which
    each would count as its own: N of them get an equal share each (``INTERNLM_MEMORY_LIMIT``), unless
    the operator set a limit."""
    from internlm_core.memory import ENV_LIMIT, available_memory

    free = available_memory()
    if workers < 2 or os.environ.get(ENV_LIMIT) or free is None:
        return {}
    return {ENV_LIMIT: str(free // workers)}


def jobs_available() -> bool:
    return importlib.util.find_spec("services.jobs") is not None and \
        importlib.util.find_spec("services.jobs.job_worker") is not None


# ---- the model -------------------------------------------------------------------------------------

def prepare_model(models_root: Path, hf_model: str | None = None, model: str | None = None) -> Path:
    """The model folder to serve: given, converted from HF once, or the cached demo model."""
    if model:
        folder = Path(model)
        if not (folder / CONFIG_FILE).is_file():
            raise SystemExit(f"{folder} is not a model folder (no config.json)")
        return folder
    models_root.mkdir(parents=True, exist_ok=True)
    if hf_model:
        from internlm_core.convert import hf_to_ms

        src = Path(hf_model)
        dst = models_root / src.resolve().name
        if not (dst / CONFIG_FILE).is_file():  # converted before: hf_to_ms publishes whole folders only
            print(f"converting {src} -> {dst}", flush=True)
            hf_to_ms(src, dst)
        return dst
    from internlm_core.demo import ensure_demo_model

    last = [0.0]

    def progress(report):  # a line every few seconds (the launcher shows it, a log keeps it)
        if report.get("step") is not None and time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            eta = report.get("eta_s")
            print(f"training the demo model (first run only): step {report['step']}/{report.get('total', '?')}, "
                  f"loss {report.get('loss') or float('nan'):.3f}" + (f", ~{eta:.0f}s left" if eta else ""),
                  flush=True)

    return ensure_demo_model(models_root, progress=progress)


# ---- supervision ---------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher itself dies (Linux), so nothing is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def terminate(proc: subprocess.Popen, grace: float) -> int:
    """SIGTERM (a part drains and exits), then SIGKILL if it has not exited within ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    restart_at: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            # A session of its own: Ctrl-C reaches only the launcher, which stops the parts in order.
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = STOP_WAIT_S) -> None:
        if self.alive():
            terminate(self.proc, grace)


class Stack:
    """Starts the parts, restarts those that die, stops them all."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.stopping = threading.Event()

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, env, self.log_dir / f"{name}.log")
        child.start()
        self.children.append(child)
        return child

    def wait_until(self, what: str, ready, child: Child, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set():
            if not child.alive():
                raise SystemExit(f"{child.name} exited ({child.proc.returncode}); see {child.log}:\n"
                                 + child.log.read_text(errors="replace")[-2000:])
            if ready():
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} not ready after {timeout:.0f}s; see {child.log}")
            time.sleep(0.2)

    def supervise(self) -> None:
        """Until told to stop: restart any part that exited, with a growing pause."""
        while not self.stopping.wait(0.5):
            for c in self.children:
                if c.alive():
                    if time.monotonic() - c.started > 60:
                        c.restarts = 0  # it ran a good while: the next failure starts the backoff afresh
                    continue
                now = time.monotonic()
                if not c.restart_at:
                    delay = min(2 ** c.restarts, 30)
                    c.restart_at = now + delay
                    print(f"launcher: {c.name} exited ({c.proc.returncode}); restarting in {delay}s "
                          f"(log: {c.log})", flush=True)
                elif now >= c.restart_at:
                    c.restarts += 1
                    c.restart_at = 0.0
                    c.start()

    def stop_all(self) -> None:
        """The endpoint first (it stops taking requests and drains its streams), then the rest in
        reverse order of starting, Redis last."""
        self.stopping.set()
        for c in sorted(reversed(self.children), key=lambda c: c.name != "endpoint"):
            if c.alive():
                print(f"launcher: stopping {c.name}", flush=True)
            c.stop()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _redis_ready(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _endpoint_ca() -> str | None:
    """What the launcher trusts when the endpoint serves TLS (INTERNLM_TLS_CERT in this environment):
    INTERNLM_TLS_CA, else the certificate itself (right for a self-signed one)."""
    from services.auth import TLS_CA_ENV, TLS_CERT_ENV

    return os.environ.get(TLS_CA_ENV) or os.environ.get(TLS_CERT_ENV) or None


def _healthy(address: str, tls_ca: str | None = None) -> bool:
    from services.server_common import wait_healthy

    try:
        wait_healthy(address, timeout=1, tls_ca=tls_ca)
        return True
    except TimeoutError:
        return False


def _workers_seen(address: str) -> int:
    """How many inference workers the endpoint routes to now (with the API key of this environment)."""
    import grpc

    from services.auth import endpoint_channel
    from services.pb import endpoint_pb2, endpoint_pb2_grpc

    with endpoint_channel(SimpleNamespace(endpoint=address, tls_ca=_endpoint_ca())) as ch:
        try:
            return len(endpoint_pb2_grpc.EndpointStub(ch).ListWorkers(endpoint_pb2.ListWorkersRequest(),
                                                                      timeout=2).workers)
        except grpc.RpcError:
            return 0


def up(args) -> int:
    """Run the stack until Ctrl-C / SIGTERM."""
    var = Path(args.var).resolve()
    host = "127.0.0.1"
    models_root = Path(args.models_root).resolve() if args.models_root else var / "store" / "models"
    ports = {"redis": args.redis_port, "endpoint": args.port, "tokenizer": args.port + 1,
             **{f"inference-{i}": args.port + 10 + i for i in range(args.workers)}}
    metrics = {name: p + 1000 for name, p in ports.items() if name != "redis"}
    http = {"http": args.http_port} if args.http_port else {}
    busy = [f"{n} {p}" for n, p in [*ports.items(), *metrics.items(), *http.items()] if not _port_free(host, p)]
    if busy:
        raise SystemExit(f"ports in use: {', '.join(busy)} (another stack running? use --port / --redis-port)")
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed; run: bash scripts/setup.sh")
    redis_url = f"redis://{host}:{args.redis_port}/0"
    env = stack_env(redis_url, var / "store", host)
    if args.max_batch:
        env["INTERNLM_MAX_BATCH"] = str(args.max_batch)
    python = sys.executable
    stack = Stack(var / "logs")

    def on_signal(*_):
        stack.stopping.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        (var / "redis").mkdir(parents=True, exist_ok=True)
        c = stack.start("redis", redis_command(args.redis_port, var / "redis", fsync=args.redis_fsync), env)
        stack.wait_until("redis", lambda: _redis_ready(redis_url), c)
        tok_addr = f"{host}:{ports['tokenizer']}"
        # the served model's own tokenizer (an InternLM2 one speaks its own chat format), else the bundled v1 one
        given = Path(args.hf_model or args.model or "") / TOKENIZER_FILE if (args.hf_model or args.model) else None
        tokenizer = str(given) if given is not None and given.is_file() else None
        c = stack.start("tokenizer", [python, *role_command("tokenizer", ports["tokenizer"], metrics["tokenizer"],
                                                             tokenizer=tokenizer)], env)
        stack.wait_until("tokenizer", lambda: _healthy(tok_addr), c)
        endpoint_addr = f"{host}:{ports['endpoint']}"
        c = stack.start("endpoint", [python, *role_command("endpoint", ports["endpoint"], metrics["endpoint"],
                                                            tokenizer_address=tok_addr, http_port=args.http_port)],
                        env)
        stack.wait_until("endpoint", lambda: _healthy(endpoint_addr, _endpoint_ca()), c)
        if jobs_available() and not args.no_jobs:
            for role in JOBS_QUEUES:
                stack.start(role, [python, *role_command(role)], env)
        # The model may take minutes (first training of the demo model): its own process, output shown.
        prep = [python, "-m", "services.launcher", "prepare-model", "--models-root", str(models_root)]
        prep += ["--hf-model", args.hf_model] if args.hf_model else ["--model", args.model] if args.model else []
        model = _run_visible(prep, {**os.environ, **env}, stack.stopping)
        if model is None:
            return 130 if stack.stopping.is_set() else 1
        worker_env = {**env, **memory_shares(args.workers)}
        for i in range(args.workers):
            name = f"inference-{i}"
            c = stack.start(name, [python, *role_command("inference", ports[name], metrics[name], model=model)],
                            worker_env)
        for c in stack.children:
            if c.name.startswith("inference-"):
                stack.wait_until(c.name, lambda c=c: _healthy(f"{host}:{ports[c.name]}"), c, timeout=600)
        endpoint = next(c for c in stack.children if c.name == "endpoint")
        stack.wait_until("the workers' registration", lambda: _workers_seen(endpoint_addr) >= args.workers, endpoint)
        if not stack.stopping.is_set():
            print(f"\nready: endpoint {endpoint_addr}, {args.workers} inference worker(s) serving {model}\n"
                  f"  try:  internlm generate --endpoint {endpoint_addr} \"The history of\"\n"
                  + (f"  HTTP: http://{host}:{args.http_port}/ (console), http://{host}:{args.http_port}/v1 "
                     "(OpenAI API)\n" if args.http_port else "") +
                  f"  logs: {var / 'logs'}   (Ctrl-C stops everything)", flush=True)
            stack.supervise()
        return 0
    finally:
        stack.stop_all()


def _run_visible(argv: list[str], env: dict, stopping: threading.Event) -> str | None:
    """Run the model preparation with its output on the console; its last line is the folder."""
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_die_with_parent)
    last = []
    reader = threading.Thread(target=lambda: [(print(line, end="", flush=True), last.append(line))
                                              for line in proc.stdout], daemon=True)
    reader.start()
    while proc.poll() is None:
        if stopping.wait(0.3):
            proc.terminate()
            proc.wait(STOP_WAIT_S)
            return None
    reader.join(5)
    if proc.returncode != 0:
        print(f"launcher: preparing the model failed ({proc.returncode})", file=sys.stderr)
        return None
    return last[-1].strip() if last else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m services.launcher", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="action", required=True)
    add_up_arguments(sub.add_parser("up", help="run the whole stack until Ctrl-C"))
    p = sub.add_parser("prepare-model", help="make the model folder to serve; prints its path last")
    add_model_arguments(p)
    h = sub.add_parser("health", help="exit 0 if the gRPC server at ADDRESS is SERVING (container health checks)")
    h.add_argument("address")
    h.add_argument("--timeout", type=float, default=5.0)
    h.add_argument("--tls-ca", default=os.environ.get("INTERNLM_TLS_CA"),
                   help="the server speaks TLS with a certificate this CA (PEM) signed ($INTERNLM_TLS_CA)")
    return ap


def add_model_arguments(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hf-model", help="an HF InternLM folder: converted once into --models-root, then served")
    g.add_argument("--model", help="a ready model folder (converted, trained or exported) to serve as it is")
    p.add_argument("--models-root", help="where models are kept (default: var/store/models)")


def add_up_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--workers", type=int, default=2, help="inference workers (default 2)")
    p.add_argument("--max-batch", type=int, help="slots per worker (default $INTERNLM_MAX_BATCH, or up to 8 as "
                   "the memory available holds)")
    p.add_argument("--port", type=int, default=50051, help="endpoint port; the tokenizer takes +1, worker i +10+i, "
                   "metrics +1000 (default 50051)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="the endpoint's HTTP port: OpenAI API and web console (default 8000; 0: none)")
    p.add_argument("--redis-port", type=int, default=6380)
    p.add_argument("--redis-fsync", choices=REDIS_FSYNC, default=os.environ.get("INTERNLM_REDIS_FSYNC", "everysec"),
                   help="Redis appendfsync: everysec (default) may lose the last second of job records and "
                        "queue messages if the machine crashes; always loses none, at ~7x fewer writes a second")
    p.add_argument("--var", default=str(DEFAULT_VAR), help="data and logs (default: var/ in the repository)")
    p.add_argument("--no-jobs", action="store_true", help="do not start the converter and trainer workers")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "up":
        if args.workers < 1:
            raise SystemExit("--workers must be at least 1")
        return up(args)
    if args.action == "prepare-model":
        root = Path(args.models_root) if args.models_root else DEFAULT_VAR / "store" / "models"
        print(prepare_model(root, args.hf_model, args.model).resolve(), flush=True)
        return 0
    from services.server_common import wait_healthy

    try:
        wait_healthy(args.address, timeout=args.timeout, tls_ca=args.tls_ca)
        return 0
    except TimeoutError as e:
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
