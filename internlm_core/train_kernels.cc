// CPU kernels for training, called from MindSpore graphs as AOT custom ops whose backward passes
// are other ops of this file (see kernels.py: ``train_linear_op`` and friends).
//
// Why (measured on the 2-core build machine, bench-100m, batch 1 x 128): MindSpore's CPU MatMul
// runs ~95 GFLOP/s where oneDNN's sgemm runs 250-390 on both cores, its autodiff of x W^T
// materialises transposes in the backward pass and computes weight gradients that LoRA throws
// away, and the step's row-wise tails (RMSNorm's gradient, a hash dropout mask, cross-entropy
// over 32000 logits) each cost tens of milliseconds as chains of small ops. So:
//
//   LinearFwd      y = x W^T (+ b)           one sgemm, W read as it lies (no transpose made)
//   LinearGradX    dx = dy W                 one sgemm
//   LinearGradW    dW = dy^T x               one sgemm, only for weights that train
//   FrozenLinear, FrozenLinearGradX   y = x W^T (+ b) and dx = dy W for a frozen weight held in its
//                  stored precision (bf16, fp16) or as int8 with per-row scales: LoRA's base
//                  (QLoRA-like), never widened whole (see below)
//   RmsNormGrad    dx, dw of x * rsqrt(mean(x^2) + eps) * w   one pass per row
//   HashDropout    x * keep / (1 - p), keep from a hash of (seed, salt, element index): a mask
//                  that is a pure function of the step, so a resumed run draws the same masks;
//                  its gradient is the same op applied to dy
//   CrossEntropy   per-token loss mean (labels < 0 left out) and each row's log-sum-exp, one pass
//   CrossEntropyGrad  d logits = (softmax - onehot) * dloss / count, from the saved log-sum-exp
//   CausalAttention  rotary + causal softmax(q k^T / sqrt(D)) v straight from the projections
//                  (B, T, heads * D) layout to wo's input layout, keeping each row's log-sum-exp;
//                  CausalAttentionGrad recomputes the probabilities from it (nothing T x T is
//                  stored) and returns dq, dk, dv in the projections' layout (rotary undone).
//                  MindSpore's form of this was ~25 ops a layer with transposes in both passes.
//   SwiGlu         silu(gate) * up, and SwiGluGrad its two input gradients, one pass each
//   SumSquares     sum((g / loss_scale)^2) of one gradient (the global norm: the sqrt of their sum)
//   AdamW          one pass over a weight, its moments and its gradient, in place: the gradient's
//                  unscale-and-clip factor applied on the way (MindSpore's optimiser, clipping and
//                  loss scaling made ~6 passes over every weight-sized tensor at ~4 GB/s)
//
// The GEMMs are oneDNN's sgemm, one slice of the output per OpenMP thread. Row-wise kernels
// split rows over the same threads; the sums over rows (dw, the loss) add fixed-size row blocks in
// order, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_common.h"

namespace {

constexpr int64_t kBlock = 64;  // rows per partial sum of a reduction over rows

// Floating-point operations done by each GEMM kind since load: the tests read these (ctypes) to
// show that a LoRA step computes no gradient for the frozen weights.
std::atomic<int64_t> g_flops[3];  // forward, input gradient, weight gradient

// oneDNN's sgemm (the libdnnl MindSpore ships; its C API, declared here as MindSpore ships no
// header): row-major C = op(A) op(B) + beta C, on the calling thread. Why not OpenBLAS, which
// threads itself: measured at 128 rows (bench-100m's shapes, 2 cores), oneDNN's AVX-512 kernel
// runs 180-190 GFLOP/s on one core against OpenBLAS's 160-170, and two column slices on two
// OpenMP threads 340-390 against OpenBLAS's own threading's 200-310 (PyTorch: 310-380).
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Returns an op's status: 0, or 3 where oneDNN refused a slice.
int gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
         int64_t ldb, float beta, float* c, int kind) {
  g_flops[kind] += 2 * M * N * K;
  int status = 0;
  const int threads = M * N * K < (1 << 20) ? 1 : omp_get_max_threads();
  const bool by_cols = N >= M;  // slice the longer side of C, in multiples of 64
  const int64_t side = by_cols ? N : M;
  const int64_t step = ((side + threads - 1) / threads + 63) / 64 * 64;
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
  for (int t = 0; t < threads; ++t) {
    const int64_t lo = t * step, hi = std::min(side, lo + step);
    if (lo >= hi) continue;
    if (by_cols)  // columns lo..hi of C: op(B)'s columns, at row lo of B^T or column lo of B
      status |= dnnl_sgemm(tra, trb, M, hi - lo, K, 1.f, a, lda, tb ? b + lo * ldb : b + lo, ldb, beta, c + lo, N);
    else  // rows lo..hi of C: op(A)'s rows, at column lo of A^T or row lo of A
      status |= dnnl_sgemm(tra, trb, hi - lo, N, K, 1.f, ta ? a + lo : a + lo * lda, lda, b, ldb, beta, c + lo * N, N);
  }
  return status ? 3 : 0;
}

// 64-bit mix (splitmix64's finaliser): adjacent inputs give independent-looking outputs.
inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

extern "C" {

int64_t internlm_gemm_flops(int kind) { return g_flops[kind].load(); }

// inputs x (..., K), w (N, K)[, b (N,)] f32; output (..., N)
int LinearFwd(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
              void* extra) {
  if ((nparam != 3 && nparam != 4) || !is_f32(dtypes[0]) || !is_f32(dtypes[1]) || ndims[1] != 2) return 1;
  const int64_t K = shapes[0][ndims[0] - 1], M = rows_of(ndims[0], shapes[0]), N = shapes[1][0];
  if (shapes[1][1] != K) return 2;
  const float* x = static_cast<const float*>(params[0]);
  const float* w = static_cast<const float*>(params[1]);
  float* y = static_cast<float*>(params[nparam - 1]);
  float beta = 0.f;
  if (nparam == 4) {  // the bias as C's starting value: sgemm adds x W^T to it
    const float* b = static_cast<const float*>(params[2]);
    for (int64_t m = 0; m < M; ++m) memcpy(y + m * N, b, N * sizeof(float));
    beta = 1.f;
  }
  return gemm(false, true, M, N, K, x, K, w, K, beta, y, 0);
}

// inputs dy (..., N), w (N, K) f32; output dx (..., K)
int LinearGradX(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                void* extra) {
  if (nparam != 3 || !is_f32(dtypes[0]) || !is_f32(dtypes[1]) || ndims[1] != 2) return 1;
  const int64_t N = shapes[0][ndims[0] - 1], M = rows_of(ndims[0], shapes[0]), K = shapes[1][1];
  if (shapes[1][0] != N) return 2;
  const float* dy = static_cast<const float*>(params[0]);
  const float* w = static_cast<const float*>(params[1]);
  return gemm(false, false, M, K, N, dy, N, w, K, 0.f, static_cast<float*>(params[2]), 1);
}

// inputs dy (..., N), x (..., K) f32; output dw (N, K)
int LinearGradW(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                void* extra) {
  if (nparam != 3 || !is_f32(dtypes[0]) || !is_f32(dtypes[1])) return 1;
  const int64_t N = shapes[0][ndims[0] - 1], M = rows_of(ndims[0], shapes[0]), K = shapes[1][ndims[1] - 1];
  if (rows_of(ndims[1], shapes[1]) != M) return 2;
  const float* dy = static_cast<const float*>(params[0]);
  const float* x = static_cast<const float*>(params[1]);
  return gemm(true, false, N, K, M, dy, N, x, K, 0.f, static_cast<float*>(params[2]), 2);
}

}  // extern "C"

// ---- FrozenLinear: a frozen weight in its stored precision ------------------------------------
//
// LoRA's base weight W (N, K) is held as the checkpoint stores it (bf16, fp16) or as int8 with
// one fp32 scale per output row (quantize.py), in W's own (N, K) layout: half or a quarter of
// fp32's bytes (a 7B base in bf16 fits where its fp32 copy does not). Each GEMM widens a block of
// W at a time into a per-thread fp32 buffer (4 MB) and runs oneDNN's sgemm on it. Block size
// measured (forward + dx at 128 rows, 2 cores): 1 MB blocks left sgemm too little to do per call,
// 103168 x 2048 bf16 718 ms against fp32's 329; 4 MB blocks 335 against 316, within ~5% of fp32's
// GEMMs on every InternLM2-1.8B shape tried. The
// widened values are exact (bf16 and fp16 widen exactly; int8 is q * s in one fp32 rounding, as
// quantize.dequantize_int8), so the results are the fp32 GEMMs' on an fp32 model holding those
// values, to the order of the sums. Blocks are fixed by the shapes, not by the threads, so the
// results do not depend on the thread count.

namespace {

constexpr int64_t kWidened = 1 << 20;  // floats of W widened at a time per thread (4 MB)

// rows x cols of W (row stride ld) from (r0, c0), widened (times each row's scale s for int8) into out
template <typename W>
void widen_block(const W* w, const float* s, int64_t ld, int64_t r0, int64_t c0, int64_t rows, int64_t cols,
                 float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * cols;
    widen_row(w + (r0 + r) * ld + c0, cols, o);
    if (s) {
      const float f = s[r0 + r];
      for (int64_t c = 0; c < cols; ++c) o[c] *= f;
    }
  }
}

// y (M, N) = x (M, K) W^T (+ b): blocks of W's rows (outputs), threads split the blocks.
template <typename W>
int frozen_forward(const float* x, const W* w, const float* s, const float* b, float* y, int64_t M, int64_t N,
                   int64_t K) {
  g_flops[0] += 2 * M * N * K;
  const int64_t rows = std::max<int64_t>(16, kWidened / std::max<int64_t>(K, 1));
  const int64_t blocks = (N + rows - 1) / rows;
  const int threads = M * N * K < (1 << 20) ? 1 : omp_get_max_threads();
  int status = 0;
#pragma omp parallel num_threads(threads) reduction(| : status)
  {
    std::vector<float> buf(std::min(rows, N) * K);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t n0 = blk * rows, n = std::min(rows, N - n0);
      widen_block(w, s, K, n0, 0, n, K, buf.data());
      float beta = 0.f;
      if (b) {  // the bias as C's starting value: sgemm adds x W^T to it
        for (int64_t m = 0; m < M; ++m) memcpy(y + m * N + n0, b + n0, n * sizeof(float));
        beta = 1.f;
      }
      status |= dnnl_sgemm('N', 'T', M, n, K, 1.f, x, K, buf.data(), K, beta, y + n0, N);
    }
  }
  return status ? 3 : 0;
}

// dx (M, K) = dy (M, N) W: threads split dx's columns into fixed slices; each slice sums over
// blocks of W's rows in order (the first block writes, the others add).
template <typename W>
int frozen_grad_x(const float* dy, const W* w, const float* s, float* dx, int64_t M, int64_t N, int64_t K) {
  g_flops[1] += 2 * M * N * K;
  const int64_t cols = std::min<int64_t>(K, 256);
  const int64_t rows = std::max<int64_t>(16, kWidened / cols);
  const int64_t slices = (K + cols - 1) / cols;
  const int threads = M * N * K < (1 << 20) ? 1 : omp_get_max_threads();
  int status = 0;
#pragma omp parallel num_threads(threads) reduction(| : status)
  {
    std::vector<float> buf(std::min(rows, N) * cols);
#pragma omp for schedule(static)
    for (int64_t sl = 0; sl < slices; ++sl) {
      const int64_t c0 = sl * cols, c = std::min(cols, K - c0);
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t n = std::min(rows, N - n0);
        widen_block(w, s, K, n0, c0, n, c, buf.data());
        status |= dnnl_sgemm('N', 'N', M, c, n, 1.f, dy + n0, N, buf.data(), c, n0 ? 1.f : 0.f, dx + c0, K);
      }
    }
  }
  return status ? 3 : 0;
}

// The weight's type from its dtype: fn(typed pointer) for fp32, bf16, fp16, int8; 1 for another.
template <typename F>
int by_weight_type(const char* dtype, const void* w, F fn) {
  if (is_f32(dtype)) return fn(static_cast<const float*>(w));
  if (is_bf16(dtype)) return fn(static_cast<const bf16_t*>(w));
  if (is_f16(dtype)) return fn(static_cast<const f16_t*>(w));
  if (is_i8(dtype)) return fn(static_cast<const int8_t*>(w));
  return 1;
}

}  // namespace

extern "C" {

// inputs x (..., K) f32, w (N, K) f32/bf16/f16/int8, [scale (N,) f32: with int8 only], [b (N,) f32];
// output y (..., N)
int FrozenLinear(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                 void* extra) {
  const int scaled = is_i8(dtypes[1]) ? 1 : 0;
  if (nparam < 3 + scaled || nparam > 4 + scaled || !is_f32(dtypes[0]) || ndims[1] != 2) return 1;
  for (int i = 2; i < nparam - 1; ++i)
    if (!is_f32(dtypes[i]) || ndims[i] != 1 || shapes[i][0] != shapes[1][0]) return 1;
  const int64_t K = shapes[0][ndims[0] - 1], M = rows_of(ndims[0], shapes[0]), N = shapes[1][0];
  if (shapes[1][1] != K) return 2;
  const float* x = static_cast<const float*>(params[0]);
  const float* s = scaled ? static_cast<const float*>(params[2]) : nullptr;
  const float* b = nparam == 4 + scaled ? static_cast<const float*>(params[2 + scaled]) : nullptr;
  float* y = static_cast<float*>(params[nparam - 1]);
  return by_weight_type(dtypes[1], params[1], [&](auto w) { return frozen_forward(x, w, s, b, y, M, N, K); });
}

// inputs dy (..., N) f32, w (N, K) f32/bf16/f16/int8, [scale (N,) f32: with int8 only]; output dx (..., K)
int FrozenLinearGradX(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                      void* extra) {
  const int scaled = is_i8(dtypes[1]) ? 1 : 0;
  if (nparam != 3 + scaled || !is_f32(dtypes[0]) || ndims[1] != 2) return 1;
  if (scaled && (!is_f32(dtypes[2]) || ndims[2] != 1 || shapes[2][0] != shapes[1][0])) return 1;
  const int64_t N = shapes[0][ndims[0] - 1], M = rows_of(ndims[0], shapes[0]), K = shapes[1][1];
  if (shapes[1][0] != N) return 2;
  const float* dy = static_cast<const float*>(params[0]);
  const float* s = scaled ? static_cast<const float*>(params[2]) : nullptr;
  float* dx = static_cast<float*>(params[nparam - 1]);
  return by_weight_type(dtypes[1], params[1], [&](auto w) { return frozen_grad_x(dy, w, s, dx, M, N, K); });
}

// inputs x (..., C), w (C,), eps (1,), dy (..., C) f32; outputs dx (..., C), dw (C,)
int RmsNormGrad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                void* extra) {
  if (nparam != 6 || !is_f32(dtypes[0]) || !is_f32(dtypes[1]) || !is_f32(dtypes[2]) || !is_f32(dtypes[3])) return 1;
  const int64_t C = shapes[0][ndims[0] - 1], M = rows_of(ndims[0], shapes[0]);
  const float* x = static_cast<const float*>(params[0]);
  const float* w = static_cast<const float*>(params[1]);
  const float eps = *static_cast<const float*>(params[2]);
  const float* dy = static_cast<const float*>(params[3]);
  float* dx = static_cast<float*>(params[4]);
  float* dw = static_cast<float*>(params[5]);
  const int64_t blocks = (M + kBlock - 1) / kBlock;
  std::vector<float> part(blocks * C, 0.f);  // dw of each block of rows
#pragma omp parallel for if (M * C > (1 << 15)) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    float* pw = part.data() + blk * C;
    for (int64_t m = blk * kBlock; m < std::min(M, (blk + 1) * kBlock); ++m) {
      const float* xr = x + m * C;
      const float* g = dy + m * C;
      float ss = 0.f, dot = 0.f;
      for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
      const float r = 1.f / std::sqrt(ss / C + eps);
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = xr[c] * r;
        dot += g[c] * w[c] * xhat;
        pw[c] += g[c] * xhat;
      }
      dot /= C;
      // d/dx of xhat * w: r * (g w - xhat * mean(g w xhat))
      for (int64_t c = 0; c < C; ++c) dx[m * C + c] = r * (g[c] * w[c] - xr[c] * r * dot);
    }
  }
  for (int64_t c = 0; c < C; ++c) dw[c] = 0.f;
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t c = 0; c < C; ++c) dw[c] += part[blk * C + c];
  return 0;
}

// inputs x (...) f32, seed (1,) f32 (< 0: dropout off), cfg (2,) f32 = (p, salt); output like x
int HashDropout(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                void* extra) {
  if (nparam != 4 || !is_f32(dtypes[0]) || !is_f32(dtypes[1]) || !is_f32(dtypes[2])) return 1;
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  const float* x = static_cast<const float*>(params[0]);
  const float seed = *static_cast<const float*>(params[1]);
  const float* cfg = static_cast<const float*>(params[2]);
  float* y = static_cast<float*>(params[3]);
  const float p = cfg[0];
  if (seed < 0.f || p <= 0.f) {
    memcpy(y, x, n * sizeof(float));
    return 0;
  }
  // keep when a uniform 24-bit draw is >= p; the key mixes the step's seed and the layer's salt
  const uint64_t key = mix((static_cast<uint64_t>(seed) << 32) ^ static_cast<uint64_t>(cfg[1]));
  const uint32_t cut = static_cast<uint32_t>(std::ceil(p * 16777216.f));
  const float scale = 1.f / (1.f - p);
#pragma omp parallel for if (n > (1 << 16)) schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = (mix(key + static_cast<uint64_t>(i)) >> 40) >= cut ? x[i] * scale : 0.f;
  return 0;
}

// inputs logits (M, V) f32, labels (M,) i32 (< 0: not counted); outputs loss (1,) = mean over
// counted rows of lse - logit[label] (0 when none), lse (M,)
int CrossEntropy(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                 void* extra) {
  if (nparam != 4 || !is_f32(dtypes[0]) || !is_i32(dtypes[1]) || ndims[0] != 2) return 1;
  const int64_t M = shapes[0][0], V = shapes[0][1];
  const float* z = static_cast<const float*>(params[0]);
  const int32_t* label = static_cast<const int32_t*>(params[1]);
  float* loss = static_cast<float*>(params[2]);
  float* lse = static_cast<float*>(params[3]);
  std::vector<double> row_loss(M, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const float* zr = z + m * V;
    const int64_t vec = V / 16 * 16;
    v16 mx16 = splat(-INFINITY);
    for (int64_t v = 0; v < vec; v += 16) {
      const v16 x = load(zr + v);
      mx16 = select(x > mx16, x, mx16);
    }
    float mx = -INFINITY;
    for (int i = 0; i < 16; ++i) mx = std::max(mx, mx16[i]);
    for (int64_t v = vec; v < V; ++v) mx = std::max(mx, zr[v]);
    v16 s16 = (v16){};
    for (int64_t v = 0; v < vec; v += 16) s16 += exp_neg(load(zr + v) - mx);
    float s = hsum(s16);
    for (int64_t v = vec; v < V; ++v) s += std::exp(zr[v] - mx);
    lse[m] = mx + std::log(s);
    if (label[m] >= 0 && label[m] < V) row_loss[m] = lse[m] - zr[label[m]];
  }
  double total = 0.0;
  int64_t count = 0;
  for (int64_t m = 0; m < M; ++m) {
    total += row_loss[m];
    count += label[m] >= 0 && label[m] < V;
  }
  loss[0] = count ? static_cast<float>(total / count) : 0.f;
  return 0;
}

// inputs logits (M, V) f32, labels (M,) i32, lse (M,) f32, dloss (1,) f32; output d logits (M, V)
int CrossEntropyGrad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                     void* extra) {
  if (nparam != 5 || !is_f32(dtypes[0]) || !is_i32(dtypes[1]) || ndims[0] != 2) return 1;
  const int64_t M = shapes[0][0], V = shapes[0][1];
  const float* z = static_cast<const float*>(params[0]);
  const int32_t* label = static_cast<const int32_t*>(params[1]);
  const float* lse = static_cast<const float*>(params[2]);
  const float dloss = *static_cast<const float*>(params[3]);
  float* dz = static_cast<float*>(params[4]);
  int64_t count = 0;
  for (int64_t m = 0; m < M; ++m) count += label[m] >= 0 && label[m] < V;
  const float g = count ? dloss / count : 0.f;
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    float* dr = dz + m * V;
    if (!(label[m] >= 0 && label[m] < V)) {
      memset(dr, 0, V * sizeof(float));
      continue;
    }
    const float* zr = z + m * V;
    const int64_t vec = V / 16 * 16;
    for (int64_t v = 0; v < vec; v += 16) store(dr + v, exp_neg(load(zr + v) - lse[m]) * g);
    for (int64_t v = vec; v < V; ++v) dr[v] = std::exp(zr[v] - lse[m]) * g;
    dr[label[m]] -= g;
  }
  return 0;
}

}  // extern "C"

// ---- CausalAttention --------------------------------------------------------------------------

namespace {

// the transpose of rope_row: the gradient of x from the gradient g of its rotated form, times f
inline void rope_row_grad(const float* g, const float* c, const float* s, int64_t D, float f, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = (g[d] * c[d] + g[d + half] * s[d + half]) * f;
  for (int64_t d = half; d < D; ++d) out[d] = (g[d] * c[d] - g[d - half] * s[d - half]) * f;
}

struct AttnShape {
  int64_t B, T, H, Hkv, D;
};

// The inputs both attention kernels start with: q (B,T,H*D), k and v (B,T,Hkv*D), cos and sin
// (B,1,T,D) or (B,T,D).
struct AttnInputs {
  AttnShape a{};  // a.D == 0: the op's arguments are wrong
  const float *q = nullptr, *k = nullptr, *v = nullptr, *cs = nullptr, *sn = nullptr;
};

// Checked: nparam == want and the first n_f32 arguments float32, the shapes consistent.
AttnInputs attn_inputs(int nparam, int want, int n_f32, void** params, int* ndims, int64_t** shapes,
                       const char** dtypes) {
  AttnInputs in;
  if (nparam != want || ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3 || ndims[3] < 3) return in;
  for (int i = 0; i < n_f32; ++i)
    if (!is_f32(dtypes[i])) return in;
  const int64_t D = shapes[3][ndims[3] - 1];
  if (D % 16 || shapes[0][2] % D || shapes[1][2] % D) return in;  // whole vectors per head
  AttnShape a{shapes[0][0], shapes[0][1], shapes[0][2] / D, shapes[1][2] / D, D};
  if (a.H % a.Hkv || shapes[2][2] != shapes[1][2] || shapes[1][1] != a.T || shapes[2][1] != a.T) return in;
  in.a = a;
  in.q = static_cast<const float*>(params[0]);
  in.k = static_cast<const float*>(params[1]);
  in.v = static_cast<const float*>(params[2]);
  in.cs = static_cast<const float*>(params[3]);
  in.sn = static_cast<const float*>(params[4]);
  return in;
}

constexpr int64_t kQueries = 64;  // query rows per block of the attention kernels

// A (T, D) block of one head, rotated (rope_row) and times f, from its rows in the projections'
// (B, T, heads * D) layout: row t of batch row b at x + (b * T + t) * ld.
void rotated(const float* x, int64_t ld, const float* cs, const float* sn, int64_t b, const AttnShape& a, float f,
             float* out) {
  for (int64_t t = 0; t < a.T; ++t)
    rope_row(x + (b * a.T + t) * ld, cs + (b * a.T + t) * a.D, sn + (b * a.T + t) * a.D, a.D, f, out + t * a.D);
}

// Query rows i0..i0+n of one head against keys 0..e (e = i0 + n): s (n, e) = q' k'^T, one GEMM.
// Scores past a query's own key are computed and then masked: wasted work only in the last
// kQueries keys, the block on the diagonal.
int block_scores(const float* qr, const float* kr, int64_t i0, int64_t n, int64_t e, int64_t D, float* s) {
  return dnnl_sgemm('N', 'T', n, e, D, 1.f, qr + i0 * D, D, kr, D, 0.f, s, e);
}

// One query's row of scores over e keys, of which it sees the first n: p = exp(s - m) there, 0
// after. Returns the sum of p.
float exp_row(float* row, int64_t n, int64_t e, float m) {
  v16 sum = (v16){};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16 p = exp_neg(load(row + j) - m);
    store(row + j, p);
    sum += p;
  }
  float tail = 0.f;
  for (; j < n; ++j) tail += row[j] = std::exp(row[j] - m);
  for (; j < e; ++j) row[j] = 0.f;
  return hsum(sum) + tail;
}

}  // namespace

extern "C" {

// inputs q (B,T,H*D), k (B,T,Hkv*D), v (B,T,Hkv*D), cos, sin (B,1,T,D) f32; outputs
// out (B,T,H*D) = causal softmax(rope(q) rope(k)^T / sqrt(D)) v per head (query head h reads k/v
// head h / (H / Hkv)), lse (B,H,T) = each query's log-sum-exp of its scaled scores. One task per
// (row, head); blocks of kQueries queries, their scores and their weighted values one GEMM each.
int CausalAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                    void* extra) {
  const AttnInputs in = attn_inputs(nparam, 7, 5, params, ndims, shapes, dtypes);
  if (in.a.D == 0) return 1;
  const AttnShape& a = in.a;
  float* out = static_cast<float*>(params[5]);
  float* lse = static_cast<float*>(params[6]);
  const int64_t T = a.T, D = a.D, group = a.H / a.Hkv, HD = a.H * D, KD = a.Hkv * D;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  int status = 0;
#pragma omp parallel for collapse(2) schedule(dynamic) reduction(| : status)
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t g = h / group;
      std::vector<float> qr(T * D), kr(T * D), s(kQueries * T);
      rotated(in.q + h * D, HD, in.cs, in.sn, b, a, scale, qr.data());
      rotated(in.k + g * D, KD, in.cs, in.sn, b, a, 1.f, kr.data());
      for (int64_t i0 = 0; i0 < T; i0 += kQueries) {
        const int64_t n = std::min(kQueries, T - i0), e = i0 + n;
        status |= block_scores(qr.data(), kr.data(), i0, n, e, D, s.data());
        for (int64_t r = 0; r < n; ++r) {
          float* row = s.data() + r * e;
          float m = -INFINITY;
          for (int64_t j = 0; j <= i0 + r; ++j) m = std::max(m, row[j]);
          const float sum = exp_row(row, i0 + r + 1, e, m);
          for (int64_t j = 0; j <= i0 + r; ++j) row[j] /= sum;
          lse[(b * a.H + h) * T + i0 + r] = m + std::log(sum);
        }
        // out rows i0..i0+n of head h = p v[0:e], written in place in the (B, T, H * D) layout
        status |= dnnl_sgemm('N', 'N', n, D, e, 1.f, s.data(), e, in.v + b * T * KD + g * D, KD, 0.f,
                             out + (b * T + i0) * HD + h * D, HD);
      }
    }
  return status ? 3 : 0;
}

// inputs q, k, v, cos, sin (as CausalAttention), out, lse (its outputs), dout (B,T,H*D) f32;
// outputs dq (B,T,H*D), dk, dv (B,T,Hkv*D). With P recomputed from lse and Dt = dout_t . out_t:
// dV = P^T dO, dS = P * (dO V^T - Dt), dQ = rope^T(dS K' / sqrt(D)), dK = rope^T(dS^T Q'), where Q'
// and K' are the rotated (Q' scaled) heads. One task per (row, k/v head) owns its dk and dv; each
// block of kQueries queries is five GEMMs against the keys it sees.
int CausalAttentionGrad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                        void* stream, void* extra) {
  const AttnInputs in = attn_inputs(nparam, 11, 8, params, ndims, shapes, dtypes);
  if (in.a.D == 0) return 1;
  const AttnShape& a = in.a;
  const float* out = static_cast<const float*>(params[5]);
  const float* lse = static_cast<const float*>(params[6]);
  const float* dout = static_cast<const float*>(params[7]);
  float* dq = static_cast<float*>(params[8]);
  float* dk = static_cast<float*>(params[9]);
  float* dv = static_cast<float*>(params[10]);
  const int64_t T = a.T, D = a.D, group = a.H / a.Hkv, HD = a.H * D, KD = a.Hkv * D;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  int status = 0;
#pragma omp parallel for collapse(2) schedule(dynamic) reduction(| : status)
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t g = 0; g < a.Hkv; ++g) {
      std::vector<float> kr(T * D), qr(T * D), dqr(kQueries * D), dkr(T * D, 0.f), dvv(T * D, 0.f);
      std::vector<float> p(kQueries * T), ds(kQueries * T);
      rotated(in.k + g * D, KD, in.cs, in.sn, b, a, 1.f, kr.data());
      const float* vb = in.v + b * T * KD + g * D;  // v[b, :, g] in place: rows KD apart
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        rotated(in.q + h * D, HD, in.cs, in.sn, b, a, scale, qr.data());
        for (int64_t i0 = 0; i0 < T; i0 += kQueries) {
          const int64_t n = std::min(kQueries, T - i0), e = i0 + n;
          const float* go = dout + (b * T + i0) * HD + h * D;  // dO rows i0.., HD apart
          status |= block_scores(qr.data(), kr.data(), i0, n, e, D, p.data());
          status |= dnnl_sgemm('N', 'T', n, e, D, 1.f, go, HD, vb, KD, 0.f, ds.data(), e);  // dO V^T
          for (int64_t r = 0; r < n; ++r) {
            const int64_t t = i0 + r;
            exp_row(p.data() + r * e, t + 1, e, lse[(b * a.H + h) * T + t]);  // the forward's P
            const float* o = out + (b * T + t) * HD + h * D;
            float dt = 0.f;
            for (int64_t d = 0; d < D; ++d) dt += go[r * HD + d] * o[d];
            float* dsr = ds.data() + r * e;
            const float* pr = p.data() + r * e;
            for (int64_t j = 0; j < e; ++j) dsr[j] = pr[j] * (dsr[j] - dt);  // 0 past t, as p is
          }
          status |= dnnl_sgemm('T', 'N', e, D, n, 1.f, p.data(), e, go, HD, 1.f, dvv.data(), D);  // += P^T dO
          status |= dnnl_sgemm('N', 'N', n, D, e, 1.f, ds.data(), e, kr.data(), D, 0.f, dqr.data(), D);
          status |= dnnl_sgemm('T', 'N', e, D, n, 1.f, ds.data(), e, qr.data() + i0 * D, D, 1.f, dkr.data(), D);
          for (int64_t r = 0; r < n; ++r) {
            const int64_t t = i0 + r;
            rope_row_grad(dqr.data() + r * D, in.cs + (b * T + t) * D, in.sn + (b * T + t) * D, D, scale,
                          dq + (b * T + t) * HD + h * D);
          }
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        rope_row_grad(dkr.data() + t * D, in.cs + (b * T + t) * D, in.sn + (b * T + t) * D, D, 1.f,
                      dk + (b * T + t) * KD + g * D);
        memcpy(dv + (b * T + t) * KD + g * D, dvv.data() + t * D, D * sizeof(float));
      }
    }
  return status ? 3 : 0;
}

// inputs gate, up (...) f32; output silu(gate) * up
int SwiGlu(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
           void* extra) {
  if (nparam != 3 || !is_f32(dtypes[0]) || !is_f32(dtypes[1])) return 1;
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  const float* g = static_cast<const float*>(params[0]);
  const float* u = static_cast<const float*>(params[1]);
  float* y = static_cast<float*>(params[2]);
  const int64_t chunk = 4096;  // floats per task: whole vectors, the threads' shares of y
#pragma omp parallel for if (n > (1 << 16)) schedule(static)
  for (int64_t i = 0; i < n; i += chunk) silu_mul_row(g + i, u + i, std::min(chunk, n - i), y + i);
  return 0;
}

// inputs gate, up, dy (...) f32; outputs d gate, d up
int SwiGluGrad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
               void* extra) {
  if (nparam != 5 || !is_f32(dtypes[0]) || !is_f32(dtypes[1]) || !is_f32(dtypes[2])) return 1;
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  const float* g = static_cast<const float*>(params[0]);
  const float* u = static_cast<const float*>(params[1]);
  const float* dy = static_cast<const float*>(params[2]);
  float* dg = static_cast<float*>(params[3]);
  float* du = static_cast<float*>(params[4]);
  const int64_t vec = n / 16 * 16;
#pragma omp parallel for if (n > (1 << 16)) schedule(static)
  for (int64_t i = 0; i < vec; i += 16) {
    const v16 x = load(g + i), d = load(dy + i), sig = sigmoid(x);
    store(du + i, d * x * sig);
    store(dg + i, d * load(u + i) * sig * (1.f + x * (1.f - sig)));  // d silu = sig (1 + g (1 - sig))
  }
  for (int64_t i = vec; i < n; ++i) {
    const float sig = 1.f / (1.f + std::exp(-g[i]));
    du[i] = dy[i] * g[i] * sig;
    dg[i] = dy[i] * u[i] * sig * (1.f + g[i] * (1.f - sig));
  }
  return 0;
}

// inputs g (...) f32, loss_scale (1,) f32; output (1,) = sum((g / loss_scale)^2): each element is
// unscaled before it is squared (a loss-scaled gradient's square can pass float32's range) and by a
// division (1 / 2^127 is a subnormal that flush-to-zero would make 0), partial sums in fixed blocks
// added in double
int SumSquares(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
               void* extra) {
  if (nparam != 3 || !is_f32(dtypes[0]) || !is_f32(dtypes[1])) return 1;
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  const float* g = static_cast<const float*>(params[0]);
  const float loss_scale = *static_cast<const float*>(params[1]);
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(chunks);
#pragma omp parallel for if (n > (1 << 16)) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(n, (c + 1) * kChunk);
    int64_t i = c * kChunk;
    v16 acc = (v16){};
    for (; i + 16 <= end; i += 16) {
      const v16 x = load(g + i) / loss_scale;
      acc += x * x;
    }
    double s = hsum(acc);
    for (; i < end; ++i) s += static_cast<double>(g[i] / loss_scale) * (g[i] / loss_scale);
    part[c] = s;
  }
  double total = 0.0;
  for (double s : part) total += s;
  *static_cast<float*>(params[2]) = static_cast<float>(total);
  return 0;
}

// inputs p, m, v, g (same shape) f32, hyper (8,) f32 = (lr, beta1, beta2, eps, weight_decay,
// loss_scale, clip, apply); p, m and v are the optimiser's Parameters, updated IN PLACE (the graph
// passes their own memory); output (1,) = apply, for the graph to depend on. Nothing changes when
// apply is 0 (a loss-scale overflow skips the step). AdamWeightDecay's update (no bias correction:
// the trainer folds it into lr):
//   g' = g / loss_scale * clip;  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   p -= lr * (m / (sqrt(v) + eps) + weight_decay * p)
int AdamW(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
          void* extra) {
  if (nparam != 6) return 1;
  for (int i = 0; i < 5; ++i)
    if (!is_f32(dtypes[i])) return 1;
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  float* p = static_cast<float*>(params[0]);
  float* m = static_cast<float*>(params[1]);
  float* v = static_cast<float*>(params[2]);
  const float* g = static_cast<const float*>(params[3]);
  const float* h = static_cast<const float*>(params[4]);
  const float lr = h[0], b1 = h[1], b2 = h[2], eps = h[3], wd = h[4], loss_scale = h[5], clip = h[6];
  *static_cast<float*>(params[5]) = h[7];
  if (h[7] == 0.f) return 0;
#pragma omp parallel for if (n > (1 << 15)) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] / loss_scale * clip;
    const float mi = b1 * m[i] + (1.f - b1) * gi;
    const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr * (mi / (std::sqrt(vi) + eps) + wd * p[i]);
  }
  return 0;
}

}  // extern "C"
