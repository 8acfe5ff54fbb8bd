// The CPU kernels' instruction-set path (see cpu_isa.h).
#include "cpu_isa.h"

namespace pyops {
namespace cpu {

Isa detected_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  // __builtin_cpu_supports checks the CPU's features and that the OS saves their registers.
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
    if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return best;
#else
  return Isa::kBaseline;
#endif
}

namespace detail {
std::atomic<int> g_isa{static_cast<int>(detected_isa())};
}

bool set_isa(Isa level) {
  if (static_cast<int>(level) < 0 || static_cast<int>(level) > static_cast<int>(detected_isa())) return false;
  detail::g_isa.store(static_cast<int>(level), std::memory_order_relaxed);
  return true;
}

const char* isa_name(Isa level) {
  switch (level) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace cpu
}  // namespace pyops
