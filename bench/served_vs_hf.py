"""The deployed configuration against HF transformers, side by side in one run.

    .venv/bin/python bench/served_vs_hf.py [--preset bench-serve | --model DIR] [--new-tokens 64]

One inference worker started with its defaults (8 slots, the model's positions), greedy streams
over its gRPC API (1, 4, 8 and 16 at once; 16 means 8 wait for a slot), against HF transformers
``generate`` on the same weights (converted back with ``ms_to_hf``) at the same batch sizes with
2 threads, in its own process. Tokens/s are new tokens over wall time, prefill included, on both
sides. Every served phase gets prompts it has not seen, so the worker's prefix reuse does not
flatter it; time to first token and inter-token latency are the served streams' medians.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

HF_SIDE = r"""
import json, sys, time, torch
from transformers import LlamaForCausalLM
torch.set_num_threads(2)
folder, new, prompts, levels = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
out = {}
for b in levels:
    ids = torch.tensor(prompts[:b])
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        t = time.perf_counter()
        model.generate(ids, **kw)
    out[b] = b * new / (time.perf_counter() - t)
print(json.dumps(out))
"""


def main() -> None:
    from serving_bench import Proc, at_once, free_port, make_model, model_arguments, stream

    ap = model_arguments(__doc__.splitlines()[0], "bench-serve")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--max-batch", type=int, help="the worker's slots (default: the worker's own default, 8)")
    args = ap.parse_args()
    levels = [int(c) for c in args.streams.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="served-vs-hf-"))
    import grpc
    import numpy as np

    from internlm_core.convert import ms_to_hf
    from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
    from services.server_common import wait_healthy

    model_dir = Path(args.model) if args.model else make_model(args.preset, tmp)
    ms_to_hf(model_dir, tmp / "hf")
    rng = np.random.default_rng(0)

    def fresh(n):  # prompts never sent before
        return rng.integers(3, 30000, (n, args.prompt_tokens)).tolist()

    hf_prompts = fresh(max(levels))
    hf = json.loads(subprocess.run([sys.executable, "-c", HF_SIDE, str(tmp / "hf"), str(args.new_tokens),
                                    json.dumps(hf_prompts), json.dumps(levels)], check=True, capture_output=True,
                                   text=True).stdout)
    port = free_port()
    worker = Proc([sys.executable, "-m", "services.inference_worker", "--model", str(model_dir), "--port", str(port),
                   "--metrics-port", str(free_port()), "--redis-url", "",
                   *(["--max-batch", str(args.max_batch)] if args.max_batch else [])], tmp / "worker.log")
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout=900)
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        params = common_pb2.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

        def request(prompt):
            return inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=prompt), params=params)

        stream(stub, request(fresh(1)[0]))
        print(f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, "
              f"{args.max_batch or 'default'} slots", flush=True)
        for c in levels:
            results, seconds = at_once(lambda p: stream(stub, request(p)), fresh(c))
            served = sum(r[0] for r in results) / seconds
            ttft = np.median([r[1] for r in results])
            itl = np.median([(r[2] - r[1]) / max(r[0] - 1, 1) for r in results])
            print(f"{c:2d} stream(s): served {served:6.1f} tok/s (TTFT {ttft * 1e3:5.0f} ms, ITL {itl * 1e3:5.1f} ms), "
                  f"HF batch {c} {hf[str(c)]:6.1f} tok/s, ratio {served / hf[str(c)]:.2f}x", flush=True)
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
