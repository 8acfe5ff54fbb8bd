"""pyops.joseph_project / joseph_backproject and pyops.pet against pyops.reference (CPU)."""

import math

import pytest
import torch

import pyops
from pyops import pet, reference


def random_lines(M, shape, vox, origin, dtype, g=None, outside=0.3):
    """Random segments around the image: most cross it, some start or end inside it, some miss."""
    lo = torch.tensor(origin, dtype=torch.float64) - torch.tensor(vox, dtype=torch.float64)
    ext = torch.tensor([n * v for n, v in zip(shape, vox)], dtype=torch.float64) + 2 * torch.tensor(
        vox, dtype=torch.float64
    )
    pts = lambda: lo + (torch.rand(M, 3, dtype=torch.float64, generator=g) * (1 + 2 * outside) - outside) * ext
    return pts().to(dtype), pts().to(dtype)


GEOMETRIES = [
    # (image shape, voxel size, origin or None)
    ((9, 11, 7), (1.5, 2.0, 2.5), (-6.0, -9.0, -7.0)),
    ((13, 1, 5), (1.0, 1.0, 3.0), None),
    ((1, 17, 4), (0.7, 0.9, 1.1), (2.0, -3.0, 0.5)),
    ((20, 17, 1), (1.0, 1.3, 1.0), None),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[0])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# B covers every frame-group width of the CPU kernels: padded frame stride P = 1, one 32-byte
# vector, 2, 3 and 4 vectors held in registers, and the generic path beyond 4
# (float32: 1, 3, 13, 20, 29, 37 -> P = 1, 8, 16, 24, 32, 40; float64: P = 1, 4, 16, 20, 32, 40)
@pytest.mark.parametrize("B", [1, 3, 13, 20, 29, 37])
def test_matches_reference(geom, dtype, B):
    shape, vox, origin = geom
    org = origin if origin is not None else tuple(-(n - 1) / 2 * v for n, v in zip(shape, vox))
    s, e = random_lines(301, shape, vox, org, dtype)
    x = torch.rand(B, *shape, dtype=dtype)
    kw = dict(voxel_size=vox, image_origin=origin)
    y = pyops.joseph_project(x, s, e, **kw)
    yr = reference.joseph_project(x, s, e, **kw)
    assert y.shape == (B, 301) and y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, yr, **tol)
    assert (y != 0).float().mean() > 0.3  # the test lines do hit the image
    g = torch.randn(B, 301, dtype=dtype)
    xb = pyops.joseph_backproject(g, s, e, image_shape=shape, **kw)
    xr = reference.joseph_backproject(g, s, e, image_shape=shape, **kw)
    assert xb.shape == (B, *shape)
    torch.testing.assert_close(xb, xr, **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_adjoint_identity(dtype, tol):
    g = torch.Generator().manual_seed(torch.initial_seed() % (1 << 31))
    for shape, vox, origin in GEOMETRIES:
        org = origin if origin is not None else tuple(-(n - 1) / 2 * v for n, v in zip(shape, vox))
        s, e = random_lines(997, shape, vox, org, dtype, g)
        kw = dict(voxel_size=vox, image_origin=origin)
        x = torch.rand(2, *shape, dtype=dtype, generator=g)
        y = torch.rand(2, 997, dtype=dtype, generator=g)
        lhs = (pyops.joseph_project(x, s, e, **kw).double() * y.double()).sum()
        rhs = (x.double() * pyops.joseph_backproject(y, s, e, image_shape=shape, **kw).double()).sum()
        assert abs(lhs - rhs) <= tol * abs(lhs), (shape, lhs.item(), rhs.item())


def test_weights_are_bitwise_shared():
    """A^T applied to a one-hot sinogram is row m of A, which A applied to one-hot images reads back."""
    shape, vox = (5, 6, 4), (1.0, 1.5, 2.0)
    s, e = random_lines(40, shape, vox, (0.0, 0.0, 0.0), torch.float64)
    kw = dict(voxel_size=vox, image_origin=(0.0, 0.0, 0.0))
    rows = pyops.joseph_backproject(torch.eye(40, dtype=torch.float64), s, e, image_shape=shape, **kw)
    cols = pyops.joseph_project(torch.eye(120, dtype=torch.float64).reshape(120, *shape), s, e, **kw)
    assert torch.equal(rows.reshape(40, 120), cols.t())


def test_gradcheck_both_directions():
    shape, vox = (4, 5, 3), (1.0, 1.2, 0.8)
    s, e = random_lines(23, shape, vox, (0.0, 0.0, 0.0), torch.float64)
    kw = dict(voxel_size=vox, image_origin=(0.0, 0.0, 0.0))
    x = torch.rand(2, *shape, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 23, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pyops.joseph_project(t, s, e, **kw), (x,))
    assert torch.autograd.gradcheck(lambda t: pyops.joseph_backproject(t, s, e, image_shape=shape, **kw), (y,))
    assert torch.autograd.gradgradcheck(lambda t: pyops.joseph_project(t, s, e, **kw) ** 2, (x,))


def test_opcheck():
    shape = (4, 5, 3)
    s, e = random_lines(17, shape, (1.0,) * 3, (0.0,) * 3, torch.float32)
    x = torch.rand(2, *shape, requires_grad=True)
    y = torch.rand(2, 17, requires_grad=True)
    torch.library.opcheck(torch.ops.pyops.joseph_project, (x, s, e, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]))
    torch.library.opcheck(torch.ops.pyops.joseph_backproject, (y, s, e, list(shape), [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]))


def test_compile_fullgraph():
    shape = (6, 7, 1)
    s, e = pet.parallel_beam_2d(shape, 5, 9)
    A = pet.JosephProjector(shape, 1.0, s, e)

    def f(x):
        y = A(x)
        return A.adjoint(y * y)

    x = torch.rand(2, *shape)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_agrees_with_skimage_radon():
    pytest.importorskip("skimage")
    import numpy as np
    from skimage.data import shepp_logan_phantom
    from skimage.transform import radon, rescale

    img = rescale(shepp_logan_phantom(), 0.25)[:99, :99]  # odd size: the same rotation centre
    n, V = img.shape[0], 45
    sino = radon(img, theta=np.arange(V) * 180.0 / V, circle=True)  # (n, V)
    s, e = pet.parallel_beam_2d((n, n), V, n, dtype=torch.float64)
    y = pyops.joseph_project(torch.from_numpy(img)[None, :, :, None], s, e, voxel_size=1.0).reshape(V, n)
    corr = np.corrcoef(y.numpy().T.ravel(), sino.ravel())[0, 1]
    assert corr > 0.999, corr
    assert abs(y.sum().item() / sino.sum() - 1) < 0.01  # same scale: pixel units


def test_degenerate_missing_and_nonfinite_lines_give_zero():
    shape = (5, 5, 5)
    s = torch.tensor([[0.0, 0.0, 0.0], [100.0, 100.0, 100.0], [float("nan"), 0, 0], [float("inf"), 0, 0], [-9.0, 0, 0]])
    e = torch.tensor([[0.0, 0.0, 0.0], [100.0, -100.0, 100.0], [5.0, 0, 0], [5.0, 0, 0], [9.0, 0, 0]])
    x = torch.rand(1, *shape)
    y = pyops.joseph_project(x, s, e, voxel_size=1.0)
    assert torch.equal(y[0, :4], torch.zeros(4))
    assert y[0, 4] > 0  # a regular line through the centre
    xb = pyops.joseph_backproject(torch.ones(1, 5), s, e, image_shape=shape, voxel_size=1.0)
    assert torch.isfinite(xb).all()
    torch.testing.assert_close(xb.sum(), torch.tensor(5.0))  # only the last line: 5 planes of length 1


def test_segment_ends_inside_the_image():
    """Only the planes between the end points count."""
    x = torch.ones(1, 9, 1, 1)
    s, e = torch.tensor([[-1.0, 0.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])  # planes -1 .. 2 (origin -4)
    y = pyops.joseph_project(x, s, e, voxel_size=1.0)
    torch.testing.assert_close(y, torch.tensor([[4.0]]))


def test_empty_inputs():
    shape = (4, 4, 2)
    s, e = torch.zeros(0, 3), torch.zeros(0, 3)
    assert pyops.joseph_project(torch.rand(2, *shape), s, e, voxel_size=1.0).shape == (2, 0)
    assert torch.equal(
        pyops.joseph_backproject(torch.rand(2, 0), s, e, image_shape=shape, voxel_size=1.0), torch.zeros(2, *shape)
    )
    s, e = pet.parallel_beam_2d((4, 4), 3, 5)
    assert pyops.joseph_project(torch.rand(0, 4, 4, 1), s, e, voxel_size=1.0).shape == (0, 15)
    assert pyops.joseph_backproject(torch.rand(0, 15), s, e, image_shape=(4, 4, 1), voxel_size=1.0).shape == (
        0,
        4,
        4,
        1,
    )


def test_backprojection_is_deterministic_across_thread_counts():
    shape = (31, 29, 6)
    s, e = random_lines(4000, shape, (1.0,) * 3, (0.0,) * 3, torch.float32)
    y = torch.rand(3, 4000)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pyops.joseph_backproject(y, s, e, image_shape=shape, voxel_size=1.0, image_origin=(0, 0, 0))
        torch.set_num_threads(max(2, n))
        many = pyops.joseph_backproject(y, s, e, image_shape=shape, voxel_size=1.0, image_origin=(0, 0, 0))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, many)


# ---------------------------------------------------------------------------------------------
# The CPU kernels' paths (csrc/pet/pet_cpu.cpp): one-slice images whose lines lie in the slice
# sample 2 corners of 4; B == 1 has kernels of its own on the AVX-512 path; B > 1 works on
# frames-last images (1 to 4 vectors of frames in registers, more one vector at a time); the
# back projection splits the image into blocks of rows, one task each.
# ---------------------------------------------------------------------------------------------
SEED = 1207  # the tests below print their seeds (pytest -s shows them)


def seeded(seed):
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(23, 19), (31, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# float32: P = 1, 8, 8, 16, 24; float64: P = 1, 8, 8, 16, 24 (4 doubles a vector)
@pytest.mark.parametrize("B", [1, 5, 8, 13, 24])
def test_parallel_beam_matches_reference(shape, dtype, B):
    """In-plane lines through a one-slice image (the 2-corner path), bins past the image edge."""
    g = seeded(SEED + 100 * B + shape[0])
    s, e = pet.parallel_beam_2d(shape, 13, max(shape) + 6, dtype=dtype)
    x = torch.rand(B, *shape, 1, dtype=dtype, generator=g)
    y = pyops.joseph_project(x, s, e, voxel_size=1.0)
    # float32: each sum has ~30 terms of weights rounded once to float32 (relative error ~1e-7
    # each) and values below ~40: 1e-5 leaves two orders of magnitude; float64: 1e-12 likewise
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, reference.joseph_project(x, s, e, voxel_size=1.0), **tol)
    assert (y != 0).float().mean() > 0.5
    r = torch.randn(B, s.shape[0], dtype=dtype, generator=g)
    kw = dict(image_shape=(*shape, 1), voxel_size=1.0)
    torch.testing.assert_close(
        pyops.joseph_backproject(r, s, e, **kw), reference.joseph_backproject(r, s, e, **kw), **tol
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 8, 13])
def test_one_slice_equals_the_middle_slice_of_a_volume(dtype, B):
    """The same in-plane lines through a one-slice image (2 corners per plane) and through the
    middle slice of a 3-slice volume whose other slices are zero (4 corners, the other 2 with
    weight 0 on zero voxels): the same sums, bit for bit."""
    g = seeded(SEED + B)
    s, e = pet.parallel_beam_2d((17, 21), 9, 25, dtype=dtype)  # z = 0: the volume's middle slice
    x2 = torch.rand(B, 17, 21, 1, dtype=dtype, generator=g)
    x3 = torch.zeros(B, 17, 21, 3, dtype=dtype)
    x3[..., 1] = x2[..., 0]
    y = pyops.joseph_project(x2, s, e, voxel_size=1.0)
    assert torch.equal(y, pyops.joseph_project(x3, s, e, voxel_size=1.0))
    r = torch.randn(B, s.shape[0], dtype=dtype, generator=g)
    b2 = pyops.joseph_backproject(r, s, e, image_shape=(17, 21, 1), voxel_size=1.0)
    b3 = pyops.joseph_backproject(r, s, e, image_shape=(17, 21, 3), voxel_size=1.0)
    assert torch.equal(b3[..., 1], b2[..., 0])
    assert (b3[..., 0] == 0).all() and (b3[..., 2] == 0).all()


def _system(s, e, shape, B1, **kw):
    """The system matrix twice: rows from back projections, columns from projections, one line /
    voxel at a time (B1: B == 1 kernels) or all at once (B > 1)."""
    M, N = s.shape[0], math.prod(shape)
    dt = s.dtype
    if B1:
        rows = torch.stack(
            [
                pyops.joseph_backproject(torch.eye(M, dtype=dt)[m : m + 1], s, e, image_shape=shape, **kw).reshape(N)
                for m in range(M)
            ]
        )
        eye = torch.eye(N, dtype=dt).reshape(N, 1, *shape)
        cols = torch.stack([pyops.joseph_project(eye[j], s, e, **kw)[0] for j in range(N)], 1)
    else:
        rows = pyops.joseph_backproject(torch.eye(M, dtype=dt), s, e, image_shape=shape, **kw).reshape(M, N)
        cols = pyops.joseph_project(torch.eye(N, dtype=dt).reshape(N, *shape), s, e, **kw).t()
    return rows, cols


def test_vectorised_paths_use_the_same_weights():
    """The AVX-512 path (intrinsics: 8 lines' geometry, 8 planes' samples at a time) and the AVX2
    build of the plain loops compute every weight with the same operations (both fuse f0 + i df
    as the CUDA kernels do): the same system matrix, bit for bit, from both ops and for B == 1
    and B > 1. (The baseline build cannot fuse: its float64 weights may differ in the last bit.)"""
    supported = pyops.backends()["cpu_isa_supported"]
    isas = [i for i in ("avx512", "avx2") if i in supported]
    if len(isas) < 2:
        pytest.skip(f"this CPU runs {supported}")
    g = seeded(SEED)
    cases = []
    for dtype in (torch.float32, torch.float64):
        s, e = random_lines(60, (5, 6, 4), (1.0, 1.5, 2.0), (0.0, 0.0, 0.0), dtype, g)
        cases.append((s, e, (5, 6, 4), dict(voxel_size=(1.0, 1.5, 2.0), image_origin=(0.0, 0.0, 0.0))))
        s, e = pet.parallel_beam_2d((7, 9), 5, 12, dtype=dtype)
        cases.append((s, e, (7, 9, 1), dict(voxel_size=1.0)))
        s[:, 2] += 0.3  # in a plane between two slices: both corner pairs, fractional weights
        e[:, 2] += 0.3
        cases.append((s, e, (7, 9, 3), dict(voxel_size=1.0)))
    before = pyops.get_cpu_isa()
    try:
        results = {}
        for isa in isas:
            pyops.set_cpu_isa(isa)
            results[isa] = [_system(s, e, shape, B1, **kw) for s, e, shape, kw in cases for B1 in (True, False)]
    finally:
        pyops.set_cpu_isa(before)
    for (r0, c0), (r1, c1) in zip(*results.values()):
        assert torch.equal(r0, c0) and torch.equal(r0, r1) and torch.equal(c0, c1)


@pytest.mark.parametrize("B", [1, 8, 24])
def test_parallel_beam_backprojection_is_deterministic_across_thread_counts(B):
    """Blocks of rows per task (2D: the B == 1 and frames-last kernels): 1, 2 and 3 threads agree."""
    g = seeded(SEED + B)
    s, e = pet.parallel_beam_2d((45, 37), 30, 50)
    y = torch.rand(B, s.shape[0], generator=g)
    n = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(pyops.joseph_backproject(y, s, e, image_shape=(45, 37, 1), voxel_size=1.0))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("B", [1, 3])
def test_many_lines_recompute_their_geometry(B):
    """Past 64 MiB of cached line geometries (~930k lines) the back projection's tasks recompute
    them; the result is the sum of the back projections of the parts (cached), to rounding."""
    g = seeded(SEED + B)
    shape, M = (6, 5, 4), 1_000_000
    s, e = random_lines(M, shape, (1.0,) * 3, (0.0,) * 3, torch.float64, g)
    y = torch.rand(B, M, dtype=torch.float64, generator=g)
    kw = dict(image_shape=shape, voxel_size=1.0, image_origin=(0.0, 0.0, 0.0))
    whole = pyops.joseph_backproject(y, s, e, **kw)
    parts = sum(
        pyops.joseph_backproject(y[:, i : i + M // 4], s[i : i + M // 4], e[i : i + M // 4], **kw)
        for i in range(0, M, M // 4)
    )
    # ~1e5 float64 terms per voxel, summed in two orders: relative differences ~1e-13
    torch.testing.assert_close(whole, parts, rtol=1e-10, atol=1e-10)
    assert (whole > 0).float().mean() > 0.9


BAD = [
    (dict(voxel_size=0.0), ValueError, "voxel_size must be > 0"),
    (dict(voxel_size=(1.0, float("nan"), 1.0)), ValueError, "voxel_size must be finite"),
    (dict(voxel_size=(1.0, 1.0)), ValueError, "voxel_size must have 3 entries"),
    (dict(image_origin=(0.0, float("inf"), 0.0)), ValueError, "image_origin must be finite"),
    (dict(lor_start=torch.zeros(4, 2)), ValueError, r"lor_start must have shape \(M, 3\)"),
    (dict(lor_end=torch.zeros(5, 3)), ValueError, "lor_end must have the shape of lor_start"),
    (dict(lor_start=torch.zeros(4, 3, dtype=torch.float64)), TypeError, "must have the dtype of"),
    (dict(lor_end=torch.zeros(4, 3, device="meta")), ValueError, "same device"),
    (dict(image=torch.zeros(3, 4, 4)), ValueError, r"image must have shape \(B, n0, n1, n2\)"),
    (dict(image=torch.zeros(1, 4, 4, 1, dtype=torch.float16)), TypeError, "image must be float32 or float64"),
    (dict(image=[[1.0]]), TypeError, "image must be a torch.Tensor"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD)
def test_project_bad_inputs(kwargs, exc, msg):
    args = dict(
        image=torch.zeros(1, 4, 4, 1),
        lor_start=torch.zeros(4, 3),
        lor_end=torch.ones(4, 3),
        voxel_size=1.0,
        image_origin=None,
    )
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        pyops.joseph_project(args.pop("image"), args.pop("lor_start"), args.pop("lor_end"), **args)


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(y=torch.zeros(1, 5)), ValueError, "y has 5 lines"),
        (dict(y=torch.zeros(5)), ValueError, r"y must have shape \(B, M\)"),
        (dict(image_shape=(4, 4)), ValueError, "image_shape must be 3 ints"),
        (dict(image_shape=(4, -1, 1)), ValueError, "image_shape entries must be >= 0"),
        (dict(voxel_size=-1.0), ValueError, "voxel_size must be > 0"),
        (dict(lor_start=torch.zeros(4, 3, dtype=torch.float64)), TypeError, "must have the dtype of y"),
    ],
)
def test_backproject_bad_inputs(kwargs, exc, msg):
    args = dict(
        y=torch.zeros(1, 4),
        lor_start=torch.zeros(4, 3),
        lor_end=torch.ones(4, 3),
        image_shape=(4, 4, 1),
        voxel_size=1.0,
    )
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        pyops.joseph_backproject(args.pop("y"), args.pop("lor_start"), args.pop("lor_end"), **args)


def test_cpu_kernel_checks_without_the_python_layer():
    with pytest.raises(ValueError, match="voxel_size must be finite and > 0"):
        torch.ops.pyops.joseph_project(
            torch.zeros(1, 2, 2, 2), torch.zeros(1, 3), torch.ones(1, 3), [1.0, 0.0, 1.0], [0.0] * 3
        )
    with pytest.raises(ValueError, match="lor_start must have shape"):
        torch.ops.pyops.joseph_backproject(
            torch.zeros(1, 1), torch.zeros(1, 4), torch.ones(1, 4), [2, 2, 2], [1.0] * 3, [0.0] * 3
        )


# ---------------------------------------------------------------------------------------------
# Projector module and geometries
# ---------------------------------------------------------------------------------------------
def test_projector_module_and_norm():
    shape = (7, 6, 1)
    s, e = pet.parallel_beam_2d(shape, 8, 9, dtype=torch.float64)
    A = pet.JosephProjector(shape, 1.0, s, e)
    dense = A(torch.eye(42, dtype=torch.float64).reshape(42, *shape)).t()  # (M, N)
    assert math.isclose(A.norm(num_iter=200), torch.linalg.matrix_norm(dense, 2).item(), rel_tol=1e-6)
    x = torch.rand(*shape, dtype=torch.float64)
    torch.testing.assert_close(A(x), dense @ x.reshape(-1))  # unbatched
    y = torch.rand(72, dtype=torch.float64)
    torch.testing.assert_close(A.adjoint(y), (dense.t() @ y).reshape(shape))
    A32 = A.float()
    assert A32.lor_start.dtype == torch.float32
    torch.testing.assert_close(A32(x.float()), A(x).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="image must have shape"):
        A(torch.rand(1, 7, 7, 1))
    assert "num_lines=72" in repr(A)


def test_parallel_beam_layout():
    s, e = pet.parallel_beam_2d((10, 12), 4, 7, voxel_size=0.5)
    assert s.shape == e.shape == (28, 3)
    d = (e - s).reshape(4, 7, 3)
    assert torch.allclose(d[0, :, 1:], torch.zeros(7, 2))  # view 0: along axis 0
    assert (d[0, :, 0] > 0).all()
    mid = ((s + e) / 2).reshape(4, 7, 3)
    torch.testing.assert_close(mid[0, :, 1], (torch.arange(7.0) - 3) * 0.5)  # bins along axis 1
    # every line spans the image
    assert ((e - s).norm(dim=1) > math.hypot(5, 6)).all()
    with pytest.raises(ValueError, match="one slice"):
        pet.parallel_beam_2d((4, 4, 2), 3, 3)


def test_ring_scanner_pairs_every_detector_pair_once():
    N, R = 12, 50.0
    s, e = pet.ring_scanner(R, N, num_rings=3, ring_spacing=2.0, max_ring_difference=1, dtype=torch.float64)
    pairs = pet.ring_pairs(3, 1)
    assert pairs == [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (1, 0), (2, 1)]
    assert s.shape == (len(pairs) * (N // 2) * (N - 1), 3)
    torch.testing.assert_close(s[:, :2].norm(dim=1), torch.full((s.shape[0],), R, dtype=torch.float64))
    det = lambda p: torch.round(torch.atan2(p[:, 1], p[:, 0]) / (2 * math.pi / N)).long() % N
    first = torch.stack([det(s), det(e)], 1)[: (N // 2) * (N - 1)]  # ring pair (0, 0)
    keys = {tuple(sorted(p)) for p in first.tolist()}
    assert len(keys) == N * (N - 1) // 2  # every unordered pair, once
    z = s[:, 2].reshape(len(pairs), -1)[:, 0], e[:, 2].reshape(len(pairs), -1)[:, 0]
    torch.testing.assert_close(torch.stack(z, 1), (torch.tensor(pairs, dtype=torch.float64) - 1) * 2.0)
    # lines of one view are (nearly) parallel: directions within half a detector step
    d = (e - s)[: (N // 2) * (N - 1)].reshape(N // 2, N - 1, 3)[..., :2]
    ang = torch.atan2(d[..., 1], d[..., 0]) % math.pi
    spread = (ang - ang[:, :1] + math.pi / 2) % math.pi - math.pi / 2
    assert spread.abs().max() <= math.pi / N + 1e-9
    with pytest.raises(ValueError, match="num_detectors must be even"):
        pet.ring_scanner(R, 7)
