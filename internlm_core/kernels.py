"""The serving engine's CPU kernels (``kernels.cc``): built once per machine, called from the
compiled steps as MindSpore AOT custom ops; and the build of the training kernels' library, whose
ops are ``train_kernels``'s.

    so = library()          # the built serving kernels' path, or None (with ``unavailable()`` saying why)
    so = training_library() # train_kernels.cc's (linked with the oneDNN in the mindspore wheel), or None
    wp = pack(w)            # (N, K) weight -> (N/16, K, 16), the layout PackedLinear reads, w's dtype kept
    pack_rows(wp, w, row0)  # w's rows into an already allocated packed weight at output row0
    y = linear_op(bias)(x, wp[, b])                  # x W^T + b, any leading shape; wp fp32, bf16 or fp16
    y = linear_op(bias, True)(x, wq, scale[, b])     # wq int8 packed, scale (N,) fp32: (x q^T) * scale + b;
                                                     # or int4 pairs (P, K/2, 16) u8, scale (P, K/32, 16)
    int4_activations()      # "int8" (W4A8, a CPU with AVX512_VNNI) or "float32" (W4A16): what int4 meets
    x = embedding_op()(ids, table)                   # the table's rows (fp32, bf16 or fp16) as fp32
    out = attention_op()(qkv, k_cache, v_cache, write, first, pos)  # new k/v rows in, then causal attention
    y = rms_norm_op()(x, w, eps)                     # eps a (1,) tensor
    y = silu_mul_op()(gate_up)                       # silu(gate) * up
    qkv = rope_op()(y, cos, sin, q_scale, heads)     # (B, T, (H+2Hkv)D) -> (B, H+2Hkv, T, D), q/k rotated
    step = DecodeStep(model, caches)                 # a served model's whole decode step as one native call
    logits = step(ids, cos, sin, write, first, pos)  # the step graph's logits, to the bit

Why (measured on the 2-core build machine, the bench-serve model): a decode step reads the
weights once per token and is bound by memory; MindSpore's CPU MatMul reads a 103168 x 512 head
at ~20 GB/s, its KV gather copies every attended row before attention reads it again, and each of
a step's ~300 small ops costs ~10 us to launch. The kernels stream each weight and KV byte once
and stand for several ops each. See ``kernels.cc`` for the layouts. A decode step (one new token a
row) runs those same kernels from one ctypes call instead (``DecodeStep``): a step graph spends as
much again between its ~60 kernels (MindSpore's runtime, the OpenMP threads waiting) as in them.

Weights may be fp32, bf16 or fp16 (``PackedLinear``, ``Embedding``): half-precision weights are
widened to fp32 in registers and everything is computed in fp32, so a bf16 checkpoint is served
from half the bytes with the results of fp32 compute on its values. ``PackedLinear`` also reads
int8 weights with one fp32 scale per output (``quantize.py``, W8A16): the integers widened in
registers, the sums in fp32, each output times its scale at the end; a quarter of fp32's bytes;
and int4 weights two to a byte with one scale per output and 32 inputs, about a sixth of fp32's
bytes (``pack`` keeps each output's 4 bytes of pairs together, a 32-bit lane). On a CPU with
AVX512_VNNI int4 is W4A8, as llama.cpp's Q4_0 x Q8_0: each row of x rounded to int8 a group of 32
(Q8_0's rule: d = max|x| / 127, ties to even), 4 nibbles x 4 int8 summed into an int32 lane by
``vpdpbusd``, each group's integer sum times d * its scale; 2.1-2.3x W4A16's speed at one row on
the InternLM2-1.8B linears held in cache, 1.16x on its 103168 x 2048 head streamed from memory,
2.6-3.1x at 4 to 64 rows (the head 1.84x at 4; ``bench/int4_kernel_bench.py``, one thread); the activations' rounding
moves the demo model's perplexity -2.2% from float32's, W4A16's -1.6%. Elsewhere (the AVX2
build, AVX-512 without VNNI) int4 is W4A16: each weight widened in registers, summed against fp32
x, each group's sum scaled once; ``int4_activations()`` says which this build does. numpy has no bf16: bf16
arrays here are their raw bits as uint16 (``checkpoint.ST_TO_NP``), and ``to_tensor`` makes
them MindSpore bfloat16 tensors without a float32 round trip or a copy.

Each library is compiled with the machine's ``g++ -O3 -march=native -fopenmp`` into a cache
folder (``INTERNLM_KERNEL_DIR``, default ``~/.cache/internlm/kernels``) under a name that hashes
the source, the command, the compiler's version and the CPU's flags, so a machine never loads
code built for another CPU and concurrent builders rename a finished file into place. Without a
compiler (or with ``INTERNLM_CPU_KERNELS=0``) the engine runs MindSpore's own ops instead: same
results to float rounding, slower; ``unavailable()`` says why and the engine logs it once.
``INTERNLM_KERNEL_MARCH`` builds for another target than ``native`` (``x86-64-v3``: AVX2 and FMA
without AVX-512, as an older CPU has; the tests build and run every kernel so). The serving
library needs only a compiler; the training one also the oneDNN that MindSpore ships (a MindSpore
without it still serves on the kernels, and trains on its own ops).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SERVING_SOURCE = Path(__file__).with_name("kernels.cc")
TRAINING_SOURCE = Path(__file__).with_name("train_kernels.cc")
HEADERS = [Path(__file__).with_name("kernel_common.h")]
PANEL = 16  # output rows per packed panel: one 16-float vector
INT4_LANE = 4  # int4: bytes (pairs of inputs) of one output packed together, one 32-bit lane
DNNL = "libdnnl.so.3"  # oneDNN 3, inside the mindspore wheel: the training GEMMs
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
ENV_SWITCH = "INTERNLM_CPU_KERNELS"
ENV_DIR = "INTERNLM_KERNEL_DIR"
ENV_MARCH = "INTERNLM_KERNEL_MARCH"  # the compiler's -march (default native), e.g. x86-64-v3 for AVX2 only

_why_not: str | None = None
_why_not_training: str | None = None


def cache_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "internlm" / "kernels"


def flags() -> list[str]:
    """The compiler flags: ``FLAGS`` with ``INTERNLM_KERNEL_MARCH``'s target where it is set."""
    march = os.environ.get(ENV_MARCH, "").strip()
    return [f"-march={march}" if f == "-march=native" and march else f for f in FLAGS]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(prefix: str, sources: list[Path], link: list[str]) -> tuple[str | None, str | None]:
    """(the library of ``sources`` built for this machine, None) or (None, why not)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None, f"{ENV_SWITCH}=0"
    import mindspore as ms

    if ms.get_context("device_target") != "CPU":
        return None, f"device {ms.get_context('device_target')} (the kernels are for CPU)"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None, "no C++ compiler (g++) on PATH"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        cmd = flags()
        key = hashlib.sha256("\0".join([*(s.read_text() for s in sources + HEADERS), " ".join(cmd + link), version,
                                         _cpu_flags()]).encode())
        target = cache_dir() / f"{prefix}-{key.hexdigest()[:16]}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                subprocess.run([compiler, *cmd, "-o", tmp, *map(str, sources), *link], capture_output=True, text=True,
                               check=True, timeout=300)
                os.replace(tmp, target)  # atomic: another process sees no file or a whole one
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return str(target), None
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        return None, f"building {' and '.join(s.name for s in sources)} failed: {detail.strip()[:500]}"


@functools.cache
def library() -> str | None:
    """The serving kernels' library (``kernels.cc``); None where they cannot be used here
    (``unavailable`` says why). It needs a compiler only: no oneDNN."""
    global _why_not
    path, _why_not = _build("kernels", [SERVING_SOURCE], [])
    return path


@functools.cache
def training_library() -> str | None:
    """The training kernels' library (``train_kernels.cc``, whose GEMMs are the oneDNN inside the
    mindspore wheel); None where they cannot be used (``training_unavailable`` says why)."""
    global _why_not_training
    import mindspore as ms

    ms_lib = Path(ms.__file__).parent / "lib"
    if not (ms_lib / DNNL).is_file():
        _why_not_training = f"this MindSpore ships no oneDNN ({ms_lib / DNNL} is missing)"
        return None
    path, _why_not_training = _build("train-kernels", [TRAINING_SOURCE],
                                     [f"-L{ms_lib}", f"-l:{DNNL}", f"-Wl,-rpath,{ms_lib}"])
    return path


def int4_activations() -> str:
    """What the int4 kernel multiplies the weights by in this build: "int8" (W4A8: each row rounded
    to int8 a group of 32 by llama.cpp's Q8_0 rule, on a CPU with AVX512_VNNI) or "float32" (W4A16)."""
    so = library()
    if so is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {unavailable()}")
    return "int8" if ctypes.CDLL(so).Int4ActivationBits() == 8 else "float32"


def unavailable() -> str | None:
    """Why the serving kernels are not used here (None when they are)."""
    return None if library() else _why_not


def training_unavailable() -> str | None:
    """Why the training kernels are not used here (None when they are)."""
    return None if training_library() else _why_not_training


def pack(w: np.ndarray) -> np.ndarray:
    """(N, K) -> (N/16, K, 16): panel p holds output rows 16p..16p+15, k-major; w's dtype kept
    (float32, float16, bf16 as uint16 bits, or int8: its scales (N,) stay as they are). uint8 is
    int4 pairs (quantize.pack_int4, (N, K/2)): the same shape, each output's bytes 4 together
    (``pack_rows``)."""
    n, k = w.shape
    if n % PANEL:
        raise ValueError(f"a packed weight needs a multiple of {PANEL} rows, got {n}")
    out = np.empty((n // PANEL, k, PANEL), np.asarray(w).dtype)
    pack_rows(out, w, 0)
    return out


def pack_rows(wp: np.ndarray, w: np.ndarray, row0: int) -> None:
    """Write the rows of ``w`` (n, K) into the packed weight ``wp`` (P, K, 16) as its output rows
    row0 .. row0 + n - 1, at any row offset: a fused weight is packed part by part from the file,
    never built whole in the unpacked layout first.

    uint8 is int4 pairs, each byte two inputs of one output: there each 4 consecutive bytes of an
    output (8 inputs) stay together, (P, K/8, 16, 4) in the (P, K/2, 16) array, the 32-bit lane
    that the W4A8 kernel's vpdpbusd multiplies by 4 int8 activations (kernel_common.h's ``u4_t``)."""
    n, k = w.shape
    if wp.shape[1:] != (k, PANEL) or row0 < 0 or row0 + n > wp.shape[0] * PANEL:
        raise ValueError(f"rows {row0}..{row0 + n} of width {k} do not fit a packed weight of shape {wp.shape}")
    if wp.dtype == np.uint8:  # int4 pairs: a lane of INT4_LANE bytes is packed as one element
        if k % INT4_LANE:
            raise ValueError(f"int4 pairs come {INT4_LANE} to a lane, and a row has {k}")
        wp, w = wp.reshape(-1, k // INT4_LANE, PANEL, INT4_LANE), w.reshape(n, k // INT4_LANE, INT4_LANE)
    i = 0
    while i < n:
        p, j = divmod(row0 + i, PANEL)
        if j == 0 and n - i >= PANEL:  # whole panels at once
            full = (n - i) // PANEL
            wp[p:p + full] = np.swapaxes(w[i:i + full * PANEL].reshape(full, PANEL, *w.shape[1:]), 1, 2)
            i += full * PANEL
        else:  # a panel shared with the previous or the next part
            take = min(PANEL - j, n - i)
            wp[p, :, j:j + take] = np.swapaxes(w[i:i + take], 0, 1)
            i += take


def unpack(wp: np.ndarray) -> np.ndarray:
    """The inverse of ``pack``."""
    p, k, _ = wp.shape
    if wp.dtype == np.uint8:
        return np.ascontiguousarray(wp.reshape(p, k // INT4_LANE, PANEL, INT4_LANE).transpose(0, 2, 1, 3)
                                    .reshape(p * PANEL, k))
    return np.ascontiguousarray(wp.transpose(0, 2, 1).reshape(p * PANEL, k))


def to_tensor(arr: np.ndarray, dtype: str):
    """A MindSpore tensor of ``dtype`` (float32, float16, bfloat16, int8, uint8: int4 pairs) sharing ``arr``'s memory
    (``Tensor.from_numpy``), bf16 from its uint16 bits by ``view(ms.bfloat16)``: no float32 round
    trip and no copy (measured on MindSpore 2.9: ``Tensor(array)`` copies, ``Tensor(float32 array,
    ms.bfloat16)`` converts through a float32 copy). The tensor keeps ``arr`` alive."""
    import mindspore as ms
    from mindspore import Tensor

    arr = np.ascontiguousarray(arr)
    t = Tensor.from_numpy(arr)
    if dtype == "bfloat16":
        if arr.dtype != np.uint16:
            raise ValueError(f"bfloat16 bits come as uint16, got {arr.dtype}")
        return t.view(ms.bfloat16)
    want = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}[dtype]
    if arr.dtype != want:
        raise ValueError(f"{dtype} data comes as {np.dtype(want)}, got {arr.dtype}")
    return t


def _op(name: str, out_shape, out_dtype, bprop=None, variant: str = "", training: bool = False):
    """A MindSpore AOT op calling kernel ``name`` of the serving library (``training``: of the
    training one)."""
    from mindspore import ops

    so = training_library() if training else library()
    if so is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {training_unavailable() if training else unavailable()}")
    op = ops.Custom(f"{so}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)
    if variant:
        # MindSpore 2.9 keeps one backward graph per distinct primitive (seen: two Custom ops of the
        # same kernel with different bprops both ran the second's); an attribute tells them apart
        op.add_prim_attr("variant", variant)
    return op


@functools.cache
def linear_op(bias: bool, quantized: bool = False):
    """y (..., N) = x (..., K) @ W^T (+ b) with W packed: inputs (x, wp[, b]); ``quantized``: inputs
    (x, wq, scale[, b]), wq int8 with scale (N,) f32: y = (x q^T) * scale (+ b), or wq uint8 int4
    pairs (P, K/2, 16) with scale (P, K/32, 16) f32: y = x (q * s)^T (+ b), x rounded to int8 a group
    of 32 first where the build has AVX512_VNNI (``int4_activations``)."""
    if quantized:
        if bias:
            return _op("PackedLinear", lambda x, w, s, b: x[:-1] + [w[0] * PANEL], lambda x, w, s, b: x)
        return _op("PackedLinear", lambda x, w, s: x[:-1] + [w[0] * PANEL], lambda x, w, s: x)
    if bias:
        return _op("PackedLinear", lambda x, w, b: x[:-1] + [w[0] * PANEL], lambda x, w, b: x)
    return _op("PackedLinear", lambda x, w: x[:-1] + [w[0] * PANEL], lambda x, w: x)


@functools.cache
def embedding_op():
    """x (..., C) float32 = the rows ``ids`` (..., int32) of ``table`` (V, C), fp32, bf16 or fp16."""
    import mindspore as ms

    return _op("Embedding", lambda ids, t: ids + [t[1]], lambda ids, t: ms.float32)


@functools.cache
def attention_op():
    """out (B, T, H, D) = softmax(q K^T) V after the new k/v rows are written into the caches:
    qkv (B, H + 2 Hkv, T, D) is the Rope kernel's output (q heads scaled and rotated, then k, then v),
    caches (R, D) both float32 or both float16 (new rows rounded to it, read rows widened to fp32,
    the arithmetic fp32), write (B * Hkv * T,) int32 = the cache row of each new k/v row, in
    (row, head, token) order (written in place; a row outside the cache is skipped), first (B, Hkv)
    int32 = each (row, k/v head)'s first cache row (query head h reads k/v head h // (H / Hkv)),
    pos (B, T) int32: query t sees rows first .. first + pos."""
    return _op("CachedAttention", lambda qkv, k, v, write, first, pos: [qkv[0], qkv[2], qkv[1] - 2 * first[1], qkv[3]],
               lambda qkv, k, v, write, first, pos: qkv)


@functools.cache
def rms_norm_op():
    """x * rsqrt(mean(x^2) + eps) * w: inputs (x (..., C), w (C,), eps (1,))."""
    return _op("RmsNorm", lambda x, w, eps: x, lambda x, w, eps: x)


@functools.cache
def silu_mul_op():
    """(..., 2F) = [gate | up] -> (..., F) = silu(gate) * up."""
    return _op("SiluMul", lambda gu: gu[:-1] + [gu[-1] // 2], lambda gu: gu)


@functools.cache
def rope_op():
    """The fused q/k/v output (B, T, (H + 2 Hkv) D) -> heads (B, H + 2 Hkv, T, D): q and k rotated by
    cos/sin (B, T, D) (rotate-half), q also times q_scale (1,), v unchanged; heads (2,) int32 = (H, Hkv)."""
    return _op("Rope", lambda y, c, s, f, h: [y[0], y[2] // c[2], y[1], c[2]], lambda y, c, s, f, h: y)


# ---- DecodeStep: a whole decode step in one native call (kernels.cc) -------------------------------

class StepLinear(ctypes.Structure):
    """kernels.cc's StepLinear: a packed weight (its scales for int8/int4, its bias or null) and its
    LoRA adapters' stacks (or null)."""
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("kind", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("lora_a", ctypes.c_void_p), ("lora_bt", ctypes.c_void_p), ("rank", ctypes.c_int64)]


class StepLayer(ctypes.Structure):
    """kernels.cc's StepLayer: one decoder layer's norms, fused linears and its two caches."""
    _fields_ = [("attention_norm", ctypes.c_void_p), ("wqkv", StepLinear), ("wo", StepLinear),
                ("ffn_norm", ctypes.c_void_p), ("w13", StepLinear), ("w2", StepLinear),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class StepModel(ctypes.Structure):
    """kernels.cc's StepModel: the model's sizes, its embedding table, final norm, head and layers."""
    _fields_ = [(name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "cache_rows",
                                                    "cache_f16", "vocab", "table_kind", "threads")] + [
        ("eps", ctypes.c_float), ("q_scale", ctypes.c_float), ("table", ctypes.c_void_p),
        ("norm_out", ctypes.c_void_p), ("head", StepLinear), ("layer", ctypes.POINTER(StepLayer))]


CGROUP_CPU = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def step_threads() -> int:
    """Threads for the native decode step: the CPUs this process may run on (its affinity), no more
    than a cgroup CPU quota allows (a container's ``--cpus``) nor ``OMP_NUM_THREADS``. The step's
    threads spin at their barrier, so a thread more than there are CPUs to run it would keep the
    others waiting for it (libgomp's default is the affinity alone)."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = CGROUP_CPU.read_text().split()[:2]
        if quota != "max":
            n = min(n, -(-int(quota) // int(period)))  # a part of a CPU still needs a thread
    except (OSError, ValueError):
        pass
    try:
        n = min(n, int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:
        pass
    return max(1, n)


# A held tensor's dtype -> kernels.cc's Kind (int4 pairs are uint8)
STEP_KINDS = {"Float32": 0, "BFloat16": 1, "Float16": 2, "Int8": 3, "UInt8": 4}


def _ptr(t) -> int:
    """The memory a MindSpore tensor (a Parameter) holds, which its graphs read and write too (seen on
    MindSpore 2.9 CPU: ``data_ptr`` is the same before and after graphs run, and a write there is what
    the next graph reads)."""
    return t.data_ptr()


class DecodeStep:
    """A decode step of a served model (``forms.ServingKernels``, every linear packed; LoRA adapters per row) in
    one call of kernels.cc's ``DecodeStep``: the same kernels in the same order as the step graph, on
    the same weights and caches, so the same logits to the bit, without MindSpore's runtime and the
    OpenMP waits between ~60 kernels a step. ``unsupported(model)`` says why a model cannot use it.

        step = DecodeStep(model, caches)            # caches: the engine's (k, v) per layer
        logits = step(ids, cos, sin, write, first, pos)   # CachedAttention's inputs, one token a row
    """

    def __init__(self, model, caches, threads: int | None = None):
        """``threads``: the step's OpenMP threads (default ``step_threads()``)."""
        why = self.unsupported(model)
        if why:
            raise ValueError(f"no native decode step: {why}")
        cfg, inner = model.config, model.model
        fn = ctypes.CDLL(library()).DecodeStep
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(StepModel), ctypes.c_int64] + [ctypes.c_void_p] * 8
        self._fn = fn
        self._held = [model, caches]  # the memory the pointers name stays alive with this object
        self.adapters = 0  # LoRA adapters in the stacks (``_linear`` counts them)
        linear = self._linear
        layers = [StepLayer(_ptr(b.attention_norm.weight), linear(b.attention.wqkv), linear(b.attention.wo),
                            _ptr(b.ffn_norm.weight), linear(b.feed_forward.w13), linear(b.feed_forward.w2),
                            _ptr(caches[2 * i]), _ptr(caches[2 * i + 1]))
                  for i, b in enumerate(inner.layers)]
        self._layers = (StepLayer * len(layers))(*layers)
        table = inner.tok_embeddings.embedding_weight
        self._model = StepModel(
            layers=len(layers), hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, cache_rows=caches[0].shape[0], cache_f16=int(str(caches[0].dtype) == "Float16"),
            vocab=cfg.vocab_size, table_kind=STEP_KINDS[str(table.dtype)], threads=threads or step_threads(),
            eps=cfg.rms_norm_eps,
            q_scale=float(inner.layers[0].attention.q_scale.asnumpy()[0]), table=_ptr(table),
            norm_out=_ptr(inner.norm_out.weight), head=linear(model.lm_head), layer=self._layers)
        self.vocab = cfg.vocab_size

    def _linear(self, lin) -> StepLinear:
        """A Linear as the step reads it. Its LoRA stacks (``Engine.load_adapter``'s, fp32) are copied,
        B transposed so that each rank's outputs are contiguous; an adapter load rebuilds the step."""
        w, s, b = lin.weight, lin.weight_scale, lin.bias
        out = StepLinear(_ptr(w), _ptr(s) if s is not None else None, _ptr(b) if b is not None else None,
                         STEP_KINDS[str(w.dtype)], lin.d_out, lin.d_in)
        if lin.lora_a is not None:
            a = np.ascontiguousarray(lin.lora_a.asnumpy(), np.float32)  # (n + 1, rank, K)
            bt = np.ascontiguousarray(lin.lora_b.asnumpy().transpose(0, 2, 1), np.float32)  # (n + 1, rank, N)
            self._held += [a, bt]
            self.adapters = a.shape[0] - 1  # the stacks' row 0 is "no adapter"
            out.lora_a, out.lora_bt, out.rank = a.ctypes.data, bt.ctypes.data, a.shape[1]
        return out

    @staticmethod
    def unsupported(model) -> str | None:
        """Why ``model`` cannot run as one native call (None when it can)."""
        from .forms import ServingKernels
        from .model import Linear, RMSNorm

        if type(model.ops) is not ServingKernels or not model.fused:  # a subclass computes otherwise
            return f"the {type(model.ops).__name__} form ({model.ops.name})"
        if library() is None:
            return unavailable()
        for name, cell in model.cells_and_names():
            if isinstance(cell, Linear) and not cell.packed:
                return f"{name} is not packed (its {cell.d_out} outputs are not a multiple of {PANEL})"
            if isinstance(cell, Linear) and cell.bias is not None and str(cell.bias.dtype) != "Float32":
                return f"{name}'s bias is {cell.bias.dtype}"
            if isinstance(cell, RMSNorm) and str(cell.weight.dtype) != "Float32":
                return f"{name} is {cell.weight.dtype}"
        table = model.model.tok_embeddings.embedding_weight.dtype
        if str(table) not in ("Float32", "BFloat16", "Float16"):
            return f"the embedding table is {table}"
        return None

    def __call__(self, ids, cos, sin, write, first, pos, adapters=None) -> np.ndarray:
        """ids (B,) int32, cos/sin (B, D) float32, write/first (B * kv_heads,) int32, pos (B,) int32,
        adapters (B,) int32 each row's LoRA adapter (0: none; checked by the engine) or None ->
        logits (B, vocab) float32. The caller holds the engine's lock (the caches are written)."""
        arrays = [np.ascontiguousarray(a, dt) for a, dt in ((ids, np.int32), (cos, np.float32), (sin, np.float32),
                                                            (write, np.int32), (first, np.int32), (pos, np.int32))]
        b, d, kv = arrays[0].size, self._model.head_dim, self._model.kv_heads
        if arrays[1].shape != (b, d) or arrays[2].shape != (b, d) or arrays[3].size != b * kv or \
                arrays[4].size != b * kv or arrays[5].size != b:
            raise ValueError(f"a decode step of {b} rows takes cos/sin ({b}, {d}), write/first ({b * kv},) and pos "
                             f"({b},); got {[a.shape for a in arrays]}")
        rows = None if adapters is None else np.ascontiguousarray(adapters, np.int32)
        if rows is not None and (rows.shape != (b,) or rows.min() < 0 or rows.max() > self.adapters):
            raise ValueError(f"a decode step of {b} rows takes {b} adapter indices in 0..{self.adapters}, got "
                             f"{rows.tolist()}")
        out = np.empty((b, self.vocab), np.float32)
        if self._fn(ctypes.byref(self._model), b, *(a.ctypes.data for a in arrays),
                    None if rows is None else rows.ctypes.data, out.ctypes.data):
            raise RuntimeError("DecodeStep refused the model's description")  # checked in unsupported(): a bug
        return out
