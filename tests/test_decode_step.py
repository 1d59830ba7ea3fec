"""The native decode step (``kernels.DecodeStep``): a decode-shaped step run as one call of the same
kernels the step graph runs gives the graph's logits to the bit and leaves the KV cache exactly as
the graph leaves it, for every weight precision, both cache dtypes, v1 (biases), InternLM2
(grouped-query) and InternLM3 (head_dim given, no o bias) shapes, rows joining and leaving, more
rows than a kernel tile holds (``verify``), and prefill chunks (on the graph) reading what it wrote."""
import os

import numpy as np
import pytest

from internlm_core import kernels
from internlm_core.config import Config
from internlm_core.engine import Engine
from internlm_core.loader import load_model, load_serving_model
from tests.helpers import pytest_on_build, random_ids
from tests.test_loader import write_random_folder

pytestmark = pytest.mark.skipif(kernels.library() is None, reason=f"kernels unavailable: {kernels.unavailable()}")

CASES = [  # (preset, stored dtype, quantise at load, KV cache dtype)
    ("tiny", "float32", None, "float32"),
    ("tiny", "bfloat16", None, "float16"),
    ("tiny-v2", "float16", None, "float32"),
    ("tiny-v2", "bfloat16", "int8", "float16"),
    ("tiny-v3", "bfloat16", "int4", "float16"),
]


def cache_rows(engine) -> list[np.ndarray]:
    return [c.asnumpy() for c in engine.caches]


@pytest.mark.parametrize("preset,dtype,quantize,cache", CASES)
def test_native_decode_equals_the_step_graph_bit_for_bit(tmp_path, preset, dtype, quantize, cache):
    cfg = Config.from_name(preset)
    folder = write_random_folder(tmp_path / "m", cfg, dtype, seed=3)
    model = load_serving_model(folder, quantize)
    graph = Engine(model, max_batch=4, max_len=64, cache_dtype=cache, native_step=False)
    native = Engine(model, max_batch=4, max_len=64, cache_dtype=cache)
    assert graph._native is None and native._native is not None
    prompts = [random_ids(n, cfg.vocab_size, seed=n) for n in (9, 3, 20)]
    slots = [0, 2, 3]
    logits = {e: e.prefill(slots, prompts) for e in (graph, native)}
    np.testing.assert_array_equal(logits[graph], logits[native])
    pos = {s: len(p) for s, p in zip(slots, prompts)}
    nxt = {s: int(t) for s, t in zip(slots, logits[graph].argmax(-1))}
    for step in range(10):
        live = [s for s in slots if not (s == 2 and step >= 4)] + ([1] * (step >= 6))  # one leaves, one joins
        if step == 6:  # slot 1 joins with a prompt of its own (a graph prefill beside native decodes)
            first = {e: e.prefill([1], [[5, 6, 7]]) for e in (graph, native)}
            np.testing.assert_array_equal(first[graph], first[native])
            pos[1], nxt[1] = 3, int(first[graph][0].argmax())
        out = {e: e.decode([nxt[s] for s in live], [pos[s] for s in live], slots=live) for e in (graph, native)}
        np.testing.assert_array_equal(out[graph], out[native])
        for s, row in zip(live, out[graph]):
            pos[s], nxt[s] = pos[s] + 1, int(row.argmax())
    # verify: 12 rows in one step (more than a kernel tile's 8), then the caches hold the same rows
    chunks = [[nxt[0], 11, 12, 13, 14, 15], [nxt[3], 21, 22, 23, 24, 25]]
    checked = {e: e.verify([0, 3], chunks, [pos[0], pos[3]]) for e in (graph, native)}
    for a, b in zip(checked[graph], checked[native]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(cache_rows(graph), cache_rows(native)):
        np.testing.assert_array_equal(a, b)
    # a prefill chunk (the graph) attends what native steps wrote: the same logits on both engines
    more = {e: e.prefill([0], [[9] * (pos[0] + 6) + [4, 5, 6]], starts=[pos[0] + 6]) for e in (graph, native)}
    np.testing.assert_array_equal(more[graph], more[native])


def test_a_model_the_native_step_cannot_run_keeps_the_graph(tiny_model_dir):
    """Linears left unpacked (outputs not a multiple of 16: here a 500-token head) and MindSpore's ops
    stay on the step graph, with the reason; so do steps with LoRA adapters (their rows run the graph)."""
    model = load_model(tiny_model_dir)
    odd = load_model(tiny_model_dir)
    from internlm_core.forms import serving_ops
    served = odd.serving_form(serving_ops("float32"))
    assert kernels.DecodeStep.unsupported(served) is None
    served.lm_head.d_out = 500  # as a 500-token vocabulary would leave it: not packed
    from mindspore import Parameter, Tensor
    served.lm_head.weight = Parameter(Tensor(np.zeros((500, served.config.hidden_size), np.float32)),
                                      name="lm_head.weight", requires_grad=False)
    assert "not packed" in kernels.DecodeStep.unsupported(served)
    assert Engine(model, max_batch=1, max_len=32, cpu_kernels=False)._native is None
    with pytest.raises(ValueError, match="no native decode step"):
        kernels.DecodeStep(served, None)


def test_the_native_step_refuses_inputs_of_the_wrong_shape(tiny_model_dir):
    engine = Engine(load_model(tiny_model_dir), max_batch=2, max_len=32)
    d, kv = engine.config.head_dim, engine.config.kv_heads
    ok = (np.zeros(2, np.int32), np.ones((2, d), np.float32), np.zeros((2, d), np.float32),
          np.zeros(2 * kv, np.int32), np.zeros(2 * kv, np.int32), np.zeros(2, np.int32))
    assert engine._native(*ok).shape == (2, engine.config.vocab_size)
    for i, bad in ((1, np.ones((2, d - 16), np.float32)), (3, np.zeros(kv, np.int32)), (5, np.zeros(3, np.int32))):
        args = list(ok)
        args[i] = bad
        with pytest.raises(ValueError, match="decode step of 2 rows"):
            engine._native(*args)


def test_lora_adapters_per_row_on_the_native_step(tmp_path):
    """Rows with different adapters (and none) in one native step give the graph's logits to float
    rounding (its own sums in place of MindSpore's matmul) and the same greedy tokens; replacing an
    adapter in place rebuilds the step, which then reads the new one."""
    from internlm_core.lora import AdapterSpec
    from tests.helpers import random_adapter

    cfg = Config.from_name("tiny-v2")
    model = load_serving_model(write_random_folder(tmp_path / "m", cfg, "bfloat16", seed=4), "int8")
    specs = [AdapterSpec(rank=4, alpha=8.0, targets=("wq", "wv", "w2")), AdapterSpec(rank=2, alpha=4.0)]
    folders = [random_adapter(cfg, spec, tmp_path / f"a{i}", seed=i, std=0.3) for i, spec in enumerate(specs)]
    graph = Engine(model, max_batch=3, max_len=48, native_step=False)
    native = Engine(model, max_batch=3, max_len=48)
    for e in (graph, native):
        e.load_adapter("a", folders[0])
        e.load_adapter("b", folders[1])
    assert native._native is not None and native._native.adapters == 2
    rows = [1, 0, 2]
    prompts = [random_ids(n, cfg.vocab_size, seed=n) for n in (7, 4, 11)]
    plain = Engine(model, max_batch=3, max_len=48)  # no adapters: row 1 (adapter 0) must be its, to the bit
    first = {e: e.prefill([0, 1, 2], prompts, adapters=rows) for e in (graph, native)}
    np.testing.assert_array_equal(plain.prefill([1], [prompts[1]])[0], first[native][1])
    pos, tok = np.array([len(p) for p in prompts]), first[graph].argmax(-1)
    for step in range(8):
        out = {e: e.decode(tok, pos, adapters=rows, slots=[0, 1, 2]) for e in (graph, native)}
        np.testing.assert_allclose(out[native], out[graph], rtol=1e-5, atol=1e-5)
        assert (out[native].argmax(-1) == out[graph].argmax(-1)).all()
        np.testing.assert_array_equal(plain.decode(tok[1:2], pos[1:2], slots=[1])[0], out[native][1])
        tok, pos = out[graph].argmax(-1), pos + 1
    # an adapter replaced in place (same shapes): the rebuilt native step reads the new weights
    for e in (graph, native):
        e.load_adapter("a", folders[1])
    out = {e: e.decode(tok, pos, adapters=rows, slots=[0, 1, 2]) for e in (graph, native)}
    np.testing.assert_allclose(out[native], out[graph], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="adapter indices in 0..2"):
        native._native(np.zeros(1, np.int32), np.ones((1, cfg.head_dim), np.float32),
                       np.zeros((1, cfg.head_dim), np.float32), np.zeros(cfg.kv_heads, np.int32),
                       np.zeros(cfg.kv_heads, np.int32), np.zeros(1, np.int32), adapters=[3])


def test_the_native_step_on_an_avx2_build(tmp_path):
    """The same tests with the kernels built for x86-64-v3 (AVX2, no AVX-512: int4 there is W4A16), in a
    fresh process with its own cache folder: the step's shares and barrier equal the graph there too."""
    pytest_on_build(__file__, "x86-64-v3", "not avx2_build", tmp_path)


def test_step_threads_follow_affinity_quota_and_omp_num_threads(tmp_path, monkeypatch):
    """A container's CPU quota (cgroup v2 cpu.max) caps the step's threads, which spin at their barrier:
    one more than there are CPUs would keep the others waiting for it."""
    cpus = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(kernels, "CGROUP_CPU", quota)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert kernels.step_threads() == cpus  # no cgroup file: the affinity
    quota.write_text("max 100000\n")
    assert kernels.step_threads() == cpus
    quota.write_text("50000 100000\n")  # half a CPU still needs a thread
    assert kernels.step_threads() == 1
    quota.write_text(f"{(cpus + 4) * 100000} 100000\n")  # a quota above the affinity: the affinity
    assert kernels.step_threads() == cpus
    quota.write_text("max 100000\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert kernels.step_threads() == 1


def test_one_thread_gives_the_same_step(tiny_model_dir):
    """A team of one (a one-CPU container) computes the same logits, bit for bit."""
    model = load_model(tiny_model_dir)
    engine = Engine(model, max_batch=2, max_len=32)
    engine.prefill([0, 1], [[5, 6, 7], [8, 9]])
    d, kv, L = engine.config.head_dim, engine.config.kv_heads, engine.max_len
    args = (np.array([3, 4], np.int32), np.ones((2, d), np.float32), np.zeros((2, d), np.float32),
            np.array([s * kv * L + h * L + 5 for s in (0, 1) for h in range(kv)], np.int32),
            np.array([s * kv * L + h * L for s in (0, 1) for h in range(kv)], np.int32), np.array([5, 5], np.int32))
    one = kernels.DecodeStep(engine.model, engine.caches, threads=1)
    np.testing.assert_array_equal(one(*args), engine._native(*args))


def test_every_row_count_up_to_17(tiny_model_dir):
    """1..17 rows in one step (the linear tiles' 8-row passes and their remainders, the step's row
    shares), each bit-equal to the graph's."""
    model = load_model(tiny_model_dir)
    graph = Engine(model, max_batch=2, max_len=64, native_step=False)
    native = Engine(model, max_batch=2, max_len=64)
    for e in (graph, native):
        e.prefill([0, 1], [[5, 6, 7, 8], [9, 10]])
    for n in range(1, 18):
        chunks = [[11 + j for j in range(n - n // 2)], [40 + j for j in range(n // 2)]]
        slots, starts = [s for s, c in zip((0, 1), chunks) if c], [s for s, c in zip((4, 2), chunks) if c]
        chunks = [c for c in chunks if c]
        got = {e: e.verify(slots, chunks, starts) for e in (graph, native)}
        for a, b in zip(got[graph], got[native]):
            np.testing.assert_array_equal(a, b)
