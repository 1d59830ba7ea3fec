"""Build a MindSpore model from a project model folder, and save one back.

Three ways in. ``load_model``: the model as trained and saved, every weight in fp32 (training, export,
MindSpore's own ops; the engine fuses it). ``load_frozen_base``: LoRA's base on the training kernels,
each linear held frozen in the precision the file stores (or quantised to int8 as read), never in
fp32. ``load_serving_model``: the engine's serving form on the CPU kernels built straight from the
file, a few MB at a time, each weight placed once in its final fused and packed layout in the
precision the file stores (bf16 stays bf16; an int8 or int4 folder's linears stay so with their
scales), or quantised tensor by tensor as they are read (``quantize="int8"`` or ``"int4"``): one copy
of the weights in memory, no fp32 intermediate, no unfused layers.
"""
from __future__ import annotations

import logging
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor

from . import kernels
from .checkpoint import (DTYPE_TO_ST, ST_TO_DTYPE, ST_TO_NP, WEIGHTS_FILE, CheckpointError, SafetensorsFile,
                         SafetensorsWriter, atomic_folder, cast, confined, copy_tokenizer, read_config, to_float32)
from .config import Config
from .forms import TRAINING_KERNELS, serving_ops
from .model import Embedding, InternLMForCausalLM, Linear, RMSNorm, compute_dtype_for, parameter_of
from .quantize import (METHODS, SCHEMES, Scheme, base_precision, check_quantizable, quantize_int8, quantized_names,
                       scale_name)

log = logging.getLogger(__name__)


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
            # quantised with its scales: MindSpore's own ops compute in float32, so widened here
            arr = SCHEMES[model.config.quantization].dequantize(weights.get(name), weights.get(scale_name(name)))
        elif isinstance(weights, SafetensorsFile):
            arr = to_float32(weights.get(name), weights.info(name)[0])
        else:
            arr = np.asarray(weights[name], np.float32)
        p = params[name]
        if tuple(arr.shape) != tuple(p.shape):
            raise CheckpointError(f"{name}: shape {list(arr.shape)} does not match the config's {list(p.shape)}")
        p.set_data(Tensor(np.ascontiguousarray(arr), p.dtype))


def _open(folder: str | Path) -> tuple[Config, SafetensorsFile]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    cfg = read_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    return cfg, SafetensorsFile(confined(folder, folder / WEIGHTS_FILE))


def load_model(folder: str | Path, compute_dtype: str | None = None, ops=None) -> InternLMForCausalLM:
    """The model in ``folder`` (config.json + model.safetensors) ready to run, unfused, computing with
    ``ops`` (``forms``; MindSpore's own by default)."""
    set_runtime()
    cfg, weights = _open(folder)
    model = InternLMForCausalLM(cfg, compute_dtype, ops=ops)
    load_weights(model, weights)
    model.set_train(False)
    return model


# What a served weight is held in: the file's own precision when it is one the kernels read.
SERVED_ST = ("F32", "F16", "BF16")


def load_serving_model(folder: str | Path, quantize: str | None = None) -> InternLMForCausalLM:
    """The model in ``folder`` in the engine's serving form on the CPU kernels, as ``Engine`` would
    make of ``load_model``'s (``serving_form(forms.ServingKernels())``), but read from the file straight
    into that form: each linear's weight (q/k/v and gate/up fused) packed once, part by part, into
    its final layout in the stored dtype (fp32, fp16 or bf16; the kernels widen in registers), the
    embedding table in the stored dtype too and memory-mapped from the file (only the rows read
    take memory), norms and biases in fp32. The unfused layers are never loaded, and weights are
    read a few MB at a time, so the peak is the weights plus those few MB.

    int8 / int4: a quantised folder's linears (``quantize.quantized_names``) are packed as stored with
    their scales placed part by part (PackedLinear's W8A16 and int4 paths); with ``quantize`` a float
    folder's are quantised so while they are read, a few MB of rows at a time (per row, so the same
    integers and scales as ``internlm convert --quantize`` writes), never the whole model in fp32.

    Where the kernels are unavailable (``forms.serving_ops`` says why), or a fused layer's outputs are
    not a multiple of 16 rows, this is ``load_model``'s fp32 model instead (MindSpore's ops have no
    bf16 or int8 kernels on CPU), the quantised weights widened from their int8 values; the engine
    makes its serving form."""
    set_runtime()
    cfg, f = _open(folder)
    if quantize not in (None, *METHODS):
        raise ValueError(f"quantize must be one of {', '.join(METHODS)}, got {quantize!r}")
    if quantize and cfg.quantization and quantize != cfg.quantization:
        raise CheckpointError(f"{folder} holds {cfg.quantization} weights: it cannot be served as {quantize}")
    method = cfg.quantization or quantize
    if quantize and not cfg.quantization:
        check_quantizable(cfg, quantize)
    check_names(cfg, f)
    # compute in fp32; its weights are initializers (zero pages, no memory until written) that the
    # file's tensors replace below, each once
    ops = serving_ops(compute_dtype_for(cfg))
    model = InternLMForCausalLM(cfg, ops=ops, fused=True) if ops.cpu_kernels else None
    linears = [(name, cell) for name, cell in model.cells_and_names() if isinstance(cell, Linear)] if model else []
    if model is None or any(cell.d_out % kernels.PANEL for _, cell in linears):
        log.info("serving %s from fp32 weights: %s", folder, "MindSpore's ops" if model is None else
                 f"a layer's outputs are not a multiple of {kernels.PANEL}")
        # the values the quantised form would serve (a quantised folder's are widened by load_weights)
        return _quantized_values(load_model(folder), None if cfg.quantization else quantize)
    quantized = set(quantized_names(cfg)) if method else set()
    for name, cell in linears:
        sources = getattr(cell, "part_names", [name])
        weights = [f"{s}.weight" for s in sources]
        if all(w in quantized for w in weights):
            cell.pack(*_packed_quantized(f, weights, cell.d_out, cell.d_in, bool(cfg.quantization), SCHEMES[method]))
        else:
            cell.pack(_packed(f, weights, cell.d_out, cell.d_in))
        if cell.bias is not None:
            bias = np.concatenate([to_float32(f.get(f"{s}.bias"), f.info(f"{s}.bias")[0]) for s in sources])
            cell.bias.set_data(Tensor.from_numpy(np.ascontiguousarray(bias, np.float32)))
    _norms_and_table(model, f)
    model.set_train(False)
    how = ("as stored" if not quantize or cfg.quantization
           else f"linears quantised to {quantize} at load from {cfg.dtype}")
    log.info("%s: serving weights %s, %s (the embedding table mapped from the file)", folder, how, _held(model))
    return model


def load_frozen_base(folder: str | Path, ops, quantize: str | None = None,
                     compute_dtype: str = "float32") -> InternLMForCausalLM:
    """LoRA's base for training (QLoRA-like), unfused, computing with ``ops``: on the training kernels
    (``forms.TrainingKernels``) each linear is held frozen (``Linear.hold``) in the precision the file
    stores it, bf16 or fp16 memory-mapped where it lies (its layout is the stored one), or as int8
    with per-row scales (an int8 folder's as stored; ``quantize="int8"``: a float folder's quantised
    a few MB of rows at a time, the integers and scales ``internlm convert --quantize int8`` writes);
    the embedding table in its stored dtype, mapped; norms and biases fp32. No fp32 copy of the
    weights is ever made: FrozenLinear widens them inside the kernel. The LoRA adapters
    (``lora.inject_lora``) and their optimiser state are fp32.

    On another form (MindSpore's ops have no bf16 or int8 kernels on CPU) this is ``load_model``'s
    model in ``compute_dtype`` holding the same values (int8's dequantised), with the reason logged."""
    set_runtime()
    cfg, f = _open(folder)
    if quantize not in (None, *METHODS):
        raise ValueError(f"quantize must be one of {', '.join(METHODS)}, got {quantize!r}")
    check_names(cfg, f)
    if base_precision(cfg, quantize) == "int4":  # FrozenLinear reads int8 at most
        raise CheckpointError(f"LoRA on an int4 base is not built: {folder} is int4 or int4 was asked for; "
                              f"fine-tune on the float folder, or with quantize int8")
    if ops.name != TRAINING_KERNELS:
        log.info("%s: the LoRA base held in %s on %s (no kernels read %s weights there)", folder, compute_dtype,
                 ops.name, base_precision(cfg, quantize))
        return _quantized_values(load_model(folder, compute_dtype, ops=ops), None if cfg.quantization else quantize)
    model = InternLMForCausalLM(cfg, "float32", ops=ops)
    quantized = set(quantized_names(cfg)) if (cfg.quantization or quantize) == "int8" else set()
    for name, cell in model.cells_and_names():
        if not isinstance(cell, Linear):
            continue
        w = f"{name}.weight"
        if w in quantized:
            cell.hold(*_int8_weight(f, w, bool(cfg.quantization)))
        else:
            src = f.info(w)[0]
            st = _served_st([src])
            cell.hold(kernels.to_tensor(f.map(w) if st == src else cast(f.get(w), src, st), ST_TO_DTYPE[st]))
        if cell.bias is not None:
            b = f"{name}.bias"
            cell.bias.set_data(Tensor.from_numpy(np.ascontiguousarray(to_float32(f.get(b), f.info(b)[0]))))
    _norms_and_table(model, f)
    for p in model.get_parameters():
        p.requires_grad = False
    model.set_train(False)
    log.info("%s: the LoRA base held frozen as %s: %s", folder, base_precision(cfg, quantize), _held(model))
    return model


def _norms_and_table(model: InternLMForCausalLM, f: SafetensorsFile) -> None:
    """The norms' weights in fp32 and the embedding table as ``_table`` holds it, from the file."""
    for name, cell in model.cells_and_names():
        if isinstance(cell, RMSNorm):
            w = f"{name}.weight"
            cell.weight.set_data(Tensor.from_numpy(np.ascontiguousarray(to_float32(f.get(w), f.info(w)[0]))))
        elif isinstance(cell, Embedding):
            w = f"{name}.embedding_weight"
            cell.embedding_weight = parameter_of(_table(f, w), w)


def _held(model: InternLMForCausalLM) -> str:
    """What a model's weights take, by dtype, for the log."""
    held = {}
    for p in model.get_parameters():
        held[str(p.dtype)] = held.get(str(p.dtype), 0) + p.nbytes
    return ", ".join(f"{n / 2**20:.0f} MiB {dt}" for dt, n in sorted(held.items()))


def _quantized_values(model: InternLMForCausalLM, quantize: str | None) -> InternLMForCausalLM:
    """``model`` (fp32, from a float folder) with its linears holding the values ``quantize`` stands
    for (quantised, then dequantised): the quantised forms' values where no kernel reads them."""
    if quantize:
        scheme = SCHEMES[quantize]
        params = dict(model.parameters_and_names())
        for name in quantized_names(model.config):
            w = params[name]
            w.set_data(Tensor(scheme.dequantize(*scheme.quantize(w.asnumpy())), w.dtype))
    return model


def _int8_weight(f: SafetensorsFile, name: str, stored: bool):
    """Tensor ``name`` (N, K) as int8 with its per-row scales (N,) fp32, as tensors: an int8 folder's
    (``stored``: I8, mapped where it lies, and F32 ``<name>_scale``), or quantised from a float
    folder a few MB of rows at a time (``quantize_int8`` is per row, so chunks change nothing)."""
    src, (rows, cols) = f.info(name)
    if stored:
        if src != "I8" or f.info(scale_name(name)) != ("F32", (rows,)):
            raise CheckpointError(f"{name}: an int8 folder stores it as I8 with an F32 {scale_name(name)} of "
                                  f"{rows} values, got {src} and {f.info(scale_name(name))}")
        return kernels.to_tensor(f.map(name), "int8"), Tensor.from_numpy(np.ascontiguousarray(f.get(scale_name(name))))
    q, scale = np.empty((rows, cols), np.int8), np.empty(rows, np.float32)
    step = max(1, READ_BYTES // (cols * 16))  # a quarter of fp32's rows: quantising makes ~5 temporaries
    for r in range(0, rows, step):
        q[r:r + step], scale[r:r + step] = quantize_int8(to_float32(f.rows(name, r, r + step), src))
    return kernels.to_tensor(q, "int8"), Tensor.from_numpy(scale)


def _served_st(dtypes) -> str:
    """One stored dtype for a weight made of parts in ``dtypes``: theirs if they agree on one the
    kernels read, else fp32."""
    dtypes = set(dtypes)
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in SERVED_ST else "F32"


READ_BYTES = 8 << 20  # a weight is read and packed this many bytes at a time


def _packed(f: SafetensorsFile, names: list[str], rows: int, cols: int):
    """The tensors ``names`` (rows stacked) packed for PackedLinear in their stored dtype, read a
    few MB at a time straight into the one final array."""
    st = _served_st(f.info(n)[0] for n in names)
    wp = np.empty((rows // kernels.PANEL, cols, kernels.PANEL), ST_TO_NP[st])
    row = 0
    for n in names:
        src, shape = f.info(n)
        step = max(kernels.PANEL, READ_BYTES // (cols * wp.itemsize) // kernels.PANEL * kernels.PANEL)
        for r in range(0, shape[0], step):
            kernels.pack_rows(wp, cast(f.rows(n, r, r + step), src, st), row + r)
        row += shape[0]
    return kernels.to_tensor(wp, ST_TO_DTYPE[st])


def _packed_quantized(f: SafetensorsFile, names: list[str], rows: int, cols: int, stored: bool, scheme: Scheme):
    """The tensors ``names`` (rows stacked) packed for PackedLinear's quantised paths with their scales
    placed in the same order: int8 (P, K, 16) with (rows,) scales, int4 (P, K/2, 16) bytes of pairs
    (each output's 4 bytes together: ``kernels.pack_rows``) with (P, K/32, 16) scales (each panel's
    group scales together, as the kernel reads them). Read as
    the file stores them (``stored``: a quantised folder's weights and F32 ``<name>_scale``), or
    quantised a few MB of rows at a time from a float folder (per row, so chunks change nothing)."""
    stored_w, _ = scheme.shapes(rows, cols)
    groups = scheme.groups(cols)
    wp = np.empty((rows // kernels.PANEL, stored_w[1], kernels.PANEL), ST_TO_NP[scheme.stored])
    sp = np.empty((rows // kernels.PANEL, groups, kernels.PANEL), np.float32)  # int8: (P, 1, 16) is (rows,)
    row = 0
    for n in names:
        src, shape = f.info(n)
        want_w, want_s = scheme.shapes(shape[0], cols)
        if stored and (f.info(n) != (scheme.stored, want_w) or f.info(scale_name(n)) != ("F32", want_s)):
            raise CheckpointError(f"{n}: an {scheme.name} folder stores it as {scheme.stored} {list(want_w)} with an "
                                  f"F32 {scale_name(n)} of {list(want_s)}, got {f.info(n)} and {f.info(scale_name(n))}")
        # stored: READ_BYTES of it at a time; quantised here: a sixteenth of that in fp32 rows, whose
        # quantisation makes ~5 temporaries of its size
        per_row = cols * 16 if not stored else want_w[1]
        step = max(kernels.PANEL, READ_BYTES // per_row // kernels.PANEL * kernels.PANEL)
        for r in range(0, shape[0], step):
            block = f.rows(n, r, r + step)
            if stored:
                q, s = block, f.rows(scale_name(n), r, r + step)
            else:
                q, s = scheme.quantize(to_float32(block, src))
            kernels.pack_rows(wp, q, row + r)
            kernels.pack_rows(sp, s.reshape(len(s), groups), row + r)
        row += shape[0]
    scale = sp.reshape(rows) if scheme.group is None else sp
    return kernels.to_tensor(wp, wp.dtype.name), Tensor.from_numpy(scale)  # int8, or uint8 (int4 pairs)


def _table(f: SafetensorsFile, name: str):
    """The embedding table in its stored dtype: memory-mapped where it lies (its layout is the
    stored one), so only the rows read are in memory; read and cast where the file's dtype is not
    one the kernels take."""
    src = f.info(name)[0]
    st = _served_st([src])
    arr = f.map(name) if st == src else cast(f.get(name), src, st)
    return kernels.to_tensor(arr, ST_TO_DTYPE[st])


def check_names(cfg: Config, weights) -> None:
    """Every tensor ``cfg`` needs is in ``weights`` with its shape (in a quantised folder, each
    quantised weight's scales too), and nothing else is."""
    expected = dict(cfg.param_shapes())
    if cfg.quantization:
        scheme = SCHEMES[cfg.quantization]
        for n in quantized_names(cfg):
            expected[n], expected[scale_name(n)] = scheme.shapes(*expected[n])
    names = set(weights.keys())
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        got = weights.info(name)[1] if isinstance(weights, SafetensorsFile) else np.shape(weights[name])
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{name}: shape {list(got)} does not match the config's {list(shape)}")


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
