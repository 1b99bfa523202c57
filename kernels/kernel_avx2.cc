// AVX2/FMA path (compiled with -mavx2 -mfma): 6 rows x 16 outputs = 12 ymm accumulators.
#include <immintrin.h>

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
}  // namespace

void run_task_avx2(const TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel) {
  run_task<Avx2, 6>(job, m0, m1, block_row, panel);
}

}  // namespace lpvit
