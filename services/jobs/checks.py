"""Each kind of job's submit-time check: run in the endpoint, before anything is queued, so a bad
request is refused at once, by name. This module must import without MindSpore (the endpoint never
loads it; ``tests/test_layering.py`` imports this module with MindSpore blocked): what it needs of the
core reads files and numbers only.

A request is the plain dict of the job's protobuf message (unset optional fields absent), so the
workers need no protobuf. ``check_*`` raise ``PathError``/``ValueError`` (INVALID_ARGUMENT),
``FileNotFoundError`` (NOT_FOUND) or ``FileExistsError`` (ALREADY_EXISTS) and return the store
path the job will publish; ``TooLarge`` (INVALID_ARGUMENT) for what is beyond ``settings.LIMITS``
or this machine's memory. The runners (``runners.py``) re-read their arguments with the helpers here.
"""
from __future__ import annotations

from pathlib import Path

from internlm_core.checkpoint import read_config
from internlm_core.config import DTYPES, Config
from internlm_core.errors import TooLarge
from internlm_core.memory import available_memory, conversion_bytes, require_fits, training_bytes
from internlm_core.quantize import METHODS, check_quantizable
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


def model_folder(store: Store, name: str, what: str = "model") -> Path:
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
    if req.get("quantize"):
        check_quantizable(cfg, req["quantize"])  # int4's widths, before the job is queued
    require_fits(f"converting {cfg.name} (its largest tensor, widened to float32)", conversion_bytes(cfg),
                 available_memory())
    if any(src.glob("*.safetensors")):
        open_weights(src)  # reads headers only: a truncated or corrupt file is caught here
    elif not any(src.glob("pytorch_model*.bin")):
        raise ValueError(f"source {req['source']!r} has no *.safetensors or pytorch_model*.bin weights")
    return _output(store, MODELS, req)


# ---- preprocess: raw data -> datasets/<output> --------------------------------------------------

DEFAULT_SEQ_LENGTH = 2048


def preprocess_args(req: dict, store: Store) -> dict:
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
    preprocess_args(req, store)
    return _output(store, DATASETS, req)


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


def finetune_base(req: dict, store: Store, job_dir: Path | None) -> Path:
    if req.get("base_model") and req.get("preset"):
        raise ValueError("give base_model or preset, not both")
    if req.get("base_model"):
        return model_folder(store, req["base_model"], "base_model")
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
    base = finetune_base(req, store, None)
    args = train_args(req, store, base, store.root / out)
    _bounded_training(args)
    cfg = Config.from_name(req["preset"]) if req.get("preset") else read_config(base)
    dtype = "float32" if args.dtype == "auto" else args.dtype  # auto: fp32 on CPU
    require_fits(f"a {args.mode} fine-tune of {cfg.name} ({cfg.num_parameters() / 1e9:.2f}B parameters)",
                 training_bytes(cfg, args.mode, dtype, args.quantize_method), available_memory())
    return out


def _bounded_training(args: TrainArgs) -> None:
    """A fine-tune within LIMITS: its length, batch, rank and checkpoints (TooLarge otherwise)."""
    values = {f: getattr(args, f) for f in ("max_steps", "epochs", "batch_size", "grad_accum", "keep_last")}
    if args.mode == "lora":
        values["lora_rank"] = args.lora_rank
    if args.max_steps and args.save_every:  # with epochs, the steps are bounded by epochs x rows
        values["checkpoints"] = -(-args.max_steps // args.save_every)
    _at_most(values, *values)


# ---- export: models/<model> -> MindIR graphs in models/<output> ---------------------------------

def check_export(req: dict, store: Store) -> str:
    model_folder(store, req.get("model", ""))
    for k in ("max_batch", "max_len"):
        if k in req and req[k] <= 0:
            raise ValueError(f"{k} must be positive, got {req[k]}")
    _at_most(req, "max_batch", "max_len")
    return _output(store, MODELS, req)
