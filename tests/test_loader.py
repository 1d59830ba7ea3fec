"""Loading a model folder for serving (``loader.load_serving_model``): the engine's fused, packed
form read straight from the file, weights in their stored precision, one copy in memory."""
import gc
import json
import subprocess
import sys

import numpy as np
import pytest

from internlm_core import kernels
from internlm_core.checkpoint import DTYPE_TO_ST, WEIGHTS_FILE, SafetensorsWriter, atomic_folder, cast
from internlm_core.config import Config
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(kernels.library() is None, reason=f"kernels unavailable: {kernels.unavailable()}")


def write_random_folder(folder, cfg: Config, dtype: str, seed: int = 0):
    """A model folder of random weights written tensor by tensor (no whole model in memory)."""
    rng = np.random.default_rng(seed)
    st = DTYPE_TO_ST[dtype]
    shapes = cfg.param_shapes()
    with atomic_folder(folder, overwrite=True) as tmp:
        w = SafetensorsWriter(tmp / WEIGHTS_FILE, [(n, st, s) for n, s in shapes.items()], {"format": "ms"})
        for n, s in shapes.items():
            a = (np.ones(s, np.float32) if "norm" in n else rng.standard_normal(s, dtype=np.float32) * 0.02)
            w.write(n, cast(a, "F32", st))
        w.close()
        cfg.replace(dtype=dtype).save(tmp)
    return folder


def served_bytes(cfg: Config, dtype: str) -> int:
    """What the serving form should hold: every weight matrix and the embedding in ``dtype``, norms
    and biases in fp32, each once."""
    item = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    return sum(int(np.prod(s)) * (4 if len(s) == 1 else item) for s in cfg.param_shapes().values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-v2"])
def test_serving_model_holds_each_weight_once_in_the_stored_dtype(tmp_path, preset, dtype):
    """The loaded model's parameters are exactly the serving form's (q/k/v and gate/up fused,
    never the separate layers) and their bytes are the checkpoint's weights in their stored dtype
    (norms and biases fp32), each once; each packed weight is the file's tensors packed."""
    import mindspore as ms

    from internlm_core.checkpoint import SafetensorsFile
    from internlm_core.loader import load_serving_model

    cfg = Config.from_name(preset)
    model = load_serving_model(write_random_folder(tmp_path / "m", cfg, dtype))
    assert model.ops.name == "cpu-kernels" and model.fused
    params = {p.name: p for p in model.get_parameters()}
    assert not [n for n in params if n.rsplit(".", 2)[-2] in ("wq", "wk", "wv", "w1", "w3")]
    size = {ms.float32: 4, ms.float16: 2, ms.bfloat16: 2}
    assert sum(int(np.prod(p.shape)) * size[p.dtype] for p in params.values()) == served_bytes(cfg, dtype)
    f = SafetensorsFile(tmp_path / "m" / WEIGHTS_FILE)

    def raw(p):  # a parameter's stored values (bf16 as its uint16 bits, as the file has them)
        return (p.view(ms.uint16) if dtype == "bfloat16" else p).asnumpy()

    a = "model.layers.1.attention"
    np.testing.assert_array_equal(kernels.unpack(raw(params[f"{a}.wqkv.weight"])),
                                  np.concatenate([f.get(f"{a}.{w}.weight") for w in ("wq", "wk", "wv")]))
    gc.collect()  # the embedding table is a mapping of the file: still there once the loader's objects are gone
    table = "model.tok_embeddings.embedding_weight"
    np.testing.assert_array_equal(raw(params[table]), f.get(table))


CHILD = r"""
import json, sys
from internlm_core import kernels
from internlm_core.engine import open_engine
kernels.library()
def status_mb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
# VmHWM, not getrusage's ru_maxrss: that one survives exec, so it reports the (larger) pytest parent
def peak_mb():
    return status_mb("VmHWM:")
def rss_mb():
    return status_mb("VmRSS:")
try:  # start the peak from now: the imports' transient peak is not the load's
    open("/proc/self/clear_refs", "w").write("5")
except OSError:  # then the imports' peak may count as growth: an overestimate, never an underestimate
    pass
base = rss_mb()
engine = open_engine(sys.argv[1], max_batch=1, max_len=64, quantize=sys.argv[2] if len(sys.argv) > 2 else None)
load = peak_mb() - base
engine.decode([1], [0], slots=[0])
print(json.dumps({"load": load, "step": peak_mb() - base}))
"""


def test_loading_a_bf16_checkpoint_peaks_near_its_weight_bytes(tmp_path):
    """A ~260 MB bf16 checkpoint (the bench-serve shape: the 103168 x 512 embedding and head, 8
    layers) served in a fresh process: peak RSS grows by at most its weight bytes while loading
    (the packed weights in bf16, the embedding mapped from the file; the fp32 upcast with its
    copies took ~4x) and by little more once a step has compiled and run."""
    cfg = Config.from_name("bench-serve")
    folder = write_random_folder(tmp_path / "bs", cfg, "bfloat16")
    weights_mb = (folder / WEIGHTS_FILE).stat().st_size / 2**20
    run = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    grew = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{weights_mb:.0f} MB of weights; peak RSS grew {grew['load']:.0f} MB loading, {grew['step']:.0f} MB "
          "after a step")
    assert grew["load"] <= 1.0 * weights_mb + 32, (grew, weights_mb)
    assert grew["step"] <= 1.2 * weights_mb + 160, (grew, weights_mb)  # + MindSpore's compiled step


def test_quantising_a_bf16_checkpoint_at_load_peaks_near_its_int8_bytes(tmp_path):
    """The bench-serve bf16 checkpoint served with quantize="int8" in a fresh process: peak RSS grows
    by at most the int8 weights and their scales (+ the few MB read and quantised at a time, and the
    ~30 MB MindSpore allocates loading any checkpoint) while
    loading: never the bf16 or fp32 weights whole."""
    from internlm_core.quantize import quantized_names

    cfg = Config.from_name("bench-serve")
    folder = write_random_folder(tmp_path / "bs", cfg, "bfloat16")
    shapes = cfg.param_shapes()
    int8_mb = sum(np.prod(shapes[n]) + 4 * shapes[n][0] for n in quantized_names(cfg)) / 2**20
    run = subprocess.run([sys.executable, "-c", CHILD, str(folder), "int8"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    grew = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{int8_mb:.0f} MB of int8 weights; peak RSS grew {grew['load']:.0f} MB loading, {grew['step']:.0f} MB "
          "after a step")
    assert grew["load"] <= int8_mb + 48, (grew, int8_mb)  # measured: 75 MB held, 107 MB grown


def _first_logits(eng):
    """The logits of a 3-token prefill and one decode step on slot 0."""
    return np.concatenate([eng.prefill([0], [[5, 6, 7]]), eng.decode([9], [3], slots=[0])])


def _logits_without_kernels(folder, tmp_path, **open_kw):
    """``_first_logits`` of ``open_engine(folder, **open_kw)`` in a process with INTERNLM_CPU_KERNELS=0,
    after checking that it served fp32 parameters on MindSpore's own ops."""
    import os

    code = f"""
import numpy as np
from internlm_core.engine import open_engine
from tests.test_loader import _first_logits
eng = open_engine({str(folder)!r}, max_batch=2, max_len=64, **{open_kw!r})
print("KERNELS", eng.kernels, sorted({{str(p.dtype) for p in eng.model.get_parameters()}}))
np.save({str(tmp_path / 'ops.npy')!r}, _first_logits(eng))
"""
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "INTERNLM_CPU_KERNELS": "0"},
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "KERNELS False ['Float32']" in run.stdout
    return np.load(tmp_path / "ops.npy")


def test_without_the_kernels_int8_is_served_from_its_dequantised_values(tmp_path):
    """INTERNLM_CPU_KERNELS=0 with quantize="int8": fp32 weights holding q * scale, MindSpore's ops;
    the logits equal the int8 kernels' (1e-4 relative)."""
    from internlm_core.engine import open_engine

    folder = write_random_folder(tmp_path / "m", Config.from_name("tiny-v2"), "bfloat16")
    ops = _logits_without_kernels(folder, tmp_path, quantize="int8")
    eng = open_engine(folder, max_batch=2, max_len=64, quantize="int8", cache_dtype="float32")  # as the ops path's
    assert eng.quantization == "int8"
    ours = _first_logits(eng)
    assert np.abs(ours - ops).max() <= 1e-4 * np.abs(ops).max()
    plain = open_engine(folder, max_batch=2, max_len=64)
    assert np.abs(plain.prefill([0], [[5, 6, 7]]) - ours[:1]).max() > 0  # quantised: not the bf16 logits


def test_a_checkpoint_that_does_not_fit_its_config_is_refused_before_loading(tmp_path):
    from internlm_core.errors import CheckpointError
    from internlm_core.loader import load_serving_model

    folder = write_random_folder(tmp_path / "m", Config.from_name("tiny"), "bfloat16")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    with pytest.raises(CheckpointError, match=r"feed_forward.w1.weight: shape \[160, 64\] does not match"):
        load_serving_model(folder)


def test_without_the_kernels_a_bf16_checkpoint_is_served_from_fp32_with_mindspores_ops(tmp_path):
    """INTERNLM_CPU_KERNELS=0: open_engine falls back to ``load_model`` (fp32, MindSpore's ops have no
    bf16 kernels on CPU); the logits equal the kernels' served from bf16 (1e-4 relative)."""
    from internlm_core.engine import open_engine

    folder = write_random_folder(tmp_path / "m", Config.from_name("tiny-v2"), "bfloat16")
    ops = _logits_without_kernels(folder, tmp_path)
    eng = open_engine(folder, max_batch=2, max_len=64, cache_dtype="float32")  # the ops path's cache
    ours = _first_logits(eng)
    assert np.abs(ours - ops).max() <= 1e-4 * np.abs(ops).max()
