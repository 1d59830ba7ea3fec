"""``internlm jobs submit|get|watch|cancel|list|store``: the Jobs API of the running stack, over gRPC."""
from __future__ import annotations

import json
import sys
import time
import uuid

from internlm_core.config import DTYPES
from services.cli.train_cmds import add_hyperparameter_flags
from services.cli.remote import add_endpoint_arguments
from services.jobs.checks import JOB_NAMES
from services.jobs.kinds import KINDS, enum_name, kind_of_enum
from services.jobs.records import STATES, STATE_PREFIX, state_enum_name

RPC_TIMEOUT_S = 30


def register(sub) -> None:
    p = sub.add_parser("jobs", help=f"queue and follow long jobs ({', '.join(KINDS)})")
    add_endpoint_arguments(p)
    js = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    s = js.add_parser("submit", help="queue a job; prints its id (and follows it with --watch)")
    kinds = s.add_subparsers(dest="kind", required=True, metavar="KIND")
    parsers = {name: kinds.add_parser(name, help=kind.help) for name, kind in KINDS.items()}
    c = parsers["convert"]
    c.add_argument("--source", required=True, help="HF folder, relative to the store root or inside its roots")
    c.add_argument("--output", required=True, help="model name in the store")
    c.add_argument("--dtype", choices=DTYPES)
    pp = parsers["preprocess"]
    pp.add_argument("--source", required=True)
    pp.add_argument("--output", required=True, help="dataset name in the store")
    pp.add_argument("--format", required=True, choices=["alpaca", "wikitext"])
    pp.add_argument("--seq-length", type=int)
    pp.add_argument("--no-pack", dest="pack", action="store_false", default=None,
                    help="wikitext: one line per row instead of packing")
    pp.add_argument("--min-length", type=int)
    pp.add_argument("--tokenizer")
    f = parsers["finetune"]
    f.add_argument("--base-model", default="", help="model name in the store")
    f.add_argument("--preset", default="", help="start from random weights of this preset instead")
    f.add_argument("--dataset", required=True)
    f.add_argument("--output", required=True)
    f.add_argument("--method", choices=["full", "lora"], default="")
    add_hyperparameter_flags(f, JOB_NAMES)  # the job API's names (FinetuneJob's fields)
    e = parsers["export"]
    e.add_argument("--model", required=True)
    e.add_argument("--output", required=True)
    e.add_argument("--max-batch", type=int)
    e.add_argument("--max-len", type=int)
    e.add_argument("--dynamic", action="store_true", default=None)
    for k in parsers.values():
        k.add_argument("--overwrite", action="store_true")
        k.add_argument("--key", help="idempotency key (default: a fresh one; reuse it to retry safely)")
        k.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
        k.add_argument("--json", action="store_true")
        k.set_defaults(func=submit)

    for name, func, text in (("get", get, "one job"), ("cancel", cancel, "cancel a queued or running job")):
        one = js.add_parser(name, help=text)
        one.add_argument("id")
        one.add_argument("--json", action="store_true")
        one.set_defaults(func=func)
    w = js.add_parser("watch", help="follow a job with a live progress bar until it ends")
    w.add_argument("id")
    w.set_defaults(func=watch)
    ls = js.add_parser("list", help="jobs, newest first")
    ls.add_argument("--state", choices=[s.lower() for s in STATES])
    ls.add_argument("--kind", choices=list(KINDS))
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_jobs)
    st = js.add_parser("store", help="what the model store holds")
    st.add_argument("--area", choices=["models", "datasets"], default="")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=store)


# ---- plumbing -------------------------------------------------------------------------------------

def _stub(args):
    from services.auth import endpoint_channel
    from services.pb import jobs_pb2_grpc

    return jobs_pb2_grpc.JobsStub(endpoint_channel(args))


def _rpc(fn):
    """Run a command; a gRPC error is printed as its code and message (exit status 2)."""
    import functools

    @functools.wraps(fn)
    def wrapper(args):
        import grpc

        try:
            return fn(args)
        except grpc.RpcError as e:
            print(f"internlm jobs: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    return wrapper


def _state(job) -> str:
    from services.pb import jobs_pb2

    return jobs_pb2.JobState.Name(job.state).removeprefix(STATE_PREFIX)


def _kind(job) -> str:
    from services.pb import jobs_pb2

    return kind_of_enum(jobs_pb2.JobKind.Name(job.kind))


def _to_json(msg) -> str:
    from google.protobuf import json_format

    return json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), ensure_ascii=False)


def _line(job) -> str:
    p = job.progress
    if p.bytes_total:
        prog = f"{p.bytes_done / 2**20:.1f}/{p.bytes_total / 2**20:.1f} MiB"
    elif p.total_steps:
        prog = f"{p.step}/{p.total_steps}" + (f" loss {p.loss:.4f}" if p.HasField("loss") else "")
    else:
        prog = "-"
    detail = job.error or job.message
    return f"{job.id}  {_kind(job):<10} {_state(job):<9} {prog:<22} {job.output:<28} {detail}"


def submit_request(args):
    """The SubmitJobRequest for ``internlm jobs submit KIND ...`` (unset options stay unset)."""
    from services.pb import jobs_pb2

    fields = {k: v for k, v in vars(args).items() if v is not None}
    skip = {"func", "command", "jobs_command", "kind", "endpoint", "api_key", "tls_ca", "key", "watch", "json"}
    request = jobs_pb2.SubmitJobRequest(idempotency_key=args.key or uuid.uuid4().hex)
    body = getattr(request, args.kind)  # the oneof's field of this kind's name
    body.SetInParent()
    known = set(body.DESCRIPTOR.fields_by_name)
    for k, v in fields.items():
        if k not in skip and k in known:
            setattr(body, k, v)
    return request


# ---- commands -------------------------------------------------------------------------------------

@_rpc
def submit(args) -> int:
    import grpc

    stub, request = _stub(args), submit_request(args)
    for attempt in range(5):  # the same idempotency key makes a retry after a lost reply safe
        try:
            job = stub.SubmitJob(request, timeout=RPC_TIMEOUT_S)
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                raise
            time.sleep(0.5 * 2 ** attempt)
    print(_to_json(job) if args.json else job.id)
    if args.watch:
        return follow(stub, job.id)
    return 0


def _print_job(job, as_json: bool) -> int:
    print(_to_json(job) if as_json else _line(job))
    return 0


@_rpc
def get(args) -> int:
    from services.pb import jobs_pb2

    return _print_job(_stub(args).GetJob(jobs_pb2.GetJobRequest(id=args.id), timeout=RPC_TIMEOUT_S), args.json)


@_rpc
def watch(args) -> int:
    return follow(_stub(args), args.id)


def follow(stub, job_id: str) -> int:
    """A live progress bar until the job ends; exit status 0 only when it succeeded."""
    from tqdm import tqdm

    from services.pb import jobs_pb2

    bar, job = None, None
    try:
        for job in stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id)):
            p = job.progress
            total, done, unit = ((p.bytes_total, p.bytes_done, "B") if p.bytes_total else
                                 (p.total_steps, p.step, "step") if p.total_steps else (None, 0, "it"))
            if bar is None or (total and bar.total != total):
                if bar is not None:
                    bar.close()
                bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=f"{_kind(job)} {job_id[:8]}",
                           file=sys.stderr, dynamic_ncols=True)
            bar.n = done
            post = _state(job).lower()
            if p.HasField("loss"):
                post += f" loss={p.loss:.4f}"
            if job.message:
                post += f" {job.message[-40:]}"
            bar.set_postfix_str(post, refresh=False)
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    if job is None:
        return 1
    state = _state(job)
    print(f"{job.id} {state}" + (f": {job.error}" if job.error else f" -> {job.output}" if state == "SUCCEEDED" else ""))
    return 0 if state == "SUCCEEDED" else 1


@_rpc
def cancel(args) -> int:
    from services.pb import jobs_pb2

    return _print_job(_stub(args).CancelJob(jobs_pb2.CancelJobRequest(id=args.id), timeout=RPC_TIMEOUT_S), args.json)


@_rpc
def list_jobs(args) -> int:
    from services.pb import jobs_pb2

    req = jobs_pb2.ListJobsRequest(limit=args.limit)
    if args.state:
        req.state = jobs_pb2.JobState.Value(state_enum_name(args.state))
    if args.kind:
        req.kind = jobs_pb2.JobKind.Value(enum_name(args.kind))
    jobs = _stub(args).ListJobs(req, timeout=RPC_TIMEOUT_S).jobs
    for job in jobs:
        print(_to_json(job) if args.json else _line(job))
    return 0


@_rpc
def store(args) -> int:
    from services.pb import jobs_pb2

    entries = _stub(args).ListStore(jobs_pb2.ListStoreRequest(area=args.area), timeout=RPC_TIMEOUT_S).entries
    for e in entries:
        print(_to_json(e) if args.json else f"{e.area}/{e.name:<32} {e.kind:<9} {e.size_bytes / 2**20:9.1f} MiB")
    return 0
