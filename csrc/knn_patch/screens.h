// The screens of the global k-NN patch search on this CPU (knn_patch_cpu.cpp), for
// pyops._C._knn_screens() and the tests.
#pragma once

#include <string>
#include <vector>

namespace pyops {
namespace knn_patch {

// Names of the screens the global float32 search can use here, best first: "amx" (AMX bf16
// tiles), "avx512bf16" (AVX-512 bf16 dot products), "fp32" (float32 GEMM: the AVX-512
// micro-kernel, or BLAS on the avx2 / baseline paths). PYOPS_KNN_SCREEN=<name> picks one.
std::vector<std::string> available_screens();

}  // namespace knn_patch
}  // namespace pyops
