// exp_rate (exp_rate.h): the exp throughput ceiling of the CPU kernels' instruction-set path.
#include "exp_rate.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <vector>

#include "simd_math.h"

namespace pyops {
namespace simd {
namespace {

constexpr int64_t kN = 4096;  // floats per sweep (16 KiB: stays in the L1 cache)

// `reps` sweeps over x; four independent vector chains so that neither the adds' latency nor one
// exp's dependency chain limits the rate. Returns a sum (kept, so that nothing is optimised away).
template <typename VF>
PYOPS_ALWAYS_INLINE float exp_sweeps_impl(const float* x, int64_t reps) {
  constexpr int64_t L = kLanesOf<VF>;
  VF s0{}, s1{}, s2{}, s3{};
  for (int64_t r = 0; r < reps; ++r) {
    const VF shift = vsplat<VF>(-1e-3f * static_cast<float>(r & 7));
    for (int64_t i = 0; i < kN; i += 4 * L) {
      s0 += exp_approx(vload<VF>(x + i) + shift);
      s1 += exp_approx(vload<VF>(x + i + L) + shift);
      s2 += exp_approx(vload<VF>(x + i + 2 * L) + shift);
      s3 += exp_approx(vload<VF>(x + i + 3 * L) + shift);
    }
  }
  return hsum((s0 + s1) + (s2 + s3));
}
PYOPS_ISA_CLONES_VEC(vf16, vf8, float, exp_sweeps, (const float* x, int64_t reps), (x, reps))

}  // namespace

double exp_rate(int64_t reps) {
  reps = std::max<int64_t>(reps, 1);
  std::vector<float> x(kN);
  for (int64_t i = 0; i < kN; ++i) x[i] = -20.0f * static_cast<float>(i) / kN;  // softmax-like arguments <= 0
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> sink{0};
  exp_sweeps(x.data(), 1);  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      std::vector<float> local(x);  // each thread its own copy in its own cache
      sink += static_cast<int64_t>(exp_sweeps(local.data(), reps) > 0);
    }
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sink.load() >= 0 ? static_cast<double>(threads * reps * kN) / secs : 0.0;
}

}  // namespace simd
}  // namespace pyops
