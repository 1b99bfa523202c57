// The int8 block-sparse micro-kernel, written once over an integer vector type and compiled once per ISA
// (like microkernel.h, and with internal linkage for the same reason). The write-back dequantises and applies
// the epilogue: y = activation(float(acc - correction[n]) * x_scale[m] * w_scale[n] + bias) + residual.
//
// A tile is ROWS rows of quantized X times one PANEL-output panel of a block row. For every kept block and every
// group of V::kDepth columns inside it, the panel's packed weights (PANEL outputs x kDepth) are loaded once and
// multiplied by the kDepth quantized values of each row, broadcast: one vpdpbusd (4 u8 x s8 products per int32
// lane) or vpmaddwd (2 s16 x s16 products per lane) per accumulator.
// Products are summed in int32, exactly.
#pragma once

#include <cstdint>

#include "epilogue.h"
#include "tile_job.h"

namespace lpvit {
namespace {

constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Quantizes each of `rows` rows of x [rows, k] to q (rows `q_stride` apart) and its scale (BsrInt8Weights
// states the rule). Written to vectorise without fast-math: max |x| as an integer max over the float bits (for
// finite non-negative floats integer order is float order; NaN and inf have the largest bits).
template <typename Q, int OFFSET = 0>
inline void quantize_rows(const float* x, int64_t rows, int64_t k, Q* q, int64_t q_stride, float* scales) {
  constexpr int32_t kInfBits = 0x7f800000;
  for (int64_t r = 0; r < rows; ++r, x += k, q += q_stride) {
    int32_t amax_bits = 0;
    for (int64_t i = 0; i < k; ++i) {
      int32_t bits;
      __builtin_memcpy(&bits, x + i, sizeof bits);
      bits &= 0x7fffffff;
      amax_bits = bits > amax_bits ? bits : amax_bits;
    }
    float amax;
    __builtin_memcpy(&amax, &amax_bits, sizeof amax);
    if (amax_bits >= kInfBits || !(amax >= 1e-30f)) {
      for (int64_t i = 0; i < k; ++i) q[i] = static_cast<Q>(OFFSET);
      scales[r] = amax_bits >= kInfBits ? __builtin_nanf("") : 0.0f;
      continue;
    }
    const float inv = 127.0f / amax;
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest even
    for (int64_t i = 0; i < k; ++i) {
      float v = x[i] * inv;
      v = v < 127.0f ? v : 127.0f;
      v = v > -127.0f ? v : -127.0f;
      q[i] = static_cast<Q>(static_cast<int32_t>((v + kRound) - kRound) + OFFSET);
    }
    scales[r] = amax / 127.0f;
  }
}

// Quantizes rows [m0, m1) of x [m, k] (the layout's tile rows a divisor of m0) into `packed` (tile_job.h's
// layout, values + OFFSET) and their scales; `row` is scratch for K values, `gathered` for K floats: a row of
// head-major X (layout.x_heads > 0) is gathered there from its heads first.
template <typename Q, int ROWS, int DEPTH, int OFFSET>
inline void quantize_tiles(const float* x, int64_t m0, int64_t m1, int64_t k, int64_t bw, Q* packed,
                           float* scales, Q* row, const HeadLayout& layout, float* gathered) {
  const int64_t heads = layout.x_heads, depth = heads > 0 ? k / heads : 0;
  const int64_t groups = (bw + DEPTH - 1) / DEPTH;
  const int64_t block_cols = (k + bw - 1) / bw;
  const int64_t block_col_stride = groups * ROWS * DEPTH;
  for (int64_t m = m0; m < m1; ++m) {
    const float* values = x + m * k;
    if (heads > 0) {
      for (int64_t h = 0; h < heads; ++h)
        __builtin_memcpy(gathered + h * depth, x + element_offset(heads, layout.tokens, k, m, h * depth),
                         depth * sizeof(float));
      values = gathered;
    }
    quantize_rows<Q, OFFSET>(values, 1, k, row, k, scales + m);
    Q* tile = packed + (m / ROWS) * block_cols * block_col_stride + (m % ROWS) * DEPTH;
    for (int64_t c = 0; c < block_cols; ++c) {
      const int64_t width = imin(bw, k - c * bw);
      const Q* src = row + c * bw;
      Q* dst = tile + c * block_col_stride;
      int64_t j = 0;
      for (; j + DEPTH <= width; j += DEPTH, dst += ROWS * DEPTH)  // whole groups: one DEPTH-value copy each
        __builtin_memcpy(dst, src + j, DEPTH * sizeof(Q));
      for (int64_t d = 0; j + d < width; ++d) dst[d] = src[j + d];
    }
  }
}

// ROWS rows of packed X (one tile) times one PANEL-output panel of a block row, into out (int32).
template <class V, int ROWS, int PANEL>
inline void int8_panel_tile(const Int8TileJob& job, const typename V::X* x, const int64_t* cols, int64_t blocks,
                            const typename V::W* packed, int32_t out[][PANEL]) {
  constexpr int kVecs = PANEL / V::kLanes;
  typename V::Acc acc[ROWS][kVecs];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = V::zero();
  const int64_t groups = (job.bw + V::kDepth - 1) / V::kDepth;
  const int64_t group_stride = job.bh_padded * V::kDepth;
  const int64_t block_col_stride = groups * ROWS * V::kDepth;
  for (int64_t b = 0; b < blocks; ++b) {
    const typename V::W* w = packed + b * job.block_stride;
    const typename V::X* xb = x + cols[b] * block_col_stride;
    for (int64_t g = 0; g < groups; ++g, xb += ROWS * V::kDepth) {
      typename V::WReg wv[kVecs];
      for (int v = 0; v < kVecs; ++v) wv[v] = V::load_w(w + g * group_stride + v * V::kLanes * V::kDepth);
      for (int r = 0; r < ROWS; ++r) {
        const typename V::XReg xv = V::broadcast_x(xb + r * V::kDepth);  // one pointer, constant offsets
        for (int v = 0; v < kVecs; ++v) acc[r][v] = V::dot(acc[r][v], xv, wv[v]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVecs; ++v) V::store(&out[r][v * V::kLanes], acc[r][v]);
}

// One task: rows [m0, m1) of X (m0 a multiple of ROWS) against panel `panel` (PANEL outputs wide) of block row
// `block_row`. A last tile with fewer rows is computed whole (its padding rows are 0) and written back in part.
template <class V, int ROWS, int PANEL = kPanel>
inline void run_int8_task(const Int8TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel) {
  const int64_t first = job.row_ptr[block_row];
  const int64_t blocks = job.row_ptr[block_row + 1] - first;
  const int64_t* cols = job.col_idx + first;
  const typename V::W* packed = V::packed(job) + first * job.block_stride + panel * PANEL * V::kDepth;
  const int64_t out0 = block_row * job.bh + panel * PANEL;
  const int64_t width = imin(imin(PANEL, job.bh - panel * PANEL), job.n - out0);
  if (width <= 0) return;  // a panel of the last block row wholly past N (found by AddressSanitizer)
  alignas(64) int32_t acc[ROWS][PANEL];
  alignas(64) float out[ROWS][PANEL];
  for (int64_t m = m0; m < m1; m += ROWS) {
    const int rows = static_cast<int>(imin(ROWS, m1 - m));
    int8_panel_tile<V, ROWS, PANEL>(job, V::xq(job) + (m / ROWS) * job.tile_stride, cols, blocks, packed, acc);
    const int32_t* correction = job.correction + out0;
    const float* w_scale = job.w_scale + out0;
    for (int r = 0; r < rows; ++r) {  // dequantise; columns past `width` are never stored
      const float sx = job.x_scale[m + r];
      for (int64_t i = 0; i < width; ++i)
        out[r][i] = static_cast<float>(acc[r][i] - correction[i]) * (sx * w_scale[i]);
      for (int64_t i = width; i < PANEL; ++i) out[r][i] = 0.0f;
    }
    write_back_rows<PANEL>(job.layout, job.activation, &out[0][0], rows, width, job.bias + out0, job.residual, job.y,
                           m, out0, job.n);
  }
}

}  // namespace
}  // namespace lpvit
