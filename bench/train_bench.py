"""Training throughput: this project's MindSpore trainer vs PyTorch, same model, same data, one run.

Full and LoRA fine-tuning of the "bench-100m" InternLM shape (vocab 32000, hidden 768,
8 layers, q/k/v/o bias; ~106M parameters). Each of the four cases runs in its own
subprocess so its peak RSS is its own:

- ms-full / ms-lora: ``internlm_core.train.Trainer`` (graph-mode step, AdamWeightDecay,
  grad clipping, LoRA rank 8 on wq/wk/wv/wo with dropout), on a MindRecord dataset.
- torch-full / torch-lora: HF ``LlamaForCausalLM(attention_bias=True)`` (the same network),
  ``torch.optim.AdamW``, ``clip_grad_norm_``, and a hand-written LoRA wrapper with the same
  rank/alpha/dropout on q/k/v/o, eager mode.

Both sides get the same rows of random token ids and the same batch and sequence length.
Tokens/s counts input tokens (batch x seq) of the timed steps; the first step (compilation
for MindSpore, allocator warm-up for torch) is not timed.

    .venv/bin/python bench/train_bench.py --steps 4 --batch 1 --seq 128 --reps 2 [--json out.json]
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
LORA = dict(rank=8, alpha=16.0, dropout=0.05)


def data_rows(n: int, seq: int, vocab: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, (n, seq + 1)).astype(np.int32)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss can carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- MindSpore: the project's trainer ------------------------------------------------------------

def run_ms(mode: str, steps: int, batch: int, seq: int, lr: float) -> dict:
    from internlm_core.config import Config
    from internlm_core.data import write_dataset
    from internlm_core.loader import save_model
    from internlm_core.model import InternLMForCausalLM, init_weights
    from internlm_core.train import TrainArgs, Trainer

    cfg = Config.from_name("bench-100m")
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp = Path(tmp)
        model = InternLMForCausalLM(cfg)
        init_weights(model, seed=0)
        save_model(model, cfg, tmp / "base")
        del model
        rows = data_rows(batch * (steps + 1), seq, cfg.vocab_size)
        write_dataset(tmp / "data", [{"input_ids": r} for r in rows], "wikitext", {})
        args = TrainArgs(model=str(tmp / "base"), data=str(tmp / "data"), out=str(tmp / "out"), mode=mode, lr=lr,
                         max_steps=steps + 1, batch_size=batch, save_every=0, warmup_ratio=0.0,
                         lora_rank=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"])
        trainer = Trainer(args, tmp / "work")
        stamps, losses = [], []
        trainer.fit(progress=lambda r: (stamps.append(time.perf_counter()), losses.append(r["loss"])))
        return {"tokens_per_s": batch * seq * (len(stamps) - 1) / (stamps[-1] - stamps[0]), "losses": losses,
                "peak_rss_mb": peak_rss_mb()}


# ---- PyTorch: HF Llama with attention bias ---------------------------------------------------------

def run_torch(mode: str, steps: int, batch: int, seq: int, lr: float) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from internlm_core.config import Config

    cfg = Config.from_name("bench-100m")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, attention_bias=True,
        tie_word_embeddings=False, attn_implementation="sdpa"))
    model.train()
    if mode == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, TorchLoRA(getattr(layer.self_attn, name), **LORA))
        decay = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": decay, "weight_decay": 0.01}]
    else:
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    rows = torch.from_numpy(data_rows(batch * (steps + 1), seq, cfg.vocab_size)).long()
    stamps, losses = [], []
    for step in range(steps + 1):
        x = rows[step * batch:(step + 1) * batch]
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        stamps.append(time.perf_counter())
    return {"tokens_per_s": batch * seq * (len(stamps) - 1) / (stamps[-1] - stamps[0]), "losses": losses,
            "peak_rss_mb": peak_rss_mb()}


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
            return self.base(x) + (self.drop(x) @ self.lora_a.T @ self.lora_b.T) * self.scaling

    return LoRALinear()


# ---- driver ------------------------------------------------------------------------------------

def worker(case: str, steps: int, batch: int, seq: int) -> None:
    side, mode = case.split("-")
    lr = 1e-5 if mode == "full" else 5e-5
    result = (run_ms if side == "ms" else run_torch)(mode, steps, batch, seq, lr)
    print("RESULT " + json.dumps({"case": case, **result}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per case (one more runs untimed first)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--reps", type=int, default=2, help="alternating repetitions of every case (median reported)")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.steps, a.batch, a.seq)
        return 0
    import numpy as np

    # The machine is shared: cases alternate over the repetitions and each reports its median.
    runs: dict[str, list] = {}
    for rep in range(a.reps):
        for case in a.cases.split(","):
            t0 = time.time()
            out = subprocess.run([sys.executable, __file__, "--worker", case, "--steps", str(a.steps), "--batch",
                                  str(a.batch), "--seq", str(a.seq)], capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "GLOG_v": "3"})
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{case} failed")
            r = json.loads(line[7:])
            runs.setdefault(case, []).append(r)
            print(f"rep {rep + 1} {case:11s} {r['tokens_per_s']:8.1f} tokens/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                  f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}  ({time.time() - t0:.0f} s wall)", flush=True)
    results = {case: {"tokens_per_s": float(np.median([r["tokens_per_s"] for r in rs])),
                      "all_tokens_per_s": [r["tokens_per_s"] for r in rs],
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for case, rs in runs.items()}
    for case, r in results.items():
        print(f"median {case:11s} {r['tokens_per_s']:8.1f} tokens/s  peak RSS {r['peak_rss_mb']:7.0f} MB")
    for mode in ("full", "lora"):
        if f"ms-{mode}" in results and f"torch-{mode}" in results:
            ratio = results[f"ms-{mode}"]["tokens_per_s"] / results[f"torch-{mode}"]["tokens_per_s"]
            print(f"{mode}: MindSpore / PyTorch tokens/s = {ratio:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"steps": a.steps, "batch": a.batch, "seq": a.seq, "reps": a.reps,
                                            "results": results},
                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
