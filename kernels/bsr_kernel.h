// Block-sparse linear kernel core: Y[M, N] = X[M, K] * W^T + bias, with W [N, K] in BSR, in float32
// (BsrWeights) or int8 (BsrInt8Weights).
//
// Shared by the onnxruntime custom ops (ort_op.cc) and the C entry points torch calls (c_api.cc).
// create() validates every index once and repacks the blocks into the micro-kernel's layout; run() then
// touches only validated, packed data.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tile_job.h"

namespace lpvit {

// Runs body(task) for every task in [0, tasks), possibly in parallel.
using ParallelFor = std::function<void(size_t tasks, const std::function<void(size_t)>& body)>;

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa best_isa();              // what this CPU supports (LPVIT_KERNEL_ISA=scalar|avx2|avx512 lowers it)
const char* isa_name(Isa isa);
// The int8 kernel's path for `isa`: AVX-512 needs VNNI and BW as well, else the AVX2 path runs.
Isa int8_isa(Isa isa);
const char* int8_isa_name(Isa isa);  // "avx512_vnni", "avx2", "scalar"

// "none", "relu", "gelu" (erf form), "gelu_tanh" -> Activation; false for any other name.
bool parse_activation(const std::string& name, Activation* out);
std::string activation_names();  // for error messages: "none, relu, gelu, gelu_tanh"

// The block structure both weight formats share; validate() checks it against the weight's shape.
struct BsrIndex {
  int64_t n = 0, k = 0, bh = 0, bw = 0, block_rows = 0, block_cols = 0, bh_padded = 0;
  std::vector<int64_t> row_ptr, col_idx;
  std::vector<float> bias;  // n entries (zeros when absent)

  // "" when valid, else a message naming the problem (see BsrWeights::create for the rules).
  static std::string validate(int64_t n, int64_t k, int64_t bh, int64_t bw, const int64_t* row_ptr,
                              int64_t row_ptr_len, const int64_t* col_idx, int64_t nnz_blocks, int64_t values_len,
                              const float* bias, int64_t bias_len);
  // Copies a validated structure.
  static BsrIndex copy(int64_t n, int64_t k, int64_t bh, int64_t bw, const int64_t* row_ptr, const int64_t* col_idx,
                       int64_t nnz_blocks, const float* bias);
  // "" when weights of this structure can read X and write Y in head-major layouts of x_heads and y_heads heads
  // (0: row-major): K = x_heads * D with D a multiple of the block width (a block column then lies within one
  // head); N = y_heads * D with D a multiple of the block height, and Y plain (no activation or residual: the
  // attention's q, k, v).
  std::string check_heads(int64_t x_heads, int64_t y_heads, Activation activation) const;
  // Runs task(m0, m1, block_row, panel) over every row tile x block row x panel of `panel` outputs.
  void for_each_task(int64_t m, int64_t panel, const ParallelFor& parallel_for,
                     const std::function<void(int64_t, int64_t, int64_t, int64_t)>& task) const;
};

class BsrWeights {
 public:
  // Validates and repacks. On bad input returns nullptr and sets *error to a message naming the problem.
  //   row_ptr: block_rows + 1 entries (block_rows = ceil(n / bh)), non-decreasing, row_ptr[0] = 0,
  //            row_ptr[block_rows] = nnz_blocks
  //   col_idx: nnz_blocks entries in [0, ceil(k / bw)), strictly increasing within a block row
  //   values:  nnz_blocks * bh * bw floats, each block row-major in W's [out, in] orientation
  //   bias:    n floats or nullptr
  static std::unique_ptr<BsrWeights> create(int64_t n, int64_t k, int64_t bh, int64_t bw,
                                            const int64_t* row_ptr, int64_t row_ptr_len,
                                            const int64_t* col_idx, int64_t nnz_blocks,
                                            const float* values, int64_t values_len,
                                            const float* bias, int64_t bias_len, std::string* error);

  // y [m, n] = activation(x [m, k] * W^T + bias) + residual [m, n] (residual may be nullptr), X and Y in
  // `layout` (tile_job.h; BsrIndex::check_heads must have accepted it).
  void run(const float* x, int64_t m, float* y, const ParallelFor& parallel_for, Isa isa,
           Activation activation = Activation::kNone, const float* residual = nullptr,
           const HeadLayout& layout = {}) const;
  std::string check_heads(int64_t x_heads, int64_t y_heads, Activation activation) const {
    return index_.check_heads(x_heads, y_heads, activation);
  }

  int64_t n() const { return index_.n; }
  int64_t k() const { return index_.k; }

 private:
  BsrWeights() = default;
  BsrIndex index_;
  std::vector<float> packed_;  // per block: [bw][bh_padded] (transposed, rows padded to a multiple of 16)
};

// int8 weights with one float scale per output channel: W[n][k] = scales[n] * values. At run time each row of X
// is quantized symmetrically to int8 with its own scale (dynamic, per token):
//   s = max_k |x_k| / 127,  xq_k = rint(clamp(x_k * (127 / max_k |x_k|), -127, 127))   (float32 arithmetic)
// (a row of zeros, or with max |x| < 1e-30, quantizes to zeros; a row holding NaN or inf gives NaN outputs), and
//   Y[m][n] = activation(s_m * scales[n] * sum_k xq[m][k] * values[n][k] + bias[n]) + residual[m][n]
// with the integer sum exact (int32; K <= kMaxInt8K).
class BsrInt8Weights {
 public:
  // As BsrWeights::create, with int8 values and `scales` (n finite floats); packs for int8_isa(isa).
  static std::unique_ptr<BsrInt8Weights> create(int64_t n, int64_t k, int64_t bh, int64_t bw,
                                                const int64_t* row_ptr, int64_t row_ptr_len, const int64_t* col_idx,
                                                int64_t nnz_blocks, const int8_t* values, int64_t values_len,
                                                const float* scales, int64_t scales_len, const float* bias,
                                                int64_t bias_len, Isa isa, std::string* error);

  void run(const float* x, int64_t m, float* y, const ParallelFor& parallel_for,
           Activation activation = Activation::kNone, const float* residual = nullptr,
           const HeadLayout& layout = {}) const;
  std::string check_heads(int64_t x_heads, int64_t y_heads, Activation activation) const {
    return index_.check_heads(x_heads, y_heads, activation);
  }

  int64_t n() const { return index_.n; }
  int64_t k() const { return index_.k; }
  Isa isa() const { return isa_; }

 private:
  BsrInt8Weights() = default;
  BsrIndex index_;
  Isa isa_ = Isa::kScalar;
  Int8Packing packing_ = Int8Packing::kPairs;
  int64_t block_stride_ = 0;
  std::vector<int8_t> quads_;    // kQuads packing (tile_job.h)
  std::vector<int16_t> pairs_;   // kPairs packing
  std::vector<float> scales_;
  std::vector<int32_t> correction_;  // [n]: 128 * sum_k values[n][k] under kQuads, else zeros
};

}  // namespace lpvit
