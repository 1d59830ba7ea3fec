// CPU kernels for serving, called from MindSpore graphs as AOT custom ops (see kernels.py).
//
// Decoding a few sequences is bound by reading weights and KV rows from memory, and MindSpore's
// CPU kernels read them slower than the memory allows (its MatMul packs each call's weight into
// its own blocks; the KV gather copies every attended row before attention reads it again).
// These two kernels read each byte once, in the order it lies in memory:
//
//   PackedLinear     y = x W^T (+ b) with W packed once at load time as (N/16, K, 16): a k step
//                    is one 16-wide load of W and one broadcast-multiply-add per row of x, so up to
//                    8 rows share every weight load and no horizontal sums are needed. W is fp32,
//                    bf16 or fp16 as the checkpoint stores it, int8 with one fp32 scale per
//                    output (W8A16), widened to fp32 in registers, or int4 with one a group of
//                    32 inputs: on a CPU with AVX512_VNNI W4A8 (x rounded to int8 a group of 32 by
//                    llama.cpp's Q8_0 rule, 4 nibbles x 4 int8 a 32-bit lane by vpdpbusd), else
//                    W4A16 (widened to fp32 in registers).
//   CachedAttention  the step's new k/v rows written into the slotted cache, then causal
//                    softmax(q K^T) V read straight from it: query t of row b, head h attends cache
//                    rows first[b, h] .. first[b, h] + pos[b, t] (clipped to the cache: never a
//                    read or write outside it); one query in a plain loop (decode),
//                    a prompt's chunk 16 queries at a time with an online softmax (prefill). The
//                    cache is fp32 or fp16 (the engine's default: half the bytes per token), fp16
//                    rows widened to fp32 in registers; the arithmetic is fp32 either way.
//                    Writing the new rows here spares a layer the split, casts and two
//                    ScatterUpdates around it, ~0.25 ms of MindSpore launches at decode (1.8B:
//                    86 -> 77 ms a step; its linears alone take ~72 ms, the memory's read rate).
//
// and row-wise ones, most standing for several MindSpore ops each, because a decode step's
// tensors are tiny and MindSpore spends ~10 us launching each op (a bench-serve decode step ran
// ~300 of them; these leave ~120):
//
//   RmsNorm          x * rsqrt(mean(x^2) + eps) * w
//   SiluMul          silu(gate) * up from the fused gate/up projection's output
//   Embedding        the token embeddings' rows gathered from the table in its stored precision
//                    (fp32, bf16, fp16) and widened to fp32 (MindSpore's CPU Gather has no bf16)
//   Rope             the fused q/k/v projection's output split into heads (B, 3H, T, D), q and k
//                    rotated (rotate-half) and q scaled by 1/sqrt(D), v as it was
//
// Built by kernels.py with the machine's g++ (-O3 -march=native -fopenmp; INTERNLM_KERNEL_MARCH picks
// another target, e.g. x86-64-v3 for an AVX2 build, where each v16 is two registers); the vector helpers are
// kernel_common.h's. Float sums run in a fixed order per output, so results depend neither on the
// thread count nor on how many rows are computed together.
#include <omp.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernel_common.h"

namespace {

// ---- PackedLinear -----------------------------------------------------------------------------

// The packed weight is read in its stored precision and widened to floats in registers
// (kernel_common.h's ``widen``): the products and sums are the same float FMAs in the same order
// whatever the weight's type, so a bf16 weight gives exactly the result of the fp32 kernel on its
// widened values, at half the bytes read per token; an int8 weight's integers are widened exactly
// and each output is multiplied by its channel's scale once at the end (before the bias):
// y = (x . q) * s, a quarter of fp32's bytes read per token.
// Activations stay fp32 (vdpbf16ps would round them to bf16 too: not within fp32 rounding).

// R rows of x against Q consecutive panels (16 outputs each); R * Q accumulators in registers.
template <int R, int Q, typename W>
void tile(const float* x, const W* wp, const float* s, const float* b, float* y, int64_t n, int64_t N, int64_t K) {
  // 4 KB ahead in each panel's stream: with several rows per k step the hardware prefetcher
  // alone leaves the loads waiting (8 rows of the 103168 x 512 head: 10.0 -> 6.4 ms)
  constexpr int64_t ahead = 4096 / (16 * sizeof(W));
  v16 acc[R][Q];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) acc[r][q] = (v16){};
  for (int64_t k = 0; k < K; ++k) {
    v16 w[Q];
    for (int q = 0; q < Q; ++q) {
      w[q] = widen(wp + (q * K + k) * 16);
      __builtin_prefetch(wp + (q * K + k + ahead) * 16);
    }
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * K + k];
      for (int q = 0; q < Q; ++q) acc[r][q] += xv * w[q];
    }
  }
  for (int q = 0; q < Q; ++q) {
    const v16 bias = b ? load(b + n + q * 16) : (v16){};
    if (s) {  // int8: each output's scale
      const v16 scale = load(s + n + q * 16);
      for (int r = 0; r < R; ++r) store(y + r * N + n + q * 16, acc[r][q] * scale + bias);
    } else {
      for (int r = 0; r < R; ++r) store(y + r * N + n + q * 16, acc[r][q] + bias);
    }
  }
}

// int4 (W4A16, as LMDeploy's and llama.cpp's Q4 store weights): a panel is K/2 x 16 bytes, each
// byte two k steps of one output, an output's bytes 4 together (kernel_common.h's u4_t), with one
// fp32 scale per output and group of GROUP k steps, (K/GROUP, 16) a panel. Within a group the
// integers q (-8..7, exact as floats) are summed against x unscaled, and the group's sum is
// multiplied by its scale once: the scale costs one FMA a group, not a multiply a weight (a one-row
// step is bound by this arithmetic, not by the half bytes it reads: 11 vector operations for 32
// weights before, 7 now). Sums in k order within a group and over groups in order, so a row's
// result does not depend on the rows computed with it. On a CPU with AVX512_VNNI the W4A8 tile
// below replaces this one.
constexpr int64_t GROUP = 32;

template <int R, int Q>
void tile_w4a16(const float* x, const u4_t* wp, const float* s, const float* b, float* y, int64_t n, int64_t N,
                int64_t K) {
  constexpr int64_t ahead = 4096;  // bytes ahead in each panel's stream, as the other types
  const int64_t panel = K / 2 * 16, groups = K / GROUP;
  const float* sp = s + n * groups;  // this tile's first panel's scales: (groups, 16) a panel
  v16 acc[R][Q];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) acc[r][q] = (v16){};
  for (int64_t g = 0; g < groups; ++g) {
    v16 part[R][Q];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q) part[r][q] = (v16){};
    for (int64_t k8 = g * GROUP; k8 < (g + 1) * GROUP; k8 += 8) {  // a 64-byte block of each panel
      for (int q = 0; q < Q; ++q) __builtin_prefetch(wp + q * panel + k8 * 8 + ahead);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {  // pair i: k steps k8 + 2i, k8 + 2i + 1
        const int64_t k = k8 + 2 * i;
        v16 w0[Q], w1[Q];
        for (int q = 0; q < Q; ++q) u4_to_f32(wp + q * panel + k8 * 8, i, w0[q], w1[q]);
        for (int r = 0; r < R; ++r) {
          const float x0 = x[r * K + k], x1 = x[r * K + k + 1];
          for (int q = 0; q < Q; ++q) {
            part[r][q] += x0 * w0[q];
            part[r][q] += x1 * w1[q];
          }
        }
      }
    }
    for (int q = 0; q < Q; ++q) {
      const v16 scale = load(sp + (q * groups + g) * 16);
      for (int r = 0; r < R; ++r) acc[r][q] += part[r][q] * scale;
    }
  }
  for (int q = 0; q < Q; ++q) {
    const v16 bias = b ? load(b + n + q * 16) : (v16){};
    for (int r = 0; r < R; ++r) store(y + r * N + n + q * 16, acc[r][q] + bias);
  }
}

#if defined(__AVX512VNNI__)
// int4 W4A8, as llama.cpp's Q4_0 x Q8_0 dot product: each row of x is quantised once a call to
// int8 a group of 32 by Q8_0's rule (d = max|x| / 127, q = x * (1 / d) rounded to nearest, ties to
// even: vcvtps2dq's rounding), and vpdpbusd multiplies 4 unsigned nibbles (q + 8) of each of 16
// outputs by 4 int8 activations and adds them into the output's int32 lane: 6 vector operations
// for 8 inputs x 16 outputs, where W4A16 takes 7 for 2. The +8 comes off in integers (the group's
// sum starts at -8 * sum of its activations), and the group's exact integer sum is converted once
// and multiplied by (d * the weight's scale) into the fp32 sum: groups in order, so a row's result
// is a function of the row alone, as W4A16's. The activations' rounding is the cost: each within
// half a step of max|x| / 127 of its group (tests/test_kernels.py checks the rule exactly).
//
// A quantised row takes the K floats of x's row it was made from (K int8, the scales, the
// offsets: 1.25 K bytes of 4 K), so linear_part's row loops step through quantised rows as
// through x's. In each 8 k steps the int8 values lie as the nibbles they meet: the 4 even k's
// (low nibbles), then the 4 odd ones (high nibbles).
// Where a quantised row's parts start, in floats from the row's start: K int8 values at 0, then
// the K / GROUP scales d, then the K / GROUP offsets (int32: -8 * the group's sum of int8 values).
constexpr int64_t q8_scales_at(int64_t K) { return K / 4; }
constexpr int64_t q8_offsets_at(int64_t K) { return K / 4 + K / GROUP; }

inline void quantize_row(const float* x, int64_t K, float* row) {
  int8_t* values = reinterpret_cast<int8_t*>(row);
  float* scales = row + q8_scales_at(K);
  int32_t* offsets = reinterpret_cast<int32_t*>(row + q8_offsets_at(K));
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t g = 0; g < K / GROUP; ++g) {
    const __m512 a = _mm512_loadu_ps(x + g * GROUP), b = _mm512_loadu_ps(x + g * GROUP + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    // vmaxps passes over a NaN and vcvtps2dq makes it a 0 byte: a NaN in x would vanish, where fp32
    // arithmetic (W4A16) carries it to the row's outputs; a NaN d carries it there
    const bool nan = _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) != 0;
    const float d = nan ? NAN : amax / 127.f, inv = d != 0.f ? 1.f / d : 0.f;
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
    // |q| <= 127: vpmovdb's truncation to a byte is exact
    _mm_storeu_si128(reinterpret_cast<__m128i*>(values + g * GROUP), _mm_shuffle_epi8(_mm512_cvtepi32_epi8(qa), order));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(values + g * GROUP + 16),
                     _mm_shuffle_epi8(_mm512_cvtepi32_epi8(qb), order));
    scales[g] = d;
    offsets[g] = -8 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  }
}

template <int R, int Q>
void tile_w4a8(const float* x, const u4_t* wp, const float* s, const float* b, float* y, int64_t n, int64_t N,
               int64_t K) {
  constexpr int64_t ahead = 4096;
  const int64_t panel = K / 2 * 16, groups = K / GROUP;
  const float* sp = s + n * groups;
  const __m512i nibble = _mm512_set1_epi8(15);
  v16 acc[R][Q];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) acc[r][q] = (v16){};
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sum[R][Q];
    for (int r = 0; r < R; ++r) {
      const __m512i start = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(x + r * K + q8_offsets_at(K))[g]);
      for (int q = 0; q < Q; ++q) sum[r][q] = start;
    }
    for (int64_t k8 = g * GROUP; k8 < (g + 1) * GROUP; k8 += 8) {
      __m512i lo[Q], hi[Q];
      for (int q = 0; q < Q; ++q) {
        const u4_t* p = wp + q * panel + k8 * 8;  // the 64-byte block of k8 .. k8 + 7
        const __m512i v = _mm512_loadu_si512(p);
        lo[q] = _mm512_and_si512(v, nibble);
        hi[q] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        __builtin_prefetch(p + ahead);
      }
      for (int r = 0; r < R; ++r) {
        int32_t even, odd;  // the 4 even k's int8 values, then the 4 odd k's
        memcpy(&even, reinterpret_cast<const int8_t*>(x + r * K) + k8, 4);
        memcpy(&odd, reinterpret_cast<const int8_t*>(x + r * K) + k8 + 4, 4);
        const __m512i xe = _mm512_set1_epi32(even), xo = _mm512_set1_epi32(odd);
        for (int q = 0; q < Q; ++q) {
          sum[r][q] = _mm512_dpbusd_epi32(sum[r][q], lo[q], xe);
          sum[r][q] = _mm512_dpbusd_epi32(sum[r][q], hi[q], xo);
        }
      }
    }
    for (int q = 0; q < Q; ++q) {
      const v16 scale = load(sp + (q * groups + g) * 16);
      for (int r = 0; r < R; ++r) {
        const v16 total = (v16)_mm512_cvtepi32_ps(sum[r][q]);  // exact: |sum| <= 32 * 127 * 8
        acc[r][q] += total * (splat(x[r * K + q8_scales_at(K) + g]) * scale);
      }
    }
  }
  for (int q = 0; q < Q; ++q) {
    const v16 bias = b ? load(b + n + q * 16) : (v16){};
    for (int r = 0; r < R; ++r) store(y + r * N + n + q * 16, acc[r][q] + bias);
  }
}
#endif

template <int R, int Q>
void tile(const float* x, const u4_t* wp, const float* s, const float* b, float* y, int64_t n, int64_t N, int64_t K) {
#if defined(__AVX512VNNI__)
  tile_w4a8<R, Q>(x, wp, s, b, y, n, N, K);
#else
  tile_w4a16<R, Q>(x, wp, s, b, y, n, N, K);
#endif
}

// Elements of W a panel holds: K x 16, or K/2 x 16 bytes of int4 pairs.
template <typename W>
constexpr int64_t panel_elems(int64_t K) { return std::is_same_v<W, u4_t> ? K / 2 * 16 : K * 16; }

// Tile shapes that keep R * Q accumulators and Q weights in registers: AVX-512 has 32 of 16
// floats (8 rows x 3 panels); AVX2 has 16 of 8 floats and a v16 takes two, so at most 4 rows and
// fewer panels (the AVX-512 shapes spilled there: bench-serve decode at 4 rows 55 tok/s, not 730).
// int4 holds two weights a panel and two sums a (row, panel) in registers, so fewer panels fit.
#if defined(__AVX512F__)
constexpr int64_t ROWS = 8;  // rows of x per pass over the weight
template <int R, typename W>
constexpr int panels_at_once() {
  if constexpr (std::is_same_v<W, u4_t>) return R <= 2 ? 4 : R <= 4 ? 2 : 1;  // two accumulators a (row, panel)
  return R <= 2 ? 4 : 3;
}
#else
constexpr int64_t ROWS = 4;
template <int R, typename W>
constexpr int panels_at_once() {
  if constexpr (std::is_same_v<W, u4_t>) return R == 1 ? 2 : 1;
  return R == 1 ? 3 : R == 2 ? 2 : 1;
}
#endif

template <int R, typename W>
void panels(const float* x, const W* wp, const float* s, const float* b, float* y, int64_t p0, int64_t p1, int64_t N,
            int64_t K) {
  constexpr int Q = panels_at_once<R, W>();
  const int64_t stride = panel_elems<W>(K);
  int64_t p = p0;
  for (; p + Q <= p1; p += Q) tile<R, Q>(x, wp + p * stride, s, b, y, p * 16, N, K);
  for (; p < p1; ++p) tile<R, 1>(x, wp + p * stride, s, b, y, p * 16, N, K);
}

template <typename W>
void linear_part(const float* x, const W* wp, const float* s, const float* b, float* y, int64_t M, int64_t p0,
                 int64_t p1, int64_t N, int64_t K) {
  int64_t m = 0;
  for (; m + ROWS <= M; m += ROWS) panels<ROWS>(x + m * K, wp, s, b, y + m * N, p0, p1, N, K);
  const float* xs = x + m * K;
  float* ys = y + m * N;
  switch (M - m) {  // fewer than ROWS left
    case 1: panels<1>(xs, wp, s, b, ys, p0, p1, N, K); break;
    case 2: panels<2>(xs, wp, s, b, ys, p0, p1, N, K); break;
    case 3: panels<3>(xs, wp, s, b, ys, p0, p1, N, K); break;
#if defined(__AVX512F__)
    case 4: panels<4>(xs, wp, s, b, ys, p0, p1, N, K); break;
    case 5: panels<5>(xs, wp, s, b, ys, p0, p1, N, K); break;
    case 6: panels<6>(xs, wp, s, b, ys, p0, p1, N, K); break;
    case 7: panels<7>(xs, wp, s, b, ys, p0, p1, N, K); break;
#endif
    default: break;
  }
}

// Whether a linear of W weights reads x's rows as they are, or quantised first (int4 on VNNI: W4A8).
template <typename W>
constexpr bool quantises_input() {
#if defined(__AVX512VNNI__)
  return std::is_same_v<W, u4_t>;
#else
  return false;
#endif
}

// x's rows m0 .. m1 - 1 as the W4A8 tiles read them, each where x's row lay in ``rows`` (quantize_row).
inline void quantize_rows(const float* x, int64_t m0, int64_t m1, int64_t K, float* rows) {
#if defined(__AVX512VNNI__)
  for (int64_t m = m0; m < m1; ++m) quantize_row(x + m * K, K, rows + m * K);
#endif
}

// Thread t of nt's share of y = x W^T (+ b): its panels (each thread reads its share of the weight
// once, whatever the rows). More than ROWS rows (prefill) pass over the weight once per ROWS rows: go
// through it a block of panels at a time (~512 KB, half an L2), every row over a block before the
// next, so the passes after the first read it from cache instead of memory (a 1.8B model's weights do
// not stay in L3 from one pass to the next). Each output's sum is still one tile's, in the same order,
// so the result does not depend on the split. x as the tiles read it (quantised where
// quantises_input<W>).
template <typename W>
void linear_share(const float* x, const void* wp, const float* s, const float* b, float* y, int64_t M, int64_t N,
                  int64_t K, int t, int nt) {
  const int64_t P = N / 16;
  const int64_t block =
      M <= ROWS ? P : std::max<int64_t>(12, (512 << 10) / (panel_elems<W>(K) * (int64_t)sizeof(W)) / 12 * 12);
  const int64_t p0 = P * t / nt, p1 = P * (t + 1) / nt;
  for (int64_t p = p0; p < p1; p += block)
    linear_part(x, static_cast<const W*>(wp), s, b, y, M, p, std::min(p + block, p1), N, K);
}

template <typename W>
void linear(const float* x, const void* wp, const float* s, const float* b, float* y, int64_t M, int64_t N,
            int64_t K) {
  std::unique_ptr<float[]> rows;
  if constexpr (quantises_input<W>()) {  // each row quantised once a call, not once a tile
    rows.reset(new float[M * K]);
#pragma omp parallel for if (M * K > (1 << 16)) schedule(static)
    for (int64_t m = 0; m < M; ++m) quantize_rows(x, m, m + 1, K, rows.get());
    x = rows.get();
  }
#pragma omp parallel if (M * N * K > (1 << 18))
  linear_share<W>(x, wp, s, b, y, M, N, K, omp_get_thread_num(), omp_get_num_threads());
}

// ---- Embedding ---------------------------------------------------------------------------------

template <typename W>
void embed(const int32_t* ids, const void* table, int64_t M, int64_t V, int64_t C, float* out) {
  const W* t = static_cast<const W*>(table);
#pragma omp parallel for if (M * C > (1 << 16)) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const int64_t id = std::min<int64_t>(std::max<int64_t>(ids[m], 0), V - 1);
    widen_row(t + id * C, C, out + m * C);
  }
}

// The weight types a packed linear or an embedding table is held in: PackedLinear and Embedding read
// them from the tensor's dtype, DecodeStep from its model's description (``kernels.py``: STEP_KINDS).
enum Kind : int64_t { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2, KIND_I8 = 3, KIND_U4 = 4, KIND_NONE = -1 };

int64_t kind_of(const char* dtype) {
  return is_f32(dtype) ? KIND_F32 : is_bf16(dtype) ? KIND_BF16 : is_f16(dtype) ? KIND_F16 : is_i8(dtype) ? KIND_I8
         : is_u8(dtype) ? KIND_U4 : KIND_NONE;
}

// f(W{}) for the weight type of ``kind``: the one table from a kind to its type. False for none.
template <typename F>
bool with_kind(int64_t kind, F&& f) {
  switch (kind) {
    case KIND_F32: f(float{}); return true;
    case KIND_BF16: f(bf16_t{}); return true;
    case KIND_F16: f(f16_t{}); return true;
    case KIND_I8: f(int8_t{}); return true;
    case KIND_U4: f(u4_t{}); return true;
    default: return false;
  }
}

// y = x W^T (+ b) for a packed weight of ``kind``; false for a kind it cannot read.
bool linear_of(int64_t kind, const float* x, const void* wp, const float* s, const float* b, float* y, int64_t M,
               int64_t N, int64_t K) {
  return with_kind(kind, [&](auto w) { linear<decltype(w)>(x, wp, s, b, y, M, N, K); });
}

// The rows ``ids`` of a (V, C) table of ``kind`` (float kinds only), widened; false for another kind.
bool embed_of(int64_t kind, const int32_t* ids, const void* table, int64_t M, int64_t V, int64_t C, float* out) {
  return kind <= KIND_F16 && with_kind(kind, [&](auto w) {
    using W = decltype(w);
    if constexpr (!std::is_same_v<W, int8_t> && !std::is_same_v<W, u4_t>) embed<W>(ids, table, M, V, C, out);
  });
}

// ---- CachedAttention --------------------------------------------------------------------------

// The cache rows are fp32 or fp16 (T = float or f16_t): fp16 rows are widened to floats in
// registers (vcvtph2ps, exact) by PackedLinear's ``widen``, so every product and sum is the same
// fp32 arithmetic in the same order as on an fp32 cache holding the fp16-rounded values.

// n rows of D values of a cache from ``src`` as floats: fp32 rows where they lie, fp16 rows widened
// into ``buf`` (n * D floats).
inline const float* rows_f32(const float* src, int64_t, int64_t, float*) { return src; }
inline const float* rows_f32(const f16_t* src, int64_t n, int64_t D, float* buf) {
  for (int64_t i = 0; i < n * D; i += 16) store(buf + i, widen(src + i));
  return buf;
}

// out[0 .. 16W) = inv * sum over j < n of p[j] * v row j's values 0 .. 16W (rows D apart): the n rows
// read once, in order, W vectors of each summed in registers (each output's sum in key order).
template <int W, typename T>
void weigh_rows(const float* p, const T* v, int64_t n, int64_t D, float inv, float* out) {
  v16 acc[W];
  for (int c = 0; c < W; ++c) acc[c] = (v16){};
  for (int64_t j = 0; j < n; ++j) {
    const v16 pj = splat(p[j]);
    for (int c = 0; c < W; ++c) acc[c] += pj * widen(v + j * D + 16 * c);
  }
  for (int c = 0; c < W; ++c) store(out + 16 * c, acc[c] * inv);
}

// One (row, head): n keys of D values from k and v (contiguous rows), q already scaled.
template <typename T>
void attend(const float* q, const T* k, const T* v, int64_t n, int64_t D, float* out, float* scores) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    v16 acc = (v16){};
    for (int64_t d = 0; d < D; d += 16) acc += load(q + d) * widen(k + j * D + d);
    scores[j] = hsum(acc);
    mx = scores[j] > mx ? scores[j] : mx;
  }
  int64_t j = 0;
  v16 total = (v16){};
  for (; j + 16 <= n; j += 16) {
    const v16 e = exp_neg(load(scores + j) - mx);
    store(scores + j, e);
    total += e;
  }
  float sum = hsum(total);
  for (; j < n; ++j) {
    scores[j] = std::exp(scores[j] - mx);
    sum += scores[j];
  }
  const float inv = 1.f / sum;
#if defined(__AVX512F__)
  constexpr int64_t vecs = 8;  // vectors of a row summed at a time, in registers (half on AVX2's 16)
#else
  constexpr int64_t vecs = 4;
#endif
  for (int64_t d = 0; d < D; d += 16 * vecs) {
    switch (std::min((D - d) / 16, vecs)) {
      case 1: weigh_rows<1>(scores, v + d, n, D, inv, out + d); break;
      case 2: weigh_rows<2>(scores, v + d, n, D, inv, out + d); break;
      case 3: weigh_rows<3>(scores, v + d, n, D, inv, out + d); break;
      case 4: weigh_rows<4>(scores, v + d, n, D, inv, out + d); break;
#if defined(__AVX512F__)
      case 5: weigh_rows<5>(scores, v + d, n, D, inv, out + d); break;
      case 6: weigh_rows<6>(scores, v + d, n, D, inv, out + d); break;
      case 7: weigh_rows<7>(scores, v + d, n, D, inv, out + d); break;
      default: weigh_rows<8>(scores, v + d, n, D, inv, out + d); break;
#endif
    }
  }
}

// Up to 16 queries of one (row, head) at once, flash-attention style: the queries sit in the
// vector lanes, keys come 16 at a time, and each query's softmax is kept online (running max and
// sum), so a prefill chunk reads each key once per 16 queries and never builds a scores matrix.
// Query j sees keys 0 .. seen[j] - 1; ``work`` holds 64 D floats (32 D for an fp32 cache).
template <typename T>
void attend_block(const float* q, int64_t nq, const int32_t* seen, const T* kc, const T* vc, int64_t D,
                  float* out, int64_t out_stride, float* work) {
  float* qt = work;           // (D, 16): the queries transposed, lane j = query j
  float* o = work + 16 * D;   // (D, 16): the running weighted sums of V
  float* kw = work + 32 * D;  // (16, D) each: a block of 16 fp16 keys and values, widened
  float* vw = work + 48 * D;
  int32_t lim[16];
  int64_t keys = 0;
  for (int64_t j = 0; j < 16; ++j) {
    lim[j] = j < nq ? seen[j] : seen[nq - 1];  // padding lanes copy a real query's range
    keys = std::max<int64_t>(keys, lim[j]);
    for (int64_t d = 0; d < D; ++d) qt[d * 16 + j] = j < nq ? q[j * D + d] : 0.f;
  }
  for (int64_t d = 0; d < D; ++d) store(o + d * 16, (v16){});
  i16 limit;
  memcpy(&limit, lim, 64);
  v16 m = splat(-INFINITY), l = (v16){};
  for (int64_t k0 = 0; k0 < keys; k0 += 16) {
    const int64_t n = std::min<int64_t>(16, keys - k0);
    const float* k = rows_f32(kc + k0 * D, n, D, kw);  // the block's keys k0 .. k0 + n - 1
    const float* v = rows_f32(vc + k0 * D, n, D, vw);
    // Scores for 16 keys, summed over 16 dimensions at a time then added up: the rounding error
    // grows with 16 + D/16 terms rather than D (the decode loop's 16-lane sums do the same).
    v16 s[16];
    for (int j = 0; j < 16; ++j) s[j] = (v16){};
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      for (int j = 0; j < 16; ++j) {
        const float* kr = k + std::min<int64_t>(j, n - 1) * D + d0;  // past the last key: masked below
        v16 acc = (v16){};
        for (int64_t d = 0; d < 16; ++d) acc += load(qt + (d0 + d) * 16) * kr[d];
        s[j] += acc;
      }
    }
    v16 m_new = m;
    for (int j = 0; j < 16; ++j) {
      const i16 visible = (int32_t)(k0 + j) < limit;
      s[j] = select(visible, s[j], splat(-INFINITY));
      m_new = select(s[j] > m_new, s[j], m_new);
    }
    const v16 alpha = exp_neg(m - m_new);  // rescales what was summed under the old max
    l *= alpha;
    for (int j = 0; j < 16; ++j) {
      const i16 visible = (int32_t)(k0 + j) < limit;
      s[j] = select(visible, exp_neg(s[j] - m_new), (v16){});  // exactly 0 for a masked key
      l += s[j];
    }
    for (int64_t d = 0; d < D; ++d) {
      v16 acc = load(o + d * 16) * alpha;
      for (int64_t j = 0; j < n; ++j) acc += s[j] * v[j * D + d];
      store(o + d * 16, acc);
    }
    m = m_new;
  }
  const v16 inv = splat(1.f) / l;
  for (int64_t d = 0; d < D; ++d) {
    const v16 od = load(o + d * 16) * inv;
    for (int64_t j = 0; j < nq; ++j) out[j * out_stride + d] = od[j];
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  v16 acc = (v16){};
  for (; i + 16 <= n; i += 16) acc += load(a + i) * load(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One row of D floats into a cache of T rows, as the cache holds it.
inline void put_row(const float* x, int64_t D, float* row) { memcpy(row, x, D * sizeof(float)); }
inline void put_row(const float* x, int64_t D, f16_t* row) {
  for (int64_t d = 0; d < D; d += 16) f32_to_f16(load(x + d), row + d);
}

// CachedAttention over a cache of R rows of T (float or f16_t); the arguments as CachedAttention
// describes them (qkv (B, H + 2 Hkv, Tq, D), out (B, Tq, H, D)). In parts, so that the op and the
// decode step can each share them out among their threads: the new rows written (``write_rows``),
// then ``items()`` independent pieces of work (16 queries of one (row, head) each), in any order.
template <typename T>
struct Attention {
  const float* qkv;
  T *kc, *vc;
  const int32_t *write, *first, *pos;
  float* out;
  int64_t B, Tq, D, R, H, Hkv;

  int64_t heads() const { return H + 2 * Hkv; }
  int64_t blocks() const { return (Tq + 15) / 16; }  // queries go 16 at a time through attend_block
  int64_t items() const { return B * H * blocks(); }

  // The new rows, in the cache's dtype (the caches are written in place: MindSpore's ScatterUpdate and
  // the casts and slices around it cost ~0.25 ms a layer at decode, more than attention itself). A
  // row outside the cache is skipped, never written.
  void write_rows() const {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t t = 0; t < Tq; ++t) {
          const int64_t row = write[(b * Hkv + g) * Tq + t];
          if (row < 0 || row >= R) continue;
          put_row(qkv + ((b * heads() + H + g) * Tq + t) * D, D, kc + row * D);
          put_row(qkv + ((b * heads() + H + Hkv + g) * Tq + t) * D, D, vc + row * D);
        }
  }

  // Rows are clipped to the cache rather than refused: the engine never asks for one outside it
  // (padding queries included), and a non-zero return leaves MindSpore 2.9's graph unusable for
  // the rest of the process (seen: every later call fails), which would take a whole worker down.
  // i = b * H + h, a query head; its k/v head's first row (query head h reads k/v head h / (H / Hkv))
  int64_t start(int64_t i) const {
    return std::min<int64_t>(std::max<int64_t>(first[i / (H / Hkv)], 0), R - 1);
  }
  int64_t keys(int64_t i, int64_t b, int64_t t) const {  // how many rows query t of (row, head) i sees
    return std::min<int64_t>(std::max<int64_t>(pos[b * Tq + t], 0) + 1, R - start(i));
  }
  int64_t longest() const {
    int64_t n = 1;
    for (int64_t i = 0; i < B * H; ++i)
      for (int64_t t = 0; t < Tq; ++t) n = std::max(n, keys(i, i / H, t));
    return n;
  }
  // floats of work space an item needs (``longest()`` computed once by the caller)
  int64_t work_floats(int64_t longest) const { return Tq == 1 ? longest : (sizeof(T) == 4 ? 32 : 64) * D; }

  void item(int64_t it, float* work) const {
    const int64_t i = it / blocks(), b = i / H, h = i % H, t0 = it % blocks() * 16;
    const T* k = kc + start(i) * D;
    const T* v = vc + start(i) * D;
    const float* q = qkv + ((b * heads() + h) * Tq + t0) * D;
    if (Tq == 1) {  // decode: one query, the keys in a plain loop
      attend(q, k, v, keys(i, b, 0), D, out + (b * H + h) * D, work);
      return;
    }
    int32_t seen[16];
    const int64_t nq = std::min<int64_t>(16, Tq - t0);
    for (int64_t j = 0; j < nq; ++j) seen[j] = (int32_t)keys(i, b, t0 + j);
    attend_block(q, nq, seen, k, v, D, out + ((b * Tq + t0) * H + h) * D, H * D, work);
  }
};

template <typename T>
void cached_attention(const Attention<T>& a) {
  a.write_rows();
  const int64_t longest = a.longest();
#pragma omp parallel if (a.items() * a.Tq * longest * a.D > (1 << 16))
  {
    std::vector<float> work(a.work_floats(longest));
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < a.items(); ++it) a.item(it, work.data());
  }
}

// ---- row-wise ----------------------------------------------------------------------------------

// y = x * rsqrt(mean(x^2) + eps) * w over one row of C
inline void rms_norm_row(const float* x, const float* w, float eps, float* y, int64_t C) {
  const float r = 1.f / std::sqrt(dot(x, x, C) / C + eps);
  for (int64_t c = 0; c < C; ++c) y[c] = x[c] * r * w[c];
}

void rms_norm(const float* x, const float* w, float eps, float* y, int64_t M, int64_t C) {
#pragma omp parallel for if (M * C > (1 << 16)) schedule(static)
  for (int64_t m = 0; m < M; ++m) rms_norm_row(x + m * C, w, eps, y + m * C, C);
}

// y (M, F) = silu(gate) * up from gu (M, 2F) = [gate | up]
void silu_mul(const float* gu, float* y, int64_t M, int64_t F) {
#pragma omp parallel for if (M * F > (1 << 16)) schedule(static)
  for (int64_t m = 0; m < M; ++m) silu_mul_row(gu + m * 2 * F, gu + m * 2 * F + F, F, y + m * F);
}

// Head h of row b of y (B, T, (H + 2 Hkv) D) -> out (B, H + 2 Hkv, T, D): a q head rotated and times
// ``scale``, a k head rotated, a v head as it was; cs/sn (B, T, D)
inline void rope_head(const float* y, const float* cs, const float* sn, float scale, int64_t H, int64_t Hkv, int64_t b,
                      int64_t h, int64_t T, int64_t D, float* out) {
  const int64_t H3 = H + 2 * Hkv;
  for (int64_t t = 0; t < T; ++t) {
    const float* src = y + ((b * T + t) * H3 + h) * D;
    float* dst = out + ((b * H3 + h) * T + t) * D;
    if (h >= H + Hkv)  // v
      memcpy(dst, src, D * sizeof(float));
    else
      rope_row(src, cs + (b * T + t) * D, sn + (b * T + t) * D, D, h < H ? scale : 1.f, dst);
  }
}

void rope(const float* y, const float* cs, const float* sn, float scale, int64_t H, int64_t Hkv, int64_t B, int64_t T,
          int64_t D, float* out) {
#pragma omp parallel for collapse(2) if (B * T * (H + 2 * Hkv) * D > (1 << 16)) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H + 2 * Hkv; ++h) rope_head(y, cs, sn, scale, H, Hkv, b, h, T, D, out);
}

}  // namespace

extern "C" {

// inputs x (..., K) f32, wp (P, K, 16) f32, bf16 or f16[, b (16P,) f32]; output y (..., 16P) f32.
// With an int8 wp: inputs x, wp (P, K, 16) i8, scale (16P,) f32[, b (16P,) f32]; y = (x q^T) * scale + b.
// With an int4 wp (uint8 pairs): inputs x, wp (P, K/2, 16) u8 (each output's bytes 4 together: see
// u4_t), scale (P, K/32, 16) f32[, b]; y = x (q * s)^T + b, s each output's scale for each group
// of 32 k, x rounded to int8 a group of 32 first where the CPU has AVX512_VNNI (W4A8).
// The weight's dtype says which: the argument lists never overlap.
int PackedLinear(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                 void* extra) {
  if (nparam < 3) return 1;
  const bool int4 = is_u8(dtypes[1]), quantized = int4 || is_i8(dtypes[1]);
  const int first_extra = quantized ? 3 : 2;  // where the bias would be
  if (nparam != first_extra + 1 && nparam != first_extra + 2) return 1;
  const bool bias = nparam == first_extra + 2;
  for (int i = 0; i < nparam; ++i)
    if (i != 1 && !is_f32(dtypes[i])) return 2;
  const int64_t K = shapes[0][ndims[0] - 1];
  if (ndims[1] != 3 || shapes[1][2] != 16 || shapes[1][1] != (int4 ? K / 2 : K)) return 3;
  if (int4 && (K % GROUP || ndims[2] != 3 || shapes[2][0] != shapes[1][0] || shapes[2][1] != K / GROUP ||
               shapes[2][2] != 16))
    return 3;
  const int64_t N = shapes[1][0] * 16, M = rows_of(ndims[0], shapes[0]);
  for (int i = int4 ? 3 : 2; i < nparam - 1; ++i)  // scale and bias: one value per output
    if (ndims[i] != 1 || shapes[i][0] != N) return 3;
  const float* x = static_cast<const float*>(params[0]);
  const float* s = quantized ? static_cast<const float*>(params[2]) : nullptr;
  const float* b = bias ? static_cast<const float*>(params[first_extra]) : nullptr;
  float* y = static_cast<float*>(params[nparam - 1]);
  return linear_of(kind_of(dtypes[1]), x, params[1], s, b, y, M, N, K) ? 0 : 2;
}

// What PackedLinear's int4 path multiplies the weights by: 8 (int8 activations, W4A8: this build
// has AVX512_VNNI) or 32 (fp32, W4A16). kernels.int4_activations asks, and the tests by it.
int Int4ActivationBits() {
#if defined(__AVX512VNNI__)
  return 8;
#else
  return 32;
#endif
}

// inputs ids (...) i32, table (V, C) f32, bf16 or f16; output (..., C) f32: each id's row, widened.
// An id outside 0..V-1 reads the nearest row (never memory outside the table; see CachedAttention
// for why kernels clip rather than fail).
int Embedding(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
              void* extra) {
  if (nparam != 3 || !is_i32(dtypes[0]) || !is_f32(dtypes[2]) || ndims[1] != 2) return 1;
  const int64_t V = shapes[1][0], C = shapes[1][1];
  int64_t M = 1;
  for (int i = 0; i < ndims[0]; ++i) M *= shapes[0][i];
  const int32_t* ids = static_cast<const int32_t*>(params[0]);
  float* out = static_cast<float*>(params[2]);
  return embed_of(kind_of(dtypes[1]), ids, params[1], M, V, C, out) ? 0 : 2;
}

// inputs qkv (B, H + 2 Hkv, T, D) f32 (the Rope kernel's output: q heads scaled and rotated, then k,
// then v), k_cache (R, D) and v_cache (R, D) both f32 or both f16, write (B * Hkv * T,) i32,
// first (B, Hkv) i32, pos (B, T) i32;
// output (B, T, H, D) f32. First k/v head g's row t of row b goes into cache row write[(b * Hkv + g) * T + t]
// (both caches, written in place); then query t of row b, head h attends the cache rows of k/v head
// g = h / (H / Hkv), first[b, g] .. first[b, g] + pos[b, t] (grouped-query attention; Hkv == H without it)
int CachedAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                    void* extra) {
  const bool f16 = nparam == 7 && is_f16(dtypes[1]);  // an fp16 cache: its rows widened to fp32 as read
  if (nparam != 7 || !is_f32(dtypes[0]) || !(is_f32(dtypes[1]) || f16) || strcmp(dtypes[1], dtypes[2]) != 0 ||
      !is_i32(dtypes[3]) || !is_i32(dtypes[4]) || !is_i32(dtypes[5]) || !is_f32(dtypes[6]))
    return 1;
  if (ndims[0] != 4 || shapes[0][3] % 16 != 0 || ndims[1] != 2 || shapes[1][1] != shapes[0][3] ||
      ndims[2] != 2 || shapes[2][0] != shapes[1][0] || shapes[2][1] != shapes[1][1] || ndims[3] != 1 ||
      ndims[4] != 2 || ndims[5] != 2 || shapes[4][0] != shapes[0][0] || shapes[5][0] != shapes[0][0] ||
      shapes[5][1] != shapes[0][2])
    return 2;
  const int64_t Hkv = shapes[4][1], H = shapes[0][1] - 2 * Hkv;
  if (Hkv < 1 || H < 1 || H % Hkv != 0 || shapes[3][0] != shapes[0][0] * Hkv * shapes[0][2]) return 2;
  const float* qkv = static_cast<const float*>(params[0]);
  const int32_t* write = static_cast<const int32_t*>(params[3]);
  const int32_t* first = static_cast<const int32_t*>(params[4]);
  const int32_t* pos = static_cast<const int32_t*>(params[5]);
  float* out = static_cast<float*>(params[6]);
  const int64_t B = shapes[0][0], Tq = shapes[0][2], D = shapes[0][3], R = shapes[1][0];
  if (f16)
    cached_attention(Attention<f16_t>{qkv, static_cast<f16_t*>(params[1]), static_cast<f16_t*>(params[2]), write,
                                      first, pos, out, B, Tq, D, R, H, Hkv});
  else
    cached_attention(Attention<float>{qkv, static_cast<float*>(params[1]), static_cast<float*>(params[2]), write,
                                      first, pos, out, B, Tq, D, R, H, Hkv});
  return 0;
}

// inputs x (..., C) f32, w (C,) f32, eps (1,) f32; output (..., C)
int RmsNorm(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
            void* extra) {
  if (nparam != 4 || !is_f32(dtypes[0]) || !is_f32(dtypes[1]) || !is_f32(dtypes[2])) return 1;
  const int64_t C = shapes[0][ndims[0] - 1], M = rows_of(ndims[0], shapes[0]);
  if (ndims[1] != 1 || shapes[1][0] != C) return 2;
  const float* x = static_cast<const float*>(params[0]);
  const float* w = static_cast<const float*>(params[1]);
  const float eps = *static_cast<const float*>(params[2]);
  rms_norm(x, w, eps, static_cast<float*>(params[3]), M, C);
  return 0;
}

// input gu (..., 2F) f32 = [gate | up]; output (..., F) = silu(gate) * up
int SiluMul(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
            void* extra) {
  if (nparam != 2 || !is_f32(dtypes[0]) || shapes[0][ndims[0] - 1] % 2) return 1;
  const int64_t F = shapes[0][ndims[0] - 1] / 2, M = rows_of(ndims[0], shapes[0]);
  const float* gu = static_cast<const float*>(params[0]);
  silu_mul(gu, static_cast<float*>(params[1]), M, F);
  return 0;
}

// inputs y (B, T, (H + 2 Hkv) D) f32, cos (B, T, D) f32, sin (B, T, D) f32, q_scale (1,) f32,
// heads (2,) i32 = (H, Hkv); output (B, H + 2 Hkv, T, D): heads 0..H-1 q (rotated, times q_scale),
// then Hkv k heads (rotated), then Hkv v heads as they were
int Rope(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
         void* extra) {
  if (nparam != 6 || !is_f32(dtypes[0]) || !is_f32(dtypes[1]) || !is_f32(dtypes[2]) || !is_f32(dtypes[3]) ||
      !is_i32(dtypes[4]))
    return 1;
  if (ndims[0] != 3 || ndims[1] != 3 || ndims[5] != 4 || ndims[4] != 1 || shapes[4][0] != 2) return 2;
  const int64_t B = shapes[0][0], T = shapes[0][1], D = shapes[1][2], H3 = shapes[5][1];
  if (shapes[0][2] != H3 * D || shapes[1][0] != B || shapes[1][1] != T || D % 2) return 3;
  const float* y = static_cast<const float*>(params[0]);
  const float* cs = static_cast<const float*>(params[1]);
  const float* sn = static_cast<const float*>(params[2]);
  const float scale = *static_cast<const float*>(params[3]);
  const int32_t* heads = static_cast<const int32_t*>(params[4]);
  float* out = static_cast<float*>(params[5]);
  if (heads[0] + 2 * heads[1] != H3) return 4;
  rope(y, cs, sn, scale, heads[0], heads[1], B, T, D, out);
  return 0;
}


}  // extern "C"

// ---- DecodeStep: a whole decode step in one call --------------------------------------------------
//
// The step graph runs ~60 kernels a decode step (8 layers of bench-serve: embedding, then per layer
// norm, fused q/k/v, rope, attention, o, norm, gate/up, SiluMul, down, two adds; then norm and the
// head), and between them MindSpore's runtime and the Python around it keep one core busy while the
// other waits in OpenMP (perf, bench-serve bf16 at one stream: kernels 46% of the samples, libgomp
// 27%, MindSpore 13%, Python 5%). DecodeStep runs the same kernels in the same order on the same
// memory from one call (``kernels.py``'s ``DecodeStep``, called through ctypes without the GIL), so
// its logits are the graph's to the bit, in one parallel region (see SpinBarrier); LoRA adapters per
// row. Decode-shaped steps only (one new token a row; ``verify``'s rows too); prefill chunks and
// unpacked linears stay on the graph. bench-serve bf16 at one row: 6.3 ms a step graph, 2.6 ms here.

// The layouts below are ``kernels.py``'s ctypes structures (StepLinear, StepLayer, StepModel): keep them equal.
struct StepLinear {
  const void* w;       // packed (P, K, 16), or int4 pairs (P, K/2, 16)
  const float* scale;  // int8: (N,); int4: (P, K/32, 16); else null
  const float* bias;   // (N,) or null
  int64_t kind, N, K;
  const float* lora_a;   // LoRA adapters' stacks, or null: A (n + 1, rank, K), row 0 zeros (no adapter)
  const float* lora_bt;  // B transposed, (n + 1, rank, N), alpha / rank folded in
  int64_t rank;
};

struct StepLayer {
  const float* attention_norm;
  StepLinear wqkv, wo;
  const float* ffn_norm;
  StepLinear w13, w2;
  void* k_cache;  // (R, D) each, float or fp16 (``cache_f16``), written in place
  void* v_cache;
};

struct StepModel {
  int64_t layers, hidden, heads, kv_heads, head_dim, cache_rows, cache_f16, vocab, table_kind;
  int64_t threads;  // the step's team (kernels.py's step_threads: no more than there are CPUs to run them)
  float eps, q_scale;
  const void* table;  // (vocab, hidden) embedding rows
  const float* norm_out;
  StepLinear head;
  const StepLayer* layer;
};

// Every linear the step reads must be one of the kinds linear_of reads (checked once, here).
static bool readable(const StepLinear& l) {
  return l.w && l.kind >= KIND_F32 && l.kind <= KIND_U4 && (l.scale != nullptr) == (l.kind >= KIND_I8) &&
         l.N % 16 == 0 && (l.kind != KIND_U4 || l.K % GROUP == 0);
}

// The step's threads meet here between its phases, spinning (then yielding the core, should a
// thread of theirs not be running). libgomp's barriers, the end of a parallel region included, put a
// waiting thread to sleep after ~100 spins whenever the process has more OpenMP threads than cores
// (MindSpore's graphs run their kernels on threads with teams of their own), and waking it costs a
// system call and a context switch. Measured, bench-serve bf16 at one row: 4.0 ms a step with a
// parallel region a kernel, 2.7 ms with OMP_WAIT_POLICY=active (which no deployed worker can use: its
// idle threads would spin for minutes); one region a step meeting here is what keeps the second.
class SpinBarrier {
 public:
  void wait(int n) {
    const int phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n - 1) {  // the last one in lets the others go
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins)
      if (spins < (1 << 12))  // ~0.1 ms: a phase waits microseconds unless a thread lost its core
        _mm_pause();
      else
        sched_yield();
  }

 private:
  std::atomic<int> arrived_{0}, phase_{0};
};

// What thread t of nt does of one layer's linear: its panels of y = x W^T (+ b) (x quantised first
// where the kind wants it: by every thread, its rows, then a barrier), then the LoRA terms of the
// same outputs, so no thread waits between the two.
struct StepThread {
  int t, nt;
  SpinBarrier* bar;
  float* qx;  // B * widest K floats: x's rows quantised, for the kinds that read them so

  int64_t first(int64_t n) const { return n * t / nt; }  // this thread's share of n things
  int64_t last(int64_t n) const { return n * (t + 1) / nt; }
  void meet() const { bar->wait(nt); }

  void linear(const StepLinear& l, const float* x, float* y, int64_t M, const int32_t* adapters) const {
    with_kind(l.kind, [&](auto w) {
      using W = decltype(w);
      const float* in = x;
      if constexpr (quantises_input<W>()) {
        quantize_rows(x, first(M), last(M), l.K, qx);
        meet();
        in = qx;
      }
      linear_share<W>(in, l.w, l.scale, l.bias, y, M, l.N, l.K, t, nt);
    });
    if (adapters && l.lora_a) lora(l, x, y, M, adapters);
  }

  // y_m += B_a (A_a x_m) for each row m whose adapter a is not 0 (the graph's per-row LoRA,
  // Linear.construct) over this thread's outputs (linear_share's panels): u = A_a x_m (rank dot
  // products, each thread its own), then each output's rank terms summed before they are added.
  void lora(const StepLinear& l, const float* x, float* y, int64_t M, const int32_t* adapters) const {
    const int64_t R = l.rank, K = l.K, N = l.N, o0 = 16 * first(N / 16), o1 = 16 * last(N / 16);
    std::vector<float> u(R);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t a = adapters[m];
      if (a <= 0) continue;
      const float* A = l.lora_a + a * R * K;
      const float* Bt = l.lora_bt + a * R * N;
      for (int64_t r = 0; r < R; ++r) u[r] = dot(A + r * K, x + m * K, K);
      for (int64_t o = o0; o < o1; o += 16) {
        v16 acc = (v16){};
        for (int64_t r = 0; r < R; ++r) acc += u[r] * load(Bt + r * N + o);
        store(y + m * N + o, load(y + m * N + o) + acc);
      }
    }
  }
};

template <typename T>
void decode_step(const StepModel* m, int64_t B, const int32_t* ids, const float* cos, const float* sin,
                 const int32_t* write, const int32_t* first, const int32_t* pos, const int32_t* adapters,
                 float* logits, int64_t F, int64_t widest) {
  const int64_t C = m->hidden, H = m->heads, Hkv = m->kv_heads, D = m->head_dim, H3 = H + 2 * Hkv;
  std::vector<float> x(B * C), h(B * C), y(B * std::max(H3 * D, 2 * F)), qkv(B * H3 * D), att(B * H * D), a(B * F),
      qx(B * widest);
  auto attention = [&](const StepLayer& l) {
    return Attention<T>{qkv.data(), static_cast<T*>(l.k_cache), static_cast<T*>(l.v_cache), write, first, pos,
                        att.data(), B, 1, D, m->cache_rows, H, Hkv};
  };
  const int64_t longest = attention(m->layer[0]).longest();  // the same for every layer
  SpinBarrier bar;
  // One parallel region for the whole step: the same kernels as the step graph's, each thread its
  // share, meeting between them (a share's result does not depend on how the work is split, so the
  // logits are the graph's to the bit).
#pragma omp parallel num_threads(m->threads)
  {
    const StepThread me{omp_get_thread_num(), omp_get_num_threads(), &bar, qx.data()};
    const int64_t r0 = me.first(B), r1 = me.last(B);  // this thread's rows, for the row-wise kernels
    std::vector<float> work(attention(m->layer[0]).work_floats(longest));
    for (int64_t r = r0; r < r1; ++r)  // a row at a time: under the size at which embed opens a region of its own
      embed_of(m->table_kind, ids + r, m->table, 1, m->vocab, C, x.data() + r * C);
    for (int64_t i = 0; i < m->layers; ++i) {
      const StepLayer& l = m->layer[i];
      for (int64_t r = r0; r < r1; ++r) rms_norm_row(x.data() + r * C, l.attention_norm, m->eps, h.data() + r * C, C);
      me.meet();
      me.linear(l.wqkv, h.data(), y.data(), B, adapters);
      me.meet();
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < H3; ++k) rope_head(y.data(), cos, sin, m->q_scale, H, Hkv, r, k, 1, D, qkv.data());
      me.meet();
      const Attention<T> at = attention(l);
      if (me.t == 0) at.write_rows();
      me.meet();
      for (int64_t it = me.t; it < at.items(); it += me.nt) at.item(it, work.data());
      me.meet();
      me.linear(l.wo, att.data(), h.data(), B, adapters);
      me.meet();
      const int64_t f = l.w2.K;
      for (int64_t r = r0; r < r1; ++r) {  // the residual, then the FFN's norm, row by row
        for (int64_t c = 0; c < C; ++c) x[r * C + c] += h[r * C + c];
        rms_norm_row(x.data() + r * C, l.ffn_norm, m->eps, h.data() + r * C, C);
      }
      me.meet();
      me.linear(l.w13, h.data(), y.data(), B, adapters);
      me.meet();
      for (int64_t r = r0; r < r1; ++r) silu_mul_row(y.data() + r * 2 * f, y.data() + r * 2 * f + f, f, a.data() + r * f);
      me.meet();
      me.linear(l.w2, a.data(), h.data(), B, adapters);
      me.meet();
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < C; ++c) x[r * C + c] += h[r * C + c];
    }
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(x.data() + r * C, m->norm_out, m->eps, h.data() + r * C, C);
    me.meet();
    me.linear(m->head, h.data(), logits, B, nullptr);
  }
}

extern "C" {

// B rows, one new token each: ids (B,), cos/sin (B, D), write (B * Hkv,) the cache row of each new
// k/v row in (row, head) order, first (B * Hkv,) each (row, head)'s first cache row, pos (B,) each
// query's position (as CachedAttention takes them); adapters (B,) each row's LoRA adapter (0: none), or
// null; logits (B, vocab). Returns 0, or 1 for a model description it cannot run (nothing computed or
// written then).
int DecodeStep(const StepModel* m, int64_t B, const int32_t* ids, const float* cos, const float* sin,
               const int32_t* write, const int32_t* first, const int32_t* pos, const int32_t* adapters,
               float* logits) {
  const int64_t C = m->hidden, H = m->heads, Hkv = m->kv_heads, D = m->head_dim, H3 = H + 2 * Hkv;
  if (B < 1 || m->layers < 1 || m->threads < 1 || Hkv < 1 || H % Hkv || D % 16 || !readable(m->head) || m->head.K != C ||
      m->head.N != m->vocab || m->table_kind < KIND_F32 || m->table_kind > KIND_F16)
    return 1;
  int64_t F = 0, widest = C;
  for (int64_t i = 0; i < m->layers; ++i) {
    const StepLayer& l = m->layer[i];
    if (!readable(l.wqkv) || !readable(l.wo) || !readable(l.w13) || !readable(l.w2) || l.wqkv.K != C ||
        l.wqkv.N != H3 * D || l.wo.K != H * D || l.wo.N != C || l.w13.K != C || l.w2.N != C || l.w13.N != 2 * l.w2.K)
      return 1;
    F = std::max(F, l.w2.K);
    widest = std::max({widest, l.wo.K, l.w2.K});
  }
  if (m->cache_f16)
    decode_step<f16_t>(m, B, ids, cos, sin, write, first, pos, adapters, logits, F, widest);
  else
    decode_step<float>(m, B, ids, cos, sin, write, first, pos, adapters, logits, F, widest);
  return 0;
}
}  // extern "C"
