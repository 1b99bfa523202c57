// AVX-512F path (compiled with -mavx512f): 12 rows x 16 outputs = 12 zmm accumulators, or 12 x 32 = 24 where
// the block rows are 32 outputs tall (or a multiple).
#include <immintrin.h>

#include "microkernel.h"

namespace lpvit {
namespace {  // internal linkage, like the micro-kernel (see microkernel.h)
struct Avx512 {
  using Reg = __m512;
  static constexpr int kWidth = 16;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
};
}  // namespace

void run_task_avx512(const TileJob& job, float* xp, int64_t m0, int64_t m1, int64_t row0, int64_t row1) {
  if (job.panel == kWidePanel)  // two zmm per row: each broadcast of X feeds two FMAs
    run_task<Avx512, kRowsAvx512, kWidePanel>(job, xp, m0, m1, row0, row1);
  else
    run_task<Avx512, kRowsAvx512>(job, xp, m0, m1, row0, row1);
}

}  // namespace lpvit
