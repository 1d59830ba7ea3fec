// Vector helpers shared by kernels.cc and train_kernels.cc. The vector type is GCC's: 16 floats,
// one AVX-512 register, or two AVX2 ones on older CPUs.
#pragma once

#include <cstdint>
#include <cstring>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

inline v16 load(const float* p) { v16 v; memcpy(&v, p, 64); return v; }
inline void store(float* p, v16 v) { memcpy(p, &v, 64); }
inline v16 splat(float f) { return (v16){} + f; }
inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// e^x for x <= 0 (softmax after subtracting the max): 2^(x log2 e) split into 2^i * 2^f with a
// degree-6 polynomial for 2^f on [-0.5, 0.5] (relative error ~2e-7, the scale of float rounding).
inline v16 exp_neg(v16 x) {
  x = x < -87.f ? splat(-87.f) : x;  // e^-87 ~ 1.6e-38: the smallest normal float's scale
  const v16 t = x * 1.44269504088896341f;
  const i16 i = -__builtin_convertvector(0.5f - t, i16);  // round(t) for t <= 0
  const v16 f = (t - __builtin_convertvector(i, v16)) * 0.6931471805599453f;
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

}  // namespace
