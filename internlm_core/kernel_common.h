// What kernels.cc and train_kernels.cc share: reading an AOT op's arguments, GCC's vector type
// (16 floats, one AVX-512 register, or two AVX2 ones on older CPUs) with its helpers, and the
// rotate-half rotary of one head.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace {

bool is_f32(const char* t) { return strcmp(t, "float32") == 0 || strcmp(t, "float") == 0; }
bool is_i32(const char* t) { return strcmp(t, "int32") == 0 || strcmp(t, "int") == 0; }
bool is_bf16(const char* t) { return strcmp(t, "bfloat16") == 0; }
bool is_f16(const char* t) { return strcmp(t, "float16") == 0 || strcmp(t, "half") == 0; }
bool is_i8(const char* t) { return strcmp(t, "int8") == 0; }
bool is_u8(const char* t) { return strcmp(t, "uint8") == 0; }

int64_t rows_of(int ndim, const int64_t* shape) {  // product of every dimension but the last
  int64_t m = 1;
  for (int i = 0; i < ndim - 1; ++i) m *= shape[i];
  return m;
}

#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

// a where mask, else b, lane by lane (mask from a comparison: -1 or 0)
inline v16 select(i16 mask, v16 a, v16 b) { return mask ? a : b; }
inline i16 to_int(v16 x) { return __builtin_convertvector(x, i16); }  // truncates toward 0
inline v16 to_float(i16 x) { return __builtin_convertvector(x, v16); }
#else
// Without AVX-512 a 64-byte GCC vector has no register to live in: GCC keeps every such value in
// memory and each operation goes through the stack (measured: bench-serve decode 55 tok/s at 4
// rows against 730 on AVX-512). Two 8-float halves, each an AVX2 register, with the operators the
// kernels use, give the same arithmetic lane by lane in registers.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));
struct v16 {
  v8 lo, hi;
  float operator[](int i) const { return i < 8 ? lo[i] : hi[i - 8]; }
};
struct i16 {
  i8v lo, hi;
  int32_t operator[](int i) const { return i < 8 ? lo[i] : hi[i - 8]; }
};
inline v16 operator+(v16 a, v16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline v16 operator-(v16 a, v16 b) { return {a.lo - b.lo, a.hi - b.hi}; }
inline v16 operator*(v16 a, v16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline v16 operator/(v16 a, v16 b) { return {a.lo / b.lo, a.hi / b.hi}; }
inline v16 operator+(v16 a, float b) { return {a.lo + b, a.hi + b}; }
inline v16 operator-(v16 a, float b) { return {a.lo - b, a.hi - b}; }
inline v16 operator*(v16 a, float b) { return {a.lo * b, a.hi * b}; }
inline v16 operator/(v16 a, float b) { return {a.lo / b, a.hi / b}; }
inline v16 operator+(float a, v16 b) { return {a + b.lo, a + b.hi}; }
inline v16 operator-(float a, v16 b) { return {a - b.lo, a - b.hi}; }
inline v16 operator*(float a, v16 b) { return {a * b.lo, a * b.hi}; }
inline v16 operator/(float a, v16 b) { return {a / b.lo, a / b.hi}; }
inline v16 operator-(v16 a) { return {-a.lo, -a.hi}; }
inline v16& operator+=(v16& a, v16 b) { return a = a + b; }
inline v16& operator-=(v16& a, v16 b) { return a = a - b; }
inline v16& operator*=(v16& a, v16 b) { return a = a * b; }
inline v16& operator*=(v16& a, float b) { return a = a * b; }
inline i16 operator<(v16 a, v16 b) { return {a.lo < b.lo, a.hi < b.hi}; }
inline i16 operator>(v16 a, v16 b) { return {a.lo > b.lo, a.hi > b.hi}; }
inline i16 operator<(v16 a, float b) { return {a.lo < b, a.hi < b}; }
inline i16 operator>(v16 a, float b) { return {a.lo > b, a.hi > b}; }
inline i16 operator<(int32_t a, i16 b) { return {a < b.lo, a < b.hi}; }
inline i16 operator+(i16 a, int32_t b) { return {a.lo + b, a.hi + b}; }
inline i16 operator-(i16 a) { return {-a.lo, -a.hi}; }
inline i16 operator<<(i16 a, int b) { return {a.lo << b, a.hi << b}; }
inline v16 select(i16 mask, v16 a, v16 b) { return {mask.lo ? a.lo : b.lo, mask.hi ? a.hi : b.hi}; }
inline i16 to_int(v16 x) { return {__builtin_convertvector(x.lo, i8v), __builtin_convertvector(x.hi, i8v)}; }
inline v16 to_float(i16 x) { return {__builtin_convertvector(x.lo, v8), __builtin_convertvector(x.hi, v8)}; }
#endif

// Half-precision storage: raw 16-bit patterns, widened to floats by the helpers below.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline v16 load(const float* p) { v16 v; memcpy(&v, p, 64); return v; }
inline void store(float* p, v16 v) { memcpy(p, &v, 64); }
inline v16 splat(float f) { return (v16){} + f; }

// 16 bf16 values -> floats: zero-extend to 32 bits and shift left 16 (exact). Written with
// intrinsics because GCC 12 vectorises the generic form as two 8-wide halves joined by shuffles
// (6 instructions a vector instead of 2 on AVX-512).
inline v16 bf16_to_f32(const bf16_t* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i v = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#elif defined(__AVX2__)
  const __m256i v[2] = {
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16),
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + 1)), 16)};
#else
  uint32_t v[16];
  for (int i = 0; i < 16; ++i) v[i] = uint32_t(p[i].bits) << 16;
#endif
  v16 out;
  memcpy(&out, &v, 64);
  return out;
}

// 16 fp16 values -> floats: vcvtph2ps (F16C, in x86-64-v3 and every AVX-512 CPU), exact.
inline v16 f16_to_f32(const f16_t* p) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const __m256 v[2] = {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + 1))};
#else
  float v[16];
  for (int i = 0; i < 16; ++i) v[i] = (float)reinterpret_cast<const _Float16*>(p)[i];
#endif
  v16 out;
  memcpy(&out, &v, 64);
  return out;
}
// 16 floats -> fp16 (round to nearest even, as numpy's and MindSpore's casts): how new k/v rows
// enter an fp16 cache. Values past fp16's range are held at +-65504, not made infinite: one
// overflowing key would otherwise turn that row's every later score into inf - inf = NaN.
inline void f32_to_f16(v16 x, f16_t* p) {
  constexpr float top = 65504.f;
#if defined(__AVX512F__)
  __m512 v;
  memcpy(&v, &x, 64);
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-top)), _mm512_set1_ps(top));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  __m256 v[2];
  memcpy(&v, &x, 64);
  for (int i = 0; i < 2; ++i) {
    v[i] = _mm256_min_ps(_mm256_max_ps(v[i], _mm256_set1_ps(-top)), _mm256_set1_ps(top));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p) + i, _mm256_cvtps_ph(v[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#else
  for (int i = 0; i < 16; ++i)
    reinterpret_cast<_Float16*>(p)[i] = (_Float16)(x[i] < -top ? -top : x[i] > top ? top : x[i]);
#endif
}

// 16 int8 values -> floats: sign-extend to 32 bits (vpmovsxbd) and convert (vcvtdq2ps), exact.
inline v16 i8_to_f32(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m256 v[2] = {
      _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
      _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
#else
  float v[16];
  for (int i = 0; i < 16; ++i) v[i] = (float)p[i];
#endif
  v16 out;
  memcpy(&out, &v, 64);
  return out;
}
// int4 weights (quantize.py's "int4"), two to a byte: the even k's value in the low nibble, the
// odd k's in the high one, each stored as q + 8 (0..15) for q in -8..7. In a packed panel
// (kernels.py's pack_rows) each output's bytes come 4 together (8 k steps): a 64-byte block holds
// k steps 8j .. 8j + 7 of the panel's 16 outputs, output o's pairs in bytes 4o .. 4o + 3, pair i
// (k = 8j + 2i, 8j + 2i + 1) in byte 4o + i. That is the 32-bit lane vpdpbusd multiplies by 4
// activations at once (kernels.cc's W4A8 tile); the W4A16 tiles read the same bytes by shifts.
struct u4_t { uint8_t bits; };

// Pair i (0..3) of a 64-byte block -> the 16 outputs' even-k values and their odd-k values as
// floats (q, exact): shift the pair's byte, then its nibble, to the bottom of each 32-bit lane and
// drop the bits above it; i is a constant once the caller's loop over the 4 pairs is unrolled.
inline void u4_to_f32(const u4_t* block, int i, v16& even, v16& odd) {
#if defined(__AVX512F__)
  // each nibble picks its value from a 16-float table (vpermps, which reads only the index's low
  // 4 bits: the shifted byte is the index as it is): one operation where subtracting 8 and
  // converting took two
  const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i v = _mm512_loadu_si512(block);
  const __m512 lo = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * i), values);
  const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * i + 4), values);
#elif defined(__AVX2__)
  // vpshufb takes byte i of each 32-bit lane into the lane's bottom, zero above (index -1): one
  // operation, as the zero-extending load of the earlier layout was (shifting and masking: two)
  const __m256i pick = _mm256_add_epi32(_mm256_set1_epi32(i | -256), _mm256_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12));
  const __m256i nibble = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  __m256 lo[2], hi[2];
  for (int h = 0; h < 2; ++h) {  // outputs 8h .. 8h + 7: 32 bytes
    const __m256i b = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * h)), pick);
    lo[h] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, nibble), eight));
    hi[h] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight));
  }
#else
  float lo[16], hi[16];
  for (int o = 0; o < 16; ++o) {
    lo[o] = (float)((block[4 * o + i].bits & 15) - 8);
    hi[o] = (float)((block[4 * o + i].bits >> 4) - 8);
  }
#endif
  memcpy(&even, &lo, 64);
  memcpy(&odd, &hi, 64);
}

// A weight's stored values as floats, 16 at a time (``widen``) or one (``widen1``): fp32 as it is, bf16
// by a 16-bit shift, fp16 by vcvtph2ps, int8 sign-extended and converted, all exact.
inline v16 widen(const float* p) { return load(p); }
inline v16 widen(const bf16_t* p) { return bf16_to_f32(p); }
inline v16 widen(const f16_t* p) { return f16_to_f32(p); }
inline v16 widen(const int8_t* p) { return i8_to_f32(p); }
inline float widen1(float v) { return v; }
inline float widen1(bf16_t v) {
  const uint32_t bits = uint32_t(v.bits) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
inline float widen1(int8_t v) { return (float)v; }
inline float widen1(f16_t v) {
  _Float16 h;
  memcpy(&h, &v.bits, 2);
  return (float)h;
}

// C values from ``row``, widened, into out.
template <typename W>
void widen_row(const W* row, int64_t C, float* out) {
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) store(out + c, widen(row + c));
  for (; c < C; ++c) out[c] = widen1(row[c]);
}


inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// e^x for x <= 0 (softmax after subtracting the max): 2^(x log2 e) split into 2^i * 2^f with a
// degree-6 polynomial for 2^f on [-0.5, 0.5] (relative error ~2e-7, the scale of float rounding).
inline v16 exp_neg(v16 x) {
  x = select(x < -87.f, splat(-87.f), x);  // e^-87 ~ 1.6e-38: the smallest normal float's scale
  const v16 t = x * 1.44269504088896341f;
  const i16 i = -to_int(0.5f - t);  // round(t) for t <= 0
  const v16 f = (t - to_float(i)) * 0.6931471805599453f;
  v16 p = splat(1.f / 720) * f + 1.f / 120;
  p = p * f + 1.f / 24;
  p = p * f + 1.f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const i16 bits = (i + 127) << 23;  // 2^i as a float's exponent field
  v16 scale;
  memcpy(&scale, &bits, 64);
  return p * scale;
}

// 1 / (1 + e^-x), from e^-|x| so that the exponent never overflows
inline v16 sigmoid(v16 x) {
  const v16 e = exp_neg(select(x < 0.f, x, -x));
  const v16 r = 1.f / (1.f + e);
  return select(x < 0.f, e * r, r);
}

// x sigmoid(x) * u over n floats (SwiGLU's product)
inline void silu_mul_row(const float* x, const float* u, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 g = load(x + i);
    store(y + i, g * sigmoid(g) * load(u + i));
  }
  for (; i < n; ++i) y[i] = x[i] / (1.f + std::exp(-x[i])) * u[i];
}

// out = x * c + rotate_half(x) * s over one head's D values, times f (out must not alias x)
inline void rope_row(const float* x, const float* c, const float* s, int64_t D, float f, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = (x[d] * c[d] - x[d + half] * s[d]) * f;
  for (int64_t d = half; d < D; ++d) out[d] = (x[d] * c[d] + x[d - half] * s[d]) * f;
}

}  // namespace
