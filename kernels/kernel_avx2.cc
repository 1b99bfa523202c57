// AVX2/FMA path (compiled with -mavx2 -mfma): 6 rows x 16 outputs = 12 ymm accumulators, in float and in int8.
#include <immintrin.h>

#include <cstring>

#include "int8_microkernel.h"
#include "microkernel.h"

namespace lpvit {
namespace {  // internal linkage, like the micro-kernel (see microkernel.h)
struct Avx2 {
  using Reg = __m256;
  static constexpr int kWidth = 8;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
};

// int8 on AVX2: int16 pairs through vpmaddwd, exact for the whole int8 range. (vpmaddubsw would multiply
// u8 x s8 twice as fast but saturates its int16 pair sums: 255 * 127 * 2 > 32767.)
struct Avx2Pairs {
  using X = int16_t;
  using W = int16_t;
  using Acc = __m256i;
  using XReg = __m256i;
  using WReg = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kDepth = 2;
  static const W* packed(const Int8TileJob& job) { return job.packed_pairs; }
  static const X* xq(const Int8TileJob& job) { return job.xq_s16; }
  static Acc zero() { return _mm256_setzero_si256(); }
  static WReg load_w(const W* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static XReg broadcast_x(const X* p) {
    int32_t pair;
    std::memcpy(&pair, p, sizeof pair);
    return _mm256_set1_epi32(pair);
  }
  static Acc dot(Acc acc, XReg x, WReg w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
  static void store(int32_t* p, Acc v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};
}  // namespace

void run_task_avx2(const TileJob& job, float* xp, int64_t m0, int64_t m1, int64_t row0, int64_t row1) {
  run_task<Avx2, kRowsAvx2>(job, xp, m0, m1, row0, row1);
}

void quantize_rows_avx2(const float* x, int64_t m0, int64_t m1, int64_t k, int64_t bw, int16_t* packed,
                        float* scales, int16_t* row, const HeadLayout& layout, float* gathered) {
  quantize_tiles<int16_t, kInt8RowsAvx2, 2, 0>(x, m0, m1, k, bw, packed, scales, row, layout,
                                               gathered);
}

void run_int8_task_avx2(const Int8TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel) {
  run_int8_task<Avx2Pairs, kInt8RowsAvx2>(job, m0, m1, block_row, panel);
}

}  // namespace lpvit
