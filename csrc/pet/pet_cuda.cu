// CUDA kernels of pyops::joseph_project / joseph_backproject: the torch-facing launcher.
//
// Checks the inputs as the CPU kernel does (pet.h), allocates the outputs and launches the
// kernels of pet_kernel.cuh on the current stream of the input's device. The back projection
// adds atomically, or runs the deterministic plane-by-plane kernels when
// torch.use_deterministic_algorithms(True) is on.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pet.h"
#include "pet_kernel.cuh"

namespace pyops {
namespace pet {
namespace {

at::Tensor joseph_project_cuda(const at::Tensor& image, const at::Tensor& lor_start, const at::Tensor& lor_end,
                               at::ArrayRef<double> voxel_size, at::ArrayRef<double> image_origin) {
  const char* op = "joseph_project";
  checks::dim(image, 4, "image", "(B, n0, n1, n2)", op);
  check_lors(image, "image", lor_start, lor_end, op);
  PYOPS_CHECK_VALUE(image.is_cuda(), op, "image must be a CUDA tensor, got ", image.device());
  const Volume v = make_volume(image.sizes().slice(1), "image.shape[1:]", voxel_size, image_origin, op);
  const c10::cuda::CUDAGuard guard(image.device());
  const int64_t B = image.size(0), M = lor_start.size(0);
  at::Tensor y = at::empty({B, M}, image.options());
  if (B == 0 || M == 0) return y;
  if (image.numel() == 0) return y.zero_();
  const at::Tensor x = image.contiguous(), s = lor_start.contiguous(), e = lor_end.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "joseph_project_cuda", [&] {
    launch_joseph_project<scalar_t>(x.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                    e.const_data_ptr<scalar_t>(), v, B, M, y.mutable_data_ptr<scalar_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor joseph_backproject_cuda(const at::Tensor& y, const at::Tensor& lor_start, const at::Tensor& lor_end,
                                   at::IntArrayRef image_shape, at::ArrayRef<double> voxel_size,
                                   at::ArrayRef<double> image_origin) {
  const char* op = "joseph_backproject";
  checks::dim(y, 2, "y", "(B, M)", op);
  check_lors(y, "y", lor_start, lor_end, op);
  PYOPS_CHECK_VALUE(y.is_cuda(), op, "y must be a CUDA tensor, got ", y.device());
  PYOPS_CHECK_VALUE(y.size(1) == lor_start.size(0), op, "y has ", y.size(1), " lines but lor_start has ",
                    lor_start.size(0));
  const Volume v = make_volume(image_shape, "image_shape", voxel_size, image_origin, op);
  checks::mul_size(y.size(0), v.n[0] * v.n[1] * v.n[2], "the image (B, n0, n1, n2)", op);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t B = y.size(0), M = y.size(1);
  at::Tensor x = at::zeros({B, v.n[0], v.n[1], v.n[2]}, y.options());
  if (B == 0 || M == 0 || x.numel() == 0) return x;
  const at::Tensor yc = y.contiguous(), s = lor_start.contiguous(), e = lor_end.contiguous();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor axis = deterministic ? at::empty({M}, y.options().dtype(at::kChar)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "joseph_backproject_cuda", [&] {
    launch_joseph_backproject<scalar_t>(yc.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                        e.const_data_ptr<scalar_t>(), v, B, M, x.mutable_data_ptr<scalar_t>(),
                                        deterministic, deterministic ? axis.mutable_data_ptr<int8_t>() : nullptr,
                                        stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("joseph_project", &joseph_project_cuda);
  m.impl("joseph_backproject", &joseph_backproject_cuda);
}

}  // namespace pet
}  // namespace pyops
