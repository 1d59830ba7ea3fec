"""The tokenizer service: ``python -m services.tokenizer_service --port 50052``.

Encode / decode (single and batched), the InternLM chat template, token counts; each RPC is
one call into ``internlm_core.tokenizer``. Clients reach it through the endpoint: it listens on
loopback unless ``--host`` says otherwise, and then ``--internal-token`` keeps others out.

One servicer, two hosts: this service, with one tokenizer for the requests that name no model,
and every inference worker, with its model's (the endpoint routes a request naming a model there).
"""
from __future__ import annotations

import argparse

from internlm_core.errors import ModelNotFound
from internlm_core.generation import MAX_PROMPT_CHARS
from internlm_core.tokenizer import Tokenizer
from internlm_core.tools import Tools

from services.pb_convert import chat_from_pb, check_names, check_size, tools_of
from services.pb import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.auth import NEED_TOKEN
from services.server_common import Server, add_access_arguments, env_default, setup_logging

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: Tokenizer, model: str | None = None):
        """``model``: the model whose tokenizer this is (a worker's); None: the tokenizer service's,
        which holds no model's name."""
        self.tok, self.model = tokenizer, model

    def _check_model(self, request) -> None:
        """A request's ``model``: '' (this host's tokenizer) or the model this host serves."""
        check_names(request)
        if not request.model or request.model == self.model:
            return
        if self.model is None:  # naming the model answered here would be a guess: refused by name
            raise ValueError(f"model {request.model!r}: the tokenizer service holds no model's tokenizer by name; "
                             "call the endpoint, which routes a model's requests to its workers")
        raise ModelNotFound(f"unknown model {request.model!r}; this worker serves {self.model!r}")

    def _encode(self, text: str, request) -> list[int]:
        return self.tok.encode(text, bos=not request.no_bos, eos=request.add_eos,
                               allow_special=request.allow_special_tokens)

    # Text to encode is bounded as a prompt is (MAX_PROMPT_CHARS), before any work: this service
    # (or a worker) has a few threads, and the endpoint's clients share them.
    def Encode(self, request, context):
        self._check_model(request)
        check_size(len(request.text), MAX_PROMPT_CHARS, "text", "characters")
        return tokenizer_pb2.EncodeResponse(ids=self._encode(request.text, request))

    def EncodeBatch(self, request, context):
        self._check_model(request)
        check_size(sum(map(len, request.texts)), MAX_PROMPT_CHARS, "texts", "characters")
        return tokenizer_pb2.EncodeBatchResponse(
            items=[common_pb2.TokenIds(ids=self._encode(t, request)) for t in request.texts])

    def Decode(self, request, context):
        self._check_model(request)
        return tokenizer_pb2.DecodeResponse(text=self.tok.decode(request.ids))

    def DecodeBatch(self, request, context):
        self._check_model(request)
        return tokenizer_pb2.DecodeBatchResponse(texts=[self.tok.decode(item.ids) for item in request.items])

    def ApplyChatTemplate(self, request, context):
        self._check_model(request)
        check_size(sum(len(m.content) for m in request.messages), MAX_PROMPT_CHARS, "messages", "characters")
        messages = chat_from_pb(request.messages)
        add = not request.no_generation_prompt
        tools = _listed(request.tools)
        text = self.tok.render_chat(messages, add, tools)
        ids = self.tok.encode_chat(messages, add, allow_special=request.allow_special_tokens, tools=tools)
        return tokenizer_pb2.ChatTemplateResponse(text=text, ids=ids)

    def CountTokens(self, request, context):
        self._check_model(request)
        allow = request.allow_special_tokens
        size = sum(len(m.content) for m in request.chat.messages) if request.HasField("chat") else len(request.text)
        check_size(size, MAX_PROMPT_CHARS, request.WhichOneof("input") or "text", "characters")
        if request.WhichOneof("input") == "chat":
            n = len(self.tok.encode_chat(chat_from_pb(request.chat.messages), allow_special=allow,
                                         tools=_listed(request.tools)))
        elif request.tools:  # a text has no prompt to list them in: counting it without them would mislead
            raise ValueError("tools: counted only with chat messages (they are listed in a chat's prompt)")
        else:
            n = len(self.tok.encode(request.text, bos=False, allow_special=allow))  # the text's own tokens, without <s>
        return tokenizer_pb2.CountTokensResponse(count=n)


def _listed(tools) -> list[dict] | None:
    """A request's tools as a chat prompt lists them (as the worker does), None without any."""
    return Tools(tools_of(tools)).validate().listed() if tools else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default=env_default("INTERNLM_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=50052)
    ap.add_argument("--metrics-port", type=int, default=9102)
    add_access_arguments(ap)
    ap.add_argument("--tokenizer", help="tokenizer.model, its chat format from its own pieces (default: the "
                                        "bundled InternLM v1 one)")
    args = ap.parse_args(argv)
    setup_logging("tokenizer")
    server = Server("tokenizer", args.port, args.host, args.metrics_port, max_workers=16,
                    metrics_host=args.metrics_host, keys=[args.internal_token] if args.internal_token else [],
                    refusal=NEED_TOKEN)
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(Tokenizer(args.tokenizer)), server.grpc)
    server.serve([SERVICE_NAME])


if __name__ == "__main__":
    main()
