// The instruction-set path of the CPU kernels, chosen at run time and forceable.
//
// The vectorised CPU kernels exist in three builds: AVX-512 (x86-64-v4), AVX2 + FMA
// (x86-64-v3) and baseline x86-64. `pyops::cpu::isa()` is the one they run: by default the best
// one the CPU supports, else the one forced by `PYOPS_CPU_ISA=avx512|avx2|baseline` (read by
// pyops at import; a path the CPU cannot run is refused there, with a message) or set with
// `pyops.set_cpu_isa()`. Forcing a lower path lets one machine test every path.
//
// PYOPS_ISA_CLONES(template-prefix, ret, name, (params), (args)) defines, from an always-inline
// `name##_impl`, the three builds `name##_avx512`, `name##_avx2`, `name##_baseline` (each with its
// target attribute, so the inlined body is compiled and vectorised for that ISA) and `name`,
// which calls the build of the current path. On other architectures the three builds are the
// same code. Code that uses intrinsics directly tests `isa() >= Isa::kAvx512` itself.
#pragma once

#include <atomic>

namespace pyops {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best path this CPU (and OS) can run.
Isa detected_isa();

namespace detail {
extern std::atomic<int> g_isa;
}

inline Isa isa() {
  return static_cast<Isa>(detail::g_isa.load(std::memory_order_relaxed));
}

// Returns false (and changes nothing) when the CPU cannot run `level`.
bool set_isa(Isa level);

const char* isa_name(Isa level);

}  // namespace cpu
}  // namespace pyops

#define PYOPS_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define PYOPS_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define PYOPS_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define PYOPS_TARGET_AVX512
#define PYOPS_TARGET_AVX2
#endif

// The body of a dispatcher: returns name##_avx512 / _avx2 / _baseline args for the current path.
#define PYOPS_ISA_DISPATCH(name, args) \
  switch (::pyops::cpu::isa()) {       \
    case ::pyops::cpu::Isa::kAvx512:   \
      return name##_avx512 args;       \
    case ::pyops::cpu::Isa::kAvx2:     \
      return name##_avx2 args;         \
    default:                           \
      return name##_baseline args;     \
  }

#define PYOPS_ISA_CLONES(tmpl, ret, name, params, args) \
  tmpl PYOPS_TARGET_AVX512 ret name##_avx512 params {   \
    return name##_impl args;                            \
  }                                                     \
  tmpl PYOPS_TARGET_AVX2 ret name##_avx2 params {       \
    return name##_impl args;                            \
  }                                                     \
  tmpl ret name##_baseline params {                     \
    return name##_impl args;                            \
  }                                                     \
  tmpl ret name params {                                \
    PYOPS_ISA_DISPATCH(name, args)                      \
  }

// The same for a kernel templated on its float vector type: `name##_impl<VF16>` in the AVX-512
// build (one 64-byte register per vector), `name##_impl<VF8>` in the AVX2 and baseline builds.
#define PYOPS_ISA_CLONES_VEC(VF16, VF8, ret, name, params, args) \
  PYOPS_TARGET_AVX512 ret name##_avx512 params {                 \
    return name##_impl<VF16> args;                               \
  }                                                              \
  PYOPS_TARGET_AVX2 ret name##_avx2 params {                     \
    return name##_impl<VF8> args;                                \
  }                                                              \
  ret name##_baseline params {                                   \
    return name##_impl<VF8> args;                                \
  }                                                              \
  ret name params {                                              \
    PYOPS_ISA_DISPATCH(name, args)                               \
  }
