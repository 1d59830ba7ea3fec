"""Training throughput and memory: this project's MindSpore trainer vs PyTorch, same model, same data, one run.

Full and LoRA fine-tuning of the "bench-100m" InternLM shape (vocab 32000, hidden 768,
8 layers, q/k/v/o bias; ~106M parameters) at several batch x sequence shapes (by default
1 x 128, 2 x 256 and 4 x 512). Every case of every shape runs in its own subprocess, so that its
peak RSS is its own:

- ms-full / ms-lora: ``internlm_core.train.Trainer`` (graph-mode step, AdamW, grad clipping,
  LoRA rank 8 on wq/wk/wv/wo with dropout), on a MindRecord dataset; ``--recompute`` turns on
  its activation recomputation (MindSpore only).
- torch-full / torch-lora: HF ``LlamaForCausalLM(attention_bias=True)`` (the same network),
  ``torch.optim.AdamW``, ``clip_grad_norm_``, and a hand-written LoRA wrapper with the same
  rank/alpha/dropout on q/k/v/o, eager mode.

Both sides get the same rows of random token ids. The base model and each shape's dataset are
written beforehand by a subprocess of their own, so a MindSpore case's peak RSS is its training
(loading the model included), as a torch case's is (building the model included). Tokens/s counts
input tokens (batch x seq) of the timed steps; the first step (compilation for MindSpore,
allocator warm-up for torch) is not timed. Cases alternate over the repetitions; each reports its
median tokens/s and its largest peak RSS.

    .venv/bin/python bench/train_bench.py --shapes 1x128,2x256,4x512 --steps 6 --reps 3 [--recompute] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CASES = ("ms-full", "ms-lora", "torch-full", "torch-lora")
SHAPES = "1x128,2x256,4x512"
LORA = dict(rank=8, alpha=16.0, dropout=0.05)
PRESET = "bench-100m"


def data_rows(n: int, seq: int, vocab: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, (n, seq + 1)).astype(np.int32)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss can carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"1x128,2x256" -> [(1, 128), (2, 256)]: batch x sequence length."""
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes are BATCHxSEQ separated by commas, e.g. {SHAPES}; got {text!r}")
    return shapes


# ---- MindSpore: the project's trainer ------------------------------------------------------------

def prepare(folder: Path, steps: int, batch: int, seq: int) -> None:
    """The base model (once) and this shape's dataset, for the MindSpore cases."""
    from internlm_core.config import Config
    from internlm_core.data import write_dataset
    from internlm_core.loader import save_model
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = Config.from_name(PRESET)
    if not (folder / "base").is_dir():
        model = InternLMForCausalLM(cfg)
        init_weights(model, seed=0)
        save_model(model, cfg, folder / "base")
    rows = data_rows(batch * (steps + 1), seq, cfg.vocab_size)
    write_dataset(folder / f"data-{batch}x{seq}", [{"input_ids": r} for r in rows], "wikitext", {})


def run_ms(mode: str, steps: int, batch: int, seq: int, lr: float, folder: Path, recompute: bool) -> dict:
    from internlm_core.train import TrainArgs, Trainer

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        args = TrainArgs(model=str(folder / "base"), data=str(folder / f"data-{batch}x{seq}"), out=f"{tmp}/out",
                         mode=mode, lr=lr, max_steps=steps + 1, batch_size=batch, save_every=0, warmup_ratio=0.0,
                         lora_rank=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                         recompute=recompute)
        trainer = Trainer(args, f"{tmp}/work")
        stamps, losses = [], []
        trainer.fit(progress=lambda r: (stamps.append(time.perf_counter()), losses.append(r["loss"])))
        return {"tokens_per_s": batch * seq * (len(stamps) - 1) / (stamps[-1] - stamps[0]), "losses": losses,
                "peak_rss_mb": peak_rss_mb()}


# ---- PyTorch: HF Llama with attention bias ---------------------------------------------------------

def run_torch(mode: str, steps: int, batch: int, seq: int, lr: float) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from internlm_core.config import Config

    cfg = Config.from_name(PRESET)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, attention_bias=True,
        tie_word_embeddings=False, attn_implementation="sdpa"))
    if mode == "lora":
        groups = [{"params": torch_lora(model, **LORA), "weight_decay": 0.01}]
    else:
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    rows = data_rows(batch * (steps + 1), seq, cfg.vocab_size)
    batches = [(x[:, :-1], x[:, 1:]) for x in (rows[s * batch:(s + 1) * batch] for s in range(steps + 1))]
    stamps, losses = torch_fit(model, groups, batches, [lr] * len(batches))
    return {"tokens_per_s": batch * seq * (len(stamps) - 1) / (stamps[-1] - stamps[0]), "losses": losses,
            "peak_rss_mb": peak_rss_mb()}


def torch_lora(model, rank: int, alpha: float, dropout: float) -> list:
    """Freeze an HF Llama ``model`` and wrap q/k/v/o of every layer in a LoRA of its own (the
    trainer's default targets); the adapters' parameters, the only ones trained."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, TorchLoRA(getattr(layer.self_attn, name), rank, alpha, dropout))
    return [p for p in model.parameters() if p.requires_grad]


def torch_fit(model, groups: list[dict], batches: list, lrs: list[float], clip: float = 1.0) -> tuple[list, list]:
    """One ``torch.optim.AdamW`` step (global-norm clip ``clip``, learning rate ``lrs[i]``) per
    (input ids, labels) batch of numpy arrays, labels -100 where not trained, in train mode;
    (the time after each step, each step's loss)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(groups, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8)
    stamps, losses = [], []
    for (ids, labels), lr in zip(batches, lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(input_ids=torch.from_numpy(ids).long()).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 torch.from_numpy(labels).long().reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        stamps.append(time.perf_counter())
    return stamps, losses


def TorchLoRA(base, rank: int, alpha: float, dropout: float):
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.lora_a = torch.nn.Parameter(torch.empty(rank, base.in_features).uniform_(-1, 1) / base.in_features ** 0.5)
            self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
            self.drop = torch.nn.Dropout(dropout)
            self.scaling = alpha / rank

        def forward(self, x):
            # The adapters are fp32 whatever the base: on a bf16 base the input is bf16, taken to
            # fp32 for the adapter and its update back to the base's output dtype (as PEFT does)
            update = self.drop(x).to(self.lora_a.dtype) @ self.lora_a.T @ self.lora_b.T
            return self.base(x) + (update * self.scaling).to(x.dtype)

    return LoRALinear()


# ---- driver ------------------------------------------------------------------------------------

def worker(a) -> None:
    side, mode = a.worker.split("-")
    lr = 1e-5 if mode == "full" else 5e-5
    if side == "ms":
        result = run_ms(mode, a.steps, a.batch, a.seq, lr, Path(a.folder), a.recompute)
    else:
        result = run_torch(mode, a.steps, a.batch, a.seq, lr)
    print("RESULT " + json.dumps({"case": a.worker, **result}), flush=True)


def subprocess_run(args: list[str], what: str) -> str:
    """Run this script with ``args`` in a fresh process; its stdout (exit on failure, with its output)."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "GLOG_v": "3"})
    if out.returncode != 0:
        print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{what} failed")
    return out.stdout


def bench_shape(a, folder: Path, batch: int, seq: int, cases: list[str]) -> dict:
    """One shape: every case over the repetitions; medians, then MindSpore / PyTorch ratios."""
    import numpy as np

    shape = ["--steps", str(a.steps), "--batch", str(batch), "--seq", str(seq)]
    if any(c.startswith("ms-") for c in cases):
        subprocess_run(["--prepare", str(folder), *shape], f"writing the {batch}x{seq} dataset")
    runs: dict[str, list] = {}
    for rep in range(a.reps):  # the machine may be shared: cases alternate over the repetitions
        for case in cases:
            t0 = time.time()
            extra = ["--folder", str(folder)] + (["--recompute"] if a.recompute else [])
            stdout = subprocess_run(["--worker", case, *shape, *extra], f"{case} {batch}x{seq}")
            line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{case} {batch}x{seq} printed no result:\n{stdout[-2000:]}")
            r = json.loads(line[7:])
            runs.setdefault(case, []).append(r)
            print(f"  rep {rep + 1} {case:11s} {r['tokens_per_s']:8.1f} tokens/s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB  loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}  "
                  f"({time.time() - t0:.0f} s wall)", flush=True)
    results = {case: {"tokens_per_s": float(np.median([r["tokens_per_s"] for r in rs])),
                      "all_tokens_per_s": [r["tokens_per_s"] for r in rs],
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for case, rs in runs.items()}
    ratios = {}
    for mode in ("full", "lora"):
        ms_r, torch_r = results.get(f"ms-{mode}"), results.get(f"torch-{mode}")
        if ms_r and torch_r:
            ratios[mode] = {"tokens_per_s": ms_r["tokens_per_s"] / torch_r["tokens_per_s"],
                            "peak_rss": ms_r["peak_rss_mb"] / torch_r["peak_rss_mb"]}
    return {"batch": batch, "seq": seq, "results": results, "ratios": ratios}


def print_table(r: dict, reps: int) -> None:
    print(f"\n{r['batch']} x {r['seq']}: median of {reps} rep(s)")
    print(f"  {'case':11s} {'tokens/s':>10s} {'peak RSS MB':>12s}")
    for case, x in r["results"].items():
        print(f"  {case:11s} {x['tokens_per_s']:10.1f} {x['peak_rss_mb']:12.0f}")
    for mode, x in r["ratios"].items():
        print(f"  {mode}: MindSpore / PyTorch  tokens/s {x['tokens_per_s']:.2f}x  peak RSS {x['peak_rss']:.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes(SHAPES),
                   help=f"batch x sequence length, comma separated (default {SHAPES})")
    p.add_argument("--steps", type=int, default=4, help="timed steps per case (one more runs untimed first)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma separated, of {', '.join(CASES)}")
    p.add_argument("--reps", type=int, default=2, help="alternating repetitions of every case (median reported)")
    p.add_argument("--recompute", action="store_true", help="MindSpore recomputes activations in the backward pass")
    p.add_argument("--json", help="write every shape's results here too")
    for hidden in ("--worker", "--prepare", "--folder"):  # a subprocess's part
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.prepare:
        prepare(Path(a.prepare), a.steps, a.batch, a.seq)
        return 0
    if a.worker:
        worker(a)
        return 0
    if a.batch or a.seq:  # the old form (README's earlier figures): say so rather than run other shapes
        p.error(f"--batch/--seq are a subprocess's; give --shapes {a.batch or 1}x{a.seq or 128}")
    cases = a.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")

    shapes = []
    with tempfile.TemporaryDirectory(prefix="train-bench-") as folder:
        for batch, seq in a.shapes:
            print(f"{batch} x {seq}", flush=True)
            shapes.append(bench_shape(a, Path(folder), batch, seq, cases))
    for r in shapes:
        print_table(r, a.reps)
    if a.json:
        Path(a.json).write_text(json.dumps({"preset": PRESET, "steps": a.steps, "reps": a.reps,
                                            "recompute": a.recompute, "shapes": shapes}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
