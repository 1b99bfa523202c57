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

// Validates the arguments of a run call and the activation name; "" when they are usable.
std::string check_run(const void* handle, const float* x, int64_t m, const float* y, int threads,
                      const char* activation, lpvit::Activation* act) {
  if (handle == nullptr || x == nullptr || y == nullptr || m < 0 || threads < 1)
    return "lpvit_bsr_run: null handle or buffer, negative row count, or thread count < 1 (got " +
           std::to_string(threads) + ")";
  if (activation != nullptr && !lpvit::parse_activation(activation, act))
    return std::string("unknown activation '") + activation + "', expected one of " + lpvit::activation_names();
  return "";
}

// Runs `body` and turns a C++ exception into -1 with the reason in `error`.
template <typename Body>
int guarded(Body body, char* error, int64_t error_len) {
  try {
    const std::string message = body();
    if (message.empty()) return 0;
    copy_error(message, error, error_len);
    return -1;
  } catch (const std::exception& e) {
    copy_error(std::string("native kernel failed: ") + e.what(), error, error_len);
    return -1;
  }
}

// Creates weights with `make(message)`, reporting a null result's reason or a C++ exception in `error`.
template <typename Make>
void* created(Make make, char* error, int64_t error_len) {
  try {
    std::string message;
    auto weights = make(&message);
    if (!weights) copy_error(message, error, error_len);
    return weights.release();
  } catch (const std::exception& e) {
    copy_error(std::string("native kernel failed: ") + e.what(), error, error_len);
    return nullptr;
  }
}

}  // namespace

extern "C" {

// Validates and packs a BSR weight; returns a handle, or nullptr with the reason in `error`.
__attribute__((visibility("default"))) void* lpvit_bsr_create(
    int64_t n, int64_t k, int64_t bh, int64_t bw, const int64_t* row_ptr, int64_t row_ptr_len,
    const int64_t* col_idx, int64_t nnz_blocks, const float* values, int64_t values_len, const float* bias,
    int64_t bias_len, char* error, int64_t error_len) {
  if (row_ptr == nullptr || (nnz_blocks > 0 && (col_idx == nullptr || values == nullptr))) {
    copy_error("null buffer", error, error_len);
    return nullptr;
  }
  return created([&](std::string* message) {
    return lpvit::BsrWeights::create(n, k, bh, bw, row_ptr, row_ptr_len, col_idx, nnz_blocks, values, values_len,
                                     bias, bias_len, message);
  }, error, error_len);
}

// y [m, n] = activation(x [m, k] * W^T + bias) + residual [m, n] with `threads` threads (>= 1); residual may be
// null; activation is a name lpvit::parse_activation knows. Returns 0, or -1 with the reason in `error`.
__attribute__((visibility("default"))) int lpvit_bsr_run(const void* handle, const float* x, int64_t m, float* y,
                                                          const float* residual, const char* activation,
                                                          int threads, char* error, int64_t error_len) {
  return guarded([&] {
    lpvit::Activation act = lpvit::Activation::kNone;
    std::string message = check_run(handle, x, m, y, threads, activation, &act);
    if (message.empty())
      static_cast<const lpvit::BsrWeights*>(handle)->run(x, m, y, thread_split(threads), lpvit::best_isa(), act,
                                                         residual);
    return message;
  }, error, error_len);
}

__attribute__((visibility("default"))) void lpvit_bsr_destroy(void* handle) {
  delete static_cast<lpvit::BsrWeights*>(handle);
}

// The int8 weight (int8 values, one float scale per output channel), packed for this CPU's int8 path.
__attribute__((visibility("default"))) void* lpvit_bsr_int8_create(
    int64_t n, int64_t k, int64_t bh, int64_t bw, const int64_t* row_ptr, int64_t row_ptr_len,
    const int64_t* col_idx, int64_t nnz_blocks, const int8_t* values, int64_t values_len, const float* scales,
    int64_t scales_len, const float* bias, int64_t bias_len, char* error, int64_t error_len) {
  if (row_ptr == nullptr || scales == nullptr || (nnz_blocks > 0 && (col_idx == nullptr || values == nullptr))) {
    copy_error("null buffer", error, error_len);
    return nullptr;
  }
  return created([&](std::string* message) {
    return lpvit::BsrInt8Weights::create(n, k, bh, bw, row_ptr, row_ptr_len, col_idx, nnz_blocks, values,
                                         values_len, scales, scales_len, bias, bias_len, lpvit::best_isa(), message);
  }, error, error_len);
}

// As lpvit_bsr_run, for a handle of lpvit_bsr_int8_create (X quantized per row, see bsr_kernel.h).
__attribute__((visibility("default"))) int lpvit_bsr_int8_run(const void* handle, const float* x, int64_t m,
                                                               float* y, const float* residual,
                                                               const char* activation, int threads, char* error,
                                                               int64_t error_len) {
  return guarded([&] {
    lpvit::Activation act = lpvit::Activation::kNone;
    std::string message = check_run(handle, x, m, y, threads, activation, &act);
    if (message.empty())
      static_cast<const lpvit::BsrInt8Weights*>(handle)->run(x, m, y, thread_split(threads), act, residual);
    return message;
  }, error, error_len);
}

__attribute__((visibility("default"))) void lpvit_bsr_int8_destroy(void* handle) {
  delete static_cast<lpvit::BsrInt8Weights*>(handle);
}

__attribute__((visibility("default"))) const char* lpvit_kernel_isa() { return lpvit::isa_name(lpvit::best_isa()); }

__attribute__((visibility("default"))) const char* lpvit_kernel_int8_isa() {
  return lpvit::int8_isa_name(lpvit::int8_isa(lpvit::best_isa()));
}

}  // extern "C"
