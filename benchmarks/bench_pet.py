"""Benchmark of pyops.joseph_project / joseph_backproject (float32).

Cases (issue #4; issue #29 part 4 added the frame counts):
* 2D: parallel_beam_2d, 1, 8 and 24 frames, forward and back projection; quick mode 128 x 128
  image, 90 views x 160 radial bins; full mode 200 x 200, 180 x 256. Against
  - a precomputed ``torch.sparse`` CSR system matrix (and its transpose) applied with
    ``torch.sparse.mm``, every case; the note gives the matrices' build time and memory (built
    once per geometry and shared by its cases);
  - the eager reference (pyops.reference: gather / index_add of the Joseph weights), every case;
  - the compiled reference, quick mode and 8 frames only: torch.compile compiles every case
    afresh (and again in the memory probe), 6-10 s per direction at 1 frame but over a minute
    at 24 frames on the 2-core Xeon: all six cases would take ~5 minutes, the whole quick run's
    budget; at the full size it unrolls the reference's loop over ~50 line chunks and compiles
    for over 20 minutes;
  - the ASTRA toolbox's CPU Joseph projector (``astra-toolbox``, projector type ``linear``,
    same geometry, frames looped), when installed.
* 3D: 128 x 128 x 32 image (2 mm voxels), a 32-ring scanner (128 detectors per ring, radius
  200 mm; quick mode: ring difference <= 3), one frame: pyops only, with the number of
  line-plane steps (one bilinear sample of 4 voxels each) per second.
Targets: 2D forward and back projection >= 10x eager, >= 2x ASTRA, and faster than the sparse
matrix (time / native >= 1.00x, aim 1.15x) at every size and frame count.
"""

from __future__ import annotations

import importlib.util
import time

import torch

import pyops
from pyops import pet, reference

from .common import Case

OP = "pet"


_SYSTEMS: dict = {}  # geometry -> (A, At, build seconds, bytes): one build per geometry


def _sparse_system(s, e, shape, vox, org):
    """Joseph's system matrix (M, N) as float32 CSR, from the reference's weights; build time, bytes."""
    key = (tuple(shape), s.shape[0], float(s.sum()), float(e.sum()))
    if key not in _SYSTEMS:
        _SYSTEMS[key] = _build_sparse_system(s, e, shape, vox, org)
    return _SYSTEMS[key]


def _build_sparse_system(s, e, shape, vox, org):
    t0 = time.perf_counter()
    M = s.shape[0]
    rows, cols, vals = [], [], []
    chunk = max(1, (1 << 22) // (4 * max(shape)))
    for m0 in range(0, M, chunk):
        idx, w = reference.joseph_weights(s[m0 : m0 + chunk], e[m0 : m0 + chunk], shape, vox, org)
        keep = w != 0
        rows.append((torch.arange(m0, m0 + idx.shape[0])[:, None, None].expand_as(idx))[keep])
        cols.append(idx[keep])
        vals.append(w[keep].float())
    N = shape[0] * shape[1] * shape[2]
    coo = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), (M, N))
    A = coo.coalesce().to_sparse_csr()
    At = coo.t().coalesce().to_sparse_csr()
    secs = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for m in (A, At) for t in (m.crow_indices(), m.col_indices(), m.values()))
    return A, At, secs, nbytes


def case_2d(name, n, views, radial, frames, direction, with_compiled=True):
    shape = (n, n, 1)
    notes: dict = {}

    def setup(device):
        g = torch.Generator().manual_seed(0)
        s, e = pet.parallel_beam_2d(shape, views, radial, device=device)
        kw = dict(voxel_size=1.0)
        org = tuple(-(k - 1) / 2 for k in shape)
        x = torch.rand(frames, *shape, generator=g).to(device)
        y = pyops.joseph_project(x, s, e, **kw)
        if direction == "forward":
            native = lambda: pyops.joseph_project(x, s, e, **kw)
            eager = lambda: reference.joseph_project(x, s, e, **kw)
            compiled_fn = torch.compile(reference.joseph_project)
            compiled = lambda: compiled_fn(x, s, e, **kw)
        else:
            native = lambda: pyops.joseph_backproject(y, s, e, image_shape=shape, **kw)
            eager = lambda: reference.joseph_backproject(y, s, e, image_shape=shape, **kw)
            compiled_fn = torch.compile(reference.joseph_backproject)
            compiled = lambda: compiled_fn(y, s, e, image_shape=shape, **kw)
        variants = {"pyops": native, "eager": eager}
        if with_compiled:
            variants["compiled"] = compiled
        if device == "cpu" and importlib.util.find_spec("astra") is not None:
            import astra
            import numpy as np

            vol = astra.create_vol_geom(n, n)
            proj = astra.create_proj_geom("parallel", 1.0, radial, np.arange(views) * np.pi / views)
            pid = astra.create_projector("linear", proj, vol)
            xs = [x[b, :, :, 0].numpy() for b in range(frames)]
            ys = [y[b].reshape(views, radial).numpy() for b in range(frames)]

            def astra_fwd():
                out = []
                for img in xs:
                    sid, sino = astra.create_sino(img, pid)
                    astra.data2d.delete(sid)
                    out.append(sino)
                return out

            def astra_back():
                out = []
                for sino in ys:
                    bid, img = astra.create_backprojection(sino, pid)
                    astra.data2d.delete(bid)
                    out.append(img)
                return out

            variants["astra"] = astra_fwd if direction == "forward" else astra_back
        if device == "cpu":
            A, At, secs, nbytes = _sparse_system(s, e, shape, (1.0, 1.0, 1.0), org)
            notes["sparse_csr"] = f"CSR matrix + transpose: built in {secs:.2f} s, {nbytes / 2**20:.0f} MiB"
            N = n * n
            if direction == "forward":
                variants["sparse_csr"] = lambda: torch.sparse.mm(A, x.reshape(frames, N).t()).t()
            else:
                variants["sparse_csr"] = lambda: torch.sparse.mm(At, y.t()).t().reshape(frames, *shape)
        return variants

    params = dict(image=list(shape), views=views, radial=radial, frames=frames, direction=direction)
    return Case(name, params, setup, notes=notes)


def case_3d(name, detectors, rings, max_ring_difference, direction):
    shape, vox = (128, 128, 32), 2.0
    s, e = pet.ring_scanner(
        200.0, detectors, num_rings=rings, ring_spacing=2.0, max_ring_difference=max_ring_difference
    )
    # line-plane steps: projecting an all-ones image gives, per line, step x planes crossed
    ones = pyops.joseph_project(torch.ones(1, *shape), s, e, voxel_size=vox)[0].double()
    d = (e - s).double()
    step = vox * d.norm(dim=1) / d.abs().amax(1)
    work = float((ones / step).sum())

    def setup(device):
        sd, ed = s.to(device), e.to(device)
        x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        if direction == "forward":
            return {"pyops": lambda: pyops.joseph_project(x, sd, ed, voxel_size=vox)}
        y = pyops.joseph_project(x, sd, ed, voxel_size=vox)
        return {"pyops": lambda: pyops.joseph_backproject(y, sd, ed, image_shape=shape, voxel_size=vox)}

    params = dict(
        image=list(shape),
        detectors=detectors,
        rings=rings,
        max_ring_difference=max_ring_difference,
        lines=s.shape[0],
        direction=direction,
    )
    return Case(name, params, setup, work=work, work_unit="line-plane steps")


FRAMES = (1, 8, 24)


def cases(quick: bool, device: str) -> list[Case]:
    # the compiled reference: quick mode, 8 frames (see the module docstring)
    n, views, radial = (128, 90, 160) if quick else (200, 180, 256)
    out = []
    for frames in FRAMES:
        for direction, short in (("forward", "fwd"), ("back", "back")):
            name = f"2D {short} {n}x{n} {views}x{radial} B{frames}"
            out.append(case_2d(name, n, views, radial, frames, direction, with_compiled=quick and frames == 8))
    if quick:
        return out + [
            case_3d("3D fwd 128x128x32 ring32 mrd3", 128, 32, 3, "forward"),
            case_3d("3D back 128x128x32 ring32 mrd3", 128, 32, 3, "back"),
        ]
    return out + [
        case_3d("3D fwd 128x128x32 ring32", 128, 32, None, "forward"),
        case_3d("3D back 128x128x32 ring32", 128, 32, None, "back"),
    ]
