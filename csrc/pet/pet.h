// Input checks shared by the CPU and CUDA launchers of the Joseph projector ops.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "pet_geometry.h"

namespace pyops {
namespace pet {

inline void check_lors(const at::Tensor& ref, const char* ref_name, const at::Tensor& s,
                       const at::Tensor& e, const char* fn) {
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, fn, ": ",
              ref_name, " must be float32 or float64, got ", ref.scalar_type());
  TORCH_CHECK(s.dim() == 2 && s.size(1) == 3, fn, ": lor_start must have shape (M, 3), got ", s.sizes());
  TORCH_CHECK(e.sizes() == s.sizes(), fn, ": lor_end must have the shape of lor_start ", s.sizes(),
              ", got ", e.sizes());
  TORCH_CHECK(s.scalar_type() == ref.scalar_type() && e.scalar_type() == ref.scalar_type(), fn,
              ": lor_start and lor_end must have the dtype of ", ref_name, " (", ref.scalar_type(), ")");
  TORCH_CHECK(s.device() == ref.device() && e.device() == ref.device(), fn,
              ": lor_start, lor_end and ", ref_name, " must be on one device");
}

inline Volume make_volume(at::IntArrayRef shape, at::ArrayRef<double> vox, at::ArrayRef<double> origin,
                          const char* fn) {
  TORCH_CHECK(vox.size() == 3, fn, ": voxel_size must have 3 entries, got ", vox.size());
  TORCH_CHECK(origin.size() == 3, fn, ": image_origin must have 3 entries, got ", origin.size());
  Volume v;
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK(std::isfinite(vox[k]) && vox[k] > 0, fn, ": voxel_size must be finite and > 0, got ", vox);
    TORCH_CHECK(std::isfinite(origin[k]), fn, ": image_origin must be finite, got ", origin);
    TORCH_CHECK(shape[k] >= 0, fn, ": image dimensions must be >= 0, got ", shape);
    v.n[k] = shape[k];
    v.vox[k] = vox[k];
    v.origin[k] = origin[k];
  }
  return v;
}

}  // namespace pet
}  // namespace pyops
