"""The deployed worker against llama.cpp's server on the same weights, side by side in one run.

    .venv/bin/python bench/vs_llamacpp.py [--preset internlm2-1_8b | bench-serve] [--ours bf16,int8]
                                          [--llama bf16,q8_0] [--streams 1,4] [--new-tokens 64]
                                          [--work DIR] [--json OUT]

A model of the preset's shape with random weights is written as InternLM ships it (bf16, tensor by
tensor, never whole in memory): the project's folder, served by one inference worker started with
its defaults over gRPC (bf16 as stored; int8 is the same worker with ``--quantize int8``), and the
same weights as an HF folder (``ms_to_hf``; InternLM2 presets get the
real InternLM2 tokenizer files) converted by llama.cpp's own ``convert_hf_to_gguf.py`` (and
``llama-quantize`` for q8_0; its converter's own q8_0 where bf16 is not asked for, to spare the disk), served by ``llama-server`` with 2 threads and 4 slots. Both get the
same fresh 32-token prompts (no prompt cache on either side) and stream 64 greedy tokens per
request to the client (gRPC messages / server-sent events), 1 and 4 streams at once; tokens/s over wall time from the client, prefill included; peak
RSS (VmHWM) of each server process, loading included. One server runs at a time.
llama.cpp is built once from the ``llama-cpp-python`` sdist (``bench/llamacpp.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
V2_TOKENIZER = REPO.parent / "shared" / "data" / "internlm2-tokenizer"


def write_random_model(preset: str, folder: Path, seed: int = 0) -> Path:
    """A project model folder of ``preset``'s shape, bf16 random weights (std 0.02, norms 1),
    written one tensor at a time."""
    from internlm_core.checkpoint import WEIGHTS_FILE, SafetensorsWriter, atomic_folder, copy_tokenizer, f32_to_bf16
    from internlm_core.config import Config

    cfg = Config.from_name(preset).replace(dtype="bfloat16")
    if folder.is_dir():
        return folder
    rng = np.random.default_rng(seed)
    shapes = cfg.param_shapes()
    with atomic_folder(folder) as tmp:
        w = SafetensorsWriter(tmp / WEIGHTS_FILE, [(n, "BF16", s) for n, s in shapes.items()], {"format": "ms"})
        for name, shape in shapes.items():
            arr = (np.ones(shape, np.float32) if name.endswith("norm.weight") or name.endswith("norm_out.weight")
                   else rng.standard_normal(shape, np.float32) * 0.02)
            w.write(name, f32_to_bf16(arr))
        w.close()
        cfg.save(tmp)
        # InternLM3's chat format is InternLM2's (ChatML ids named in tokenizer_config.json); its own
        # 128k tokenizer is not in ../shared, and the v2 one fits inside its vocabulary.
        copy_tokenizer(V2_TOKENIZER if cfg.family in ("internlm2", "internlm3") else None, tmp)
    return folder


def llama_hf_folder(hf: Path) -> Path:
    """llama.cpp reads an InternLM2 or InternLM3 folder as it is; v1's layout is LLaMA's with q/k/v/o
    bias, which its converter knows under LLaMA's name."""
    cfg = json.loads((hf / "config.json").read_text())
    if cfg["model_type"] in ("internlm2", "internlm3"):
        return hf
    out = hf.with_name(hf.name + "-llama")
    out.mkdir(exist_ok=True)
    for f in hf.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=cfg.get("bias", False))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_streams(one, prompts: list[list[int]]) -> float:
    """Tokens/s over wall time of ``one(prompt) -> tokens`` run for every prompt at once."""
    from serving_bench import at_once

    counts, seconds = at_once(one, prompts)
    return sum(counts) / seconds


def bench_worker(model_dir: Path, tmp: Path, levels, fresh, new_tokens: int, extra: list[str]) -> dict:
    import grpc

    from serving_bench import Proc, free_port, stream
    from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
    from services.server_common import wait_healthy

    port = free_port()
    worker = Proc([sys.executable, "-m", "services.inference_worker", "--model", str(model_dir), "--port", str(port),
                   "--metrics-port", str(free_port()), "--redis-url", "", *extra], tmp / "worker.log")
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout=1800)
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        params = common_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

        def one(prompt):
            return stream(stub, inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=prompt), params=params))[0]

        one(fresh(1)[0])
        out = {c: run_streams(one, fresh(c)) for c in levels}
        out["peak_rss_mb"] = peak_rss_mb(worker.proc.pid)
        info = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}")).ModelInfo(
            inference_pb2.ModelInfoRequest(), timeout=30)
        out["setup"] = f"{info.max_batch} slots x {info.max_len} positions (its defaults{', ' + ' '.join(extra) if extra else ''})"
        return out
    finally:
        worker.stop()


def bench_llama(gguf: Path, tmp: Path, levels, fresh, new_tokens: int, prompt_tokens: int) -> dict:
    import httpx

    from llamacpp import binaries
    from serving_bench import Proc, free_port, wait_http

    port, slots = free_port(), max(levels)
    server = Proc([str(binaries()["llama-server"]), "-m", str(gguf), "-t", "2", "-np", str(slots),
                   "-c", str(slots * (prompt_tokens + new_tokens + 16)), "--port", str(port), "--host", "127.0.0.1"],
                  tmp / f"llama-{gguf.stem}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base, 1800, server.proc)

        def one(prompt):  # streamed, as the worker's tokens are: each token a message to the client
            body = {"prompt": prompt, "n_predict": new_tokens, "temperature": 0, "ignore_eos": True,
                    "cache_prompt": False, "samplers": ["top_k"], "top_k": 1, "stream": True}
            with httpx.stream("POST", f"{base}/completion", timeout=1800, json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: ") and (event := json.loads(line[6:])).get("stop"):
                        return event["tokens_predicted"]
            raise RuntimeError("llama-server's stream ended without its last event")

        one(fresh(1)[0])
        out = {c: run_streams(one, fresh(c)) for c in levels}
        out["peak_rss_mb"] = peak_rss_mb(server.proc.pid)
        out["setup"] = f"llama-server -t 2 -np {slots}"
        return out
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internlm2-1_8b")
    ap.add_argument("--ours", default="bf16,int8",
                    help="the worker's weights: bf16 (as stored), int8 or int4 (--quantize int8|int4)")
    ap.add_argument("--llama", default="bf16,q8_0",
                    help="llama.cpp weight types: f32, bf16, q8_0, q4_0 (llama-quantize's own choice for the "
                         "head, as its users get it) ('' for none)")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--work", help="folder for the models (kept between runs; default: a temporary one)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    from internlm_core.config import Config
    from internlm_core.convert import ms_to_hf
    from llamacpp import quantize, to_gguf

    levels = [int(c) for c in args.streams.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="vs-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = Config.from_name(args.preset)
    model_dir = write_random_model(args.preset, work / args.preset)
    hf = work / f"{args.preset}-hf"
    kinds = list(filter(None, args.llama.split(",")))
    if kinds and not hf.is_dir():  # llama.cpp's converter reads an HF folder (--llama '': ours alone)
        ms_to_hf(model_dir, hf)
    rng = np.random.default_rng(0)

    def fresh(n):  # prompts never sent before, so neither side reuses a prompt's cache
        return rng.integers(3, min(cfg.vocab_size, 30000), (n, args.prompt_tokens)).tolist()

    results = {"preset": args.preset, "parameters": cfg.num_parameters(), "weights": "bf16 random"}
    print(f"{args.preset}: {cfg.num_parameters() / 1e9:.2f} B parameters, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} greedy tokens per stream", flush=True)

    def report(name, r):
        results[name] = r
        cells = ", ".join(f"{c} stream(s) {r[c]:6.2f} tok/s" for c in levels)
        print(f"{name:>22}: {cells}, peak RSS {r['peak_rss_mb']:8.0f} MB  ({r['setup']})", flush=True)

    for kind in filter(None, args.ours.split(",")):
        extra = ["--quantize", kind] if kind in ("int8", "int4") else []
        report(f"this project {kind}", bench_worker(model_dir, work, levels, fresh, args.new_tokens, extra))
    for kind in kinds:
        if kind == "q8_0" and "bf16" not in kinds:  # straight from the HF folder: no bf16 GGUF on disk
            gguf = to_gguf(llama_hf_folder(hf), work / f"{args.preset}-q8_0.gguf", "q8_0")
        else:
            base = to_gguf(llama_hf_folder(hf), work / f"{args.preset}-{'f32' if kind == 'f32' else 'bf16'}.gguf",
                           "f32" if kind == "f32" else "bf16")
            if kind in ("q8_0", "q4_0"):
                gguf = quantize(base, work / f"{args.preset}-{kind}.gguf", kind.upper())
            else:
                gguf = base
        report(f"llama.cpp {kind}", bench_llama(gguf, work, levels, fresh, args.new_tokens, args.prompt_tokens))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
