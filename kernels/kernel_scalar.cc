// Portable path: plain floats and integers (the compiler may still vectorise with the baseline ISA).
#include "int8_microkernel.h"
#include "microkernel.h"

namespace lpvit {
namespace {  // internal linkage, like the micro-kernel (see microkernel.h)
struct Scalar {
  using Reg = float;
  static constexpr int kWidth = 1;
  static Reg zero() { return 0.0f; }
  static Reg load(const float* p) { return *p; }
  static Reg broadcast(const float* p) { return *p; }
  static Reg fma(Reg a, Reg b, Reg c) { return a * b + c; }
  static void store(float* p, Reg v) { *p = v; }
};

// The kPairs packing element by element: two int16 products per int32 accumulator.
struct ScalarPairs {
  using X = int16_t;
  using W = int16_t;
  using Acc = int32_t;
  struct XReg { int32_t a, b; };
  struct WReg { int32_t a, b; };
  static constexpr int kLanes = 1;
  static constexpr int kDepth = 2;
  static const W* packed(const Int8TileJob& job) { return job.packed_pairs; }
  static const X* xq(const Int8TileJob& job) { return job.xq_s16; }
  static Acc zero() { return 0; }
  static WReg load_w(const W* p) { return {p[0], p[1]}; }
  static XReg broadcast_x(const X* p) { return {p[0], p[1]}; }
  static Acc dot(Acc acc, XReg x, WReg w) { return acc + x.a * w.a + x.b * w.b; }
  static void store(int32_t* p, Acc v) { *p = v; }
};
}  // namespace

void run_task_scalar(const TileJob& job, float* xp, int64_t m0, int64_t m1, int64_t row0, int64_t row1) {
  run_task<Scalar, kRowsScalar>(job, xp, m0, m1, row0, row1);
}

void quantize_rows_scalar(const float* x, int64_t m0, int64_t m1, int64_t k, int64_t bw, int16_t* packed,
                          float* scales, int16_t* row, const HeadLayout& layout, float* gathered) {
  quantize_tiles<int16_t, kInt8RowsScalar, 2, 0>(x, m0, m1, k, bw, packed, scales, row, layout,
                                                 gathered);
}

void run_int8_task_scalar(const Int8TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel) {
  run_int8_task<ScalarPairs, kInt8RowsScalar>(job, m0, m1, block_row, panel);
}

}  // namespace lpvit
