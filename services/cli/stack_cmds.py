"""``internlm up`` (the whole stack on this machine) and ``internlm workers`` (what the endpoint sees)."""
from __future__ import annotations


def register(sub) -> None:
    from services.cli.remote import add_endpoint_arguments
    from services.launcher import add_up_arguments

    p = sub.add_parser("up", help="run redis, the tokenizer, inference workers, jobs workers and the endpoint "
                                  "on loopback until Ctrl-C")
    add_up_arguments(p)
    p.set_defaults(func=up)

    w = sub.add_parser("workers", help="list the inference workers behind the running stack's endpoint")
    add_endpoint_arguments(w)
    w.set_defaults(func=workers)


def up(args) -> int:
    from services.launcher import up as launch

    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    return launch(args)


def workers(args) -> int:
    import grpc

    from services.auth import endpoint_address, endpoint_channel
    from services.pb import endpoint_pb2, endpoint_pb2_grpc

    address = endpoint_address(args)
    with endpoint_channel(args) as ch:
        try:
            r = endpoint_pb2_grpc.EndpointStub(ch).ListWorkers(endpoint_pb2.ListWorkersRequest(), timeout=10)
        except grpc.RpcError as e:
            raise ValueError(f"{address}: {e.code().name}: {e.details()}") from None
    print(f"{'address':<24} {'model':<24} {'load':>5} {'slots':>5} {'routed':>7}")
    for w in r.workers:
        print(f"{w.address:<24} {w.model:<24} {w.load:>5} {w.max_batch:>5} {w.requests_routed:>7}")
    return 0
