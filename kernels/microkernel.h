// The block-sparse micro-kernel, written once over a vector type and compiled once per ISA
// (kernel_scalar.cc, kernel_avx2.cc, kernel_avx512.cc, each with its own compiler flags). The write-back applies
// the epilogue (epilogue.h): bias, activation, residual.
//
// X is packed per task (pack_rows): tile t of ROWS rows, block column c, row r, column j at
//   xp[((t * block_cols + c) * ROWS + r) * bw + j]   (zeros past K and past the task's last row),
// so one walking pointer reaches every row at a constant offset. Read from X in place, the ROWS row pointers
// (stride K, known only at run time) did not fit the general registers: the spilled ones were reloaded for
// every column, more loads than FMAs.
//
// A tile is ROWS rows of packed X times one PANEL-output panel of a block row. For every kept block of the row
// and every column j inside it, the panel's weights W^T[j][0:PANEL] are loaded once and multiplied by the
// broadcast X[m][j] of each row: ROWS x PANEL accumulators stay in registers for the whole block row.
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

// Rows [m0, m1) of X [m, k] into xp in the layout above (ROWS rows per tile). BW: the block width as a constant
// (each block's row is then one fixed-size copy: with a run-time size the compiler emitted `rep movsq`, whose
// start-up cost was a sixth of the kernel's time at 25% density), or 0 for the run-time width bw. Head-major X
// (x_heads > 0; its head width a multiple of bw, so K is too) is read block by block from its heads.
template <int ROWS, int BW>
inline void pack_rows(const TileJob& job, int64_t m0, int64_t m1, float* xp) {
  const int64_t k = job.k, bw = BW > 0 ? BW : job.bw, heads = job.layout.x_heads;
  const int64_t block_cols = (k + bw - 1) / bw, full_cols = k / bw;
  const int64_t tiles = (m1 - m0 + ROWS - 1) / ROWS;
  for (int64_t t = 0; t < tiles; ++t) {
    for (int r = 0; r < ROWS; ++r) {
      const int64_t m = m0 + t * ROWS + r;
      float* dst = xp + t * block_cols * ROWS * bw + r * bw;
      const float* src = job.x + m * k;
      int64_t c = 0;
      if (m < m1) {
        for (; c < full_cols; ++c, dst += ROWS * bw, src += bw) {
          const float* from = heads == 0 ? src : job.x + element_offset(heads, job.layout.tokens, k, m, c * bw);
          if constexpr (BW > 0)
            __builtin_memcpy(dst, from, BW * sizeof(float));
          else
            for (int64_t j = 0; j < bw; ++j) dst[j] = from[j];
        }
      }
      for (; c < block_cols; ++c, dst += ROWS * bw, src += bw) {  // the edge block column, or a padding row
        const int64_t width = m < m1 ? k - c * bw : 0;
        for (int64_t j = 0; j < bw; ++j) dst[j] = j < width ? src[j] : 0.0f;
      }
    }
  }
}

// R rows (R <= ROWS) of one packed tile times one panel. BW: the block width as a constant (16 or 32, the
// widths worth unrolling), or 0 to read it from the job.
template <class V, int ROWS, int R, int PANEL, int BW>
inline void panel_tile(const TileJob& job, const float* xt, const int64_t* cols, int64_t blocks, const float* packed,
                       float out[][PANEL]) {
  constexpr int kVecs = PANEL / V::kWidth;
  const int64_t bw = BW > 0 ? BW : job.bw, ldw = job.bh_padded, stride = job.block_stride;
  typename V::Reg acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = V::zero();
  for (int64_t b = 0; b < blocks; ++b) {
    const float* w = packed + b * stride;
    const float* xj = xt + cols[b] * ROWS * bw;
    for (int64_t j = 0; j < bw; ++j, w += ldw, ++xj) {  // past K both X and the packed weights are 0
      typename V::Reg wv[kVecs];
      for (int v = 0; v < kVecs; ++v) wv[v] = V::load(w + v * V::kWidth);
      for (int r = 0; r < R; ++r) {
        const typename V::Reg xv = V::broadcast(xj + r * bw);
        for (int v = 0; v < kVecs; ++v) acc[r][v] = V::fma(xv, wv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) V::store(&out[r][v * V::kWidth], acc[r][v]);
}

// A last tile of `rows` < ROWS rows: pick the instantiation that fits (block width from the job).
template <class V, int ROWS, int R, int PANEL>
inline void panel_tail(const TileJob& job, int rows, const float* xt, const int64_t* cols, int64_t blocks,
                       const float* packed, float out[][PANEL]) {
  if constexpr (R > 0) {
    if (rows == R) return panel_tile<V, ROWS, R, PANEL, 0>(job, xt, cols, blocks, packed, out);
    panel_tail<V, ROWS, R - 1, PANEL>(job, rows, xt, cols, blocks, packed, out);
  }
}

// Packs rows [m0, m1) of X into xp, then computes them against every panel of block rows [row0, row1): each
// block row's weights stay in cache while the task's tiles pass over them. BW as in pack_rows.
template <class V, int ROWS, int PANEL, int BW>
inline void run_rows(const TileJob& job, float* xp, int64_t m0, int64_t m1, int64_t row0, int64_t row1) {
  pack_rows<ROWS, BW>(job, m0, m1, xp);
  const int64_t tile_stride = (job.k + job.bw - 1) / job.bw * ROWS * job.bw;
  alignas(64) float out[ROWS][PANEL];
  for (int64_t block_row = row0; block_row < row1; ++block_row) {
    const int64_t first = job.row_ptr[block_row];
    const int64_t blocks = job.row_ptr[block_row + 1] - first;
    const int64_t* cols = job.col_idx + first;
    for (int64_t panel = 0; panel * PANEL < job.bh_padded; ++panel) {
      const float* packed = job.packed + first * job.block_stride + panel * PANEL;
      const int64_t out0 = block_row * job.bh + panel * PANEL;
      const int64_t width = min2(min2(PANEL, job.bh - panel * PANEL), job.n - out0);
      if (width <= 0) continue;  // a panel of the last block row wholly past N: nothing to compute
      for (int64_t m = m0; m < m1; m += ROWS) {
        const int rows = static_cast<int>(min2(ROWS, m1 - m));
        const float* xt = xp + (m - m0) / ROWS * tile_stride;
        if (rows == ROWS)
          panel_tile<V, ROWS, ROWS, PANEL, BW>(job, xt, cols, blocks, packed, out);
        else
          panel_tail<V, ROWS, ROWS - 1, PANEL>(job, rows, xt, cols, blocks, packed, out);
        write_back_rows<PANEL>(job.layout, job.activation, &out[0][0], rows, width, job.bias + out0, job.residual,
                               job.y, m, out0, job.n);
      }
    }
  }
}

// One task (tile_job.h): rows [m0, m1) of X (m0 a multiple of ROWS; xp holds room for them) against block rows
// [row0, row1).
template <class V, int ROWS, int PANEL = kPanel>
inline void run_task(const TileJob& job, float* xp, int64_t m0, int64_t m1, int64_t row0, int64_t row1) {
  if (job.bw == 16) return run_rows<V, ROWS, PANEL, 16>(job, xp, m0, m1, row0, row1);
  if (job.bw == 32) return run_rows<V, ROWS, PANEL, 32>(job, xp, m0, m1, row0, row1);
  run_rows<V, ROWS, PANEL, 0>(job, xp, m0, m1, row0, row1);
}

}  // namespace
}  // namespace lpvit
