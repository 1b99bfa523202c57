#include "bsr_kernel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "tile_job.h"

namespace lpvit {
namespace {

constexpr int64_t kMaxDim = int64_t{1} << 31;  // N, K: with kMaxBlock, every size product fits in int64
constexpr int64_t kMaxBlock = 4096;
constexpr int64_t kRowTile = 60;  // X rows per task (a multiple of every micro-kernel height: 4, 6, 12)
// float32 tasks wanted at least: enough to keep a few threads busy; fewer row groups than this split the block
// rows too, and each split packs the same X rows once more
constexpr int64_t kMinTasks = 16;

// parallel_for over tasks that allocate. A task runs on a worker thread (onnxruntime's pool, or a std::thread of
// the C API), where an escaping exception terminates the process: an allocation failure is caught there and
// rethrown on the calling thread once every task has returned, so the call fails with an error instead.
void parallel_allocating(const ParallelFor& parallel_for, size_t tasks, const std::function<void(size_t)>& body) {
  std::atomic<bool> out_of_memory{false};
  parallel_for(tasks, [&](size_t task) {
    if (out_of_memory.load(std::memory_order_relaxed)) return;
    try {
      body(task);
    } catch (const std::bad_alloc&) {
      out_of_memory.store(true, std::memory_order_relaxed);
    }
  });
  if (out_of_memory.load()) throw std::bad_alloc();
}

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

std::string BsrIndex::validate(int64_t n, int64_t k, int64_t bh, int64_t bw, const int64_t* row_ptr,
                               int64_t row_ptr_len, const int64_t* col_idx, int64_t nnz_blocks, int64_t values_len,
                               const float* bias, int64_t bias_len) {
  if (n <= 0 || k <= 0 || n >= kMaxDim || k >= kMaxDim)
    return "N and K must be in [1, 2^31), got N=" + std::to_string(n) + ", K=" + std::to_string(k);
  if (bh <= 0 || bw <= 0 || bh > kMaxBlock || bw > kMaxBlock)
    return "block_shape must be in [1, 4096], got [" + std::to_string(bh) + ", " + std::to_string(bw) + "]";
  const int64_t block_rows = (n + bh - 1) / bh;
  const int64_t block_cols = (k + bw - 1) / bw;
  if (row_ptr_len != block_rows + 1) return describe("row_ptr length", row_ptr_len, block_rows + 1);
  if (nnz_blocks < 0 || nnz_blocks > block_rows * block_cols)
    return "nnz_blocks is " + std::to_string(nnz_blocks) + ", must be in [0, " +
           std::to_string(block_rows * block_cols) + "]";
  if (values_len != nnz_blocks * bh * bw)
    return describe("values size", values_len, nnz_blocks * bh * bw) + " (nnz_blocks * bh * bw)";
  if (bias != nullptr && bias_len != n) return describe("bias length", bias_len, n);
  if (row_ptr[0] != 0) return describe("row_ptr[0]", row_ptr[0], 0);
  for (int64_t r = 0; r < block_rows; ++r) {
    if (row_ptr[r + 1] < row_ptr[r] || row_ptr[r + 1] > nnz_blocks)
      return "row_ptr must be non-decreasing and within [0, nnz_blocks]: row_ptr[" + std::to_string(r + 1) +
             "] = " + std::to_string(row_ptr[r + 1]);
  }
  for (int64_t r = 0; r < block_rows; ++r) {  // row_ptr is now known to index col_idx safely
    for (int64_t b = row_ptr[r]; b < row_ptr[r + 1]; ++b) {
      if (col_idx[b] < 0 || col_idx[b] >= block_cols)
        return "col_idx[" + std::to_string(b) + "] = " + std::to_string(col_idx[b]) + " is out of range [0, " +
               std::to_string(block_cols) + ")";
      if (b > row_ptr[r] && col_idx[b] <= col_idx[b - 1])
        return "col_idx must increase within a block row: col_idx[" + std::to_string(b) + "] = " +
               std::to_string(col_idx[b]) + " after " + std::to_string(col_idx[b - 1]);
    }
  }
  if (row_ptr[block_rows] != nnz_blocks) return describe("row_ptr[last]", row_ptr[block_rows], nnz_blocks);
  return "";
}

BsrIndex BsrIndex::copy(int64_t n, int64_t k, int64_t bh, int64_t bw, const int64_t* row_ptr,
                        const int64_t* col_idx, int64_t nnz_blocks, const float* bias) {
  BsrIndex index;
  index.n = n, index.k = k, index.bh = bh, index.bw = bw;
  index.block_rows = (n + bh - 1) / bh, index.block_cols = (k + bw - 1) / bw;
  index.bh_padded = (bh + kPanel - 1) / kPanel * kPanel;
  index.row_ptr.assign(row_ptr, row_ptr + index.block_rows + 1);
  index.col_idx.assign(col_idx, col_idx + nnz_blocks);
  index.bias.assign(static_cast<size_t>(n), 0.0f);
  if (bias != nullptr) std::copy(bias, bias + n, index.bias.begin());
  return index;
}

void BsrIndex::for_each_task(int64_t m, int64_t panel, const ParallelFor& parallel_for,
                             const std::function<void(int64_t, int64_t, int64_t, int64_t)>& task) const {
  const int64_t panels = bh_padded / panel;
  const int64_t row_tiles = (m + kRowTile - 1) / kRowTile;
  const int64_t per_tile = block_rows * panels;
  parallel_for(static_cast<size_t>(row_tiles * per_tile), [&](size_t index) {
    const int64_t t = static_cast<int64_t>(index);
    const int64_t tile = t / per_tile, rest = t % per_tile;
    const int64_t m0 = tile * kRowTile;
    task(m0, std::min(m, m0 + kRowTile), rest / panels, rest % panels);
  });
}

std::unique_ptr<BsrWeights> BsrWeights::create(int64_t n, int64_t k, int64_t bh, int64_t bw,
                                               const int64_t* row_ptr, int64_t row_ptr_len,
                                               const int64_t* col_idx, int64_t nnz_blocks,
                                               const float* values, int64_t values_len,
                                               const float* bias, int64_t bias_len, std::string* error) {
  *error = BsrIndex::validate(n, k, bh, bw, row_ptr, row_ptr_len, col_idx, nnz_blocks, values_len, bias, bias_len);
  if (!error->empty()) return nullptr;
  std::unique_ptr<BsrWeights> w(new BsrWeights());
  w->index_ = BsrIndex::copy(n, k, bh, bw, row_ptr, col_idx, nnz_blocks, bias);
  const int64_t bh_padded = w->index_.bh_padded;
  w->packed_.assign(static_cast<size_t>(nnz_blocks * bw * bh_padded), 0.0f);
  for (int64_t b = 0; b < nnz_blocks; ++b) {  // [bh][bw] row-major -> [bw][bh_padded]
    const float* src = values + b * bh * bw;
    float* dst = w->packed_.data() + b * bw * bh_padded;
    // columns past K stay 0: the micro-kernel multiplies them by X's zero padding, and inf or NaN there would
    // make NaN
    const int64_t width = std::min(bw, k - w->index_.col_idx[b] * bw);
    for (int64_t i = 0; i < bh; ++i)
      for (int64_t j = 0; j < width; ++j) dst[j * bh_padded + i] = src[i * bw + j];
  }
  return w;
}

std::string BsrIndex::check_heads(int64_t x_heads, int64_t y_heads, Activation activation) const {
  const BsrIndex& ix = *this;
  if (x_heads < 0 || y_heads < 0)
    return "input_heads and output_heads must be >= 0, got " + std::to_string(x_heads) + " and " +
           std::to_string(y_heads);
  if (x_heads > 0 && (ix.k % x_heads != 0 || ix.k / x_heads % ix.bw != 0))
    return "input_heads=" + std::to_string(x_heads) + " needs K=" + std::to_string(ix.k) +
           " to split into heads whose width is a multiple of the block width " + std::to_string(ix.bw);
  if (y_heads > 0 && (ix.n % y_heads != 0 || ix.n / y_heads % ix.bh != 0))
    return "output_heads=" + std::to_string(y_heads) + " needs N=" + std::to_string(ix.n) +
           " to split into heads whose width is a multiple of the block height " + std::to_string(ix.bh);
  if (y_heads > 0 && activation != Activation::kNone) return "output_heads takes no activation";
  return "";
}

void BsrWeights::run(const float* x, int64_t m, float* y, const ParallelFor& parallel_for, Isa isa,
                     Activation activation, const float* residual, const HeadLayout& layout) const {
  if (m <= 0) return;
  const BsrIndex& ix = index_;
  const int64_t panel = isa == Isa::kAvx512 && ix.bh_padded % kWidePanel == 0 ? kWidePanel : kPanel;
  const TileJob job{x, y, m, ix.n, ix.k, ix.bh, ix.bw, ix.bh_padded, panel, ix.bw * ix.bh_padded,
                    ix.row_ptr.data(), ix.col_idx.data(), packed_.data(), ix.bias.data(), residual, activation,
                    layout};
  void (*task_fn)(const TileJob&, float*, int64_t, int64_t, int64_t, int64_t) =
      isa == Isa::kAvx512 ? run_task_avx512 : isa == Isa::kAvx2 ? run_task_avx2 : run_task_scalar;
  const int64_t rows = isa == Isa::kAvx512 ? kRowsAvx512 : isa == Isa::kAvx2 ? kRowsAvx2 : kRowsScalar;
  // Tasks are row groups x ranges of block rows: kRowTile rows per group, fewer (a multiple of the tile's rows)
  // when that gives under kMinTasks groups, and block-row ranges only when the groups are still too few.
  int64_t group = kRowTile;
  if ((m + group - 1) / group < kMinTasks)
    group = std::max<int64_t>(rows, ((m + kMinTasks - 1) / kMinTasks + rows - 1) / rows * rows);
  const int64_t groups = (m + group - 1) / group;
  const int64_t ranges = std::min(ix.block_rows, (kMinTasks + groups - 1) / groups);
  const size_t scratch = static_cast<size_t>(group * ix.block_cols * ix.bw);  // group: a multiple of `rows`
  parallel_allocating(parallel_for, static_cast<size_t>(groups * ranges), [&](size_t index) {
    const int64_t g = static_cast<int64_t>(index) / ranges, r = static_cast<int64_t>(index) % ranges;
    // each thread's own packed rows, kept between calls (onnxruntime reuses its threads)
    thread_local std::vector<float> xp;
    if (xp.size() < scratch) xp.resize(scratch);
    task_fn(job, xp.data(), g * group, std::min(m, (g + 1) * group), r * ix.block_rows / ranges,
            (r + 1) * ix.block_rows / ranges);
  });
}

Isa int8_isa(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (isa == Isa::kAvx512 && !(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")))
    return Isa::kAvx2;
#endif
  return isa;
}

const char* int8_isa_name(Isa isa) { return isa == Isa::kAvx512 ? "avx512_vnni" : isa_name(isa); }

std::unique_ptr<BsrInt8Weights> BsrInt8Weights::create(int64_t n, int64_t k, int64_t bh, int64_t bw,
                                                       const int64_t* row_ptr, int64_t row_ptr_len,
                                                       const int64_t* col_idx, int64_t nnz_blocks,
                                                       const int8_t* values, int64_t values_len, const float* scales,
                                                       int64_t scales_len, const float* bias, int64_t bias_len,
                                                       Isa isa, std::string* error) {
  *error = BsrIndex::validate(n, k, bh, bw, row_ptr, row_ptr_len, col_idx, nnz_blocks, values_len, bias, bias_len);
  if (error->empty() && k > kMaxInt8K)
    *error = "K is " + std::to_string(k) + ", the int8 kernel takes K <= " + std::to_string(kMaxInt8K) +
             " (its int32 sums must not overflow)";
  if (error->empty() && scales_len != n) *error = describe("scales length", scales_len, n);
  for (int64_t i = 0; error->empty() && i < n; ++i)
    if (!std::isfinite(scales[i])) *error = "scales[" + std::to_string(i) + "] is not finite";
  if (!error->empty()) return nullptr;

  std::unique_ptr<BsrInt8Weights> w(new BsrInt8Weights());
  w->index_ = BsrIndex::copy(n, k, bh, bw, row_ptr, col_idx, nnz_blocks, bias);
  w->isa_ = int8_isa(isa);
  w->packing_ = w->isa_ == Isa::kAvx512 ? Int8Packing::kQuads : Int8Packing::kPairs;
  const int64_t depth = w->packing_ == Int8Packing::kQuads ? 4 : 2;
  const int64_t bh_padded = w->index_.bh_padded;
  const int64_t groups = (bw + depth - 1) / depth;
  w->block_stride_ = groups * bh_padded * depth;
  w->scales_.assign(scales, scales + n);
  w->correction_.assign(static_cast<size_t>(n), 0);
  if (w->packing_ == Int8Packing::kQuads)
    w->quads_.assign(static_cast<size_t>(nnz_blocks * w->block_stride_), 0);
  else
    w->pairs_.assign(static_cast<size_t>(nnz_blocks * w->block_stride_), 0);
  const BsrIndex& ix = w->index_;
  for (int64_t r = 0; r < ix.block_rows; ++r) {
    for (int64_t b = ix.row_ptr[r]; b < ix.row_ptr[r + 1]; ++b) {
      const int8_t* src = values + b * bh * bw;
      const int64_t width = std::min(bw, k - ix.col_idx[b] * bw);  // padding past K is never read: stays 0
      const int64_t height = std::min(bh, n - r * bh);
      for (int64_t i = 0; i < height; ++i) {
        for (int64_t j = 0; j < width; ++j) {
          const int8_t v = src[i * bw + j];
          const int64_t at = b * w->block_stride_ + (j / depth) * bh_padded * depth + i * depth + j % depth;
          if (w->packing_ == Int8Packing::kQuads) {
            w->quads_[at] = v;
            w->correction_[r * bh + i] += 128 * v;
          } else {
            w->pairs_[at] = v;
          }
        }
      }
    }
  }
  return w;
}

void BsrInt8Weights::run(const float* x, int64_t m, float* y, const ParallelFor& parallel_for,
                         Activation activation, const float* residual, const HeadLayout& layout) const {
  if (m <= 0) return;
  const BsrIndex& ix = index_;
  const bool quads = packing_ == Int8Packing::kQuads;
  const int64_t rows = quads ? kInt8RowsAvx512 : isa_ == Isa::kAvx2 ? kInt8RowsAvx2 : kInt8RowsScalar;
  const int64_t depth = quads ? 4 : 2;
  const int64_t tile_stride = ix.block_cols * ((ix.bw + depth - 1) / depth) * rows * depth;
  const size_t packed_size = static_cast<size_t>((m + rows - 1) / rows * tile_stride);
  // this call's own quantized X (run() may be called from many threads at once), zero where nothing is written
  std::vector<uint8_t> xq_u8(quads ? packed_size : 0, 0);
  std::vector<int16_t> xq_s16(quads ? 0 : packed_size, 0);
  std::vector<float> x_scale(static_cast<size_t>(m));
  const int64_t chunks = (m + kRowTile - 1) / kRowTile;  // kRowTile is a multiple of every tile's rows
  parallel_allocating(parallel_for, static_cast<size_t>(chunks), [&](size_t chunk) {
    const int64_t m0 = static_cast<int64_t>(chunk) * kRowTile, m1 = std::min(m, m0 + kRowTile);
    std::vector<float> gathered(layout.x_heads > 0 ? static_cast<size_t>(ix.k) : 0);  // a head-major row
    if (quads) {
      std::vector<uint8_t> row(static_cast<size_t>(ix.k));
      quantize_rows_avx512_vnni(x, m0, m1, ix.k, ix.bw, xq_u8.data(), x_scale.data(), row.data(), layout,
                                gathered.data());
    } else {
      std::vector<int16_t> row(static_cast<size_t>(ix.k));
      (isa_ == Isa::kAvx2 ? quantize_rows_avx2 : quantize_rows_scalar)(x, m0, m1, ix.k, ix.bw, xq_s16.data(),
                                                                       x_scale.data(), row.data(), layout,
                                                                       gathered.data());
    }
  });
  const int64_t panel = quads && ix.bh_padded % kWidePanel == 0 ? kWidePanel : kPanel;
  const Int8TileJob job{xq_u8.data(), xq_s16.data(), x_scale.data(), y, m, ix.n, ix.k, ix.bh, ix.bw,
                        ix.bh_padded, panel, ix.block_cols, tile_stride, block_stride_, ix.row_ptr.data(),
                        ix.col_idx.data(), quads_.data(), pairs_.data(), scales_.data(), correction_.data(),
                        ix.bias.data(), residual, activation, layout};
  void (*task_fn)(const Int8TileJob&, int64_t, int64_t, int64_t, int64_t) =
      isa_ == Isa::kAvx512 ? run_int8_task_avx512_vnni : isa_ == Isa::kAvx2 ? run_int8_task_avx2
                                                                            : run_int8_task_scalar;
  ix.for_each_task(m, panel, parallel_for,
                   [&](int64_t m0, int64_t m1, int64_t block_row, int64_t p) { task_fn(job, m0, m1, block_row, p); });
}

}  // namespace lpvit
