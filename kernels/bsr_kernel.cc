#include "bsr_kernel.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "tile_job.h"

namespace lpvit {
namespace {

constexpr int64_t kMaxDim = int64_t{1} << 31;  // N, K: with kMaxBlock, every size product fits in int64
constexpr int64_t kMaxBlock = 4096;
constexpr int64_t kRowTile = 60;  // X rows per task (a multiple of every micro-kernel height: 4, 6, 12)

std::string describe(const char* what, int64_t got, int64_t expected) {
  return std::string(what) + " is " + std::to_string(got) + ", expected " + std::to_string(expected);
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

namespace {
const struct {
  const char* name;
  Activation value;
} kActivations[] = {{"none", Activation::kNone},
                    {"relu", Activation::kRelu},
                    {"gelu", Activation::kGeluErf},
                    {"gelu_tanh", Activation::kGeluTanh}};
}  // namespace

std::string activation_names() {
  std::string names;
  for (const auto& entry : kActivations) names += (names.empty() ? "" : ", ") + std::string(entry.name);
  return names;
}

bool parse_activation(const std::string& name, Activation* out) {
  for (const auto& entry : kActivations) {
    if (name == entry.name) {
      *out = entry.value;
      return true;
    }
  }
  return false;
}

Isa best_isa() {
  Isa isa = Isa::kScalar;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f")) isa = Isa::kAvx512;
#endif
  if (const char* forced = std::getenv("LPVIT_KERNEL_ISA")) {  // lower only: never run what the CPU lacks
    if (std::strcmp(forced, "scalar") == 0) isa = Isa::kScalar;
    if (std::strcmp(forced, "avx2") == 0 && isa == Isa::kAvx512) isa = Isa::kAvx2;
    // "avx512" keeps the best, which is AVX-512 exactly when the CPU has it
  }
  return isa;
}

std::unique_ptr<BsrWeights> BsrWeights::create(int64_t n, int64_t k, int64_t bh, int64_t bw,
                                               const int64_t* row_ptr, int64_t row_ptr_len,
                                               const int64_t* col_idx, int64_t nnz_blocks,
                                               const float* values, int64_t values_len,
                                               const float* bias, int64_t bias_len, std::string* error) {
  auto fail = [&](std::string message) {
    *error = std::move(message);
    return std::unique_ptr<BsrWeights>();
  };
  if (n <= 0 || k <= 0 || n >= kMaxDim || k >= kMaxDim)
    return fail("N and K must be in [1, 2^31), got N=" + std::to_string(n) + ", K=" + std::to_string(k));
  if (bh <= 0 || bw <= 0 || bh > kMaxBlock || bw > kMaxBlock)
    return fail("block_shape must be in [1, 4096], got [" + std::to_string(bh) + ", " + std::to_string(bw) + "]");
  const int64_t block_rows = (n + bh - 1) / bh;
  const int64_t block_cols = (k + bw - 1) / bw;
  if (row_ptr_len != block_rows + 1) return fail(describe("row_ptr length", row_ptr_len, block_rows + 1));
  if (nnz_blocks < 0 || nnz_blocks > block_rows * block_cols)
    return fail("nnz_blocks is " + std::to_string(nnz_blocks) + ", must be in [0, " +
                std::to_string(block_rows * block_cols) + "]");
  if (values_len != nnz_blocks * bh * bw)
    return fail(describe("values size", values_len, nnz_blocks * bh * bw) + " (nnz_blocks * bh * bw)");
  if (bias != nullptr && bias_len != n) return fail(describe("bias length", bias_len, n));
  if (row_ptr[0] != 0) return fail(describe("row_ptr[0]", row_ptr[0], 0));
  for (int64_t r = 0; r < block_rows; ++r) {
    if (row_ptr[r + 1] < row_ptr[r] || row_ptr[r + 1] > nnz_blocks)
      return fail("row_ptr must be non-decreasing and within [0, nnz_blocks]: row_ptr[" + std::to_string(r + 1) +
                  "] = " + std::to_string(row_ptr[r + 1]));
  }
  for (int64_t r = 0; r < block_rows; ++r) {  // row_ptr is now known to index col_idx safely
    for (int64_t b = row_ptr[r]; b < row_ptr[r + 1]; ++b) {
      if (col_idx[b] < 0 || col_idx[b] >= block_cols)
        return fail("col_idx[" + std::to_string(b) + "] = " + std::to_string(col_idx[b]) + " is out of range [0, " +
                    std::to_string(block_cols) + ")");
      if (b > row_ptr[r] && col_idx[b] <= col_idx[b - 1])
        return fail("col_idx must increase within a block row: col_idx[" + std::to_string(b) + "] = " +
                    std::to_string(col_idx[b]) + " after " + std::to_string(col_idx[b - 1]));
    }
  }
  if (row_ptr[block_rows] != nnz_blocks) return fail(describe("row_ptr[last]", row_ptr[block_rows], nnz_blocks));

  std::unique_ptr<BsrWeights> w(new BsrWeights());
  w->n_ = n, w->k_ = k, w->bh_ = bh, w->bw_ = bw, w->block_rows_ = block_rows;
  w->bh_padded_ = (bh + kPanel - 1) / kPanel * kPanel;
  w->row_ptr_.assign(row_ptr, row_ptr + row_ptr_len);
  w->col_idx_.assign(col_idx, col_idx + nnz_blocks);
  w->packed_.assign(static_cast<size_t>(nnz_blocks * bw * w->bh_padded_), 0.0f);
  for (int64_t b = 0; b < nnz_blocks; ++b) {  // [bh][bw] row-major -> [bw][bh_padded]
    const float* src = values + b * bh * bw;
    float* dst = w->packed_.data() + b * bw * w->bh_padded_;
    for (int64_t i = 0; i < bh; ++i)
      for (int64_t j = 0; j < bw; ++j) dst[j * w->bh_padded_ + i] = src[i * bw + j];
  }
  w->bias_.assign(static_cast<size_t>(n), 0.0f);
  if (bias != nullptr) std::copy(bias, bias + n, w->bias_.begin());
  return w;
}

void BsrWeights::run(const float* x, int64_t m, float* y, const ParallelFor& parallel_for, Isa isa,
                     Activation activation, const float* residual) const {
  if (m <= 0) return;
  const int64_t panel = isa == Isa::kAvx512 && bh_padded_ % kWidePanel == 0 ? kWidePanel : kPanel;
  const TileJob job{x, y, m, n_, k_, bh_, bw_, bh_padded_, panel, bw_ * bh_padded_, row_ptr_.data(),
                    col_idx_.data(), packed_.data(), bias_.data(), residual, activation};
  void (*task_fn)(const TileJob&, int64_t, int64_t, int64_t, int64_t) =
      isa == Isa::kAvx512 ? run_task_avx512 : isa == Isa::kAvx2 ? run_task_avx2 : run_task_scalar;
  const int64_t panels = bh_padded_ / panel;
  const int64_t row_tiles = (m + kRowTile - 1) / kRowTile;
  const int64_t per_tile = block_rows_ * panels;
  parallel_for(static_cast<size_t>(row_tiles * per_tile), [&](size_t task) {
    const int64_t t = static_cast<int64_t>(task);
    const int64_t tile = t / per_tile, rest = t % per_tile;
    const int64_t m0 = tile * kRowTile;
    task_fn(job, m0, std::min(m, m0 + kRowTile), rest / panels, rest % panels);
  });
}

}  // namespace lpvit
