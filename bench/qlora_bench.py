"""LoRA fine-tuning of a bf16 or int8 base (QLoRA-like) beside PyTorch's bf16 LoRA: the peak RSS and
step time of a LoRA run of a few steps on a random InternLM2-1.8B-shaped checkpoint (``weights_bench``'s
shape and file: bf16 safetensors), one process per case so each peak (VmHWM) is its own, loading
included.

    .venv/bin/python bench/qlora_bench.py [--shape internlm2-1.8b | --preset bench-serve | --preset tiny-v2]
        [--cases fp32,bf16,int8,torch-bf16] [--steps 2] [--batch 1] [--seq 128] [--fp32-code /work/main]

Cases: ``bf16`` the base held as the file stores it, ``int8`` quantised at load (``quantize="int8"``),
``fp32`` the same file with every weight upcast to fp32 as training held it before (``--fp32-code``: a
checkout without the held base, e.g. the main branch's; by default this checkout's trainer on an fp32
copy of the file, written once). LoRA rank 8 on wq/wk/wv/wo (the trainer's defaults), on rows of
random token ids. RSS is what matters here; the step time is reported for what it is (2 shared cores).

The reference, ``torch-bf16``: the same LoRA fine-tuning as PyTorch users run it on a CPU, the base
frozen in bf16 and the adapters fp32. HF transformers' ``LlamaForCausalLM`` (the same network:
``tests.helpers.llama_config``) holds the same file's tensors in bf16 (``dtype=torch.bfloat16``);
``train_bench``'s LoRA wrapper and AdamW loop train rank, alpha, dropout and targets, learning rate,
schedule, weight decay and clip of the trainer's defaults (``TrainArgs``) on the batches the trainer
draws (``schedule``). Its activations are bf16 as well (ours fp32), so its losses agree with ours to
bf16 rounding; the first step's (the adapters' B is zero there) is checked against ours on the tiny
model by tests/test_qlora.py. The step time is that of the second step on (the first is the
compilation for MindSpore, the allocator's warm-up for PyTorch).

No int8 PyTorch case: this environment has no int8 weight-only path that trains on a CPU. PyTorch's
int8 weight-only kernel (``torch._weight_int8pack_mm``, gpt-fast's) has no derivative, and its
dynamic quantisation (``torch.ao.quantization.quantize_dynamic``) passes no gradient to a layer's
input, so adapters below a quantised layer would not learn; PEFT's int8 LoRA needs bitsandbytes,
torchao or optimum-quanto, none of which is installed (torch 2.13 CPU, transformers, PEFT only).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
def mb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
from internlm_core.train import TrainArgs, Trainer
folder, data, work, steps, batch, quantize = sys.argv[2:8]
kw = {"quantize": quantize} if quantize else {}
args = TrainArgs(model=folder, data=data, out=work + "/out", mode="lora", max_steps=int(steps), batch_size=int(batch),
                 save_every=0, overwrite=True, **kw)
t = time.perf_counter()
trainer = Trainer(args, work + "/work")
out = {"load_s": time.perf_counter() - t, "after_load_rss_mb": mb("VmRSS:"), "after_load_peak_mb": mb("VmHWM:"),
       "base": getattr(trainer, "base", "float32 (upcast)"), "form": trainer.ops.name}
times = []
history = trainer.fit(progress=lambda r: times.append(time.perf_counter()))
out.update(peak_rss_mb=mb("VmHWM:"), losses=[r["loss"] for r in history],
           step_s=(times[-1] - times[0]) / max(len(times) - 1, 1) if len(times) > 1 else None)
print(json.dumps(out))
"""


ROWS = 64  # dataset rows of random token ids (train_bench.data_rows), labels the ids themselves
TORCH_CASE = "torch-bf16"


def trainer_batches(ids, labels, args, total: int) -> list:
    """The (input ids, labels) batches ``Trainer`` trains on, step by step, from its dataset's rows:
    its eval hold-out and data order are pure functions of the step (``schedule``). One process, no
    gradient accumulation, as in this bench."""
    from internlm_core.schedule import batch_rows, split_eval

    if args.grad_accum != 1:
        raise ValueError(f"trainer_batches reproduces grad_accum 1 only, got {args.grad_accum}")
    train, _ = split_eval(len(ids), args.eval_ratio, args.seed)
    out = []
    for step in range(total):
        rows = train[batch_rows(step, args.batch_size, len(train), args.seed)]
        out.append((ids[rows, :-1], labels[rows, 1:]))
    return out


def torch_bf16_base(folder):
    """HF's LlamaForCausalLM holding the model folder's tensors (under Llama's names) in bf16, as a
    PyTorch user loads a bf16 checkpoint (``dtype=torch.bfloat16``: the file's tensors are used as
    they are, one copy)."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from internlm_core.checkpoint import WEIGHTS_FILE, read_config
    from internlm_core.convert import hf_name
    from tests.helpers import llama_config

    cfg = read_config(Path(folder))
    if cfg.quantization:
        raise ValueError(f"{folder} holds {cfg.quantization} weights; the PyTorch case reads a bf16 folder")
    tensors = {hf_name(k): v for k, v in load_file(str(Path(folder) / WEIGHTS_FILE)).items()}
    return LlamaForCausalLM.from_pretrained(None, config=llama_config(cfg), state_dict=tensors, dtype=torch.bfloat16)


def torch_lora_run(folder, batches: list, args) -> dict:
    """The PyTorch reference: LoRA fine-tuning of the folder's base frozen in bf16 (fp32 adapters),
    one step per batch, with ``args``' (``TrainArgs``) LoRA, learning-rate schedule, weight decay
    and clip. Load time, RSS after the load, each step's loss and the time after each step."""
    import time

    import torch
    from train_bench import torch_fit, torch_lora

    from internlm_core.schedule import lr_at
    from internlm_core.train_args import TrainArgs

    args = args.resolved()
    if args.lora_targets != TrainArgs.lora_targets or tuple(args.betas) != (0.9, 0.999) or args.eps != 1e-8:
        raise ValueError("the PyTorch case trains the trainer's default LoRA targets (wq|wk|wv|wo) with AdamW's "
                         f"default betas and eps; got targets {args.lora_targets!r}, betas {args.betas}, "
                         f"eps {args.eps}")
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    model = torch_bf16_base(folder)
    out = {"load_s": time.perf_counter() - t, "after_load_rss_mb": _mb("VmRSS:"), "after_load_peak_mb": _mb("VmHWM:")}
    adapters = torch_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout)
    lrs = [lr_at(s, len(batches), args.lr, args.warmup_ratio, args.min_lr_ratio) for s in range(len(batches))]
    stamps, losses = torch_fit(model, [{"params": adapters, "weight_decay": args.weight_decay}], batches, lrs,
                               args.grad_clip)
    return {**out, "losses": losses, "stamps": stamps}


def _mb(key: str) -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024


def torch_worker(folder: str, data: str, steps: int, batch: int, seq: int) -> None:
    """The torch-bf16 case in this process (a child of the bench): its result as a JSON line."""
    import torch
    from train_bench import data_rows

    from internlm_core.checkpoint import read_config
    from internlm_core.train_args import TrainArgs

    args = TrainArgs(model=folder, data=data, out="-", mode="lora", max_steps=steps, batch_size=batch)
    ids = data_rows(ROWS, seq, read_config(Path(folder)).vocab_size)  # the rows the dataset was written from
    r = torch_lora_run(folder, trainer_batches(ids, ids, args, steps), args)
    times = r.pop("stamps")
    print(json.dumps({**r, "base": "bfloat16", "form": f"HF transformers LlamaForCausalLM, torch {torch.__version__}",
                      "peak_rss_mb": _mb("VmHWM:"),
                      "step_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None}))


def main() -> None:
    from weights_bench import SHAPES, make_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="internlm2-1.8b")
    ap.add_argument("--preset", help="a preset instead of --shape (e.g. bench-serve, for a quick run)")
    ap.add_argument("--cases", default=f"fp32,bf16,int8,{TORCH_CASE}")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--fp32-code", help="a checkout whose trainer upcasts the base to fp32 (e.g. /work/main)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "internlm" / "weights-bench"))
    ap.add_argument("--torch-worker", nargs=2, metavar=("FOLDER", "DATA"), help=argparse.SUPPRESS)  # a child's part
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(*args.torch_worker, args.steps, args.batch, args.seq)
        return
    unknown = set(args.cases.split(",")) - {"fp32", "bf16", "int8", TORCH_CASE}
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from fp32, bf16, int8, {TORCH_CASE}")
    from train_bench import data_rows

    from internlm_core.config import Config
    from internlm_core.data import write_dataset

    name = args.preset or args.shape
    cfg = Config.from_name(args.preset) if args.preset else Config.from_name(SHAPES[name][0], **SHAPES[name][1])
    work = Path(args.work)
    folders = {}
    for dtype in ("bfloat16",) + (("float32",) if "fp32" in args.cases and not args.fp32_code else ()):
        folders[dtype] = work / f"{name}-{dtype}"
        if not (folders[dtype] / "config.json").is_file():
            make_checkpoint(folders[dtype], cfg, dtype)
    data = work / f"{name}-rows-{args.seq}"
    if not data.is_dir():
        ids = data_rows(ROWS, args.seq, cfg.vocab_size)
        write_dataset(data, [{"input_ids": r, "labels": r} for r in ids], "alpaca", {})
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    print(f"{name}: {cfg.num_parameters() / 1e9:.2f}B parameters; LoRA {args.steps} steps of {args.batch} x "
          f"{args.seq}; load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for case in args.cases.split(","):
        code, folder, quantize = str(REPO), folders["bfloat16"], ""
        if case == "fp32":
            code, folder = (args.fp32_code, folder) if args.fp32_code else (code, folders["float32"])
        elif case == "int8":
            quantize = "int8"
        if case == TORCH_CASE:
            code = "PyTorch"
            command = [str(Path(__file__).resolve()), "--torch-worker", str(folder), str(data), "--steps",
                       str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        else:
            shutil.rmtree(work / f"run-{case}", ignore_errors=True)  # a fresh run, not a resume of the last one
            command = ["-c", CHILD, code, str(folder), str(data), str(work / f"run-{case}"), str(args.steps),
                       str(args.batch), quantize]
        run = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, cwd="/")
        if run.returncode:
            print(f"{case}: failed (exit {run.returncode}):\n" +
                  "\n".join(line for line in run.stderr.splitlines() if "WARN" not in line)[-3000:])
            continue
        r = results[case] = json.loads(run.stdout.strip().splitlines()[-1])
        step = f"{r['step_s']:.2f} s" if r["step_s"] is not None else "n/a (one step)"
        print(f"{case}: base {r['base']} on {r['form']} ({code}); peak RSS {r['peak_rss_mb']:.0f} MB (after load "
              f"{r['after_load_peak_mb']:.0f} MB peak, {r['after_load_rss_mb']:.0f} MB held); "
              f"load {r['load_s']:.0f} s; step {step}; losses {[round(x, 3) for x in r['losses']]}; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    ref = results.get(TORCH_CASE)
    for case, r in results.items():
        if ref and case != TORCH_CASE:
            step = (f"step time {r['step_s'] / ref['step_s']:.2f}x" if r["step_s"] and ref["step_s"]
                    else "step time n/a (one step)")
            print(f"{case} / {TORCH_CASE}: peak RSS {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x, {step}; first loss "
                  f"{r['losses'][0]:.4f} vs {ref['losses'][0]:.4f}")


if __name__ == "__main__":
    main()
