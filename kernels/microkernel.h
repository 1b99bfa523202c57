// The block-sparse micro-kernel, written once over a vector type and compiled once per ISA
// (kernel_scalar.cc, kernel_avx2.cc, kernel_avx512.cc, each with its own compiler flags). The write-back applies
// the epilogue (epilogue.h): bias, activation, residual.
//
// A tile is ROWS rows of X times one 16-output panel of a block row. For every kept block of the row and every
// column j inside it, the panel's 16 weights W^T[j][0:16] are loaded once and multiplied by the broadcast
// X[m][j] of each of the ROWS rows: ROWS x 16 accumulators stay in registers for the whole block row.
//
// Everything here has internal linkage (an unnamed namespace) and calls no library template: an inline
// function compiled with -mavx512f must never be shared with, and picked by the linker for, another ISA's
// translation unit. The build checks the ISA objects define no weak symbols (CMakeLists.txt).
#pragma once

#include <cstdint>

#include "epilogue.h"
#include "tile_job.h"

namespace lpvit {
namespace {

constexpr int64_t min2(int64_t a, int64_t b) { return a < b ? a : b; }

template <class V, int ROWS, int PANEL>
inline void panel_tile(const TileJob& job, const float* x, const int64_t* cols, int64_t blocks,
                       const float* packed, float out[][PANEL]) {
  constexpr int kVecs = PANEL / V::kWidth;
  // Sizes as locals and the X rows as row offsets from one walking pointer: read through `job` inside the loop,
  // the compiler reloaded job's fields and kept a pointer per row, more scalar work than FMAs per column.
  const int64_t k = job.k, bw = job.bw, ldw = job.bh_padded, stride = job.block_stride;
  int64_t row_offset[ROWS];
  for (int r = 0; r < ROWS; ++r) row_offset[r] = r * k;
  typename V::Reg acc[ROWS][kVecs];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = V::zero();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t col0 = cols[b] * bw;
    const int64_t width = min2(bw, k - col0);  // edge block: never read X past column k
    const float* w = packed + b * stride;
    const float* xj = x + col0;
    for (int64_t j = 0; j < width; ++j, w += ldw, ++xj) {
      typename V::Reg wv[kVecs];
      for (int v = 0; v < kVecs; ++v) wv[v] = V::load(w + v * V::kWidth);
      for (int r = 0; r < ROWS; ++r) {
        const typename V::Reg xv = V::broadcast(xj + row_offset[r]);
        for (int v = 0; v < kVecs; ++v) acc[r][v] = V::fma(xv, wv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVecs; ++v) V::store(&out[r][v * V::kWidth], acc[r][v]);
}

// Rows [m, m + rows) with rows < ROWS: pick the instantiation that fits.
template <class V, int ROWS, int PANEL>
inline void panel_tail(const TileJob& job, int rows, const float* x, const int64_t* cols, int64_t blocks,
                       const float* packed, float out[][PANEL]) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) return panel_tile<V, ROWS, PANEL>(job, x, cols, blocks, packed, out);
    panel_tail<V, ROWS - 1, PANEL>(job, rows, x, cols, blocks, packed, out);
  }
}

// One task: rows [m0, m1) of X against panel `panel` (PANEL outputs wide) of block row `block_row`.
template <class V, int ROWS, int PANEL = kPanel>
inline void run_task(const TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel) {
  const int64_t first = job.row_ptr[block_row];
  const int64_t blocks = job.row_ptr[block_row + 1] - first;
  const int64_t* cols = job.col_idx + first;
  const float* packed = job.packed + first * job.block_stride + panel * PANEL;
  const int64_t out0 = block_row * job.bh + panel * PANEL;
  const int64_t width = min2(min2(PANEL, job.bh - panel * PANEL), job.n - out0);
  if (width <= 0) return;  // a panel of the last block row wholly past N: nothing to compute
  alignas(64) float out[ROWS][PANEL];
  for (int64_t m = m0; m < m1; m += ROWS) {
    const int rows = static_cast<int>(min2(ROWS, m1 - m));
    const float* x = job.x + m * job.k;
    if (rows == ROWS)
      panel_tile<V, ROWS, PANEL>(job, x, cols, blocks, packed, out);
    else
      panel_tail<V, ROWS - 1, PANEL>(job, rows, x, cols, blocks, packed, out);
    const int64_t offset = m * job.n + out0;
    write_back(job.activation, &out[0][0], rows, PANEL, width, job.bias + out0,
               job.residual ? job.residual + offset : nullptr, job.y + offset, job.n);
  }
}

}  // namespace
}  // namespace lpvit
