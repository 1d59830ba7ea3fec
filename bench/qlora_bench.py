"""LoRA fine-tuning of a bf16 or int8 base (QLoRA-like): the peak RSS of a LoRA run of a few steps on a
random InternLM2-1.8B-shaped checkpoint (``weights_bench``'s shape and file: bf16 safetensors), one
process per case so each peak (VmHWM) is its own, loading included.

    .venv/bin/python bench/qlora_bench.py [--shape internlm2-1.8b | --preset bench-serve]
        [--cases fp32,bf16,int8] [--steps 2] [--batch 1] [--seq 128] [--fp32-code /work/main]

Cases: ``bf16`` the base held as the file stores it, ``int8`` quantised at load (``quantize="int8"``),
``fp32`` the same file with every weight upcast to fp32 as training held it before (``--fp32-code``: a
checkout without the held base, e.g. the main branch's; by default this checkout's trainer on an fp32
copy of the file, written once). LoRA rank 8 on wq/wk/wv/wo (the trainer's defaults), on rows of
random token ids. RSS is what matters here; the step time is reported for what it is (2 shared cores).
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


def main() -> None:
    from weights_bench import SHAPES, make_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="internlm2-1.8b")
    ap.add_argument("--preset", help="a preset instead of --shape (e.g. bench-serve, for a quick run)")
    ap.add_argument("--cases", default="fp32,bf16,int8")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--fp32-code", help="a checkout whose trainer upcasts the base to fp32 (e.g. /work/main)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "internlm" / "weights-bench"))
    args = ap.parse_args()
    import numpy as np

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
        ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (64, args.seq + 1)).astype(np.int32)
        write_dataset(data, [{"input_ids": r, "labels": r} for r in ids], "alpaca", {})
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    print(f"{name}: {cfg.num_parameters() / 1e9:.2f}B parameters; LoRA {args.steps} steps of {args.batch} x "
          f"{args.seq}; load average {os.getloadavg()[0]:.1f}", flush=True)
    for case in args.cases.split(","):
        code, folder, quantize = str(REPO), folders["bfloat16"], ""
        if case == "fp32":
            code, folder = (args.fp32_code, folder) if args.fp32_code else (code, folders["float32"])
        elif case == "int8":
            quantize = "int8"
        shutil.rmtree(work / f"run-{case}", ignore_errors=True)  # a fresh run, not a resume of the last one
        run = subprocess.run([sys.executable, "-c", CHILD, code, str(folder), str(data), str(work / f"run-{case}"),
                              str(args.steps), str(args.batch), quantize], capture_output=True, text=True, env=env,
                             cwd="/")
        if run.returncode:
            print(f"{case}: failed (exit {run.returncode}):\n" +
                  "\n".join(line for line in run.stderr.splitlines() if "WARN" not in line)[-3000:])
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        step = f"{r['step_s']:.1f} s" if r["step_s"] is not None else "n/a (one step)"
        print(f"{case}: base {r['base']} on {r['form']} ({code}); peak RSS {r['peak_rss_mb']:.0f} MB (after load "
              f"{r['after_load_peak_mb']:.0f} MB peak, {r['after_load_rss_mb']:.0f} MB held); "
              f"load {r['load_s']:.0f} s; step {step}; losses {[round(x, 3) for x in r['losses']]}; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
