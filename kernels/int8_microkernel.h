// The int8 block-sparse micro-kernel, written once over an integer vector type and compiled once per ISA
// (like microkernel.h, and with internal linkage for the same reason). The write-back dequantises and applies
// the epilogue: y = activation(float(acc - shift[m]) * x_scale[m] * w_scale[n] + bias) + residual, shift[m] the
// kQuads packing's 128 * (sum of the row's xq over the block row's kept columns), 0 for kPairs.
//
// A tile is ROWS rows of quantized X times one PANEL-output panel of a block row. For every kept block and every
// group of V::kDepth columns inside it, the panel's packed weights (PANEL outputs x kDepth) are loaded once and
// multiplied by the kDepth quantized values of each row, broadcast: one vpdpbusd (4 u8 x s8 products per int32
// lane, the X quad broadcast straight from memory) or vpmaddwd (2 s16 x s16 products per lane) per accumulator.
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
template <typename Q>
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
      for (int64_t i = 0; i < k; ++i) q[i] = 0;
      scales[r] = amax_bits >= kInfBits ? __builtin_nanf("") : 0.0f;
      continue;
    }
    const float inv = 127.0f / amax;
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest even
    for (int64_t i = 0; i < k; ++i) {
      float v = x[i] * inv;
      v = v < 127.0f ? v : 127.0f;
      v = v > -127.0f ? v : -127.0f;
      q[i] = static_cast<Q>(static_cast<int32_t>((v + kRound) - kRound));
    }
    scales[r] = amax / 127.0f;
  }
}

// Per row, the sums of q over each block column of width bw (the kQuads packing's shift, tile_job.h).
inline void block_column_sums(const int8_t* q, int64_t rows, int64_t k, int64_t q_stride, int64_t bw,
                              int64_t block_cols, int32_t* sums) {
  for (int64_t r = 0; r < rows; ++r, q += q_stride, sums += block_cols) {
    for (int64_t c = 0; c < block_cols; ++c) {
      int32_t sum = 0;
      for (int64_t j = c * bw; j < imin(k, (c + 1) * bw); ++j) sum += q[j];
      sums[c] = sum;
    }
  }
}

template <class V, int ROWS, int PANEL>
inline void int8_panel_tile(const Int8TileJob& job, const typename V::X* x, const int64_t* cols, int64_t blocks,
                            const typename V::W* packed, int32_t out[][PANEL]) {
  constexpr int kVecs = PANEL / V::kLanes;
  typename V::Acc acc[ROWS][kVecs];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = V::zero();
  const int64_t groups = (job.bw + V::kDepth - 1) / V::kDepth;
  const int64_t group_stride = job.bh_padded * V::kDepth;
  for (int64_t b = 0; b < blocks; ++b) {
    const typename V::W* w = packed + b * job.block_stride;
    const typename V::X* xb = x + cols[b] * job.bw;  // a group past column k reads X's padding (weights are 0)
    for (int64_t g = 0; g < groups; ++g) {
      typename V::WReg wv[kVecs];
      for (int v = 0; v < kVecs; ++v) wv[v] = V::load_w(w + g * group_stride + v * V::kLanes * V::kDepth);
      for (int r = 0; r < ROWS; ++r) {
        const typename V::XReg xv = V::broadcast_x(xb + r * job.x_stride + g * V::kDepth);
        for (int v = 0; v < kVecs; ++v) acc[r][v] = V::dot(acc[r][v], xv, wv[v]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVecs; ++v) V::store(&out[r][v * V::kLanes], acc[r][v]);
}

template <class V, int ROWS, int PANEL>
inline void int8_panel_tail(const Int8TileJob& job, int rows, const typename V::X* x, const int64_t* cols,
                            int64_t blocks, const typename V::W* packed, int32_t out[][PANEL]) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) return int8_panel_tile<V, ROWS, PANEL>(job, x, cols, blocks, packed, out);
    int8_panel_tail<V, ROWS - 1, PANEL>(job, rows, x, cols, blocks, packed, out);
  }
}

// One task: rows [m0, m1) of X against panel `panel` (PANEL outputs wide) of block row `block_row`.
template <class V, int ROWS, int PANEL = kPanel>
inline void run_int8_task(const Int8TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel) {
  const int64_t first = job.row_ptr[block_row];
  const int64_t blocks = job.row_ptr[block_row + 1] - first;
  const int64_t* cols = job.col_idx + first;
  const typename V::W* packed = V::packed(job) + first * job.block_stride + panel * PANEL * V::kDepth;
  const int64_t out0 = block_row * job.bh + panel * PANEL;
  const int64_t width = imin(imin(PANEL, job.bh - panel * PANEL), job.n - out0);
  alignas(64) int32_t acc[ROWS][PANEL];
  alignas(64) float out[ROWS][PANEL];
  for (int64_t m = m0; m < m1; m += ROWS) {
    const int rows = static_cast<int>(imin(ROWS, m1 - m));
    const typename V::X* x = V::xq(job) + m * job.x_stride;
    if (rows == ROWS)
      int8_panel_tile<V, ROWS, PANEL>(job, x, cols, blocks, packed, acc);
    else
      int8_panel_tail<V, ROWS - 1, PANEL>(job, rows, x, cols, blocks, packed, acc);
    for (int r = 0; r < rows; ++r) {  // dequantise; columns past `width` are never stored
      const float sx = job.x_scale[m + r];
      int32_t shift = 0;
      if constexpr (V::kShifted) {
        const int32_t* sums = job.x_block_sums + (m + r) * job.block_cols;
        for (int64_t b = 0; b < blocks; ++b) shift += sums[cols[b]];
        shift *= 128;
      }
      for (int64_t i = 0; i < width; ++i)
        out[r][i] = static_cast<float>(acc[r][i] - shift) * (sx * job.w_scale[out0 + i]);
      for (int64_t i = width; i < PANEL; ++i) out[r][i] = 0.0f;
    }
    const int64_t offset = m * job.n + out0;
    write_back(job.activation, &out[0][0], rows, PANEL, width, job.bias + out0,
               job.residual ? job.residual + offset : nullptr, job.y + offset, job.n);
  }
}

}  // namespace
}  // namespace lpvit
