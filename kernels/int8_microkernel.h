// The int8 block-sparse micro-kernel, written once over an integer vector type and compiled once per ISA
// (like microkernel.h, and with internal linkage for the same reason). The write-back dequantises and applies
// the epilogue: y = activation(float(acc - correction[n]) * x_scale[m] * w_scale[n] + bias) + residual.
//
// A tile is ROWS rows of quantized X times one PANEL-output panel of a block row. For every kept block and every
// group of V::kDepth columns inside it, the panel's packed weights (PANEL outputs x kDepth) are loaded once and
// multiplied by the kDepth quantized values of each row, broadcast: one vpdpbusd (4 u8 x s8 products per int32
// lane) or vpmaddwd (2 s16 x s16 products per lane) per accumulator. Products are summed in int32, exactly.
#pragma once

#include <cstdint>

#include "epilogue.h"
#include "tile_job.h"

namespace lpvit {
namespace {

constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

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
      for (int64_t i = 0; i < width; ++i)
        out[r][i] = static_cast<float>(acc[r][i] - job.correction[out0 + i]) * (sx * job.w_scale[out0 + i]);
      for (int64_t i = width; i < PANEL; ++i) out[r][i] = 0.0f;
    }
    const int64_t offset = m * job.n + out0;
    write_back(job.activation, &out[0][0], rows, PANEL, width, job.bias + out0,
               job.residual ? job.residual + offset : nullptr, job.y + offset, job.n);
  }
}

}  // namespace
}  // namespace lpvit
