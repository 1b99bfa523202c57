// The write-back epilogue: y = activation(acc + bias) + residual, for one tile of rows x one output panel.
//
// Plain branch-free float code, compiled once per ISA translation unit (like microkernel.h), so the compiler
// vectorises each loop with that unit's instruction set. Internal linkage for the same reason as the
// micro-kernel: nothing compiled with AVX-512 flags may be shared with another ISA's code.
//
//   relu(v)      = max(v, 0)
//   gelu(v)      = v (1 + erf(z)) / 2,  z = v / sqrt(2) clamped to [-3.92, 3.92] (erf is +-1 in float32 there),
//                  erf(z) = z P(x), x = z^2 / 3.92^2 * 2 - 1, P the degree-14 polynomial of a weighted Chebyshev
//                  least-squares fit of erf(z)/z (absolute error of erf < 3e-7 in float32: the accuracy of
//                  onnxruntime's and torch's float GELU, 15 FMAs and no division); exactly 0 left of the clamp
//   gelu_tanh(v) = v / (1 + exp(-2u)),  u = sqrt(2/pi) (v + 0.044715 v^3)   (= v/2 (1 + tanh u))
//   exp(a)       = 2^n * e^r,  n = round(a / ln 2),  r = a - n ln 2 (Cody-Waite split),  e^r by its degree-7
//                  Taylor polynomial (|r| <= ln2/2: truncation < 3e-9); a clamped to [-87, 88] so 2^n is a
//                  normal float
#pragma once

#include <cstdint>
#include <cstring>

#include "tile_job.h"

namespace lpvit {
namespace {

// c[0] + c[1] x + ... + c[N-1] x^(N-1) by Horner's rule (unrolled: N is a constant)
template <int N>
inline float horner(float x, const float (&c)[N]) {
  float p = c[N - 1];
  for (int i = N - 2; i >= 0; --i) p = p * x + c[i];
  return p;
}

inline float exp_approx(float a) {
  a = a > -87.0f ? a : -87.0f;  // (min/max instructions)
  a = a < 88.0f ? a : 88.0f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (a * 1.44269504f + kRound) - kRound;
  const float r = (a - n * 0.693145751953125f) - n * 1.42860677e-6f;
  constexpr float kTaylor[] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};
  const float p = horner(r, kTaylor);
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float gelu_erf(float v) {
  constexpr float kZMax = 3.92f;  // erf(3.92) = 1 - 3e-8: past it erf is 1 in float32
  float z = v * 0.70710678f;
  z = z < kZMax ? z : kZMax;  // (compiles to min/max; a NaN v still gives NaN through the final product)
  z = z > -kZMax ? z : -kZMax;
  const float x = z * z * (2.0f / (kZMax * kZMax)) - 1.0f;  // z^2 mapped to [-1, 1]
  // erf(z) / z in powers of x, constant term first
  constexpr float kErf[] = {0.3607368373f,  -0.1801090208f, 0.1340816265f,  -0.1091625919f, 0.0906499996f,
                            -0.0742210393f, 0.0580405789f,  -0.0423749541f, 0.0308199922f,  -0.0228462374f,
                            0.0124062537f,  -0.0035915326f, 0.0033466473f,  -0.0043327297f, 0.0016582222f};
  const float p = horner(x, kErf);
  const float half = 0.5f * v;
  // v * (1 + erf(z)) / 2 = half + half * erf(z): left of about -3 the two terms cancel to a thousandth of their
  // size, so round once where the ISA has FMA rather than leave it to the compiler's contraction choices
#if defined(__FMA__) || defined(__AVX512F__)
  const float gelu = __builtin_fmaf(half, z * p, half);
#else
  const float gelu = half + half * (z * p);
#endif
  // Past the clamp on the left GELU is below 1e-7 in size: exactly 0 (times v, so -inf gives NaN as in torch),
  // not the rounding error of 1 + erf(z) times a possibly huge v.
  return z > -kZMax ? gelu : v * 0.0f;
}

inline float gelu_tanh(float v) {
  const float u = 0.79788456f * (v + 0.044715f * v * v * v);
  return v / (1.0f + exp_approx(-2.0f * u));
}

inline float relu(float v) { return v < 0.0f ? 0.0f : v; }  // NaN stays NaN, as in torch

template <float (*ACT)(float)>
inline void activate(float* values, int64_t count) {
  for (int64_t i = 0; i < count; ++i) values[i] = ACT(values[i]);
}

// tile: `rows` x PANEL accumulators (row-major), of which the first `width` columns are outputs. Writes
// y[r][0:width] = activation(tile[r] + bias) + residual[r] for rows r that are `row_stride` floats apart in y
// and residual (which may be nullptr). The activation runs over the whole tile in one loop, not row by row:
// its iterations are independent, so the long dependency chain of one GELU overlaps with the next ones.
// W: the width as a constant (a whole panel), or 0 for `width`.
template <int64_t PANEL, int64_t W>
inline void write_back_width(Activation activation, float* tile, int rows, int64_t width, const float* bias,
                             const float* residual, float* y, int64_t row_stride) {
  if constexpr (W > 0) width = W;
  for (int r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i) tile[r * PANEL + i] += bias[i];
  const int64_t count = rows * PANEL;  // columns past `width` hold zeros from the padded weights: harmless
  switch (activation) {
    case Activation::kRelu: activate<relu>(tile, count); break;
    case Activation::kGeluErf: activate<gelu_erf>(tile, count); break;
    case Activation::kGeluTanh: activate<gelu_tanh>(tile, count); break;
    default: break;
  }
  for (int r = 0; r < rows; ++r) {
    const float* t = tile + r * PANEL;
    float* out = y + r * row_stride;
    if (residual != nullptr) {
      const float* add = residual + r * row_stride;
      for (int64_t i = 0; i < width; ++i) out[i] = t[i] + add[i];
    } else {
      for (int64_t i = 0; i < width; ++i) out[i] = t[i];
    }
  }
}

// A whole panel's loops get constant bounds: with a run-time width GCC made the row copy a `rep movsq`, whose
// start-up cost was a sixth of the kernel's time at 25% density (perf annotate, DeiT-S fc1 shape).
template <int64_t PANEL>
inline void write_back(Activation activation, float* tile, int rows, int64_t width, const float* bias,
                       const float* residual, float* y, int64_t row_stride) {
  if (width == PANEL)
    write_back_width<PANEL, PANEL>(activation, tile, rows, width, bias, residual, y, row_stride);
  else
    write_back_width<PANEL, 0>(activation, tile, rows, width, bias, residual, y, row_stride);
}

// Offset of row m, column j in a [m, width] tensor of `heads` heads (tile_job.h's HeadLayout; 0: row-major).
inline int64_t element_offset(int64_t heads, int64_t tokens, int64_t width, int64_t m, int64_t j) {
  if (heads == 0) return m * width + j;
  const int64_t depth = width / heads;
  return ((m / tokens * heads + j / depth) * tokens + m % tokens) * depth + j % depth;
}

// Rows [m, m + rows) of one output panel (columns out0 .. out0 + width) into Y in `layout`: one write_back of
// the tile (rows `n` apart) when Y is row-major, else row by row into the heads (a block row lies within one
// head: its height divides the head's width). Y head-major has no residual (check_heads).
template <int64_t PANEL>
inline void write_back_rows(const HeadLayout& layout, Activation activation, float* tile, int rows, int64_t width,
                            const float* bias, const float* residual, float* y, int64_t m, int64_t out0,
                            int64_t n) {
  if (layout.y_heads == 0) {
    const int64_t offset = m * n + out0;
    write_back<PANEL>(activation, tile, rows, width, bias, residual ? residual + offset : nullptr, y + offset, n);
    return;
  }
  for (int r = 0; r < rows; ++r)
    write_back<PANEL>(activation, tile + r * PANEL, 1, width, bias, nullptr,
                      y + element_offset(layout.y_heads, layout.tokens, n, m + r, out0), 0);
}

}  // namespace
}  // namespace lpvit
