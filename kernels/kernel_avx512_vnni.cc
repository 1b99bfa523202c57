// AVX-512 VNNI int8 path (compiled with -mavx512f -mavx512bw -mavx512vnni): vpdpbusd multiplies 4 u8 weights
// (wq + 128) by 4 s8 values of X and adds them to an int32 lane without saturation. The signed operand is the one
// vpdpbusd can broadcast from memory, so X is s8 and each row costs no separate broadcast (the shift of the
// weights is undone in the write-back, see tile_job.h). 12 rows x 16 outputs = 12 zmm
// accumulators, or 12 x 32 = 24 where the block rows are 32 outputs tall (or a multiple).
#include <immintrin.h>

#include "int8_microkernel.h"

namespace lpvit {
namespace {  // internal linkage, like the micro-kernel (see microkernel.h)
using Quad = int32_t __attribute__((may_alias, aligned(1)));  // 4 bytes of X read as one broadcast

struct Avx512Quads {
  using X = int8_t;
  using W = uint8_t;
  using Acc = __m512i;
  using XReg = __m512i;
  using WReg = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kDepth = 4;
  static constexpr bool kShifted = true;
  static const W* packed(const Int8TileJob& job) { return job.packed_quads; }
  static const X* xq(const Int8TileJob& job) { return job.xq_s8; }
  static Acc zero() { return _mm512_setzero_si512(); }
  static WReg load_w(const W* p) { return _mm512_loadu_si512(p); }
  static XReg broadcast_x(const X* p) {
    return _mm512_set1_epi32(*reinterpret_cast<const Quad*>(p));  // folds into vpdpbusd's {1to16} operand
  }
  static Acc dot(Acc acc, XReg x, WReg w) { return _mm512_dpbusd_epi32(acc, w, x); }
  static void store(int32_t* p, Acc v) { _mm512_storeu_si512(p, v); }
};
}  // namespace

void quantize_rows_avx512_vnni(const float* x, int64_t rows, int64_t k, int8_t* q, int64_t q_stride, float* scales,
                               int64_t bw, int32_t* block_sums) {
  quantize_rows(x, rows, k, q, q_stride, scales);
  block_column_sums(q, rows, k, q_stride, bw, (k + bw - 1) / bw, block_sums);
}

void run_int8_task_avx512_vnni(const Int8TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel) {
  if (job.panel == kWidePanel)
    run_int8_task<Avx512Quads, 12, kWidePanel>(job, m0, m1, block_row, panel);
  else
    run_int8_task<Avx512Quads, 12>(job, m0, m1, block_row, panel);
}

}  // namespace lpvit
