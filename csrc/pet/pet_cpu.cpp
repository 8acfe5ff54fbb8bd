// CPU kernels of pyops::joseph_project and pyops::joseph_backproject.
//
// Both work on a frames-last copy of the image, (n0 n1 n2, B), so that a voxel's B frames are
// contiguous: one line geometry serves the whole batch and the inner loops vectorise over B.
//  * projection: parallel over lines; every line accumulates its B sums in registers.
//  * back projection: deterministic and race-free without atomics or per-thread images. A line
//    whose principal axis is a writes plane i of the image (voxels with index i along a) only
//    at its step i. So the lines are grouped by principal axis, and for each axis the planes
//    are split into blocks processed in parallel: the task of a block visits the group's lines
//    in index order and adds their steps that fall in its planes. Every voxel thus receives its
//    contributions in one fixed order (axis 0 lines, then axis 1, then axis 2, each by index):
//    the result does not depend on the thread count.
// The weights come from pet_geometry.h (shared with the CUDA kernels): identical in both ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/cpu_isa.h"
#include "pet.h"
#include "pet_geometry.h"

namespace pyops {
namespace pet {
namespace {

template <typename T>
Line line_of(const T* s, const T* e, int64_t m, const Volume& v) {
  const double sd[3] = {static_cast<double>(s[3 * m]), static_cast<double>(s[3 * m + 1]),
                        static_cast<double>(s[3 * m + 2])};
  const double ed[3] = {static_cast<double>(e[3 * m]), static_cast<double>(e[3 * m + 1]),
                        static_cast<double>(e[3 * m + 2])};
  return make_line(sd, ed, v);
}

// The samples of a block of consecutive planes of a line: voxel offsets (-1 outside the image)
// and weights of the 4 bilinear corners, the formulas of plane_sample (pet_geometry.h) written
// branch-free so that the loop vectorises (in the AVX-512 / AVX2 / baseline builds of the line
// functions, csrc/common/cpu_isa.h).
constexpr int kBlock = 64;

struct Samples {  // corner-major so that the sampling loop stores whole vectors
  int64_t off[4][kBlock];
  double w[4][kBlock];
  bool any[4];  // corner j inside the image at some plane of the block (2D: the c + 1 corners never)
};

template <bool kAny>
inline __attribute__((always_inline)) void sample_block(const Line& L, int64_t i0, int n, const Volume& v,
                                                        Samples& out) {
  // index arithmetic in double (exact: offsets < 2^53) so that the loop vectorises
  const double stride[3] = {static_cast<double>(v.n[1] * v.n[2]), static_cast<double>(v.n[2]), 1.0};
  const double sa = stride[L.axis], sb = stride[L.b], sc = stride[L.c];
  const double nb = static_cast<double>(v.n[L.b]), nc = static_cast<double>(v.n[L.c]);
  const double f0b = L.f0[0], dfb = L.df[0], f0c = L.f0[1], dfc = L.df[1], step = L.step;
  const double first = static_cast<double>(i0);
  int any0 = 0, any1 = 0, any2 = 0, any3 = 0;
  for (int k = 0; k < n; ++k) {
    const double di = first + k;
    const double fb = f0b + di * dfb;
    const double fc = f0c + di * dfc;
    const double flb = std::floor(fb), flc = std::floor(fc);
    const double wb = fb - flb, wc = fc - flc;
    const bool b0 = (flb >= 0) & (flb < nb), b1 = (flb >= -1) & (flb < nb - 1);
    const bool c0 = (flc >= 0) & (flc < nc), c1 = (flc >= -1) & (flc < nc - 1);
    const double base = di * sa + flb * sb + flc * sc;
    out.w[0][k] = step * ((1 - wb) * (1 - wc));
    out.w[1][k] = step * (wb * (1 - wc));
    out.w[2][k] = step * ((1 - wb) * wc);
    out.w[3][k] = step * (wb * wc);
    out.off[0][k] = static_cast<int64_t>((b0 & c0) ? base : -1.0);
    out.off[1][k] = static_cast<int64_t>((b1 & c0) ? base + sb : -1.0);
    out.off[2][k] = static_cast<int64_t>((b0 & c1) ? base + sc : -1.0);
    out.off[3][k] = static_cast<int64_t>((b1 & c1) ? base + sb + sc : -1.0);
    if (kAny) {
      any0 |= b0 & c0;
      any1 |= b1 & c0;
      any2 |= b0 & c1;
      any3 |= b1 & c1;
    }
  }
  out.any[0] = !kAny || any0;
  out.any[1] = !kAny || any1;
  out.any[2] = !kAny || any2;
  out.any[3] = !kAny || any3;
}

// Frames-last layouts use a padded frame stride P: 1 for B == 1, else B rounded up to whole
// 32-byte vectors, so that 32-byte loads and stores of a voxel's frames never straddle a cache
// line. Padding lanes hold zeros and are never returned.
template <typename T>
int64_t frame_stride(int64_t B) {
  constexpr int64_t W = 32 / sizeof(T);
  return B == 1 ? 1 : (B + W - 1) / W * W;
}

// Calls f(std::integral_constant<int, G>{}) with the frame-group width G for a padded frame
// stride P > 1: G = P when P is 1 to 4 whole 32-byte vectors (all of a voxel's frames stay in
// registers), else one vector at a time. (Inlined into the ISA clones of its callers.)
template <typename T, typename F>
inline __attribute__((always_inline)) void with_group_width(int64_t P, F&& f) {
  constexpr int W = 32 / sizeof(T);
  if (P == W)
    f(std::integral_constant<int, W>{});
  else if (P == 2 * W)
    f(std::integral_constant<int, 2 * W>{});
  else if (P == 3 * W)
    f(std::integral_constant<int, 3 * W>{});
  else if (P == 4 * W)
    f(std::integral_constant<int, 4 * W>{});
  else
    f(std::integral_constant<int, W>{});
}

// Gathers line m's P sums from xT (N, P) into acc. P == 1: per-plane partial sums (gathers,
// vectorised), added in plane order. P > 1: groups of G lanes (G divides P) whose sums stay in
// registers over the whole line.
template <typename T, int G>
inline __attribute__((always_inline)) void project_line_groups(const Samples& S, int n, const T* xT, int64_t P,
                                                               T* acc) {
  for (int64_t g0 = 0; g0 < P; g0 += G) {
    T a[G];
    for (int t = 0; t < G; ++t) a[t] = acc[g0 + t];
    for (int k = 0; k < n; ++k)
      for (int j = 0; j < 4; ++j) {
        const int64_t o = S.off[j][k];
        if (o < 0) continue;  // (2D: predictable)
        const T wj = static_cast<T>(S.w[j][k]);
        const T* src = xT + o * P + g0;
        for (int t = 0; t < G; ++t) a[t] += wj * src[t];
      }
    for (int t = 0; t < G; ++t) acc[g0 + t] = a[t];
  }
}

template <typename T>
PYOPS_ALWAYS_INLINE void project_line_impl(const Line& L, const Volume& v, const T* xT, int64_t P, T* acc, Samples& S) {
  std::fill(acc, acc + P, T(0));
  for (int64_t i0 = L.lo; i0 <= L.hi; i0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, L.hi - i0 + 1));
    if (P == 1)
      sample_block<true>(L, i0, n, v, S);
    else
      sample_block<false>(L, i0, n, v, S);
    if (P == 1) {
      T part[kBlock];
      for (int k = 0; k < n; ++k) part[k] = 0;
      for (int j = 0; j < 4; ++j) {
        if (!S.any[j]) continue;
        for (int k = 0; k < n; ++k) {
          const int64_t o = S.off[j][k];
          const T xv = o >= 0 ? xT[o] : T(0);
          part[k] += static_cast<T>(S.w[j][k]) * xv;
        }
      }
      T a = acc[0];
      for (int k = 0; k < n; ++k) a += part[k];
      acc[0] = a;
    } else {
      with_group_width<T>(P, [&](auto G) __attribute__((always_inline)) {
        project_line_groups<T, decltype(G)::value>(S, n, xT, P, acc);
      });
    }
  }
}
PYOPS_ISA_CLONES(template <typename T>, void, project_line,
                 (const Line& L, const Volume& v, const T* xT, int64_t P, T* acc, Samples& S), (L, v, xT, P, acc, S))

// Adds w * yrow to the P values of every voxel of a sampled block; G lanes at a time (G
// divides P), so that a row of up to 4 vectors stays in registers.
template <typename T, int G>
inline __attribute__((always_inline)) void scatter_block(const Samples& S, int n, const T* yrow, int64_t P, T* xT) {
  for (int64_t g0 = 0; g0 < P; g0 += G) {
    T yv[G];
    for (int t = 0; t < G; ++t) yv[t] = yrow[g0 + t];
    for (int j = 0; j < 4; ++j) {
      if (!S.any[j]) continue;
      for (int k = 0; k < n; ++k) {
        const int64_t o = S.off[j][k];
        if (o < 0) continue;
        const T wj = static_cast<T>(S.w[j][k]);
        T* dst = xT + o * P + g0;
        for (int t = 0; t < G; ++t) dst[t] += wj * yv[t];
      }
    }
  }
}

// Scatters line m's steps i in [i0, i1] (P values yT row) into xT (N, P). The (up to 4) voxels
// of all steps of one line are distinct, so the order of one line's adds does not matter.
template <typename T>
PYOPS_ALWAYS_INLINE void backproject_line_impl(const Line& L, int64_t i0, int64_t i1, const Volume& v, const T* yrow,
                                               int64_t P, T* xT, Samples& S) {
  const int64_t first = std::max(i0, L.lo), last = std::min(i1, L.hi);
  for (int64_t p0 = first; p0 <= last; p0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, last - p0 + 1));
    sample_block<true>(L, p0, n, v, S);
    if (P == 1)
      scatter_block<T, 1>(S, n, yrow, P, xT);
    else
      with_group_width<T>(
          P, [&](auto G) __attribute__((always_inline)) { scatter_block<T, decltype(G)::value>(S, n, yrow, P, xT); });
  }
}
PYOPS_ISA_CLONES(template <typename T>, void, backproject_line,
                 (const Line& L, int64_t i0, int64_t i1, const Volume& v, const T* yrow, int64_t P, T* xT, Samples& S),
                 (L, i0, i1, v, yrow, P, xT, S))

constexpr int64_t kBlockBytes = 1024 * 1024;            // back projection: image bytes per task (~ L2)
constexpr int64_t kLineCacheBytes = int64_t{64} << 20;  // back projection: cached line geometries

// (B, rest...) -> zero-padded frames-last (numel / B, P)
at::Tensor frames_last(const at::Tensor& t, int64_t B, int64_t P) {
  const int64_t n = B == 0 ? 0 : t.numel() / B;
  if (P == 1) return t.contiguous().view({n, 1});
  at::Tensor out = at::zeros({n, P}, t.options());
  out.narrow(1, 0, B).copy_(t.reshape({B, n}).t());
  return out;
}

at::Tensor joseph_project_cpu(const at::Tensor& image, const at::Tensor& lor_start, const at::Tensor& lor_end,
                              at::ArrayRef<double> voxel_size, at::ArrayRef<double> image_origin) {
  const char* op = "joseph_project";
  checks::dim(image, 4, "image", "(B, n0, n1, n2)", op);
  check_lors(image, "image", lor_start, lor_end, op);
  const Volume v = make_volume(image.sizes().slice(1), "image.shape[1:]", voxel_size, image_origin, op);
  const int64_t B = image.size(0), M = lor_start.size(0), N = v.n[0] * v.n[1] * v.n[2];
  if (B == 0 || M == 0 || N == 0) return at::zeros({B, M}, image.options());
  const at::Tensor s = lor_start.contiguous(), e = lor_end.contiguous();
  at::Tensor yT;
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "joseph_project_cpu", [&] {
    const int64_t P = frame_stride<scalar_t>(B);
    const at::Tensor xT = frames_last(image, B, P);
    yT = at::empty({M, P}, image.options());
    const scalar_t* x = xT.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    scalar_t* y = yT.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
      Samples S;
      for (int64_t m = m0; m < m1; ++m) project_line(line_of(sp, ep, m, v), v, x, P, y + m * P, S);
    });
  });
  return B == 1 ? yT.view({1, M}) : yT.narrow(1, 0, B).t().contiguous();
}

at::Tensor joseph_backproject_cpu(const at::Tensor& y, const at::Tensor& lor_start, const at::Tensor& lor_end,
                                  at::IntArrayRef image_shape, at::ArrayRef<double> voxel_size,
                                  at::ArrayRef<double> image_origin) {
  const char* op = "joseph_backproject";
  checks::dim(y, 2, "y", "(B, M)", op);
  check_lors(y, "y", lor_start, lor_end, op);
  PYOPS_CHECK_VALUE(y.size(1) == lor_start.size(0), op, "y has ", y.size(1), " lines but lor_start has ",
                    lor_start.size(0));
  const Volume v = make_volume(image_shape, "image_shape", voxel_size, image_origin, op);
  const int64_t B = y.size(0), M = y.size(1), N = v.n[0] * v.n[1] * v.n[2];
  checks::mul_size(B, N, "the image (B, n0, n1, n2)", op);
  if (B == 0 || M == 0 || N == 0) return at::zeros({B, v.n[0], v.n[1], v.n[2]}, y.options());
  const at::Tensor s = lor_start.contiguous(), e = lor_end.contiguous();
  at::Tensor xT;
  int64_t P = 1;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "joseph_backproject_cpu", [&] {
    P = frame_stride<scalar_t>(B);
    const at::Tensor yT = frames_last(y, B, P);
    xT = at::zeros({N, P}, y.options());
    const scalar_t* yp = yT.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    scalar_t* x = xT.mutable_data_ptr<scalar_t>();
    // principal axis of every line (-1: touches nothing); the line geometries too when they
    // take little memory, else each block recomputes them
    const bool cache = M * static_cast<int64_t>(sizeof(Line)) <= kLineCacheBytes;
    std::vector<int8_t> axis(M);
    std::vector<Line> lines(cache ? M : 0);
    at::parallel_for(0, M, 1024, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const Line L = line_of(sp, ep, m, v);
        axis[m] = static_cast<int8_t>(L.axis);
        if (cache) lines[m] = L;
      }
    });
    const int64_t threads = at::get_num_threads();
    for (int a = 0; a < 3; ++a) {
      std::vector<int64_t> group;
      for (int64_t m = 0; m < M; ++m)
        if (axis[m] == a) group.push_back(m);
      if (group.empty()) continue;
      // plane blocks: one per thread, and (when the line geometries are cached) small enough
      // that a block's part of the image stays in the L2 cache
      const int64_t plane_bytes = N / v.n[a] * P * static_cast<int64_t>(sizeof(scalar_t));
      const int64_t per_block = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, plane_bytes));
      // (a multiple of the thread count, so that the threads get equal shares)
      const int64_t wanted = cache ? (v.n[a] + per_block - 1) / per_block : 1;
      const int64_t n_blocks = std::min<int64_t>(v.n[a], (wanted + threads - 1) / threads * threads);
      at::parallel_for(0, n_blocks, 1, [&](int64_t k0, int64_t k1) {
        Samples S;
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t i0 = k * v.n[a] / n_blocks, i1 = (k + 1) * v.n[a] / n_blocks - 1;
          for (const int64_t m : group) {
            const Line L = cache ? lines[m] : line_of(sp, ep, m, v);
            if (L.hi < i0 || L.lo > i1) continue;
            backproject_line(L, i0, i1, v, yp + m * P, P, x, S);
          }
        }
      });
    }
  });
  const at::Tensor out = B == 1 ? xT.view({1, N}) : xT.narrow(1, 0, B).t().contiguous();
  return out.view({B, v.n[0], v.n[1], v.n[2]});
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("joseph_project", &joseph_project_cpu);
  m.impl("joseph_backproject", &joseph_backproject_cpu);
}

}  // namespace pet
}  // namespace pyops
