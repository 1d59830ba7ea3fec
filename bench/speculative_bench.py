"""Speculative decoding as served: tokens/s with speculation on and off, same run.

    .venv/bin/python bench/speculative_bench.py --model /root/demo-models/internlm-demo [--streams 1,8]
    .venv/bin/python bench/speculative_bench.py --model TARGET_DIR --draft-model DRAFT_DIR


One inference worker with its default settings (subprocess, gRPC on loopback; it speculates by
default where the CPU kernels serve) serves the model; each request sets ``speculate`` on or off,
so both halves run on the same worker, alternately, ``--reps`` times. Two tasks at each stream
count (``--streams``, concurrent ``Generate`` streams, each making ``--rounds`` requests one after
another, as clients of a busy worker do: one request a stream would measure the slowest stream
alone, however much faster the others finished):

  copy  a WikiText-2 passage, a blank line, then the passage's first words again: greedy, so a
        model that has learnt to repeat what it has read goes on with the passage (issue 28's
        target: >= 2.0x tokens/s at 1 stream, >= 1.3x at 8);
  free  the start of another passage, sampled (temperature 0.8, a seed per stream): little repeats
        (target: >= 0.97x, no loss where proposals fail). With ``--draft-model`` these proposals
        are the draft's samples, kept by the rejection rule (``speculative.judge``): its accepted
        column is the sampled acceptance.

Reported per task and stream count: tokens/s off and on, the ratio, and from the worker's
Prometheus series over the speculative runs: proposed and accepted tokens (acceptance rate) and the
tokens a sequence got per decode step. ``--model`` takes a model folder (the self-trained demo
model of the local stack learnt the first WikiText-2 valid articles, which the passages of
``--text valid`` come from, and to repeat a passage it has read; ``--text test``: passages it never
saw, about a third of whose tokens it never learnt); without it a ``--preset`` model with random
weights is made (small random weights make greedy text loop: proposals are kept there too).
``--draft-model`` starts the worker with that draft model (a smaller model with the target's
tokenizer; the worker's ``--speculate auto`` then takes its proposals instead of prompt lookup's),
and the acceptance and tokens per step reported are the draft's.
"""
from __future__ import annotations

import os

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

import sys  # noqa: E402
import tempfile  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serving_bench import Proc, at_once, free_port, make_model, model_arguments  # noqa: E402
from vs_llamacpp import peak_rss_mb  # noqa: E402

WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
CUE_WORDS = 8  # of the passage, after it: the copy task's cue to repeat it
MAX_CHARS = 700  # of a passage
SERIES = ("internlm_spec_decode_draft_tokens_total", "internlm_spec_decode_accepted_tokens_total",
          "internlm_spec_decode_tokens_per_step_sum", "internlm_spec_decode_tokens_per_step_count")
# the worker labels them by where the proposals came from: {method="ngram"} or {method="draft"}


def passages(n: int, chars: int, split: str = "valid") -> list[str]:
    """n paragraphs of WikiText-2 ``split`` of at least ``chars`` characters, as the demo model's
    text is made (``demo.build_corpus``: detokenised, the sentences with ``<unk>`` or digits left
    out), a longer one cut at the last sentence's end within MAX_CHARS."""
    from internlm_core.demo import build_corpus

    text = build_corpus(WIKITEXT / f"{split}.txt", max_bytes=10**9)
    paras = [p for p in text.splitlines() if len(p) >= chars and p[0] != "="]
    return [p if len(p) <= MAX_CHARS else p[:p.rfind(". ", 0, MAX_CHARS) + 1] for p in paras[:n]]


def prompts(task: str, streams: int, chars: int, split: str = "valid") -> list[str]:
    if task == "copy":
        return [p + "\n\n" + " ".join(p.split()[:CUE_WORDS]) for p in passages(streams, chars, split)]
    return [p[:chars // 4].rsplit(" ", 1)[0] for p in passages(2 * streams, chars, split)[streams:]]


def scrape(url: str, method: str) -> dict[str, float]:
    """The SERIES' values for proposals of ``method`` (ngram or draft)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = dict(line.rpartition(" ")[::2] for line in text.splitlines())
    return {name: float(values.get(f'{name}{{method="{method}"}}', 0.0)) for name in SERIES}


def main() -> None:
    ap = model_arguments(__doc__.splitlines()[0], "bench-serve")
    ap.add_argument("--streams", default="1,8", help="comma-separated concurrent stream counts")
    ap.add_argument("--reps", type=int, default=2, help="(off, on) pairs per task and stream count")
    ap.add_argument("--rounds", type=int, default=3,
                    help="requests each stream makes, one after another: a burst of one request a stream would "
                         "end with the slowest (a stream speculation cannot speed up holds the rest's time)")
    ap.add_argument("--chars", type=int, default=300, help="characters of each passage, at least")
    ap.add_argument("--spread", type=int, default=16, help="requests ask for --new-tokens +- up to this many")
    ap.add_argument("--text", choices=("valid", "test"), default="valid",
                    help="the WikiText-2 split the passages come from: valid's first paragraphs are the demo "
                         "model's own text (every token one it knows), test's are text it never saw")
    ap.add_argument("--draft-model", help="a draft model folder for the worker (--draft-model): its proposals, "
                                          "not prompt lookup's")
    args = ap.parse_args()

    import grpc

    from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
    from services.server_common import wait_healthy

    tmp = Path(tempfile.mkdtemp(prefix="speculative-bench-"))
    model = Path(args.model) if args.model else make_model(args.preset, tmp)
    port, metrics_port = free_port(), free_port()
    draft = ["--draft-model", args.draft_model] if args.draft_model else []
    method = "draft" if args.draft_model else "ngram"
    worker = Proc([sys.executable, "-m", "services.inference_worker", "--model", str(model), "--port", str(port),
                   "--metrics-port", str(metrics_port), "--redis-url", "", *draft], tmp / "worker.log")
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout=600)
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def one(job):  # one stream: its requests one after another
            texts, task, i, speculate = job
            tokens = 0
            for r, text in enumerate(texts):
                # lengths spread as real requests' are (the same in both halves): requests of one length
                # that start together run in lockstep without speculation, and finish (and their streams'
                # next prompts are prefilled) together, which real traffic never does
                spread = (7 * i + 13 * r) % (2 * args.spread + 1) - args.spread
                params = common_pb2.SamplingParams(max_new_tokens=args.new_tokens + spread, ignore_eos=True,
                                                   speculate=speculate)
                if task == "free":
                    params.temperature, params.seed = 0.8, 1000 + 100 * i + r
                tokens += sum(len(c.token_ids) for c in stub.Generate(
                    inference_pb2.GenerateRequest(text=text, params=params), timeout=600))
            return tokens

        one((prompts("copy", 1, args.chars, args.text), "copy", 0, True))  # warm
        print(f"model {model.name}, {args.rounds} requests of {args.new_tokens} +- {args.spread} new tokens a "
              f"stream, one after another, one worker with its defaults"
              f"{f' and draft model {Path(args.draft_model).name}' if args.draft_model else ''}, "
              f"{args.reps} alternating (off, on) pairs; proposals: {method}")
        print(f"  {'task':5} {'streams':>7} {'off tok/s':>10} {'on tok/s':>9} {'on/off':>7} {'accepted':>14} "
              f"{'tokens/step':>11}")
        for streams in (int(s) for s in args.streams.split(",")):
            for task in ("copy", "free"):
                texts = prompts(task, streams * args.rounds, args.chars, args.text)
                rates = {False: [], True: []}
                before = scrape(metrics_url, method)
                for _ in range(args.reps):
                    for speculate in (False, True):
                        counts, wall = at_once(one, [(texts[i::streams], task, i, speculate)
                                                     for i in range(streams)])
                        rates[speculate].append(sum(counts) / wall)
                delta = {k: v - before[k] for k, v in scrape(metrics_url, method).items()}
                drafts, kept, per_step, steps = (delta[name] for name in SERIES)
                off, on = (sum(rates[s]) / len(rates[s]) for s in (False, True))
                print(f"  {task:5} {streams:>7} {off:>10.1f} {on:>9.1f} {on / off:>6.2f}x "
                      f"{int(kept):>6}/{int(drafts):<7} {per_step / max(steps, 1):>11.2f}")
        print(f"worker peak RSS {peak_rss_mb(worker.proc.pid):.0f} MB (loading included; both halves on this worker)")
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
