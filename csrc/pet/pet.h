// Input checks shared by the CPU and CUDA launchers of the Joseph projector ops.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "../common/checks.h"
#include "pet_geometry.h"

namespace pyops {
namespace pet {

inline void check_lors(const at::Tensor& ref, const char* ref_name, const at::Tensor& s, const at::Tensor& e,
                       const char* op) {
  checks::float32_or_64(ref, ref_name, op);
  PYOPS_CHECK_VALUE(s.dim() == 2 && s.size(1) == 3, op, "lor_start must have shape (M, 3), got ", s.sizes());
  PYOPS_CHECK_VALUE(e.sizes() == s.sizes(), op, "lor_end must have the shape of lor_start ", s.sizes(), ", got ",
                    e.sizes());
  checks::same_dtype(s, "lor_start", ref, ref_name, op);
  checks::same_dtype(e, "lor_end", ref, ref_name, op);
  checks::same_device(s, "lor_start", ref, ref_name, op);
  checks::same_device(e, "lor_end", ref, ref_name, op);
}

// shape: the image's (n0, n1, n2) (shape_name: where it comes from)
inline Volume make_volume(at::IntArrayRef shape, const char* shape_name, at::ArrayRef<double> vox,
                          at::ArrayRef<double> origin, const char* op) {
  PYOPS_CHECK_VALUE(shape.size() == 3, op, shape_name, " must have 3 entries, got ", shape);
  PYOPS_CHECK_VALUE(vox.size() == 3, op, "voxel_size must have 3 entries, got ", vox.size());
  PYOPS_CHECK_VALUE(origin.size() == 3, op, "image_origin must have 3 entries, got ", origin.size());
  Volume v;
  for (int k = 0; k < 3; ++k) {
    PYOPS_CHECK_VALUE(std::isfinite(vox[k]) && vox[k] > 0, op, "voxel_size must be finite and > 0, got ", vox);
    PYOPS_CHECK_VALUE(std::isfinite(origin[k]), op, "image_origin must be finite, got ", origin);
    PYOPS_CHECK_VALUE(shape[k] >= 0, op, shape_name, " must be >= 0, got ", shape);
    v.n[k] = shape[k];
    v.vox[k] = vox[k];
    v.origin[k] = origin[k];
  }
  checks::mul_size(checks::mul_size(shape[0], shape[1], shape_name, op), shape[2], shape_name, op);
  return v;
}

}  // namespace pet
}  // namespace pyops
