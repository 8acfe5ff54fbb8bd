// CUDA kernels of pyops::joseph_project / joseph_backproject (device code and host launch helpers).
//
// Self-contained: no torch / ATen headers, so that this file compiles with plain nvcc
// (tests/test_cuda_compile.py compiles it with -DPYOPS_COMPILE_CHECK, which adds explicit
// instantiations for float and double). The torch-facing launcher is pet_cuda.cu; the
// semantic model is the CPU kernel pet_cpu.cpp, and the weights come from pet_geometry.h
// (shared with it), so both ops use the same weights and are exact transposes.
//
// Layout: image x (B, N) and sinogram y (B, M) contiguous, N = n0 n1 n2 row-major; end points
// (M, 3) contiguous, all of one type T (float or double); geometry in double.
//  * projection: one thread per (batch entry, line), lines fastest (neighbouring threads trace
//    neighbouring lines through the same image); the sum stays in a register.
//  * back projection: one thread per (batch entry, line) adding its weighted value to the (up
//    to) four voxels of each plane with atomicAdd (the order of the adds varies from run to run).
//  * deterministic back projection (torch.use_deterministic_algorithms(True)): the CPU kernel's
//    scheme. A line whose principal axis is a writes image plane i (index i along a) only at its
//    step i, so one thread per (batch entry, plane i of axis a) visits the lines of axis a in
//    index order and adds their step i: no atomics, a fixed order per voxel (lines of axis 0,
//    then 1, then 2), the same as the CPU kernel. Slower (every thread scans all lines of its
//    axis); a pre-pass stores each line's principal axis so the scan skips the others cheaply.
#ifndef PYOPS_CSRC_PET_PET_KERNEL_CUH_
#define PYOPS_CSRC_PET_PET_KERNEL_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "pet_geometry.h"

namespace pyops {
namespace pet {

constexpr int kPetThreads = 256;

template <typename T>
__device__ __forceinline__ Line pet_line_at(const T* __restrict__ s, const T* __restrict__ e, int64_t m,
                                            const Volume& v) {
  const double sd[3] = {static_cast<double>(s[3 * m]), static_cast<double>(s[3 * m + 1]),
                        static_cast<double>(s[3 * m + 2])};
  const double ed[3] = {static_cast<double>(e[3 * m]), static_cast<double>(e[3 * m + 1]),
                        static_cast<double>(e[3 * m + 2])};
  return make_line(sd, ed, v);
}

template <typename T>
__global__ void joseph_project_kernel(const T* __restrict__ x, const T* __restrict__ s, const T* __restrict__ e,
                                      Volume v, int64_t B, int64_t M, T* __restrict__ y) {
  const int64_t N = v.n[0] * v.n[1] * v.n[2];
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < B * M;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / M, m = t % M;
    const Line L = pet_line_at(s, e, m, v);
    const T* xb = x + b * N;
    T acc = 0;
    int64_t off[4];
    double w[4];
    for (int64_t i = L.lo; i <= L.hi; ++i) {
      plane_sample(L, i, v, off, w);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (off[j] >= 0) acc += static_cast<T>(w[j]) * xb[off[j]];
    }
    y[t] = acc;
  }
}

template <typename T>
__global__ void joseph_backproject_atomic_kernel(const T* __restrict__ y, const T* __restrict__ s,
                                                 const T* __restrict__ e, Volume v, int64_t B, int64_t M,
                                                 T* __restrict__ x) {
  const int64_t N = v.n[0] * v.n[1] * v.n[2];
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < B * M;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T yv = y[t];
    if (yv == T(0)) continue;  // adds nothing (a NaN or inf value is still spread)
    const int64_t b = t / M, m = t % M;
    const Line L = pet_line_at(s, e, m, v);
    T* xb = x + b * N;
    int64_t off[4];
    double w[4];
    for (int64_t i = L.lo; i <= L.hi; ++i) {
      plane_sample(L, i, v, off, w);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (off[j] >= 0) atomicAdd(xb + off[j], static_cast<T>(w[j]) * yv);
    }
  }
}

template <typename T>
__global__ void joseph_line_axis_kernel(const T* __restrict__ s, const T* __restrict__ e, Volume v, int64_t M,
                                        int8_t* __restrict__ axis) {
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < M;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x)
    axis[m] = static_cast<int8_t>(pet_line_at(s, e, m, v).axis);
}

template <typename T>
__global__ void joseph_backproject_planes_kernel(const T* __restrict__ y, const T* __restrict__ s,
                                                 const T* __restrict__ e, const int8_t* __restrict__ axis, Volume v,
                                                 int64_t B, int64_t M, int a, T* __restrict__ x) {
  const int64_t N = v.n[0] * v.n[1] * v.n[2], P = v.n[a];
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < B * P;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / P, i = t % P;
    T* xb = x + b * N;
    const T* yb = y + b * M;
    int64_t off[4];
    double w[4];
    for (int64_t m = 0; m < M; ++m) {
      if (axis[m] != a) continue;
      const Line L = pet_line_at(s, e, m, v);
      if (i < L.lo || i > L.hi) continue;
      const T yv = yb[m];
      plane_sample(L, i, v, off, w);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (off[j] >= 0) xb[off[j]] += static_cast<T>(w[j]) * yv;
    }
  }
}

inline unsigned pet_blocks(int64_t work) {
  const int64_t blocks = (work + kPetThreads - 1) / kPetThreads;
  return static_cast<unsigned>(blocks < (int64_t{1} << 30) ? blocks : (int64_t{1} << 30));
}

// y (B, M) = A x, x (B, N).
template <typename T>
void launch_joseph_project(const T* x, const T* s, const T* e, const Volume& v, int64_t B, int64_t M, T* y,
                           cudaStream_t stream) {
  if (B * M == 0) return;
  joseph_project_kernel<T><<<pet_blocks(B * M), kPetThreads, 0, stream>>>(x, s, e, v, B, M, y);
}

// x (B, N) += A^T y, y (B, M); x zeroed by the caller. deterministic: axis is a device buffer
// of M bytes (scratch); else unused.
template <typename T>
void launch_joseph_backproject(const T* y, const T* s, const T* e, const Volume& v, int64_t B, int64_t M, T* x,
                               bool deterministic, int8_t* axis, cudaStream_t stream) {
  if (B * M == 0 || v.n[0] * v.n[1] * v.n[2] == 0) return;
  if (!deterministic) {
    joseph_backproject_atomic_kernel<T><<<pet_blocks(B * M), kPetThreads, 0, stream>>>(y, s, e, v, B, M, x);
    return;
  }
  joseph_line_axis_kernel<T><<<pet_blocks(M), kPetThreads, 0, stream>>>(s, e, v, M, axis);
  for (int a = 0; a < 3; ++a)  // one axis after the other: a fixed order of the adds per voxel
    joseph_backproject_planes_kernel<T>
        <<<pet_blocks(B * v.n[a]), kPetThreads, 0, stream>>>(y, s, e, axis, v, B, M, a, x);
}

#ifdef PYOPS_COMPILE_CHECK
// Stand-alone compile check (tests/test_cuda_compile.py): every supported type.
template void launch_joseph_project<float>(const float*, const float*, const float*, const Volume&, int64_t, int64_t,
                                           float*, cudaStream_t);
template void launch_joseph_project<double>(const double*, const double*, const double*, const Volume&, int64_t,
                                            int64_t, double*, cudaStream_t);
template void launch_joseph_backproject<float>(const float*, const float*, const float*, const Volume&, int64_t,
                                               int64_t, float*, bool, int8_t*, cudaStream_t);
template void launch_joseph_backproject<double>(const double*, const double*, const double*, const Volume&, int64_t,
                                                int64_t, double*, bool, int8_t*, cudaStream_t);
#endif

}  // namespace pet
}  // namespace pyops

#endif  // PYOPS_CSRC_PET_PET_KERNEL_CUH_
