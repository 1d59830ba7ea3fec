"""Build a MindSpore model from a project model folder, and save one back."""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .checkpoint import (DTYPE_TO_ST, WEIGHTS_FILE, CheckpointError, SafetensorsFile, SafetensorsWriter,
                         atomic_folder, cast, copy_tokenizer, read_config, to_float32)
from .config import Config
from .model import InternLMForCausalLM
from .quantize import dequantize_int8, quantized_names, scale_name


def set_runtime() -> None:
    # PyNative by default; the hot steps are compiled with ms.jit. Fix the device once, here.
    if ms.get_context("device_target") not in ("CPU", "GPU", "Ascend"):
        ms.set_context(device_target="CPU")


def load_weights(model: InternLMForCausalLM, weights: dict[str, np.ndarray] | SafetensorsFile) -> None:
    expected = model.config.param_shapes()
    params = dict(model.parameters_and_names())
    names = set(weights.keys())
    missing = sorted(k for k in params if k.startswith(("model.", "lm_head")) and k not in names
                     and k in expected)
    scales = {scale_name(n) for n in quantized_names(model.config)} if model.config.quantization else set()
    unexpected = sorted(names - set(params) - scales)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name in expected:
        if isinstance(weights, SafetensorsFile) and scale_name(name) in scales:
            # int8 with per-channel scales: MindSpore's own ops compute in float32, so widened here
            arr = dequantize_int8(weights.get(name), weights.get(scale_name(name)))
        elif isinstance(weights, SafetensorsFile):
            arr = to_float32(weights.get(name), weights.info(name)[0])
        else:
            arr = np.asarray(weights[name], np.float32)
        p = params[name]
        if tuple(arr.shape) != tuple(p.shape):
            raise CheckpointError(f"{name}: shape {list(arr.shape)} does not match the config's {list(p.shape)}")
        p.set_data(Tensor(np.ascontiguousarray(arr), p.dtype))


def load_model(folder: str | Path, compute_dtype: str | None = None) -> InternLMForCausalLM:
    """The model in ``folder`` (config.json + model.safetensors) ready to run."""
    set_runtime()
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    cfg = read_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    model = InternLMForCausalLM(cfg, compute_dtype)
    load_weights(model, SafetensorsFile(folder / WEIGHTS_FILE))
    model.set_train(False)
    return model


def state_dict(model: InternLMForCausalLM) -> dict[str, np.ndarray]:
    """Weights as float32 numpy arrays by MindFormers name (for saving and tests)."""
    return {n: p.astype(ms.float32).asnumpy() if p.dtype != ms.float32 else p.asnumpy()
            for n, p in model.parameters_and_names() if n in model.config.param_shapes()}


def save_model(model: InternLMForCausalLM | dict, cfg: Config, folder: str | Path, dtype: str | None = None,
               overwrite: bool = False, tokenizer_from: Path | None = None, extra_files: dict | None = None) -> Path:
    """Write a model folder atomically; ``model`` may be a model or a {name: array} dict."""
    sd = state_dict(model) if isinstance(model, InternLMForCausalLM) else model
    dtype = dtype or cfg.dtype
    st = DTYPE_TO_ST[dtype]
    names = list(cfg.param_shapes())
    with atomic_folder(folder, overwrite) as tmp:
        w = SafetensorsWriter(tmp / WEIGHTS_FILE, [(n, st, tuple(sd[n].shape)) for n in names], {"format": "ms"})
        for n in names:
            w.write(n, cast(np.asarray(sd[n], np.float32), "F32", st))
        w.close()
        cfg.replace(dtype=dtype).save(tmp)
        copy_tokenizer(tokenizer_from, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)
