"""The CLI's side of the running stack: ``internlm generate`` without ``--model`` (stream from the
endpoint), and the endpoint options every remote command shares (address, API key, TLS CA; the
channel itself is ``services.auth.endpoint_channel``)."""
from __future__ import annotations

import json
import sys

import grpc

from internlm_core.generation import SCALAR_PARAMS

from services.auth import API_KEY_ENV, DEFAULT_ENDPOINT, ENDPOINT_ENV, TLS_CA_ENV, endpoint_address, endpoint_channel
from services.pb_convert import FINISH_FROM_PB, chat_to_pb, grammar_to_pb
from services.pb import common_pb2, inference_pb2, inference_pb2_grpc


def add_endpoint_arguments(p) -> None:
    """--endpoint, --api-key and --tls-ca, for the commands that call the running stack."""
    p.add_argument("--endpoint", default=None, help=f"endpoint address (default: ${ENDPOINT_ENV} or {DEFAULT_ENDPOINT})")
    p.add_argument("--api-key", default=None,
                   help=f"the endpoint's API key, sent as 'authorization: Bearer <key>' (default: ${API_KEY_ENV}, "
                        "its first key)")
    p.add_argument("--tls-ca", default=None,
                   help=f"speak TLS, trusting the CA in this PEM file (for a self-signed certificate, the "
                        f"certificate itself; default: ${TLS_CA_ENV}; none: plain text)")


def generate_request(args) -> inference_pb2.GenerateRequest:
    """The GenerateRequest for ``internlm generate``'s arguments (the server checks the values)."""
    params = common_pb2.SamplingParams(stop=list(getattr(args, "stop", None) or []))
    for name in SCALAR_PARAMS:  # the flags ``model_cmds`` derives from the same list
        value = getattr(args, name, None)
        if value is not None:
            setattr(params, name, value)
    from services.cli.model_cmds import grammar_from_args, prompt_messages

    if getattr(args, "speculate", None) == "off":  # (the others are refused without --model: model_cmds)
        params.speculate = False
    if (grammar := grammar_from_args(args)) is not None:
        params.grammar.CopyFrom(grammar_to_pb(grammar))
    request = inference_pb2.GenerateRequest(params=params, adapter=getattr(args, "adapter", None) or "",
                                            allow_special_tokens=getattr(args, "allow_special_tokens", False),
                                            thinking=getattr(args, "thinking", False))
    if getattr(args, "ids", None):
        request.ids.ids.extend(int(x) for x in args.ids.split(",") if x.strip())
    elif getattr(args, "chat", False):
        request.chat.CopyFrom(chat_to_pb(prompt_messages(args)))
    else:
        request.text = args.prompt
    return request


def remote_generate(args) -> int:
    """Print the stream as it comes (or one JSON object with ``--json``); 1 on an RPC error."""
    address = endpoint_address(args)
    request = generate_request(args)
    ids, text, finish = [], [], None
    with endpoint_channel(args) as channel:
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
