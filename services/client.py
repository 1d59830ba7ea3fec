"""The client side of ``internlm generate`` without ``--model``: stream from the running stack."""
from __future__ import annotations

import json
import os
import sys

import grpc

from internlm_core.generation import SCALAR_PARAMS

from services.pb_convert import FINISH_FROM_PB, chat_to_pb, grammar_to_pb
from services.pb import common_pb2, inference_pb2, inference_pb2_grpc

DEFAULT_ENDPOINT = "localhost:50051"



def endpoint_address(args=None) -> str:
    return getattr(args, "endpoint", None) or os.environ.get("INTERNLM_ENDPOINT") or DEFAULT_ENDPOINT


def request_from_args(args) -> inference_pb2.GenerateRequest:
    """The GenerateRequest for ``internlm generate``'s arguments (the server checks the values)."""
    params = common_pb2.SamplingParams(stop=list(getattr(args, "stop", None) or []))
    for name in SCALAR_PARAMS:  # the flags ``model_cmds`` derives from the same list
        value = getattr(args, name, None)
        if value is not None:
            setattr(params, name, value)
    from services.cli.model_cmds import grammar_from_args

    if (grammar := grammar_from_args(args)) is not None:
        params.grammar.CopyFrom(grammar_to_pb(grammar))
    request = inference_pb2.GenerateRequest(params=params, adapter=getattr(args, "adapter", None) or "",
                                            allow_special_tokens=getattr(args, "allow_special_tokens", False))
    if getattr(args, "ids", None):
        request.ids.ids.extend(int(x) for x in args.ids.split(",") if x.strip())
    elif getattr(args, "chat", False):
        messages = [{"role": "system", "content": args.system}] if getattr(args, "system", None) else []
        request.chat.CopyFrom(chat_to_pb(messages + [{"role": "user", "content": args.prompt}]))
    else:
        request.text = args.prompt
    return request


def remote_generate(args) -> int:
    """Print the stream as it comes (or one JSON object with ``--json``); 1 on an RPC error."""
    address = endpoint_address(args)
    request = request_from_args(args)
    ids, text, finish = [], [], None
    with grpc.insecure_channel(address) as channel:
        try:
            for chunk in inference_pb2_grpc.InferenceStub(channel).Generate(request, wait_for_ready=False):
                ids.extend(chunk.token_ids)
                text.append(chunk.text)
                if not args.json:
                    print(chunk.text, end="", flush=True)
                if chunk.HasField("finish"):
                    finish = chunk.finish
        except grpc.RpcError as e:
            if not args.json and text:
                print()
            print(f"internlm generate: {address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"token_ids": ids, "text": "".join(text),
                          "finish_reason": FINISH_FROM_PB.get(finish.reason) if finish else None,
                          "prompt_tokens": finish.prompt_tokens if finish else None,
                          "seed": finish.seed if finish else None}, ensure_ascii=False))
    else:
        print()
    return 0
