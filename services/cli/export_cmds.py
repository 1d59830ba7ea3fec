"""``internlm export``: a model folder -> MindIR prefill/decode graphs (``internlm generate --model`` runs them)."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model folder to MindIR prefill + decode graphs with a manifest")
    p.add_argument("model_dir")
    p.add_argument("dst")
    p.add_argument("--max-batch", type=int, default=1,
                   help="KV-cache slots (static shape, or the default if --dynamic)")
    p.add_argument("--max-len", type=int, help="KV-cache positions (default: the model's max positions)")
    p.add_argument("--dynamic", action="store_true",
                   help="declare batch, prompt length and cache length dynamic (sizes chosen when loading)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=export)


def export(args) -> int:
    from tqdm import tqdm

    from internlm_core.export import export_mindir
    from internlm_core.exported import read_manifest

    bar = tqdm(total=4, desc="export", file=sys.stderr)

    def progress(done, total, step):
        bar.total, bar.n = total, done
        bar.set_postfix_str(step, refresh=False)
        bar.refresh()

    dst = export_mindir(args.model_dir, args.dst, max_batch=args.max_batch, max_len=args.max_len,
                        dynamic=args.dynamic, overwrite=args.overwrite, progress=progress)
    bar.close()
    m = read_manifest(dst)
    shape = "dynamic" if m["dynamic"] else "static"
    print(f"wrote {dst} ({m['preset']}, {shape} shapes, {m['max_batch']} slots x {m['max_len']} positions)")
    return 0
