// The machine's ceiling for exp-bound kernels: how many float32 exp_approx evaluations per second
// the CPU kernels' instruction-set path reaches on all threads, with nothing else to do (inputs
// in the L1 cache; 16-lane vectors with AVX-512, 8 lanes otherwise; four independent chains per
// thread). The benchmarks report the cross-view row kernels' exp evaluations per second as a
// fraction of it (issue #29).
#pragma once

#include <cstdint>

namespace pyops {
namespace simd {

// Runs `reps` sweeps of 4096 exps on every thread of ATen's pool; returns exps per second.
double exp_rate(int64_t reps);

}  // namespace simd
}  // namespace pyops
