// Block-sparse linear kernel core: Y[M, N] = X[M, K] * W^T + bias, with W [N, K] in BSR.
//
// Shared by the onnxruntime custom op (ort_op.cc) and the C entry point torch calls (c_api.cc).
// BsrWeights::create validates every index once and repacks the blocks into the micro-kernel's layout;
// run() then touches only validated, packed data.
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

// "none", "relu", "gelu" (erf form), "gelu_tanh" -> Activation; false for any other name.
bool parse_activation(const std::string& name, Activation* out);
std::string activation_names();  // for error messages: "none, relu, gelu, gelu_tanh"

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

  // y [m, n] = activation(x [m, k] * W^T + bias) + residual [m, n] (residual may be nullptr).
  void run(const float* x, int64_t m, float* y, const ParallelFor& parallel_for, Isa isa,
           Activation activation = Activation::kNone, const float* residual = nullptr) const;

  int64_t n() const { return n_; }
  int64_t k() const { return k_; }

 private:
  BsrWeights() = default;
  int64_t n_ = 0, k_ = 0, bh_ = 0, bw_ = 0, block_rows_ = 0, bh_padded_ = 0;
  std::vector<int64_t> row_ptr_, col_idx_;
  std::vector<float> packed_;  // per block: [bw][bh_padded] (transposed, rows padded to a multiple of 16)
  std::vector<float> bias_;    // n entries (zeros when absent)
};

}  // namespace lpvit
