// Transparent huge pages for large fresh outputs of the CPU kernels.
//
// A fresh CPU tensor of hundreds of MiB (the two gradients of a cross_view_kl backward, for
// example) is mapped page by page on first touch: one page fault per 4 KiB, about as long as
// the kernel that fills it. advise_huge_pages(t) asks Linux to back the 2 MiB-aligned part of
// t's memory with huge pages (madvise MADV_HUGEPAGE: 512 times fewer faults) before it is first
// written; it does nothing for small tensors, off Linux, or where the system's
// transparent_hugepage setting is "never". (PyTorch does the same for every large CPU
// allocation when THP_MEM_ALLOC_ENABLE=1.)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyops {
namespace mem {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge || !t.is_cpu()) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);  // advisory
#else
  (void)t;
#endif
}

}  // namespace mem
}  // namespace pyops
