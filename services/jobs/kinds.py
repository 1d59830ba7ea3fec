"""Each kind of job: check its request (before queueing) and run it (one core call, in a worker).

A request is the plain dict of the job's protobuf message (unset optional fields absent), so the
workers need no protobuf. ``check_*`` raise ``PathError``/``ValueError`` (INVALID_ARGUMENT),
``FileNotFoundError`` (NOT_FOUND) or ``FileExistsError`` (ALREADY_EXISTS) and return the store
path the job will publish; ``TooLarge`` (INVALID_ARGUMENT) for what is beyond ``settings.LIMITS``
or this machine's memory. ``run_*`` write into ``ctx.staging`` (or ``ctx.work_dir``) and publish it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from internlm_core.checkpoint import read_config
from internlm_core.config import DTYPES, Config
from internlm_core.errors import TooLarge
from internlm_core.memory import available_memory, conversion_bytes, require_fits, training_bytes
from internlm_core.quantize import METHODS
from internlm_core.store import DATASETS, MODELS, Store, check_name
from internlm_core.train_args import HYPERPARAMS, TrainArgs

from .settings import LIMITS


def _output(store: Store, area: str, req: dict) -> str:
    name = check_name(req.get("output", ""), "output")
    if store.item_path(area, name, must_exist=False).exists() and not req.get("overwrite"):
        raise FileExistsError(f"{area}/{name} already exists (set overwrite to replace it)")
    return f"{area}/{name}"


def _at_most(values: dict, *fields: str) -> None:
    """TooLarge naming the first of ``fields`` whose value in ``values`` is above its limit."""
    for field in fields:
        if values.get(field) is not None and values[field] > LIMITS[field]:
            raise TooLarge(f"{field} {values[field]} is above the limit of {LIMITS[field]}")


def _model_folder(store: Store, name: str, what: str = "model") -> Path:
    from internlm_core.convert import is_model_folder

    path = store.model_path(check_name(name, what))
    if not is_model_folder(path):
        raise ValueError(f"{what} {name!r} is not a model folder (config.json + model.safetensors)")
    return path


# ---- convert: HF folder -> models/<output> ----------------------------------------------------

def check_convert(req: dict, store: Store) -> str:
    from internlm_core.convert import open_weights
    from internlm_core.config import CONFIG_FILE

    src = store.source_path(req.get("source", ""))
    if not src.is_dir():
        raise ValueError(f"source {req['source']!r} is not a folder")
    if not (src / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"source {req['source']!r} has no {CONFIG_FILE}")
    if req.get("dtype") and req["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {req['dtype']!r}")
    if req.get("quantize") and req["quantize"] not in METHODS:
        raise ValueError(f"quantize must be one of {', '.join(METHODS)}, got {req['quantize']!r}")
    cfg = Config.from_hf_config(src / CONFIG_FILE)  # ConfigError: the config does not describe a model
    require_fits(f"converting {cfg.name} (its largest tensor, widened to float32)", conversion_bytes(cfg),
                 available_memory())
    if any(src.glob("*.safetensors")):
        open_weights(src)  # reads headers only: a truncated or corrupt file is caught here
    elif not any(src.glob("pytorch_model*.bin")):
        raise ValueError(f"source {req['source']!r} has no *.safetensors or pytorch_model*.bin weights")
    return _output(store, MODELS, req)


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
    cfg = _read_config(ctx.staging)
    ctx.publish(MODELS, req["output"], req.get("overwrite", False))
    return {"parameters": cfg.num_parameters(), "dtype": cfg.dtype, "preset": cfg.name,
            **({"quantization": cfg.quantization} if cfg.quantization else {})}


# ---- preprocess: raw data -> datasets/<output> --------------------------------------------------

DEFAULT_SEQ_LENGTH = 2048


def _preprocess_args(req: dict, store: Store) -> dict:
    from internlm_core.data import MODES

    fmt = req.get("format", "")
    if fmt not in MODES:
        raise ValueError(f"format must be one of {', '.join(sorted(MODES))}, got {fmt!r}")
    kw = {"kind": fmt, "src": store.source_path(req.get("source", "")),
          "seq_length": req.get("seq_length", DEFAULT_SEQ_LENGTH)}
    if not kw["src"].is_file():
        raise ValueError(f"source {req['source']!r} is not a file")
    if kw["seq_length"] < 8:
        raise ValueError(f"seq_length must be at least 8, got {kw['seq_length']}")
    _at_most(kw, "seq_length")
    if "pack" in req:
        if fmt != "wikitext":
            raise ValueError("pack applies to the wikitext format only")
        kw["mode"] = "pack" if req["pack"] else "line"
    if "min_length" in req:
        if req["min_length"] <= 0:
            raise ValueError(f"min_length must be positive, got {req['min_length']}")
        kw["min_length"] = req["min_length"]
    if req.get("tokenizer"):
        kw["tokenizer_path"] = store.source_path(req["tokenizer"])
    return kw


def check_preprocess(req: dict, store: Store) -> str:
    _preprocess_args(req, store)
    return _output(store, DATASETS, req)


def run_preprocess(req: dict, ctx) -> dict:
    from internlm_core import data
    from internlm_core.tokenizer import Tokenizer

    kw = _preprocess_args(req, ctx.store)
    path = kw.pop("tokenizer_path", None)
    if not ctx.staging.is_dir():
        ctx.clear_partial()
        stats = data.preprocess(dst=ctx.staging, tokenizer=Tokenizer(path) if path else None,
                                progress=ctx.count_progress, cancel=ctx.cancelled, **kw)
    else:
        stats = {}
    ctx.publish(DATASETS, req["output"], req.get("overwrite", False))
    return _plain(stats)


# ---- finetune: models/<base_model> (or a preset) + datasets/<dataset> -> models/<output> ---------

# The job API's names for TrainArgs hyperparameters where they differ; every other hyperparameter
# has a FinetuneJob field of its own name (a test holds the proto to that).
JOB_NAMES = {"lr": "learning_rate"}
# request field -> TrainArgs field
TRAIN_FIELDS = {"method": "mode", **{JOB_NAMES.get(name, name): name for name in HYPERPARAMS}}
INIT = "init"  # a preset job's random starting model, inside its job folder (the same on every execution)


def train_args(req: dict, store: Store, base: Path, out: Path):
    """The trainer's validated arguments for this request (its ValueErrors name the bad field)."""
    kw = {TRAIN_FIELDS[k]: v for k, v in req.items() if k in TRAIN_FIELDS and v not in ("", None)}
    dataset = store.dataset_path(check_name(req.get("dataset", ""), "dataset"))
    return TrainArgs(model=str(base), data=str(dataset), out=str(out), **kw).validate()


def _finetune_base(req: dict, store: Store, job_dir: Path | None) -> Path:
    if req.get("base_model") and req.get("preset"):
        raise ValueError("give base_model or preset, not both")
    if req.get("base_model"):
        return _model_folder(store, req["base_model"], "base_model")
    if req.get("preset"):
        Config.from_name(req["preset"])  # ConfigError names the known presets
        return (job_dir or store.root / "jobs" / "_") / INIT
    raise ValueError("give base_model (a model in the store) or preset (to start from random weights)")


def check_finetune(req: dict, store: Store) -> str:
    # the two checks whose field names differ in the trainer (lr, mode), so its messages would not match
    if "learning_rate" in req and not req["learning_rate"] > 0:
        raise ValueError(f"learning_rate must be positive, got {req['learning_rate']}")
    if req.get("method", "") not in ("", "full", "lora"):
        raise ValueError(f"method must be 'full' or 'lora', got {req['method']!r}")
    out = _output(store, MODELS, req)
    base = _finetune_base(req, store, None)
    args = train_args(req, store, base, store.root / out)
    _bounded_training(args)
    cfg = Config.from_name(req["preset"]) if req.get("preset") else read_config(base)
    dtype = "float32" if args.dtype == "auto" else args.dtype  # auto: fp32 on CPU
    require_fits(f"a {args.mode} fine-tune of {cfg.name} ({cfg.num_parameters() / 1e9:.2f}B parameters)",
                 training_bytes(cfg, args.mode, dtype), available_memory())
    return out


def _bounded_training(args: TrainArgs) -> None:
    """A fine-tune within LIMITS: its length, batch, rank and checkpoints (TooLarge otherwise)."""
    values = {f: getattr(args, f) for f in ("max_steps", "epochs", "batch_size", "grad_accum", "keep_last")}
    if args.mode == "lora":
        values["lora_rank"] = args.lora_rank
    if args.max_steps and args.save_every:  # with epochs, the steps are bounded by epochs x rows
        values["checkpoints"] = -(-args.max_steps // args.save_every)
    _at_most(values, *values)


def run_finetune(req: dict, ctx) -> dict:
    from internlm_core.train import finetune
    from internlm_core.train_state import checkpoint_step

    base = _finetune_base(req, ctx.store, ctx.job_dir)
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


# ---- export: models/<model> -> MindIR graphs in models/<output> ---------------------------------

def check_export(req: dict, store: Store) -> str:
    _model_folder(store, req.get("model", ""))
    for k in ("max_batch", "max_len"):
        if k in req and req[k] <= 0:
            raise ValueError(f"{k} must be positive, got {req[k]}")
    _at_most(req, "max_batch", "max_len")
    return _output(store, MODELS, req)


def run_export(req: dict, ctx) -> dict:
    from internlm_core import export

    src = _model_folder(ctx.store, req["model"])
    kw = {k: req[k] for k in ("max_batch", "max_len", "dynamic") if k in req}
    if not ctx.staging.is_dir():
        ctx.clear_partial()
        export.export_mindir(src, ctx.staging, progress=ctx.count_progress, cancel=ctx.cancelled, **kw)
    ctx.publish(MODELS, req["output"], req.get("overwrite", False))
    return {"graphs": sorted(p.name for p in ctx.store.model_path(req["output"]).glob("*.mindir"))}


# ---- the table --------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobKind:
    """One kind of job. Its ``name`` is the field of ``SubmitJobRequest``'s ``job`` oneof, the Celery
    queue and task (``app.task_name``), the ``internlm jobs submit`` subcommand, and, upper-cased
    after ``JOB_KIND_``, the value of the proto's ``JobKind`` enum (``enum_name``); a test holds the
    proto to this table."""
    name: str
    check: Callable[[dict, Store], str]  # in the endpoint, before queueing: the output's store path
    run: Callable[[dict, object], dict]  # in a worker: the job's result
    help: str


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("convert", check_convert, run_convert, "HF InternLM folder -> model in the store"),
    JobKind("preprocess", check_preprocess, run_preprocess, "Alpaca JSON or WikiText -> MindRecord dataset in the store"),
    JobKind("finetune", check_finetune, run_finetune, "full or LoRA fine-tuning of a model in the store"),
    JobKind("export", check_export, run_export, "model in the store -> MindIR prefill/decode graphs"),
)}
ENUM_PREFIX = "JOB_KIND_"


def enum_name(kind: str) -> str:
    """The proto ``JobKind`` value's name for a kind (``convert`` -> ``JOB_KIND_CONVERT``)."""
    return ENUM_PREFIX + kind.upper()


def kind_of_enum(name: str) -> str:
    """The kind a proto ``JobKind`` value's name stands for (``JOB_KIND_CONVERT`` -> ``convert``)."""
    return name.removeprefix(ENUM_PREFIX).lower()


def _read_config(folder: Path):
    from internlm_core.checkpoint import read_config

    return read_config(folder)


def _plain(obj) -> dict:
    """A JSON-able dict from whatever the core returned (dict, dataclass, None)."""
    import dataclasses
    import json

    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, dict):
        obj = {"result": obj}
    return json.loads(json.dumps(obj, default=str))
