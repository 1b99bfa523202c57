// AVX-512 VNNI int8 path (compiled with -mavx512f -mavx512bw -mavx512vnni): vpdpbusd multiplies 4 u8 values of
// X (xq + 128) by 4 s8 weights and adds them to an int32 lane without saturation (the + 128 is undone by the
// write-back's per-output correction, see tile_job.h). 12 rows x 16 outputs = 12 zmm
// accumulators, or 12 x 32 = 24 where the block rows are 32 outputs tall (or a multiple).
#include <immintrin.h>

#include "int8_microkernel.h"

namespace lpvit {
namespace {  // internal linkage, like the micro-kernel (see microkernel.h)
using Quad = int32_t __attribute__((may_alias, aligned(1)));  // 4 bytes of X, broadcast to every lane

struct Avx512Quads {
  using X = uint8_t;
  using W = int8_t;
  using Acc = __m512i;
  using XReg = __m512i;
  using WReg = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kDepth = 4;
  static const W* packed(const Int8TileJob& job) { return job.packed_quads; }
  static const X* xq(const Int8TileJob& job) { return job.xq_u8; }
  static Acc zero() { return _mm512_setzero_si512(); }
  static WReg load_w(const W* p) { return _mm512_loadu_si512(p); }
  static XReg broadcast_x(const X* p) {
    return _mm512_set1_epi32(*reinterpret_cast<const Quad*>(p));
  }
  static Acc dot(Acc acc, XReg x, WReg w) { return _mm512_dpbusd_epi32(acc, x, w); }
  static void store(int32_t* p, Acc v) { _mm512_storeu_si512(p, v); }
};
}  // namespace

void quantize_rows_avx512_vnni(const float* x, int64_t m0, int64_t m1, int64_t k, int64_t bw, uint8_t* packed,
                               float* scales, uint8_t* row, const HeadLayout& layout, float* gathered) {
  quantize_tiles<uint8_t, kInt8RowsAvx512, 4, 128>(x, m0, m1, k, bw, packed, scales, row, layout,
                                                   gathered);
}

void run_int8_task_avx512_vnni(const Int8TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel) {
  if (job.panel == kWidePanel)
    run_int8_task<Avx512Quads, kInt8RowsAvx512, kWidePanel>(job, m0, m1, block_row, panel);
  else
    run_int8_task<Avx512Quads, kInt8RowsAvx512>(job, m0, m1, block_row, panel);
}

}  // namespace lpvit
