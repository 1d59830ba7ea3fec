"""Structured output as served: tokens/s of concurrent streams with and without a JSON Schema.

    .venv/bin/python bench/structured_serving_bench.py [--model DIR | --preset bench-serve] [--streams 8]

One inference worker with its default settings (subprocess, gRPC on loopback) serves the model;
``--streams`` concurrent ``Generate`` streams of sampled answers (temperature 1, the same prompts
both times) run twice in one run, alternately: free (``ignore_eos``), and with
``SamplingParams.grammar`` a JSON Schema that cannot be complete within ``--new-tokens`` (at least
64 array items), so every answer of both runs is exactly ``--new-tokens`` long and the two runs
generate the same number of tokens (that every constrained answer parses and validates is the
tests' business). Reported: aggregate tokens/s of each, the ratio (the issue's target:
constrained >= 0.9x free) and how the answers ended. ``--model`` takes a model folder (e.g. the
demo model the local stack trains); without it a ``--preset`` model with random weights is made.
"""
from __future__ import annotations

import os

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serving_bench import Proc, at_once, free_port, make_model, model_arguments  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "tags"],
          "properties": {"title": {"type": "string", "maxLength": 16},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 64,
                                  "maxItems": 200}}}
PROMPT = "Describe the river in JSON:"


def main() -> None:
    ap = model_arguments(__doc__.splitlines()[0], "bench-serve")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2, help="pairs of (free, constrained) runs")
    args = ap.parse_args()

    import grpc

    from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
    from services.pb_convert import FINISH_FROM_PB, grammar_to_pb
    from services.server_common import wait_healthy
    from internlm_core.structured import Grammar

    tmp = Path(tempfile.mkdtemp(prefix="structured-bench-"))
    model = Path(args.model) if args.model else make_model(args.preset, tmp)
    port = free_port()
    worker = Proc([sys.executable, "-m", "services.inference_worker", "--model", str(model), "--port", str(port),
                   "--metrics-port", str(free_port()), "--redis-url", ""], tmp / "worker.log")
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout=600)
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        grammar = grammar_to_pb(Grammar("json_schema", json.dumps(SCHEMA)))

        def one(i, constrained):
            params = common_pb2.SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=1000 + i)
            if constrained:
                params.grammar.CopyFrom(grammar)
            else:
                params.ignore_eos = True
            n, text, reason = 0, [], None
            for chunk in stub.Generate(inference_pb2.GenerateRequest(text=PROMPT, params=params), timeout=600):
                n += len(chunk.token_ids)
                text.append(chunk.text)
                if chunk.HasField("finish"):
                    reason = FINISH_FROM_PB[chunk.finish.reason]
            return n, "".join(text), reason

        one(0, True)  # warm: compiles and the grammar's tokenizer view
        runs = {"free": [], "json_schema": []}
        ends = {"free": {}, "json_schema": {}}
        for _ in range(args.reps):
            for kind in runs:
                results, wall = at_once(lambda i: one(i, kind == "json_schema"), list(range(args.streams)))
                runs[kind].append(sum(n for n, _, _ in results) / wall)
                for _, _, reason in results:
                    ends[kind][reason] = ends[kind].get(reason, 0) + 1
        print(f"model {model.name}, {args.streams} streams of {args.new_tokens} sampled tokens, one worker with "
              f"its defaults, {args.reps} alternating pairs")
        for kind, rates in runs.items():
            print(f"  {kind:12} tok/s {' / '.join(f'{r:.1f}' for r in rates)}   ends {ends[kind]}")
        ratio = sum(runs["json_schema"]) / sum(runs["free"])
        print(f"  constrained / free: {ratio:.2f}x")
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
