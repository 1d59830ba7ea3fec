"""``internlm preprocess``, ``finetune``, ``merge-lora`` and ``demo-model``: the training core, locally."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from internlm_core.train_logs import LOSS_PLOT

DEFAULT_MODELS = Path(__file__).resolve().parents[2] / "var" / "store" / "models"  # the launcher's default


def register(sub) -> None:
    p = sub.add_parser("preprocess", help="Alpaca JSON or WikiText text -> MindRecord dataset folder")
    p.add_argument("kind", choices=["alpaca", "wikitext"])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path, help="dataset folder to create (data.mindrecord + stats.json)")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per row (rows hold seq_length+1)")
    p.add_argument("--mode", help="wikitext: pack (default; full rows) or line (MindFormers' one line per row)")
    p.add_argument("--min-length", type=int, default=50, help="wikitext line mode: shortest line kept")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: the bundled InternLM one)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=preprocess)

    f = sub.add_parser("finetune", help="full or LoRA fine-tuning of a model folder on a dataset folder")
    f.add_argument("--model", required=True, help="base model folder")
    f.add_argument("--data", required=True, help="dataset folder from 'internlm preprocess'")
    f.add_argument("--out", required=True, help="output: a model folder, or an adapter folder with --lora")
    f.add_argument("--work", help="checkpoint folder; a rerun resumes from it (default: .<out>.work beside --out)")
    f.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    add_hyperparameter_flags(f)
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    f.set_defaults(func=finetune)

    m = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model: a full model folder")
    m.add_argument("base", type=Path)
    m.add_argument("adapter", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=merge_lora)

    d = sub.add_parser("demo-model", help="train (once) and print the self-trained demo model's folder")
    d.add_argument("--root", type=Path, default=DEFAULT_MODELS, help=f"models folder (default {DEFAULT_MODELS})")
    d.set_defaults(func=demo_model)


def preprocess(args) -> int:
    from tqdm import tqdm

    from internlm_core.data import preprocess as run
    from internlm_core.tokenizer import Tokenizer

    bar = tqdm(total=0, unit="rec", desc=f"preprocess {args.kind}", file=sys.stderr)

    def progress(done, total):
        bar.total, bar.n = total, done
        bar.refresh()

    stats = run(args.kind, args.src, args.dst, args.seq_length, args.mode,
                tokenizer=Tokenizer(args.tokenizer) if args.tokenizer else None, progress=progress,
                overwrite=args.overwrite, min_length=args.min_length)
    bar.close()
    print(json.dumps(stats))
    return 0


def add_hyperparameter_flags(parser, names: dict[str, str] | None = None) -> None:
    """One flag per ``TrainArgs`` hyperparameter, with its help; ``names`` renames some (the job
    API's names). Unset flags keep the trainer's defaults."""
    import dataclasses

    from internlm_core.train_args import HYPERPARAMS, TrainArgs

    fields = {f.name: f for f in dataclasses.fields(TrainArgs)}
    for name in HYPERPARAMS:
        f = fields[name]
        flag = (names or {}).get(name, name)
        if f.type == "bool":  # a switch; unset (None) keeps the default, off
            parser.add_argument("--" + flag.replace("_", "-"), dest=flag, action="store_true", default=None,
                                help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float, "float | None": float}.get(f.type, str)  # "auto" / numbers: parsed later
        default = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, help=f.metadata["help"] + default)


def train_args(args):
    from internlm_core.train_args import HYPERPARAMS, TrainArgs

    kw = {k: getattr(args, k) for k in HYPERPARAMS if getattr(args, k) is not None}
    return TrainArgs(model=args.model, data=args.data, out=args.out, mode="lora" if args.lora else "full",
                     overwrite=args.overwrite, **kw).validate()


def finetune(args) -> int:
    from tqdm import tqdm

    from internlm_core.checkpoint import Cancelled
    from internlm_core.train import finetune as run

    targs = train_args(args)
    out = Path(targs.out)
    work = Path(args.work) if args.work else out.parent / f".{out.name}.work"
    stop = []
    # Ctrl-C asks the trainer to stop between steps; it checkpoints so the same command resumes.
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    bar = tqdm(total=0, unit="step", desc=f"finetune ({targs.mode})", file=sys.stderr)

    def progress(r):
        bar.total, bar.n = r["total"], r["step"]
        post = f"loss {r['loss']:.4f} lr {r['lr']:.2e} {r['tokens_per_s']:.0f} tok/s"
        if "eval_loss" in r:
            post += f" eval {r['eval_loss']:.4f} ppl {r['eval_ppl']:.1f}"
        bar.set_postfix_str(post, refresh=False)
        bar.refresh()

    try:
        folder = run(targs, work, progress=progress, cancel=lambda: bool(stop))
    except Cancelled as e:
        bar.close()
        print(f"stopped: {e}. Run the same command to resume from {work}.", file=sys.stderr)
        return 130
    bar.close()
    print(f"wrote {folder} (loss curve: {folder / LOSS_PLOT}; checkpoints in {work})")
    return 0


def merge_lora(args) -> int:
    from internlm_core.lora import merge_lora as run

    print(f"wrote {run(args.base, args.adapter, args.out, overwrite=args.overwrite)}")
    return 0


def demo_model(args) -> int:
    from tqdm import tqdm

    from internlm_core.demo import ensure_demo_model

    bar = tqdm(total=0, unit="step", desc="demo model", file=sys.stderr, disable=None)

    def progress(r):
        if r.get("stage") == "train":
            bar.total, bar.n = r["total"], r["step"]
            bar.set_postfix_str(f"loss {r['loss']:.3f}", refresh=False)
            bar.refresh()

    folder = ensure_demo_model(args.root, progress=progress)
    bar.close()
    print(folder)
    return 0
