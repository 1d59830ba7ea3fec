"""The CPU kernels (internlm_core/kernels.cc) against numpy in float64, inside compiled graphs as
the engine runs them, and the build: cached per machine, refused cleanly without a compiler."""
import os
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

from internlm_core import kernels, train_kernels
from internlm_core.checkpoint import bf16_to_f32, f32_to_bf16
from internlm_core.quantize import GROUP, dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8
from tests.helpers import pytest_on_build

# A developer's machine without a compiler skips these; CI (CI set, as .ci/run sets it) must not:
# setup.sh installs g++, and a library that does not build there is a failure.
pytestmark = pytest.mark.skipif(kernels.library() is None and not os.environ.get("CI"),
                                reason=f"kernels unavailable: {kernels.unavailable()}")


def test_the_kernels_build_here():
    assert kernels.library() is not None, kernels.unavailable()
    assert kernels.training_library() is not None, kernels.training_unavailable()


def stored(w: np.ndarray, dtype: str):
    """(the weight as stored in ``dtype``: fp32, fp16, or bf16 bits as uint16; its values as float64)."""
    if dtype == "bfloat16":
        bits = f32_to_bf16(w)
        return bits, bf16_to_f32(bits).astype(np.float64)
    arr = w.astype({"float32": np.float32, "float16": np.float16}[dtype])
    return arr, arr.astype(np.float64)


class _Linear(nn.Cell):
    """``dtype`` int4: ``w`` is q (N, K) in -8..7 and ``scale`` its (N, K / GROUP) group scales, packed
    here as the loader packs them (two values a byte, each panel's scales together)."""

    def __init__(self, w, b, dtype="float32", scale=None):
        super().__init__()
        if dtype == "int4":
            w, scale, dtype = pack_int4(w), kernels.pack(np.asarray(scale, np.float32)), "uint8"
        self.w = Parameter(kernels.to_tensor(kernels.pack(w), dtype), name="w")
        self.b = None if b is None else Parameter(Tensor(b), name="b")
        self.s = None if scale is None else Parameter(Tensor(scale), name="s")
        self.op = kernels.linear_op(b is not None, scale is not None)

    @ms.jit
    def construct(self, x):
        if self.s is not None:
            return self.op(x, self.w, self.s) if self.b is None else self.op(x, self.w, self.s, self.b)
        return self.op(x, self.w) if self.b is None else self.op(x, self.w, self.b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,), (9,), (17,), (2, 1), (3, 40)])
@pytest.mark.parametrize("n,k", [(16, 64), (48, 37), (80, 64), (400, 160), (816, 2048)])
def test_packed_linear_equals_numpy(bias, lead, n, k):
    """Every rows count (the 8-row tiles and each remainder), panel counts that leave a remainder of
    the 4/3/2-panel tiles, odd K, leading dims, bias; the threaded path too (the largest shapes),
    and past 8 rows the weight taken in blocks of panels with a remainder block (816 x 2048)."""
    rng = np.random.default_rng(n * k + len(lead))
    w = rng.normal(size=(n, k)).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32) if bias else None
    x = rng.normal(size=lead + (k,)).astype(np.float32)
    y = _Linear(w, b)(Tensor(x)).asnumpy()
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + (0 if b is None else b)
    assert y.shape == lead + (n,)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", list(range(1, 18)) + [(3, 40)])
@pytest.mark.parametrize("n,k", [(16, 64), (48, 37), (80, 64), (400, 160), (816, 2048)])
def test_packed_linear_with_half_precision_weights_equals_numpy(dtype, bias, rows, n, k):
    """bf16 / fp16 weights widened in the kernel: every row count 1..17 (the 8-row tiles and each
    remainder), panel remainders, odd K, the threaded path, against float64 on the widened values;
    and exactly the fp32 kernel's result on those values (the same FMAs in the same order)."""
    rng = np.random.default_rng(n * k + (rows if isinstance(rows, int) else 99))
    lead = (rows,) if isinstance(rows, int) else rows
    w, w64 = stored(rng.normal(size=(n, k)).astype(np.float32), dtype)
    b = rng.normal(size=n).astype(np.float32) if bias else None
    x = rng.normal(size=lead + (k,)).astype(np.float32)
    y = _Linear(w, b, dtype)(Tensor(x)).asnumpy()
    ref = x.astype(np.float64) @ w64.T + (0 if b is None else b)
    assert y.shape == lead + (n,) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    np.testing.assert_array_equal(y, _Linear(w64.astype(np.float32), b)(Tensor(x)).asnumpy())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", list(range(1, 18)) + [(3, 40)])
@pytest.mark.parametrize("n,k", [(16, 64), (48, 37), (80, 64), (400, 160), (816, 2048)])
def test_packed_linear_with_int8_weights_equals_numpy(bias, rows, n, k):
    """int8 weights with per-output-channel scales (W8A16): every row count 1..17, panel
    remainders, odd K, the threaded path, against float64 on the dequantised values q * scale;
    and exactly the fp32 kernel's sums on the integers, times the scale, plus the bias."""
    rng = np.random.default_rng(n * k + (rows if isinstance(rows, int) else 99))
    lead = (rows,) if isinstance(rows, int) else rows
    q, scale = quantize_int8(rng.normal(size=(n, k)).astype(np.float32) * rng.uniform(0.1, 3, size=(n, 1)))
    b = rng.normal(size=n).astype(np.float32) if bias else None
    x = rng.normal(size=lead + (k,)).astype(np.float32)
    y = _Linear(q, b, "int8", scale)(Tensor(x)).asnumpy()
    w64 = q.astype(np.float64) * scale.astype(np.float64)[:, None]
    ref = x.astype(np.float64) @ w64.T + (0 if b is None else b)
    assert y.shape == lead + (n,) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k) * scale.max() * 127)
    sums = _Linear(q.astype(np.float32), None)(Tensor(x)).asnumpy()
    if b is None:
        np.testing.assert_array_equal(y, sums * scale)
    else:  # sums * scale + b in one FMA: one rounding of the exact value
        np.testing.assert_array_equal(y, (sums.astype(np.float64) * scale + b).astype(np.float32))


def q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (..., K) rounded as the W4A8 kernel rounds it, llama.cpp's Q8_0 rule in float32 arithmetic:
    per row and group of 32, d = max|x| / 127, q = x * (1 / d) rounded to nearest, ties to even
    (0 where d is 0). (q (..., K/32, 32) int64, d (..., K/32) float32)."""
    g = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, GROUP)
    d = np.abs(g).max(-1) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    return np.rint(g * inv[..., None]).astype(np.int64), d


def int4_reference(x: np.ndarray, q: np.ndarray, scale: np.ndarray, b) -> np.ndarray:
    """What the int4 kernel computes, in float64: x against q * scale (W4A16); where the build
    multiplies int8 activations (W4A8, ``kernels.int4_activations``), x rounded by ``q8_0`` first,
    each (row, group)'s integer sum times its d * scale (the float32 product the kernel takes)."""
    n, k = q.shape
    if kernels.int4_activations() == "float32":
        y = x.astype(np.float64) @ dequantize_int4(q, scale).astype(np.float64).T
    else:
        xq, d = q8_0(x)
        sums = np.einsum("...gk,ngk->...ng", xq, q.reshape(n, k // GROUP, GROUP).astype(np.int64))
        y = (sums * (d[..., None, :] * scale).astype(np.float64)).sum(-1)
    return y + (0 if b is None else b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", list(range(1, 18)) + [(3, 40)])
@pytest.mark.parametrize("n,k", [(16, 64), (48, 32), (80, 96), (400, 160), (816, 2048)])
def test_packed_linear_with_int4_weights_equals_numpy(bias, rows, n, k):
    """int4 weights two a byte with a scale per output and group of 32 inputs: every row count
    1..17, panel remainders of every tile width (2, 3 and 4 panels), one group and many, the
    threaded path and the blocked one past 8 rows, against float64 (``int4_reference``): W4A16, on
    the dequantised values; W4A8, on the activations rounded by Q8_0's rule, each group's integer
    sum times its scales. Within fp32 rounding of either: a W4A8 kernel differs from W4A16 by ~0.5%
    of max|y| (the activations' rounding), far outside it."""
    rng = np.random.default_rng(n * k + (rows if isinstance(rows, int) else 99))
    lead = (rows,) if isinstance(rows, int) else rows
    q, scale = quantize_int4(rng.normal(size=(n, k)).astype(np.float32) * rng.uniform(0.1, 3, size=(n, 1)))
    q[0, :2] = (-8, 7)  # the nibbles' whole range, -8 included (a folder written elsewhere may use it)
    b = rng.normal(size=n).astype(np.float32) if bias else None
    x = rng.normal(size=lead + (k,)).astype(np.float32)
    x.reshape(-1, k)[0, :GROUP] = 0  # a group of zeros: W4A8's d = 0
    y = _Linear(q, b, "int4", scale)(Tensor(x)).asnumpy()
    w32 = dequantize_int4(q, scale)
    assert y.shape == lead + (n,) and y.dtype == np.float32
    np.testing.assert_allclose(y, int4_reference(x, q, scale, b), rtol=1e-5, atol=1e-5 * np.sqrt(k) * np.abs(w32).max())


def test_int4_activations_are_rounded_by_q8_0s_rule():
    """W4A8's rounding exactly (ties to even, d = max|x| / 127, a zero group): one group whose largest
    value is 127 (d = 1: x * (1 / d) is x) holding the ties 0.5, 1.5, 2.5, -0.5, -2.5, against
    weights picking each out, so every output is one rounded activation times 2 (the scale); and
    W4A16's exact products where the build has no VNNI."""
    ties = [0.5, 1.5, 2.5, -0.5, -2.5, 3.25, 127.0]
    x = np.zeros((1, 2 * GROUP), np.float32)
    x[0, :len(ties)] = ties
    x[0, GROUP:] = 0  # the second group is all zeros
    q = np.zeros((16, 2 * GROUP), np.int8)
    for o in range(len(ties)):
        q[o, o] = 1
    q[len(ties), 0], q[len(ties), 1] = -8, 7  # -8 * 0.5 + 7 * 1.5 (A16) or -8 * 0 + 7 * 2 (A8)
    scale = np.full((16, 2), 2.0, np.float32)
    y = _Linear(q, None, "int4", scale)(Tensor(x)).asnumpy()[0]
    if kernels.int4_activations() == "int8":
        want = [0, 2, 2, 0, -2, 3, 127, 14]
    else:
        want = ties + [-8 * 0.5 + 7 * 1.5]
    np.testing.assert_array_equal(y[:len(want)], 2 * np.array(want, np.float32))
    np.testing.assert_array_equal(y[len(want):], 0)


def test_int4_carries_a_nan_in_x_to_its_rows_outputs_only():
    """A NaN (or inf) in a row of x makes that row's outputs NaN, as fp32 arithmetic would (W4A8's
    rounding must not turn it into a 0), and leaves the other rows as they were."""
    rng = np.random.default_rng(5)
    q, scale = quantize_int4(rng.normal(size=(48, 96)).astype(np.float32))
    x = rng.normal(size=(3, 96)).astype(np.float32)
    cell = _Linear(q, None, "int4", scale)
    clean = cell(Tensor(x)).asnumpy()
    for bad in (np.nan, np.inf):
        x2 = x.copy()
        x2[1, 40] = bad
        y = cell(Tensor(x2)).asnumpy()
        assert np.isnan(y[1]).all() or (bad == np.inf and not np.isfinite(y[1]).any()), y[1]
        np.testing.assert_array_equal(y[[0, 2]], clean[[0, 2]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("c", [64, 37])
def test_embedding_widens_the_rows_of_its_table(dtype, c):
    """Rows of an fp32 / bf16 / fp16 table as fp32, exactly; a vector tail; ids out of range read
    the nearest row, never outside the table."""
    rng = np.random.default_rng(c)
    table, t64 = stored(rng.normal(size=(300, c)).astype(np.float32), dtype)
    ids = np.array([[0, 299, 17], [5, 5, 123]], np.int32)
    out = _Graph(kernels.embedding_op())(Tensor(ids), Parameter(kernels.to_tensor(table, dtype), name="t")).asnumpy()
    assert out.dtype == np.float32 and out.shape == (2, 3, c)
    np.testing.assert_array_equal(out, t64[ids].astype(np.float32))
    out = _Graph(kernels.embedding_op())(Tensor(np.array([-3, 10**6], np.int32)),
                                         Parameter(kernels.to_tensor(table, dtype), name="t")).asnumpy()
    np.testing.assert_array_equal(out, t64[[0, 299]].astype(np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_packed_linear_rows_do_not_depend_on_how_many_are_computed_together(dtype):
    """A row's outputs are the same bits whether it is computed alone (decode, one stream) or with
    up to 16 others (the tiles differ: four panels at a time for one or two rows, three for more,
    8 rows a pass), so batching never changes a greedy token."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(816, 160)).astype(np.float32)
    scale = None
    if dtype == "int8":
        w, scale = quantize_int8(w)
    elif dtype == "int4":
        w, scale = quantize_int4(w)
    elif dtype == "bfloat16":
        w = f32_to_bf16(w)
    x = rng.normal(size=(17, 160)).astype(np.float32)
    cell = _Linear(w, None, dtype, scale)
    alone = np.concatenate([cell(Tensor(x[i:i + 1])).asnumpy() for i in range(17)])
    for rows in (2, 3, 8, 17):
        np.testing.assert_array_equal(cell(Tensor(x[:rows])).asnumpy(), alone[:rows])


def test_pack_rows_fills_a_fused_weight_part_by_part():
    """Parts of any row count (not panel-aligned) packed in place equal the whole packed at once,
    in the stored dtype (bf16 bits)."""
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 2**16, size=(n, 7), dtype=np.uint16) for n in (40, 8, 8, 24)]
    wp = np.zeros((5, 7, 16), np.uint16)
    row = 0
    for part in parts:
        kernels.pack_rows(wp, part, row)
        row += len(part)
    np.testing.assert_array_equal(wp, kernels.pack(np.concatenate(parts)))
    assert kernels.pack(parts[0][:32]).dtype == np.uint16
    with pytest.raises(ValueError, match="do not fit"):
        kernels.pack_rows(wp, parts[0], 50)


def test_every_kernel_on_an_avx2_build(tmp_path):
    """The kernels built for x86-64-v3 (AVX2 + FMA + F16C, no AVX-512: ``INTERNLM_KERNEL_MARCH``), in
    a fresh process with its own cache folder: every kernel test of this file (serving and
    training) passes there too, from a library without one AVX-512 register in it."""
    pytest_on_build(__file__, "x86-64-v3", "not avx2_build and not avx512_build and not built_once and not without_",
                    tmp_path, timeout=1200)
    (lib,) = tmp_path.glob("kernels-*.so")
    objdump = shutil.which("objdump")
    if objdump:
        code = subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        assert "%zmm" not in code and "%ymm" in code


@pytest.mark.skipif("avx512f" not in kernels._cpu_flags().split(), reason="no AVX-512 on this CPU")
def test_int4_on_an_avx512_build_without_vnni(tmp_path):
    """An AVX-512 CPU without AVX512_VNNI (skylake-avx512: INTERNLM_KERNEL_MARCH) builds the W4A16 int4
    tile, on the same packed layout: this file's int4 tests pass there, against W4A16's reference."""
    pytest_on_build(__file__, "skylake-avx512", "int4 and not avx512_build", tmp_path, timeout=600)
    env = {**os.environ, "INTERNLM_KERNEL_DIR": str(tmp_path), kernels.ENV_MARCH: "skylake-avx512"}
    check = "from internlm_core import kernels; print(kernels.int4_activations())"
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "float32", out.stdout + out.stderr[-2000:]


def test_pack_layout_and_its_inverse():
    w = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    wp = kernels.pack(w)
    assert wp.shape == (2, 3, 16) and wp[1, 2, 5] == w[16 + 5, 2]
    np.testing.assert_array_equal(kernels.unpack(wp), w)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.pack(np.zeros((20, 3), np.float32))


def test_int4_pairs_pack_each_outputs_four_bytes_together():
    """uint8 (int4 pairs): the (P, K/2, 16) array holds (P, K/8, 16, 4), output o's pairs 4c .. 4c + 3
    in one 32-bit lane, as the kernels read them; packed part by part (rows not panel-aligned) as
    whole; ``unpack`` inverts it; a row that is not whole lanes is refused."""
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, size=(48, 12), dtype=np.uint8)
    wp = kernels.pack(b)
    assert wp.shape == (3, 12, 16) and wp.dtype == np.uint8
    lanes = wp.reshape(3, 3, 16, 4)
    for o, c in ((0, 0), (17, 5), (47, 11), (30, 7)):
        assert lanes[o // 16, c // 4, o % 16, c % 4] == b[o, c]
    np.testing.assert_array_equal(kernels.unpack(wp), b)
    parts = np.zeros_like(wp)
    for lo, hi in ((0, 5), (5, 21), (21, 48)):
        kernels.pack_rows(parts, b[lo:hi], lo)
    np.testing.assert_array_equal(parts, wp)
    with pytest.raises(ValueError, match="4 to a lane"):
        kernels.pack(b[:, :10])


class _Attention(nn.Cell):
    def __init__(self, k, v):
        super().__init__()
        self.k = Parameter(Tensor(k), name="k")
        self.v = Parameter(Tensor(v), name="v")
        self.op = kernels.attention_op()

    @ms.jit
    def construct(self, qkv, write, first, pos):
        return self.op(qkv, self.k, self.v, write, first, pos)


def reference_attention(q, k, v, first, pos):
    """(B, T, H, D): query t of row b, head h over the cache rows of k/v head h // (H / Hkv),
    first[b, that head] .. + pos[b, t]."""
    b, h, t, d = q.shape
    group = h // first.shape[1]
    out = np.zeros((b, t, h, d))
    for i in range(b):
        for j in range(h):
            for n in range(t):
                rows = slice(first[i, j // group], first[i, j // group] + pos[i, n] + 1)
                s = k[rows].astype(np.float64) @ q[i, j, n].astype(np.float64)
                p = np.exp(s - s.max())
                out[i, n, j] = (p / p.sum()) @ v[rows]
    return out


@pytest.mark.parametrize("cache", ["float32", "float16"])
@pytest.mark.parametrize("kv", [2, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("t", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_cached_attention_equals_causal_softmax_over_each_rows_cache(t, d, kv, cache):
    """One query (decode) and chunks of queries (prefill: 16 at a time, and remainders), rows and
    heads anywhere in the cache, positions from 0 to hundreds (one key, the 16-key blocks and their
    remainders, the 16-wide exp and its tail), scores large enough that the max subtraction matters;
    with k/v heads shared by query heads (grouped-query attention) too. The step's new k/v rows are
    written at their positions first (rounded to nearest-even in an fp16 cache, as numpy rounds them,
    and nothing else changed) and attended by the same call. An fp16 cache (the engine's default)
    against float64 on its fp16 values (widening is exact: the same fp32 arithmetic), and exactly the
    fp32 kernel's output on an fp32 cache holding those values."""
    rng = np.random.default_rng(d * t)
    rows, b, h = 4400, 3, 2
    k = rng.normal(size=(rows, d)).astype(cache)
    v = rng.normal(size=(rows, d)).astype(cache)
    q = (3 * rng.normal(size=(b, h, t, d))).astype(np.float32)
    new_k, new_v = (rng.normal(size=(b, kv, t, d)).astype(np.float32) for _ in range(2))
    qkv = np.concatenate([q, new_k, new_v], 1)
    start = np.array([0, 15, 650])[:, None] + np.arange(t)  # each row's query positions
    first = (rng.permutation(b * kv) * 700).reshape(b, kv).astype(np.int32)  # apart: no row written twice
    write = (first[:, :, None] + start[:, None, :]).reshape(-1).astype(np.int32)
    args = Tensor(qkv), Tensor(write), Tensor(first), Tensor(start.astype(np.int32))
    cell = _Attention(k, v)
    out = cell(*args).asnumpy()
    assert out.dtype == np.float32
    k_after, v_after = k.copy(), v.copy()
    k_after[write] = new_k.reshape(-1, d)
    v_after[write] = new_v.reshape(-1, d)
    np.testing.assert_array_equal(cell.k.asnumpy(), k_after)
    np.testing.assert_array_equal(cell.v.asnumpy(), v_after)
    # float32 sums of 128 products per score and over up to 700 keys of unit-scale values:
    # ~6e-8 * (sqrt(128) * |score| + sqrt(700)) a few times over
    np.testing.assert_allclose(out, reference_attention(q, k_after, v_after, first, start), rtol=1e-5, atol=2e-5)
    if cache == "float16":
        exact = np.concatenate([q, new_k.astype(np.float16), new_v.astype(np.float16)], 1).astype(np.float32)
        fp32 = _Attention(k.astype(np.float32), v.astype(np.float32))
        np.testing.assert_array_equal(out, fp32(Tensor(exact), *args[1:]).asnumpy())


def test_an_fp16_cache_holds_values_past_its_range_at_its_largest():
    """New k/v values past fp16's range are written as +-65504 (the largest finite fp16), not inf:
    attention over them stays finite."""
    k = np.zeros((8, 16), np.float16)
    cell = _Attention(k, k.copy())
    qkv = np.zeros((1, 3, 1, 16), np.float32)
    qkv[0, 1:, 0, :8], qkv[0, 1:, 0, 8:] = 1e6, -1e9
    out = cell(Tensor(qkv), Tensor(np.array([2], np.int32)), Tensor(np.zeros((1, 1), np.int32)),
               Tensor(np.array([[2]], np.int32))).asnumpy()
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(cell.k.asnumpy()[2], [65504] * 8 + [-65504] * 8)


def test_cached_attention_never_reads_or_writes_outside_the_cache():
    """Rows past the cache are clipped to it and writes outside it are skipped (an error code from an
    AOT kernel would leave MindSpore's graph unusable for every later call): the output is attention
    over the rows that exist, nothing outside the cache is touched, and the graph keeps working."""
    rng = np.random.default_rng(0)
    k = rng.normal(size=(64, 16)).astype(np.float32)
    v = rng.normal(size=(64, 16)).astype(np.float32)
    cell = _Attention(k, v)
    for t in (1, 3):
        q = rng.normal(size=(1, 1, t, 16)).astype(np.float32)
        qkv = Tensor(np.concatenate([q, np.full((1, 2, t, 16), 7, np.float32)], 1))
        first = Tensor(np.array([[60]], np.int32))
        inside = np.full((1, t), 3, np.int32)  # rows 60..63, the cache's last
        expected = reference_attention(q, k, v, np.array([[60]]), inside)
        for write in (-1, 64, 2**31 - 1):  # no row of the cache
            for pos in (inside + 1, np.full((1, t), 10**9, np.int32), inside):
                out = cell(qkv, Tensor(np.full(t, write, np.int32)), first, Tensor(pos)).asnumpy()
                np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        out = cell(qkv, Tensor(np.full(t, -7, np.int32)), Tensor(np.array([[-5]], np.int32)),
                   Tensor(np.full((1, t), -1, np.int32))).asnumpy()
        assert np.isfinite(out).all()
    np.testing.assert_array_equal(cell.k.asnumpy(), k)
    np.testing.assert_array_equal(cell.v.asnumpy(), v)


class _Graph(nn.Cell):
    """An op run in a compiled graph, as the engine's steps run it."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    @ms.jit
    def construct(self, *args):
        return self.op(*args)


@pytest.mark.parametrize("shape", [(1, 64), (2, 37), (3, 5, 160), (1100, 96)])  # a scalar tail; threads
def test_rms_norm_equals_numpy(shape):
    rng = np.random.default_rng(shape[-1])
    x = (5 * rng.normal(size=shape)).astype(np.float32)
    w = rng.normal(size=shape[-1]).astype(np.float32)
    y = _Graph(kernels.rms_norm_op())(Tensor(x), Tensor(w), Tensor([1e-6], ms.float32)).asnumpy()
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 32), (3, 5, 320), (700, 2752)])
def test_silu_mul_equals_numpy(shape):
    rng = np.random.default_rng(shape[-1])
    gu = (4 * rng.normal(size=shape)).astype(np.float32)
    y = _Graph(kernels.silu_mul_op())(Tensor(gu)).asnumpy()
    g, u = np.split(gu.astype(np.float64), 2, -1)
    np.testing.assert_allclose(y, g / (1 + np.exp(-g)) * u, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("b,t,h,kv,d", [(1, 1, 4, 4, 16), (3, 7, 2, 2, 64), (2, 130, 8, 8, 128), (2, 5, 8, 2, 32)])
def test_rope_equals_rotate_half_on_q_and_k(b, t, h, kv, d):
    """Heads out of the fused projection's (B, T, (H + 2 Hkv) D): q rotated and scaled, k rotated,
    v as is (fewer k/v heads under grouped-query attention), with cos/sin per row and position (so
    rows of different lengths and NTK bases mix)."""
    rng = np.random.default_rng(d + kv)
    y = rng.normal(size=(b, t, (h + 2 * kv) * d)).astype(np.float32)
    angles = rng.uniform(-50, 50, size=(b, t, d // 2))
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(np.float32)
    out = _Graph(kernels.rope_op())(Tensor(y), Tensor(cos), Tensor(sin), Tensor([0.125], ms.float32),
                                    Tensor([h, kv], ms.int32)).asnumpy()
    heads = y.astype(np.float64).reshape(b, t, h + 2 * kv, d).transpose(0, 2, 1, 3)
    c, s = cos[:, None].astype(np.float64), sin[:, None].astype(np.float64)
    turned = np.concatenate([-heads[..., d // 2:], heads[..., :d // 2]], -1)
    rotated = heads * c + turned * s
    ref = np.concatenate([rotated[:, :h] * 0.125, rotated[:, h:h + kv], heads[:, h + kv:]], 1)
    assert out.shape == (b, h + 2 * kv, t, d)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_library_is_built_once_per_machine_and_found_again(tmp_path):
    """A fresh cache folder gets one library; a second process finds it instead of compiling."""
    code = "from internlm_core import kernels; print(kernels.library())"
    env = {**os.environ, "INTERNLM_KERNEL_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    built = list(tmp_path.iterdir())
    assert [p.name for p in built] == [os.path.basename(first.stdout.strip())]
    mtime = built[0].stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert again.stdout == first.stdout and built[0].stat().st_mtime_ns == mtime


def test_without_onednn_serving_keeps_its_kernels_and_training_says_why(tmp_path):
    """The training GEMMs link the oneDNN inside the mindspore wheel; a MindSpore without it still
    gets the serving kernels (their own library, no oneDNN), and training gets the reason and the
    MindSpore-ops model (a fresh process: the libraries are cached per process)."""
    code = """
from internlm_core import kernels
from internlm_core.forms import training_ops
kernels.DNNL = "libdnnl.so.0-not-here"
print("SERVING", kernels.library() is not None)
print("TRAINING", kernels.training_library())
print("WHY", kernels.training_unavailable())
print("TRAIN", training_ops().name == "cpu-training-kernels")
"""
    env = {**os.environ, "INTERNLM_KERNEL_DIR": str(tmp_path / "k")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "SERVING True" in out.stdout and "TRAINING None" in out.stdout and "TRAIN False" in out.stdout
    assert "WHY this MindSpore ships no oneDNN (" in out.stdout and "libdnnl.so.0-not-here is missing)" in out.stdout
    assert [p.name.split("-")[0] for p in (tmp_path / "k").glob("*.so")] == ["kernels"]


def test_without_a_compiler_the_engine_runs_mindspores_ops(tmp_path, tiny_model_dir):
    """No g++: the kernels say why, the engine logs it and serves with MindSpore's ops, and its
    logits equal the kernels' to float rounding."""
    code = f"""
import logging, numpy as np
logging.basicConfig(level=logging.WARNING)
from internlm_core import kernels
from internlm_core.engine import Engine
from internlm_core.loader import load_model
eng = Engine(load_model({str(tiny_model_dir)!r}), max_batch=2, max_len=64)
print("WHY", kernels.unavailable())
print("USED", eng.kernels)
logits = eng.prefill([0], [[5, 6, 7]])
np.save({str(tmp_path / 'ops.npy')!r}, np.concatenate([logits, eng.decode([9], [3], slots=[0])]))
"""
    env = {**os.environ, "INTERNLM_KERNEL_DIR": str(tmp_path / "k"), "CXX": "no-such-compiler"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "WHY no C++ compiler (g++) on PATH" in out.stdout and "USED False" in out.stdout
    assert "CPU kernels not used (no C++ compiler" in out.stderr
    assert not (tmp_path / "k").exists()

    from internlm_core.engine import Engine
    from internlm_core.loader import load_model

    eng = Engine(load_model(tiny_model_dir), max_batch=2, max_len=64, cache_dtype="float32")  # as the ops path's
    assert eng.kernels
    ours = np.concatenate([eng.prefill([0], [[5, 6, 7]]), eng.decode([9], [3], slots=[0])])
    np.testing.assert_allclose(ours, np.load(tmp_path / "ops.npy"), rtol=1e-5, atol=1e-5)


# ---- training kernels (train_kernels.cc): forward and backward inside compiled gradient graphs ----

class _Grads(nn.Cell):
    """value_and_grad of sum(f(inputs) * probe) in one compiled graph, as the trainer's step runs it."""

    def __init__(self, fn, positions, weights=None):
        super().__init__()
        self.fn, self.grad = fn, ms.value_and_grad(fn, positions, weights)

    @ms.jit
    def construct(self, *args):
        return self.grad(*args)


class _Probe(nn.Cell):
    def __init__(self, op, *params):
        super().__init__()
        self.op, self.params = op, ms.ParameterTuple(params)

    def construct(self, x, probe):
        return (self.op(x, *self.params) * probe).sum()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 33)])
@pytest.mark.parametrize("n,k", [(16, 64), (37, 50), (320, 96)])
def test_training_linear_and_its_gradients_equal_numpy(bias, lead, n, k):
    """y = x W^T + b, dx = dy W, dW = dy^T x, db = the column sums of dy, in float64 numpy; a
    frozen layer gives dx alone and its GEMMs count no weight-gradient work."""
    rng = np.random.default_rng(n + k + len(lead))
    x = rng.normal(size=lead + (k,)).astype(np.float32)
    w, b = rng.normal(size=(n, k)).astype(np.float32), rng.normal(size=n).astype(np.float32)
    dy = rng.normal(size=lead + (n,)).astype(np.float32)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    tol = dict(rtol=1e-5, atol=1e-5 * np.sqrt(max(k, n, x.size // k)))
    for trains in (True, False):
        params = [Parameter(Tensor(w), name="w", requires_grad=trains)]
        if bias:
            params.append(Parameter(Tensor(b), name="b", requires_grad=trains))
        net = _Probe(train_kernels.train_linear_op(bias, trains), *params)
        before = train_kernels.gemm_flops()
        value, grads = _Grads(net, 0, net.trainable_params() if trains else None)(Tensor(x), Tensor(dy))
        grads = [grads[0], *grads[1]] if trains else [grads]  # dx, then dW (and db) when the layer trains
        value, grads = value.asnumpy(), [g.asnumpy() for g in grads]
        work = {kind: train_kernels.gemm_flops()[kind] - before[kind] for kind in before}  # counted once the graph ran
        y = x64 @ w64.T + (b if bias else 0)
        assert float(value) == pytest.approx(float((y * dy64).sum()), rel=1e-5, abs=1e-3)
        np.testing.assert_allclose(grads[0], dy64 @ w64, **tol)
        m = x.size // k
        assert work["forward"] == 2 * m * n * k and work["input_grad"] == 2 * m * n * k
        if trains:
            np.testing.assert_allclose(grads[1], dy64.reshape(-1, n).T @ x64.reshape(-1, k), **tol)
            if bias:
                np.testing.assert_allclose(grads[2], dy64.reshape(-1, n).sum(0), **tol)
            assert work["weight_grad"] == 2 * m * n * k
        else:
            assert work["weight_grad"] == 0


def held(w: np.ndarray, dtype: str):
    """(the arrays a frozen base holds for ``w`` as ``dtype``: the weight, and int8's scales or None;
    the values they stand for, in float64)."""
    if dtype == "int8":
        q, scale = quantize_int8(w)
        return q, scale, dequantize_int8(q, scale).astype(np.float64)
    arr, w64 = stored(w, dtype)
    return arr, None, w64


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "float16", "float32"])
@pytest.mark.parametrize("rows", list(range(1, 18)) + [(3, 40)])
def test_frozen_linear_and_its_input_gradient_equal_numpy_at_every_row_count(dtype, rows):
    """LoRA's frozen base held as stored (bf16, fp16) or int8 with per-row scales: y = x W^T + b and
    dx = dy W at every row count 1..17, an odd K (the widening's scalar tail), N not a multiple of 16,
    against float64 on the values the weight stands for; no gradient for W, its scales or b."""
    rng = np.random.default_rng(17 * (rows if isinstance(rows, int) else 99))
    lead = (rows,) if isinstance(rows, int) else rows
    _frozen_case(rng, dtype, lead, n=45, k=37, bias=isinstance(rows, tuple) or rows % 2 == 1)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("lead,n,k,bias", [((5,), 16, 64, False), ((2, 33), 320, 300, True),
                                           ((3, 40), 4200, 300, False), ((7,), 1300, 1030, True)])
def test_frozen_linear_blocks_and_threads(dtype, lead, n, k, bias):
    """Shapes past one widened block (2^20 floats): K over 256 (dx's column slices, with a remainder),
    N over a block of rows (4200 x 300: the forward's 3495-row and dx's 4096-row blocks, each with a
    remainder; 1300 x 1030: the forward's 1018-row blocks), the threaded path."""
    _frozen_case(np.random.default_rng(n + k), dtype, lead, n, k, bias)


def _frozen_case(rng, dtype, lead, n, k, bias):
    w, scale, w64 = held(rng.normal(size=(n, k)).astype(np.float32) * rng.uniform(0.1, 3, size=(n, 1)).astype(
        np.float32), dtype)
    b = rng.normal(size=n).astype(np.float32)
    x = rng.normal(size=lead + (k,)).astype(np.float32)
    dy = rng.normal(size=lead + (n,)).astype(np.float32)
    params = [Parameter(kernels.to_tensor(w, dtype), name="w", requires_grad=False)]
    if scale is not None:
        params.append(Parameter(Tensor(scale), name="s", requires_grad=False))
    if bias:
        params.append(Parameter(Tensor(b), name="b", requires_grad=False))
    net = _Probe(train_kernels.frozen_linear_op(bias, scale is not None), *params)
    before = train_kernels.gemm_flops()
    value, dx = _Grads(net, 0)(Tensor(x), Tensor(dy))
    value, dx = value.asnumpy(), dx.asnumpy()
    work = {kind: train_kernels.gemm_flops()[kind] - before[kind] for kind in before}  # counted once the graph ran
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    y = x64 @ w64.T + (b if bias else 0)
    tol = dict(rtol=1e-5, atol=1e-5 * np.sqrt(max(k, n)) * np.abs(w64).max())
    assert float(value) == pytest.approx(float((y * dy64).sum()), rel=1e-5, abs=1e-3)
    assert dx.shape == lead + (k,)
    np.testing.assert_allclose(dx, dy64 @ w64, **tol)
    m = x.size // k
    assert work == {"forward": 2 * m * n * k, "input_grad": 2 * m * n * k, "weight_grad": 0}
    fwd = train_kernels.frozen_linear_op(bias, scale is not None)(Tensor(x), *params).asnumpy()
    np.testing.assert_allclose(fwd, y, **tol)


@pytest.mark.parametrize("shape", [(1, 64), (2, 37), (3, 5, 160), (700, 96)])  # a scalar tail; threads
def test_training_rms_norm_gradients_equal_torch_in_float64(shape):
    import torch

    rng = np.random.default_rng(shape[-1])
    x = (3 * rng.normal(size=shape)).astype(np.float32)
    w, dy = rng.normal(size=shape[-1]).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    eps = Tensor([1e-6], ms.float32)

    class Net(nn.Cell):
        def construct(self, x, w, probe):
            return (train_kernels.train_rms_norm_op()(x, w, eps) * probe).sum()

    _, (dx, dw) = _Grads(Net(), (0, 1))(Tensor(x), Tensor(w), Tensor(dy))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    (xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-6) * wt * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(dx.asnumpy(), xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw.asnumpy(), wt.grad.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("labels", [[1, -100, 3, 49, 0, -100], [-100] * 6, [5, 5, 5, 5, 5, 5]])
def test_cross_entropy_and_its_gradient_equal_torch(labels):
    """Mean over the counted rows (-100 left out), and nothing at all when every row is left out."""
    import torch

    z = (3 * np.random.default_rng(len(set(labels))).normal(size=(6, 50))).astype(np.float32)
    labels = np.array(labels, np.int32)

    class Net(nn.Cell):
        def construct(self, z, labels):
            return train_kernels.cross_entropy_op()(z, labels)[0].reshape(()) * 2.0

    loss, dz = _Grads(Net(), 0)(Tensor(z), Tensor(labels))
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    if (labels >= 0).any():
        ref = torch.nn.functional.cross_entropy(zt, torch.tensor(labels, dtype=torch.long), ignore_index=-100) * 2
        ref.backward()
        assert float(loss) == pytest.approx(ref.item(), rel=1e-6)
        np.testing.assert_allclose(dz.asnumpy(), zt.grad.numpy(), rtol=1e-5, atol=1e-7)
    else:
        assert float(loss) == 0.0 and not dz.asnumpy().any()


def test_hash_dropout_is_a_function_of_seed_and_salt_and_its_gradient_uses_the_same_mask():
    x = np.random.default_rng(0).normal(size=(256, 300)).astype(np.float32)  # past the kernel's threading threshold
    seed = Parameter(Tensor(7.0, ms.float32), name="seed", requires_grad=False)

    class Net(nn.Cell):
        def __init__(self, salt):
            super().__init__()
            self.seed, self.cfg = seed, Tensor([0.25, salt], ms.float32)

        def construct(self, x, probe):
            return (train_kernels.dropout_op()(x, self.seed, self.cfg) * probe).sum()

    def run(salt, value):
        seed.set_data(Tensor(value, ms.float32))
        y = _Graph(train_kernels.dropout_op())(Tensor(x), seed, Tensor([0.25, salt], ms.float32)).asnumpy()
        _, dx = _Grads(Net(salt), 0)(Tensor(x), Tensor(np.ones_like(x)))
        return y, dx.asnumpy()

    y, dx = run(3.0, 7.0)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(dx != 0, kept)  # the gradient flows where the input was kept
    np.testing.assert_array_equal(run(3.0, 7.0)[0], y)  # same seed and salt: the same mask
    assert not np.array_equal(run(3.0, 8.0)[0] != 0, kept)  # another step (seed): another mask
    assert not np.array_equal(run(4.0, 7.0)[0] != 0, kept)  # another layer (salt): another mask
    np.testing.assert_array_equal(run(3.0, -1.0)[0], x)  # seed < 0: off


@pytest.mark.parametrize("shape", [(3, 7, 200), (2, 130, 2048)])  # a vector tail; split over threads
def test_swiglu_and_its_gradients_equal_torch_in_float64(shape):
    import torch

    rng = np.random.default_rng(5)
    gate, up, dy = ((4 * rng.normal(size=shape)).astype(np.float32) for _ in range(3))
    gate.flat[:4] = [-100.0, -30.0, 30.0, 100.0]  # sigmoid's ends: no overflow either way

    class Net(nn.Cell):
        def construct(self, gate, up, probe):
            return (train_kernels.swiglu_op()(gate, up) * probe).sum()

    value, (dg, du) = _Grads(Net(), (0, 1))(Tensor(gate), Tensor(up), Tensor(dy))
    g, u = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (gate, up))
    ref = (torch.nn.functional.silu(g) * u * torch.tensor(dy, dtype=torch.float64)).sum()
    ref.backward()
    assert float(value) == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(dg.asnumpy(), g.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(du.asnumpy(), u.grad.numpy(), rtol=1e-5, atol=1e-5)


def reference_attention_torch(q, k, v, cos, sin, h, kv):
    """The model's MindSpore-free reference in float64 torch: heads, rotate-half rotary, causal softmax."""
    import torch

    b, t, _ = q.shape
    d = cos.shape[-1]

    def heads(x, n):
        return x.reshape(b, t, n, d).transpose(1, 2)

    def rope(x):
        turned = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos + turned * sin

    qh, kh, vh = rope(heads(q, h)), rope(heads(k, kv)), heads(v, kv)
    kh, vh = (x.repeat_interleave(h // kv, 1) for x in (kh, vh))
    scores = qh @ kh.transpose(-1, -2) / d ** 0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2).reshape(b, t, h * d)


@pytest.mark.parametrize("b,t,h,kv,d", [(1, 1, 2, 2, 32), (2, 17, 3, 3, 64), (1, 40, 4, 2, 16), (2, 130, 2, 1, 128)])
def test_causal_attention_and_its_gradients_equal_torch_in_float64(b, t, h, kv, d):
    """Rotary, causal softmax and the layouts in one kernel each way, against torch autograd in
    float64: lengths around the 16-key blocks, grouped-query heads, head sizes 32..128."""
    import torch

    rng = np.random.default_rng(t + h + d)
    q, dy = (rng.normal(size=(b, t, h * d)).astype(np.float32) for _ in range(2))
    k, v = (rng.normal(size=(b, t, kv * d)).astype(np.float32) for _ in range(2))
    angles = rng.uniform(-30, 30, size=(b, 1, t, d // 2))
    cos, sin = (f(np.concatenate([angles, angles], -1)).astype(np.float32) for f in (np.cos, np.sin))

    class Net(nn.Cell):
        def construct(self, q, k, v, cos, sin, probe):
            return (train_kernels.causal_attention_op()(q, k, v, cos, sin)[0] * probe).sum()

    value, grads = _Grads(Net(), (0, 1, 2))(*(Tensor(a) for a in (q, k, v, cos, sin, dy)))
    qt, kt, vt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    ct, st = (torch.tensor(a, dtype=torch.float64) for a in (cos, sin))
    ref = (reference_attention_torch(qt, kt, vt, ct, st, h, kv) * torch.tensor(dy, dtype=torch.float64)).sum()
    ref.backward()
    assert float(value) == pytest.approx(ref.item(), rel=1e-4, abs=1e-3)
    for got, want in zip(grads, (qt.grad, kt.grad, vt.grad)):
        np.testing.assert_allclose(got.asnumpy(), want.numpy(), rtol=1e-4, atol=1e-4)
