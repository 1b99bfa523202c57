// What one kernel call needs, as plain pointers into validated, packed weights.
#pragma once

#include <cstdint>

namespace lpvit {

constexpr int64_t kWidePanel = 32;  // AVX-512 panel where bh_padded is a multiple of it
constexpr int64_t kPanel = 16;  // outputs per micro-kernel panel; packed block rows are padded to a multiple

// Applied to every output in the write-back: y = activation(x W^T + bias) + residual.
enum class Activation : int { kNone = 0, kRelu = 1, kGeluErf = 2, kGeluTanh = 3 };

struct TileJob {
  const float* x;         // [m, k]
  float* y;               // [m, n]
  int64_t m, n, k, bh, bw;
  int64_t bh_padded;      // bh rounded up to kPanel
  int64_t panel;          // outputs per task: kPanel, or kWidePanel (AVX-512, bh_padded a multiple of it)
  int64_t block_stride;   // floats per packed block: bw * bh_padded
  const int64_t* row_ptr;
  const int64_t* col_idx;
  const float* packed;    // per block [bw][bh_padded]
  const float* bias;      // [n]
  const float* residual;  // [m, n] added after the activation, or nullptr
  Activation activation;
};

// One entry per ISA translation unit: rows [m0, m1) against one panel of one block row.
void run_task_scalar(const TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel);
void run_task_avx2(const TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel);
void run_task_avx512(const TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel);

}  // namespace lpvit
