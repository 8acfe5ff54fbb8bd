// Schemas of the Joseph PET projector ops.
//
//   joseph_project(image (B, n0, n1, n2), lor_start (M, 3), lor_end (M, 3), voxel_size [3],
//                  image_origin [3]) -> y (B, M)
//     y[b, m] = sum over the planes crossed by line m of (line length between planes) x
//     (bilinear interpolation of image[b] in the plane); see pet_geometry.h.
//   joseph_backproject(y (B, M), lor_start, lor_end, image_shape [3], voxel_size [3],
//                      image_origin [3]) -> image (B, n0, n1, n2)
//     the exact transpose of joseph_project (same weights, pet_geometry.h).
// float32 or float64; end points have the image's (y's) dtype and device; positions in mm,
// image_origin the centre of voxel (0, 0, 0).
// Kernels: pet_cpu.cpp (CPU), pet_cuda.cu + pet_kernel.cuh (CUDA). Fakes, autograd (each op's
// gradient is the other op) and validation: pyops/pet.py. Reference: pyops/reference.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def(
      "joseph_project(Tensor image, Tensor lor_start, Tensor lor_end, float[] voxel_size, "
      "float[] image_origin) -> Tensor");
  m.def(
      "joseph_backproject(Tensor y, Tensor lor_start, Tensor lor_end, int[] image_shape, "
      "float[] voxel_size, float[] image_origin) -> Tensor");
}
