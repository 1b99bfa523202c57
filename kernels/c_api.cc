// C entry points for callers without onnxruntime (the torch op loads them with ctypes).
// No C++ exception crosses this boundary: every entry point catches and reports through its return value.
#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "bsr_kernel.h"

namespace {

void copy_error(const std::string& message, char* error, int64_t error_len) {
  if (error == nullptr || error_len <= 0) return;
  const size_t n = std::min<size_t>(message.size(), static_cast<size_t>(error_len - 1));
  std::memcpy(error, message.data(), n);
  error[n] = '\0';
}

// Static split of tasks over `threads` std::threads (the caller passes torch's intra-op thread count).
lpvit::ParallelFor thread_split(int threads) {
  return [threads](size_t tasks, const std::function<void(size_t)>& body) {
    const size_t workers = std::max<size_t>(1, std::min<size_t>(threads, tasks));
    if (workers == 1) {
      for (size_t t = 0; t < tasks; ++t) body(t);
      return;
    }
    std::vector<std::thread> pool;
    for (size_t w = 0; w < workers; ++w)
      pool.emplace_back([&, w] {
        for (size_t t = tasks * w / workers; t < tasks * (w + 1) / workers; ++t) body(t);
      });
    for (auto& thread : pool) thread.join();
  };
}

}  // namespace

extern "C" {

// Validates and packs a BSR weight; returns a handle, or nullptr with the reason in `error`.
__attribute__((visibility("default"))) void* lpvit_bsr_create(
    int64_t n, int64_t k, int64_t bh, int64_t bw, const int64_t* row_ptr, int64_t row_ptr_len,
    const int64_t* col_idx, int64_t nnz_blocks, const float* values, int64_t values_len, const float* bias,
    int64_t bias_len, char* error, int64_t error_len) {
  try {
    if (row_ptr == nullptr || (nnz_blocks > 0 && (col_idx == nullptr || values == nullptr))) {
      copy_error("null buffer", error, error_len);
      return nullptr;
    }
    std::string message;
    auto weights = lpvit::BsrWeights::create(n, k, bh, bw, row_ptr, row_ptr_len, col_idx, nnz_blocks, values,
                                             values_len, bias, bias_len, &message);
    if (!weights) copy_error(message, error, error_len);
    return weights.release();
  } catch (const std::exception& e) {
    copy_error(std::string("native kernel failed: ") + e.what(), error, error_len);
    return nullptr;
  }
}

// y [m, n] = activation(x [m, k] * W^T + bias) + residual [m, n] with `threads` threads (>= 1); residual may be
// null; activation is a name lpvit::parse_activation knows. Returns 0, or -1 with the reason in `error`.
__attribute__((visibility("default"))) int lpvit_bsr_run(const void* handle, const float* x, int64_t m, float* y,
                                                          const float* residual, const char* activation,
                                                          int threads, char* error, int64_t error_len) {
  try {
    if (handle == nullptr || x == nullptr || y == nullptr || m < 0 || threads < 1) {
      copy_error("lpvit_bsr_run: null handle or buffer, negative row count, or thread count < 1 (got " +
                     std::to_string(threads) + ")", error, error_len);
      return -1;
    }
    lpvit::Activation act = lpvit::Activation::kNone;
    if (activation != nullptr && !lpvit::parse_activation(activation, &act)) {
      copy_error(std::string("unknown activation '") + activation + "', expected one of " + lpvit::activation_names(),
                 error, error_len);
      return -1;
    }
    static_cast<const lpvit::BsrWeights*>(handle)->run(x, m, y, thread_split(threads), lpvit::best_isa(), act,
                                                       residual);
    return 0;
  } catch (const std::exception& e) {
    copy_error(std::string("native kernel failed: ") + e.what(), error, error_len);
    return -1;
  }
}

__attribute__((visibility("default"))) void lpvit_bsr_destroy(void* handle) {
  delete static_cast<lpvit::BsrWeights*>(handle);
}

__attribute__((visibility("default"))) const char* lpvit_kernel_isa() { return lpvit::isa_name(lpvit::best_isa()); }

}  // extern "C"
