"""Joseph PET forward and back projection (an exactly matched pair) and scanner geometries.

Where each piece lives:

* schemas: ``csrc/pet/pet.cpp``; the line geometry shared by all kernels: ``csrc/pet/pet_geometry.h``
* CPU kernels: ``csrc/pet/pet_cpu.cpp``
* CUDA kernels: ``csrc/pet/pet_kernel.cuh`` (device code) and ``csrc/pet/pet_cuda.cu`` (launcher)
* fake kernels, autograd, input validation, public functions, ``JosephProjector`` and the
  geometries: this module
* pure-PyTorch reference: ``pyops/reference.py`` (``joseph_weights``, ``joseph_project``,
  ``joseph_backproject``)

Conventions: an image is ``(B, n0, n1, n2)`` (B = frames x batch); voxel ``(i0, i1, i2)`` has
its centre at ``image_origin + i * voxel_size`` (mm); ``image_origin=None`` centres the image
on (0, 0, 0). A line of response is the segment ``lor_start[m] -> lor_end[m]`` (mm). Joseph's
method steps through the voxel-centre planes of the line's principal axis (the axis where it is
longest) between its end points, interpolates the image bilinearly in each plane (voxels
outside the image count as 0) and weights each plane by the line's length between two planes.
``joseph_backproject`` is the exact transpose: both use the same weights, bit for bit.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._validation import check_int, check_same_device, check_tensor

__all__ = [
    "joseph_project",
    "joseph_backproject",
    "JosephProjector",
    "parallel_beam_2d",
    "ring_scanner",
    "ring_pairs",
]

_ops = torch.ops.pyops
_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _triple(value, name: str, fn: str, positive: bool) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    try:
        out = [float(v) for v in value]
    except TypeError:
        raise TypeError(f"{fn}: {name} must be a number or a sequence of 3 numbers, got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"{fn}: {name} must have 3 entries, got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{fn}: {name} must be finite, got {out}")
    if positive and not all(v > 0 for v in out):
        raise ValueError(f"{fn}: {name} must be > 0, got {out}")
    return out


def _geometry(image_shape, voxel_size, image_origin, fn):
    vox = _triple(voxel_size, "voxel_size", fn, positive=True)
    if image_origin is None:
        org = [-(n - 1) / 2 * v for n, v in zip(image_shape, vox)]
    else:
        org = _triple(image_origin, "image_origin", fn, positive=False)
    return vox, org


def _check_lors(lor_start, lor_end, ref: torch.Tensor, ref_name: str, fn: str) -> None:
    check_tensor(lor_start, "lor_start", fn)
    check_tensor(lor_end, "lor_end", fn)
    if lor_start.dim() != 2 or lor_start.shape[1] != 3:
        raise ValueError(f"{fn}: lor_start must have shape (M, 3), got {tuple(lor_start.shape)}")
    if lor_end.shape != lor_start.shape:
        raise ValueError(
            f"{fn}: lor_end must have the shape of lor_start {tuple(lor_start.shape)}, got {tuple(lor_end.shape)}"
        )
    if lor_start.dtype != ref.dtype or lor_end.dtype != ref.dtype:
        raise TypeError(
            f"{fn}: lor_start and lor_end must have the dtype of {ref_name} ({ref.dtype}), "
            f"got {lor_start.dtype} and {lor_end.dtype}"
        )
    check_same_device(fn, **{ref_name: ref, "lor_start": lor_start, "lor_end": lor_end})


def _check_values(x, name: str, dim: int, shape_text: str, fn: str) -> None:
    check_tensor(x, name, fn)
    if x.dtype not in _DTYPES:
        raise TypeError(f"{fn}: {name} must be float32 or float64, got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{fn}: {name} must have shape {shape_text}, got {tuple(x.shape)}")


_MAX_NUMEL = 2**62


def _check_op_geometry(shape, shape_name: str, voxel_size, image_origin, fn: str) -> None:
    """The registered ops' geometry: 3 sizes >= 0 (a product that fits), 3 finite voxel sizes
    > 0 and 3 finite origin coordinates (lists of numbers, as the schemas take them)."""
    if len(shape) != 3:
        raise ValueError(f"{fn}: {shape_name} must have 3 entries, got {list(shape)}")
    if any(n < 0 for n in shape):
        raise ValueError(f"{fn}: {shape_name} must be >= 0, got {list(shape)}")
    if math.prod(shape) > _MAX_NUMEL:
        raise ValueError(f"{fn}: {shape_name} {list(shape)} is too large")
    _triple(list(voxel_size), "voxel_size", fn, positive=True)
    _triple(list(image_origin), "image_origin", fn, positive=False)


def _check_project_op(image, lor_start, lor_end, voxel_size, image_origin, fn: str) -> None:
    _check_values(image, "image", 4, "(B, n0, n1, n2)", fn)
    _check_lors(lor_start, lor_end, image, "image", fn)
    _check_op_geometry(tuple(image.shape[1:]), "image.shape[1:]", voxel_size, image_origin, fn)


def _check_backproject_op(y, lor_start, lor_end, image_shape, voxel_size, image_origin, fn: str) -> None:
    _check_values(y, "y", 2, "(B, M)", fn)
    _check_lors(lor_start, lor_end, y, "y", fn)
    if y.shape[1] != lor_start.shape[0]:
        raise ValueError(f"{fn}: y has {y.shape[1]} lines (y.shape[1]) but lor_start has {lor_start.shape[0]}")
    _check_op_geometry(tuple(image_shape), "image_shape", voxel_size, image_origin, fn)
    if y.shape[0] * math.prod(image_shape) > _MAX_NUMEL:
        raise ValueError(f"{fn}: the image (B, n0, n1, n2) = {(y.shape[0], *image_shape)} is too large")


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------
def joseph_project(
    image: torch.Tensor, lor_start: torch.Tensor, lor_end: torch.Tensor, *, voxel_size, image_origin=None
) -> torch.Tensor:
    """Joseph forward projection of a batch of images along M lines of response.

    Args:
        image: (B, n0, n1, n2) float32 or float64 (B = frames x batch).
        lor_start, lor_end: (M, 3) end points in mm, the image's dtype and device.
        voxel_size: a number or 3 numbers (mm), finite and > 0.
        image_origin: the centre of voxel (0, 0, 0) in mm (3 numbers); None centres the image.

    Returns ``y`` (B, M): line integrals; lines that miss the image and degenerate lines give 0.
    Differentiable w.r.t. ``image`` (the gradient is ``joseph_backproject``).
    """
    fn = "joseph_project"
    _check_values(image, "image", 4, "(B, n0, n1, n2)", fn)
    _check_lors(lor_start, lor_end, image, "image", fn)
    vox, org = _geometry(tuple(image.shape[1:]), voxel_size, image_origin, fn)
    return _ops.joseph_project(image, lor_start, lor_end, vox, org)


def joseph_backproject(
    y: torch.Tensor,
    lor_start: torch.Tensor,
    lor_end: torch.Tensor,
    *,
    image_shape: Sequence[int],
    voxel_size,
    image_origin=None,
) -> torch.Tensor:
    """The exact transpose of ``joseph_project``: ``<A x, y> = <x, A^T y>``.

    Args:
        y: (B, M) float32 or float64; lor_start, lor_end: (M, 3), y's dtype and device.
        image_shape: (n0, n1, n2); voxel_size, image_origin: as ``joseph_project``.

    Returns (B, n0, n1, n2), differentiable w.r.t. ``y`` (the gradient is ``joseph_project``).
    The CPU kernel is deterministic (independent of the thread count); the CUDA kernel adds
    atomically unless ``torch.use_deterministic_algorithms(True)``.
    """
    fn = "joseph_backproject"
    _check_values(y, "y", 2, "(B, M)", fn)
    _check_lors(lor_start, lor_end, y, "y", fn)
    if y.shape[1] != lor_start.shape[0]:
        raise ValueError(f"{fn}: y has {y.shape[1]} lines (y.shape[1]) but lor_start has {lor_start.shape[0]}")
    if isinstance(image_shape, torch.Size):
        image_shape = tuple(image_shape)
    if not isinstance(image_shape, (tuple, list)):
        raise TypeError(f"{fn}: image_shape must be 3 ints (n0, n1, n2), got {type(image_shape).__name__}")
    if len(image_shape) != 3:
        raise ValueError(f"{fn}: image_shape must be 3 ints (n0, n1, n2), got {image_shape!r}")
    shape = [check_int(n, "image_shape entries", fn, 0) for n in image_shape]
    vox, org = _geometry(tuple(shape), voxel_size, image_origin, fn)
    return _ops.joseph_backproject(y, lor_start, lor_end, shape, vox, org)


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd (each op's gradient is the other op)
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("pyops::joseph_project")
def _project_fake(image, lor_start, lor_end, voxel_size, image_origin):
    _check_project_op(image, lor_start, lor_end, voxel_size, image_origin, "pyops::joseph_project")
    return image.new_empty((image.shape[0], lor_start.shape[0]))


@torch.library.register_fake("pyops::joseph_backproject")
def _backproject_fake(y, lor_start, lor_end, image_shape, voxel_size, image_origin):
    _check_backproject_op(y, lor_start, lor_end, image_shape, voxel_size, image_origin, "pyops::joseph_backproject")
    return y.new_empty((y.shape[0], *image_shape))


def _project_setup(ctx, inputs, output):
    image, lor_start, lor_end, voxel_size, image_origin = inputs
    ctx.save_for_backward(lor_start, lor_end)
    ctx.geometry = (list(image.shape[1:]), voxel_size, image_origin)


def _project_backward(ctx, grad_y):
    lor_start, lor_end = ctx.saved_tensors
    shape, vox, org = ctx.geometry
    grad = _ops.joseph_backproject(grad_y, lor_start, lor_end, shape, vox, org) if ctx.needs_input_grad[0] else None
    return grad, None, None, None, None


def _backproject_setup(ctx, inputs, output):
    y, lor_start, lor_end, image_shape, voxel_size, image_origin = inputs
    ctx.save_for_backward(lor_start, lor_end)
    ctx.geometry = (voxel_size, image_origin)


def _backproject_backward(ctx, grad_image):
    lor_start, lor_end = ctx.saved_tensors
    vox, org = ctx.geometry
    grad = _ops.joseph_project(grad_image, lor_start, lor_end, vox, org) if ctx.needs_input_grad[0] else None
    return grad, None, None, None, None, None


torch.library.register_autograd("pyops::joseph_project", _project_backward, setup_context=_project_setup)
torch.library.register_autograd("pyops::joseph_backproject", _backproject_backward, setup_context=_backproject_setup)


# --------------------------------------------------------------------------------------------
# Projector module
# --------------------------------------------------------------------------------------------
def _image_shape3(image_shape, fn: str) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) == 2:
        shape = shape + (1,)
    if len(shape) != 3:
        raise ValueError(f"{fn}: image_shape must be (n0, n1) or (n0, n1, n2), got {image_shape!r}")
    return tuple(check_int(n, "image_shape entries", fn, 1) for n in shape)


class JosephProjector(torch.nn.Module):
    """A fixed-geometry Joseph projector ``A`` as a module: ``A(x)``, ``A.adjoint(y)``, ``A.norm()``.

    ``x`` is (B, n0, n1, n2) or one unbatched (n0, n1, n2) image; ``y`` is (B, M) or (M,). The
    end points are buffers (they move with ``.to(device)``); images of another floating dtype
    are projected with the end points cast to it.
    """

    def __init__(self, image_shape, voxel_size, lor_start: torch.Tensor, lor_end: torch.Tensor, image_origin=None):
        super().__init__()
        fn = "JosephProjector"
        self.image_shape = _image_shape3(image_shape, fn)
        self.voxel_size, self.image_origin = _geometry(self.image_shape, voxel_size, image_origin, fn)
        check_tensor(lor_start, "lor_start", fn)
        _check_lors(lor_start, lor_end, lor_start, "lor_start", fn)
        self.register_buffer("lor_start", lor_start.detach().clone())
        self.register_buffer("lor_end", lor_end.detach().clone())

    @property
    def num_lines(self) -> int:
        return self.lor_start.shape[0]

    def _lors(self, dtype):
        return self.lor_start.to(dtype), self.lor_end.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        xb = x[None] if unbatched else x
        if tuple(xb.shape[1:]) != self.image_shape:
            raise ValueError(
                f"JosephProjector: image must have shape (B, {', '.join(map(str, self.image_shape))}) "
                f"or the unbatched shape, got {tuple(x.shape)}"
            )
        y = joseph_project(xb, *self._lors(x.dtype), voxel_size=self.voxel_size, image_origin=self.image_origin)
        return y[0] if unbatched else y

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        unbatched = y.dim() == 1
        yb = y[None] if unbatched else y
        x = joseph_backproject(
            yb,
            *self._lors(y.dtype),
            image_shape=self.image_shape,
            voxel_size=self.voxel_size,
            image_origin=self.image_origin,
        )
        return x[0] if unbatched else x

    @torch.no_grad()
    def norm(self, num_iter: int = 50, seed: int = 0) -> float:
        """Operator 2-norm ``||A||`` by power iteration on ``A^T A`` (float64)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.rand((1, *self.image_shape), generator=g, dtype=torch.float64).to(self.lor_start.device)
        s, e = self._lors(torch.float64)
        kw = dict(voxel_size=self.voxel_size, image_origin=self.image_origin)
        value = 0.0
        for _ in range(num_iter):
            x = x / x.norm().clamp_min(1e-300)
            x = joseph_backproject(joseph_project(x, s, e, **kw), s, e, image_shape=self.image_shape, **kw)
            value = x.norm().item()  # ||A^T A x|| -> ||A||^2
            if value == 0.0:
                return 0.0
        return math.sqrt(value)

    def extra_repr(self) -> str:
        return (
            f"image_shape={self.image_shape}, voxel_size={self.voxel_size}, "
            f"image_origin={self.image_origin}, num_lines={self.num_lines}"
        )


# --------------------------------------------------------------------------------------------
# Geometries (lines in a frame centred on the image: use image_origin=None)
# --------------------------------------------------------------------------------------------
def parallel_beam_2d(
    image_shape,
    num_views: int,
    num_radial: int,
    radial_spacing: Optional[float] = None,
    *,
    voxel_size=1.0,
    dtype: torch.dtype = torch.float32,
    device=None,
):
    """Parallel-beam lines through one slice, ordered (view, radial bin).

    Views at angles ``pi * v / num_views`` over [0, pi); at view angle phi the lines run along
    ``(cos phi, sin phi, 0)`` and bin ``r`` sits at signed distance ``(r - (num_radial - 1) / 2) *
    radial_spacing`` along ``(-sin phi, cos phi, 0)`` from the image centre, so
    ``y.view(B, num_views, num_radial)`` is a sinogram (at view 0, lines along axis 0, bins along
    axis 1, as ``skimage.transform.radon`` at theta = 0). ``radial_spacing`` defaults to the
    smaller in-plane voxel size; ``voxel_size`` is the image's (mm). Every line spans the
    whole image. Returns ``(lor_start, lor_end)``, each (num_views * num_radial, 3).
    """
    fn = "parallel_beam_2d"
    shape = _image_shape3(image_shape, fn)
    if shape[2] != 1:
        raise ValueError(f"{fn}: image_shape must be one slice ((n0, n1) or (n0, n1, 1)), got {tuple(image_shape)}")
    num_views = check_int(num_views, "num_views", fn, 1)
    num_radial = check_int(num_radial, "num_radial", fn, 1)
    vox = _triple(voxel_size, "voxel_size", fn, positive=True)
    spacing = min(vox[0], vox[1]) if radial_spacing is None else float(radial_spacing)
    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"{fn}: radial_spacing must be finite and > 0, got {radial_spacing}")
    phi = torch.arange(num_views, dtype=torch.float64) * (math.pi / num_views)
    r = (torch.arange(num_radial, dtype=torch.float64) - (num_radial - 1) / 2) * spacing
    half = 0.5 * math.hypot(shape[0] * vox[0], shape[1] * vox[1]) + max(vox[0], vox[1])
    u = torch.stack([phi.cos(), phi.sin(), torch.zeros_like(phi)], -1)  # (V, 3) line direction
    nrm = torch.stack([-phi.sin(), phi.cos(), torch.zeros_like(phi)], -1)  # (V, 3) radial direction
    centre = nrm[:, None, :] * r[None, :, None]  # (V, R, 3)
    start = (centre - half * u[:, None, :]).reshape(-1, 3)
    end = (centre + half * u[:, None, :]).reshape(-1, 3)
    return start.to(dtype=dtype, device=device), end.to(dtype=dtype, device=device)


def ring_pairs(num_rings: int, max_ring_difference: Optional[int] = None) -> list[tuple[int, int]]:
    """The (ring of the first detector, ring of the second) pairs of ``ring_scanner``, in its
    order: by ring difference r2 - r1 = 0, +1, -1, +2, -2, ... (Michelogram segments), then by r1."""
    num_rings = check_int(num_rings, "num_rings", "ring_pairs", 1)
    mrd = (
        num_rings - 1
        if max_ring_difference is None
        else check_int(max_ring_difference, "max_ring_difference", "ring_pairs", 0)
    )
    pairs = []
    for delta in range(0, min(mrd, num_rings - 1) + 1):
        for sgn in (1,) if delta == 0 else (1, -1):
            dd = sgn * delta
            pairs += [(r1, r1 + dd) for r1 in range(num_rings) if 0 <= r1 + dd < num_rings]
    return pairs


def ring_scanner(
    radius: float,
    num_detectors: int,
    num_rings: int = 1,
    ring_spacing: float = 4.0,
    max_ring_difference: Optional[int] = None,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
):
    """Lines between all detector pairs of a cylindrical scanner, grouped as sinograms.

    Detector ``d`` of ring ``q`` sits at ``(R cos(2 pi d / N), R sin(2 pi d / N),
    (q - (num_rings - 1) / 2) * ring_spacing)`` (mm; N = num_detectors, even). A detector pair is
    the (view v, radial bin j) entry, v in [0, N/2), j in [0, N - 1), that joins detectors
    ``d1 = v + ceil(s / 2)`` and ``d2 = v - floor(s / 2)`` (mod N) with ``s = j + 1``: lines of
    view v are (nearly) parallel at angle ``2 pi v / N`` and j runs across the field of view
    (odd and even s interleaved, as PET sinograms do). Every unordered pair appears once.
    Ring pairs ``(q1, q2)`` (q1 for d1) with ``|q1 - q2| <= max_ring_difference`` (default: all)
    in the order of ``ring_pairs``. The lines are ordered (ring pair, view, radial bin):
    ``y.view(B, len(ring_pairs(...)), N // 2, N - 1)``. Returns ``(lor_start, lor_end)``.
    """
    fn = "ring_scanner"
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"{fn}: radius must be finite and > 0, got {radius}")
    N = check_int(num_detectors, "num_detectors", fn, 2)
    if N % 2:
        raise ValueError(f"{fn}: num_detectors must be even, got {N}")
    num_rings = check_int(num_rings, "num_rings", fn, 1)
    ring_spacing = float(ring_spacing)
    if not (math.isfinite(ring_spacing) and ring_spacing > 0):
        raise ValueError(f"{fn}: ring_spacing must be finite and > 0, got {ring_spacing}")
    pairs = torch.tensor(ring_pairs(num_rings, max_ring_difference), dtype=torch.float64)  # (P, 2)
    v = torch.arange(N // 2)[:, None]
    s = torch.arange(1, N)[None, :]
    d1 = (v + (s + 1) // 2) % N
    d2 = (v - s // 2) % N
    ang = lambda d: d.to(torch.float64) * (2 * math.pi / N)
    xy1 = torch.stack([radius * ang(d1).cos(), radius * ang(d1).sin()], -1).reshape(-1, 2)  # (V*R, 2)
    xy2 = torch.stack([radius * ang(d2).cos(), radius * ang(d2).sin()], -1).reshape(-1, 2)
    z = (pairs - (num_rings - 1) / 2) * ring_spacing  # (P, 2)
    n_lines = xy1.shape[0]
    start = torch.cat([xy1.expand(len(pairs), n_lines, 2), z[:, None, :1].expand(-1, n_lines, 1)], -1)
    end = torch.cat([xy2.expand(len(pairs), n_lines, 2), z[:, None, 1:].expand(-1, n_lines, 1)], -1)
    return start.reshape(-1, 3).to(dtype=dtype, device=device), end.reshape(-1, 3).to(dtype=dtype, device=device)
