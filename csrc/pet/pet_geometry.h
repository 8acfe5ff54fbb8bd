// Joseph's line geometry, shared by the CPU kernels (pet_cpu.cpp) and the CUDA kernels
// (pet_kernel.cuh): one source of the weights. Within a device the projection and the back
// projection compute every weight with the same code (CUDA: plane_sample; CPU: the same
// formulas in the vectorised sample_block of pet_cpu.cpp), so they use bitwise-identical
// weights and are exact transposes of each other.
//
// Volume: an (n0, n1, n2) image whose voxel (i0, i1, i2) has its centre at origin + i * vox (mm).
// A line of response is the segment from `s` to `e` (mm). Along its principal axis a (the axis
// where |e - s| is largest, the lowest one on ties) it crosses the voxel-centre planes
// x_a = origin_a + i vox_a, i = lo..hi (those between s and e inside the image). In plane i it
// samples the image bilinearly at the fractional indices f_b(i) = f0 + i df (the two other
// axes b < c; voxels outside the image count as 0), weighted by the line's length between two
// planes, vox_a |e - s| / |e_a - s_a|. All geometry is in double precision whatever the image
// type; a line with start == end or a non-finite coordinate touches nothing.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYOPS_HD __host__ __device__ __forceinline__
#else
#define PYOPS_HD inline
#endif

namespace pyops {
namespace pet {

struct Volume {
  int64_t n[3];
  double vox[3];
  double origin[3];
};

struct Line {
  int axis;             // principal axis a; -1: the line touches no voxel
  int b, c;             // the two other axes, b < c
  int64_t lo, hi;       // planes lo..hi along a (empty when lo > hi)
  double f0[2], df[2];  // fractional index along b (0) and c (1) in plane i: f0 + i * df
  double step;          // line length between two consecutive planes (mm)
};

// true for finite x (inf - inf and NaN - NaN are NaN); portable to host and device code
PYOPS_HD bool is_finite(double x) {
  return x - x == 0;
}

// Principal axis of the segment s -> e (-1 when s == e or not finite).
PYOPS_HD int principal_axis(const double d[3]) {
  int a = 0;
  if (fabs(d[1]) > fabs(d[a])) a = 1;
  if (fabs(d[2]) > fabs(d[a])) a = 2;
  return fabs(d[a]) > 0 && is_finite(d[0]) && is_finite(d[1]) && is_finite(d[2]) ? a : -1;
}

// min / max without libm calls (NaN operands are caught by make_line's final checks)
PYOPS_HD double dmin(double a, double b) {
  return a < b ? a : b;
}
PYOPS_HD double dmax(double a, double b) {
  return a > b ? a : b;
}

// Restrict [lo, hi] to the planes where f0 + i * df is within (-1, n): elsewhere the bilinear
// footprint misses the image. Conservative (one plane of slack each side): the per-corner
// checks of plane_sample decide.
PYOPS_HD void clip_planes(double f0, double df, int64_t n, double& lo, double& hi) {
  if (df == 0) {
    if (!(f0 > -1 && f0 < static_cast<double>(n))) hi = lo - 1;
    return;
  }
  const double t1 = (-1 - f0) / df, t2 = (static_cast<double>(n) - f0) / df;
  lo = dmax(lo, floor(dmin(t1, t2)) - 1);
  hi = dmin(hi, ceil(dmax(t1, t2)) + 1);
}

PYOPS_HD Line make_line(const double s[3], const double e[3], const Volume& v) {
  Line L;
  L.axis = -1;
  L.b = 1;
  L.c = 2;
  L.lo = 0;
  L.hi = -1;
  L.f0[0] = L.f0[1] = L.df[0] = L.df[1] = L.step = 0;
  const double d[3] = {e[0] - s[0], e[1] - s[1], e[2] - s[2]};
  const int a = principal_axis(d);
  if (a < 0 || !is_finite(s[0]) || !is_finite(s[1]) || !is_finite(s[2])) return L;
  const int b = a == 0 ? 1 : 0, c = a == 2 ? 1 : 2;
  const double inv = 1.0 / d[a];
  const double len = sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
  const int ax[2] = {b, c};
  for (int k = 0; k < 2; ++k) {
    const int x = ax[k];
    L.f0[k] = (s[x] + (v.origin[a] - s[a]) * inv * d[x] - v.origin[x]) / v.vox[x];
    L.df[k] = v.vox[a] * inv * d[x] / v.vox[x];
  }
  // planes between s and e (closed segment), inside the image
  double lo = ceil((dmin(s[a], e[a]) - v.origin[a]) / v.vox[a]);
  double hi = floor((dmax(s[a], e[a]) - v.origin[a]) / v.vox[a]);
  lo = dmax(lo, 0.0);
  hi = dmin(hi, static_cast<double>(v.n[a] - 1));
  clip_planes(L.f0[0], L.df[0], v.n[b], lo, hi);
  clip_planes(L.f0[1], L.df[1], v.n[c], lo, hi);
  // (an overflow to inf or NaN anywhere: the line touches nothing)
  if (!(lo <= hi) || !is_finite(lo) || !is_finite(hi) || !is_finite(L.f0[0] + L.df[0] + L.f0[1] + L.df[1])) return L;
  L.axis = a;
  L.b = b;
  L.c = c;
  L.lo = static_cast<int64_t>(lo);
  L.hi = static_cast<int64_t>(hi);
  L.step = v.vox[a] * len * fabs(inv);
  return L;
}

// The (up to) four voxels of plane i of line L and their weights: off[j] is the voxel's
// row-major offset in the (n0, n1, n2) image, or -1 when outside the image.
PYOPS_HD void plane_sample(const Line& L, int64_t i, const Volume& v, int64_t off[4], double w[4]) {
  const double fb = L.f0[0] + static_cast<double>(i) * L.df[0];
  const double fc = L.f0[1] + static_cast<double>(i) * L.df[1];
  const double flb = floor(fb), flc = floor(fc);
  const double wb = fb - flb, wc = fc - flc;
  const int64_t ib = static_cast<int64_t>(flb), ic = static_cast<int64_t>(flc);
  const int64_t stride[3] = {v.n[1] * v.n[2], v.n[2], 1};
  const int64_t base = i * stride[L.axis];
  const int64_t nb = v.n[L.b], nc = v.n[L.c];
  const bool b0 = ib >= 0 && ib < nb, b1 = ib + 1 >= 0 && ib + 1 < nb;
  const bool c0 = ic >= 0 && ic < nc, c1 = ic + 1 >= 0 && ic + 1 < nc;
  const int64_t sb = stride[L.b], sc = stride[L.c];
  w[0] = L.step * ((1 - wb) * (1 - wc));
  w[1] = L.step * (wb * (1 - wc));
  w[2] = L.step * ((1 - wb) * wc);
  w[3] = L.step * (wb * wc);
  off[0] = b0 && c0 ? base + ib * sb + ic * sc : -1;
  off[1] = b1 && c0 ? base + (ib + 1) * sb + ic * sc : -1;
  off[2] = b0 && c1 ? base + ib * sb + (ic + 1) * sc : -1;
  off[3] = b1 && c1 ? base + (ib + 1) * sb + (ic + 1) * sc : -1;
}

}  // namespace pet
}  // namespace pyops
