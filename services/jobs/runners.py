"""Each kind of job's runner: run in a job worker, one core call that writes into ``ctx.staging``
(or ``ctx.work_dir``) and publishes it; its arguments re-read with the checks' helpers
(``checks.py``). MindSpore is imported inside the runners that need it: the table of kinds
(``kinds.py``), which the endpoint reads too, names these functions, and the endpoint must not load
MindSpore (a worker loads it with its first job).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from internlm_core.checkpoint import read_config
from internlm_core.config import Config
from internlm_core.store import DATASETS, MODELS

from .checks import finetune_base, model_folder, preprocess_args, train_args


def run_convert(req: dict, ctx) -> dict:
    from internlm_core.convert import hf_to_ms

    src = ctx.store.source_path(req["source"])
    if not ctx.staging.is_dir():  # a previous execution may have finished it before being killed
        ctx.clear_partial()
        # work_dir survives a killed execution: the next one keeps the tensors already written and verified.
        hf_to_ms(src, ctx.staging, dtype=req.get("dtype") or None, quantize=req.get("quantize") or None,
                 progress=lambda done, total, name: ctx.progress(bytes_done=done, bytes_total=total,
                                                                 message=name),
                 cancel=ctx.cancelled, work_dir=ctx.work_dir)
    cfg = read_config(ctx.staging)
    ctx.publish(MODELS, req["output"], req.get("overwrite", False))
    return {"parameters": cfg.num_parameters(), "dtype": cfg.dtype, "preset": cfg.name,
            **({"quantization": cfg.quantization} if cfg.quantization else {})}


def run_preprocess(req: dict, ctx) -> dict:
    from internlm_core import data
    from internlm_core.tokenizer import Tokenizer

    kw = preprocess_args(req, ctx.store)
    path = kw.pop("tokenizer_path", None)
    if not ctx.staging.is_dir():
        ctx.clear_partial()
        stats = data.preprocess(dst=ctx.staging, tokenizer=Tokenizer(path) if path else None,
                                progress=ctx.count_progress, cancel=ctx.cancelled, **kw)
    else:
        stats = {}
    ctx.publish(DATASETS, req["output"], req.get("overwrite", False))
    return _plain(stats)


def run_finetune(req: dict, ctx) -> dict:
    from internlm_core.train import finetune
    from internlm_core.train_state import checkpoint_step

    base = finetune_base(req, ctx.store, ctx.job_dir)
    if req.get("preset") and not base.is_dir():
        _init_model(req["preset"], req.get("seed", 0), base)
    args = train_args(req, ctx.store, base, ctx.staging)
    resumed = None
    if not ctx.staging.is_dir():  # else an earlier execution finished training and died before publishing
        ctx.clear_partial()
        ctx.work_dir.mkdir(exist_ok=True)  # checkpoints: kept across executions, so a re-run resumes
        resumed = checkpoint_step(ctx.work_dir)
        if resumed is not None:
            ctx.progress(force=True, message=f"resuming from the checkpoint of step {resumed}")
        finetune(args, ctx.work_dir, progress=ctx.train_progress, cancel=ctx.cancelled)
    summary = ctx.staging / "training.json"
    result = json.loads(summary.read_text()) if summary.is_file() else {}
    ctx.publish(MODELS, req["output"], req.get("overwrite", False))
    return {**{k: result.get(k) for k in ("steps", "final_loss", "eval_loss")}, "resumed_from_step": resumed}


def _init_model(preset: str, seed: int, folder: Path) -> None:
    """A seeded random model of ``preset`` (the same on every execution of the job)."""
    from internlm_core.loader import save_model
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = Config.from_name(preset)
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=seed, std=0.02)
    save_model(model, cfg, folder, overwrite=True)


def run_export(req: dict, ctx) -> dict:
    from internlm_core import export

    src = model_folder(ctx.store, req["model"])
    kw = {k: req[k] for k in ("max_batch", "max_len", "dynamic") if k in req}
    if not ctx.staging.is_dir():
        ctx.clear_partial()
        export.export_mindir(src, ctx.staging, progress=ctx.count_progress, cancel=ctx.cancelled, **kw)
    ctx.publish(MODELS, req["output"], req.get("overwrite", False))
    return {"graphs": sorted(p.name for p in ctx.store.model_path(req["output"]).glob("*.mindir"))}


def _plain(obj) -> dict:
    """A JSON-able dict from whatever the core returned (dict, dataclass, None)."""
    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, dict):
        obj = {"result": obj}
    return json.loads(json.dumps(obj, default=str))
