// What one kernel call needs, as plain pointers into validated, packed weights.
#pragma once

#include <cstdint>

namespace lpvit {

constexpr int64_t kWidePanel = 32;  // AVX-512 panel where bh_padded is a multiple of it
constexpr int64_t kPanel = 16;  // outputs per micro-kernel panel; packed block rows are padded to a multiple

// Applied to every output in the write-back: y = activation(x W^T + bias) + residual.
enum class Activation : int { kNone = 0, kRelu = 1, kGeluErf = 2, kGeluTanh = 3 };

// Where X and Y live. heads = 0: row-major [m, width]. heads = h > 0: head-major [B, h, tokens, width / h], and
// row m = b * tokens + t, column j = i * (width / h) + d is element [b][i][t][d]. An attention's layers read
// and write it so: q, k and v come out as its matmuls take them, and proj reads their output, with no
// Transpose or Split between them.
struct HeadLayout {
  int64_t tokens = 0;   // rows per image (B = m / tokens) where a layout is head-major
  int64_t x_heads = 0;  // X's heads
  int64_t y_heads = 0;  // Y's heads
};

struct TileJob {
  const float* x;         // [m, k]
  float* y;               // [m, n]
  int64_t m, n, k, bh, bw;
  int64_t bh_padded;      // bh rounded up to kPanel
  int64_t panel;          // outputs per micro-kernel panel: kPanel, or kWidePanel (AVX-512, bh_padded a multiple)
  int64_t block_stride;   // floats per packed block: bw * bh_padded
  const int64_t* row_ptr;
  const int64_t* col_idx;
  const float* packed;    // per block [bw][bh_padded]
  const float* bias;      // [n]
  const float* residual;  // [m, n] added after the activation, or nullptr
  Activation activation;
  HeadLayout layout;      // standard unless set (then no activation and no residual with y_heads)
};

// The int8 kernel (int8_microkernel.h): Y = activation(sx[m] * sw[n] * (sum_k xq[m][k] * wq[n][k]) + bias) +
// residual, xq the per-row quantized X, wq the int8 weights; int32 accumulation is exact (K <= kMaxInt8K).
// Two packings, chosen by ISA when the weights are created:
//   kQuads (AVX-512 VNNI, vpdpbusd):   per block [ceil(bw/4)][bh_padded][4] int8 wq (0 in the padding); X as
//                                      uint8 xq + 128 (vpdpbusd multiplies unsigned by signed bytes), so each
//                                      output subtracts correction[n] = 128 * sum_k wq[n][k], known at packing
//   kPairs (AVX2 vpmaddwd, and scalar): per block [ceil(bw/2)][bh_padded][2] int16; X as int16 xq
// Quantized X is packed per call in tiles of the micro-kernel's rows, so that one pointer reaches every row:
//   [m / rows][block column][group of depth columns within the block][row within the tile][depth]
// (columns past the block's width or past K, and rows past M, are 0).
constexpr int64_t kMaxInt8K = 65536;  // 255 * 127 * K stays below 2^31 in the u8 x s8 accumulation
enum class Int8Packing { kQuads, kPairs };
constexpr int kInt8RowsScalar = 4, kInt8RowsAvx2 = 6, kInt8RowsAvx512 = 12;  // rows of a micro-kernel tile

struct Int8TileJob {
  const uint8_t* xq_u8;    // kQuads: packed quantized X + 128
  const int16_t* xq_s16;   // kPairs: packed quantized X
  const float* x_scale;    // [m]: X row m = x_scale[m] * xq[m] (NaN for a row with a NaN or inf)
  float* y;                // [m, n]
  int64_t m, n, k, bh, bw, bh_padded, panel, block_cols;
  int64_t tile_stride;     // elements of packed X per tile: block_cols * ceil(bw / depth) * rows * depth
  int64_t block_stride;    // int8 (kQuads) or int16 (kPairs) elements per packed block
  const int64_t* row_ptr;
  const int64_t* col_idx;
  const int8_t* packed_quads;
  const int16_t* packed_pairs;
  const float* w_scale;     // [n]
  const int32_t* correction;  // [n]: 128 * sum_k wq[n][k] (kQuads), 0 (kPairs)
  const float* bias;        // [n]
  const float* residual;    // [m, n] or nullptr
  Activation activation;
  HeadLayout layout;        // as TileJob's
};

// One entry per ISA translation unit: packs rows [m0, m1) of X into xp (microkernel.h's layout, rows padded to
// a multiple of the tile's) and computes them against every panel of block rows [row0, row1).
constexpr int kRowsScalar = 4, kRowsAvx2 = 6, kRowsAvx512 = 12;  // rows of a float32 micro-kernel tile
void run_task_scalar(const TileJob& job, float* xp, int64_t m0, int64_t m1, int64_t row0, int64_t row1);
void run_task_avx2(const TileJob& job, float* xp, int64_t m0, int64_t m1, int64_t row0, int64_t row1);
void run_task_avx512(const TileJob& job, float* xp, int64_t m0, int64_t m1, int64_t row0, int64_t row1);
// Rows [m0, m1) of X quantized for the int8 kernel (BsrInt8Weights states the rule) by each ISA's code, into the
// packed tiles (m0 a multiple of the tile rows; kQuads: + 128) and scales [m]; `row` is scratch for K values,
// `gathered` for K floats (used where X is head-major).
void quantize_rows_scalar(const float* x, int64_t m0, int64_t m1, int64_t k, int64_t bw, int16_t* packed,
                          float* scales, int16_t* row, const HeadLayout& layout, float* gathered);
void quantize_rows_avx2(const float* x, int64_t m0, int64_t m1, int64_t k, int64_t bw, int16_t* packed,
                        float* scales, int16_t* row, const HeadLayout& layout, float* gathered);
void quantize_rows_avx512_vnni(const float* x, int64_t m0, int64_t m1, int64_t k, int64_t bw, uint8_t* packed,
                               float* scales, uint8_t* row, const HeadLayout& layout, float* gathered);
void run_int8_task_scalar(const Int8TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel);
void run_int8_task_avx2(const Int8TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel);
void run_int8_task_avx512_vnni(const Int8TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel);

}  // namespace lpvit
