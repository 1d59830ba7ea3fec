// CPU kernels for training, called from MindSpore graphs as AOT custom ops whose backward passes
// are other ops of this file (see kernels.py: ``train_linear_op`` and friends).
//
// Why (measured on the 2-core build machine, bench-100m, batch 1 x 128): MindSpore's CPU MatMul
// runs ~95 GFLOP/s where OpenBLAS runs 260-400, its autodiff of x W^T materialises transposes in
// the backward pass and computes weight gradients that LoRA throws away, and the step's row-wise
// tails (RMSNorm's gradient, a hash dropout mask, cross-entropy over 32000 logits) each cost tens
// of milliseconds as chains of small ops. So:
//
//   LinearFwd      y = x W^T (+ b)           one sgemm, W read as it lies (no transpose made)
//   LinearGradX    dx = dy W                 one sgemm
//   LinearGradW    dW = dy^T x               one sgemm, only for weights that train
//   RmsNormGrad    dx, dw of x * rsqrt(mean(x^2) + eps) * w   one pass per row
//   HashDropout    x * keep / (1 - p), keep from a hash of (seed, salt, element index): a mask
//                  that is a pure function of the step, so a resumed run draws the same masks;
//                  its gradient is the same op applied to dy
//   CrossEntropy   per-token loss mean (labels < 0 left out) and each row's log-sum-exp, one pass
//   CrossEntropyGrad  d logits = (softmax - onehot) * dloss / count, from the saved log-sum-exp
//   SumSquares     sum((g / loss_scale)^2) of one gradient (the global norm: the sqrt of their sum)
//   AdamW          one pass over a weight, its moments and its gradient, in place: the gradient's
//                  unscale-and-clip factor applied on the way (MindSpore's optimiser, clipping and
//                  loss scaling made ~6 passes over every weight-sized tensor at ~4 GB/s)
//
// The GEMMs are OpenBLAS's (the scipy-openblas32 wheel), which threads itself. Row-wise kernels
// split rows over OpenMP threads; the sums over rows (dw, the loss) add fixed-size row blocks in
// order, so results do not depend on the thread count.
#include <omp.h>
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

bool f32(const char* t) { return strcmp(t, "float32") == 0 || strcmp(t, "float") == 0; }
bool i32(const char* t) { return strcmp(t, "int32") == 0 || strcmp(t, "int") == 0; }

int64_t rows(int ndim, const int64_t* shape) {  // product of every dimension but the last
  int64_t m = 1;
  for (int i = 0; i < ndim - 1; ++i) m *= shape[i];
  return m;
}

constexpr int64_t kBlock = 64;  // rows per partial sum of a reduction over rows

// Floating-point operations done by each GEMM kind since load: the tests read these (ctypes) to
// show that a LoRA step computes no gradient for the frozen weights.
std::atomic<int64_t> g_flops[3];  // forward, input gradient, weight gradient

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int kind) {
  g_flops[kind] += 2 * M * N * K;
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, 1.f, a,
                    lda, b, ldb, beta, c, N);
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
  if ((nparam != 3 && nparam != 4) || !f32(dtypes[0]) || !f32(dtypes[1]) || ndims[1] != 2) return 1;
  const int64_t K = shapes[0][ndims[0] - 1], M = rows(ndims[0], shapes[0]), N = shapes[1][0];
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
  gemm(false, true, M, N, K, x, K, w, K, beta, y, 0);
  return 0;
}

// inputs dy (..., N), w (N, K) f32; output dx (..., K)
int LinearGradX(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                void* extra) {
  if (nparam != 3 || !f32(dtypes[0]) || !f32(dtypes[1]) || ndims[1] != 2) return 1;
  const int64_t N = shapes[0][ndims[0] - 1], M = rows(ndims[0], shapes[0]), K = shapes[1][1];
  if (shapes[1][0] != N) return 2;
  gemm(false, false, M, K, N, static_cast<const float*>(params[0]), N, static_cast<const float*>(params[1]), K, 0.f,
       static_cast<float*>(params[2]), 1);
  return 0;
}

// inputs dy (..., N), x (..., K) f32; output dw (N, K)
int LinearGradW(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                void* extra) {
  if (nparam != 3 || !f32(dtypes[0]) || !f32(dtypes[1])) return 1;
  const int64_t N = shapes[0][ndims[0] - 1], M = rows(ndims[0], shapes[0]), K = shapes[1][ndims[1] - 1];
  if (rows(ndims[1], shapes[1]) != M) return 2;
  gemm(true, false, N, K, M, static_cast<const float*>(params[0]), N, static_cast<const float*>(params[1]), K, 0.f,
       static_cast<float*>(params[2]), 2);
  return 0;
}

// inputs x (..., C), w (C,), eps (1,), dy (..., C) f32; outputs dx (..., C), dw (C,)
int RmsNormGrad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                void* extra) {
  if (nparam != 6 || !f32(dtypes[0]) || !f32(dtypes[1]) || !f32(dtypes[2]) || !f32(dtypes[3])) return 1;
  const int64_t C = shapes[0][ndims[0] - 1], M = rows(ndims[0], shapes[0]);
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
  if (nparam != 4 || !f32(dtypes[0]) || !f32(dtypes[1]) || !f32(dtypes[2])) return 1;
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
  if (nparam != 4 || !f32(dtypes[0]) || !i32(dtypes[1]) || ndims[0] != 2) return 1;
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
      mx16 = x > mx16 ? x : mx16;
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
  if (nparam != 5 || !f32(dtypes[0]) || !i32(dtypes[1]) || ndims[0] != 2) return 1;
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

// inputs g (...) f32, loss_scale (1,) f32; output (1,) = sum((g / loss_scale)^2): each element is
// unscaled before it is squared (a loss-scaled gradient's square can pass float32's range) and by a
// division (1 / 2^127 is a subnormal that flush-to-zero would make 0), partial sums in fixed blocks
// added in double
int SumSquares(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
               void* extra) {
  if (nparam != 3 || !f32(dtypes[0]) || !f32(dtypes[1])) return 1;
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
    if (!f32(dtypes[i])) return 1;
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
