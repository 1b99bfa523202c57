// Portable path: plain floats (the compiler may still vectorise with the baseline ISA).
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
}  // namespace

void run_task_scalar(const TileJob& job, int64_t m0, int64_t m1, int64_t block_row, int64_t panel) {
  run_task<Scalar, 4>(job, m0, m1, block_row, panel);
}

}  // namespace lpvit
