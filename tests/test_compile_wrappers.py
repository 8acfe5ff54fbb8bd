"""Every public wrapper in ``pyops.__all__`` under ``torch.compile(fullgraph=True)``: the same
values as eager code and, where the op is differentiable, the same gradients (CPU).

Backend: inductor, which also checks that every fake kernel reports the strides its kernel
returns (a wrong one fails inductor's stride assertions, not aot_eager); strided input views
are used where the wrapper accepts them. pyops.harmonize_gradients' error cases use aot_eager:
they test the checks, not the code generation, and inductor's C++ compile is the slow part.
"""

import pytest
import torch

import pyops

COMPILED_WRAPPERS = {  # the public functions of pyops.__all__ tested here (and the JosephProjector methods)
    "cross_view_kl_entropy",
    "fused_linear_cross_view",
    "fused_linear_cross_view_loss",
    "knn_patch_search",
    "patch_aggregate",
    "knn",
    "joseph_project",
    "joseph_backproject",
    "harmonize_gradients",
    "gr_loss",
    "diagonal_stats",
}
NOT_OPS = {  # the other entries of pyops.__all__: configuration, modules, types, a shape helper
    "backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "get_cpu_isa",
    "set_cpu_isa",
    "reference",
    "CrossViewOutput",
    "HarmonizeStats",
    "KNNResult",
    "patch_grid",
    "pet",
    "nn",
}


@pytest.fixture(autouse=True)
def _fresh_compile():
    """A fresh dynamo state and no compile caches: a graph compiled with an earlier version of a
    fake kernel must not stand in for the current one (inductor's cache keys do not cover it)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def leaves(inputs, grad_of):
    """Fresh copies of the inputs, the ones listed in grad_of requiring gradients."""
    return [t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]


def outputs(out):
    """The tensors of a result (a tensor, a tuple or NamedTuple of tensors / None / ints)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def check_compiled(fn, inputs, *, grad_of=None, backend="inductor", exact=False):
    """fn(*inputs) compiled with fullgraph=True against eager: every output tensor, and the
    gradients w.r.t. inputs[i] for i in grad_of of sum(out * fixed random weights) over the
    float outputs."""
    grad_of = grad_of or []
    eager_in, comp_in = leaves(inputs, grad_of), leaves(inputs, grad_of)
    eager = outputs(fn(*eager_in))
    comp = outputs(torch.compile(fn, fullgraph=True, backend=backend)(*comp_in))
    assert len(eager) == len(comp)
    for a, b in zip(eager, comp):
        assert a.dtype == b.dtype and a.shape == b.shape
        if exact or not a.is_floating_point():
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a)
    if not grad_of:
        return
    weights = [torch.randn(a.shape, dtype=a.dtype) for a in eager if a.is_floating_point()]
    loss = lambda outs: sum((o * w).sum() for o, w in zip([o for o in outs if o.is_floating_point()], weights))
    ge = torch.autograd.grad(loss(eager), [eager_in[i] for i in grad_of])
    gc = torch.autograd.grad(loss(comp), [comp_in[i] for i in grad_of])
    for a, b in zip(ge, gc):
        torch.testing.assert_close(b, a)


def test_every_public_op_is_covered():
    assert set(pyops.__all__) - NOT_OPS == COMPILED_WRAPPERS


def test_cross_view_kl_entropy():
    a = torch.randn(9, 5, 3)  # logits a.transpose(0, 2): a strided (3, 5, 9) view
    b = torch.randn(3, 5, 9)
    t = torch.randint(0, 9, (3, 5))
    t[0, 1] = -100
    f = lambda a, b, t: pyops.cross_view_kl_entropy(a.transpose(0, 2), b, t, temperature=1.7)
    check_compiled(f, [a, b, t], grad_of=[0, 1])
    a2 = torch.randn(9, 4)  # (N, V) logits a2.t(): the op gets this strided view itself
    f = lambda a, b: pyops.cross_view_kl_entropy(a.t(), b)
    check_compiled(f, [a2, torch.randn(4, 9)], grad_of=[0, 1])


def test_fused_linear_cross_view():
    h1, h2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w, bias = torch.randn(8, 11), torch.randn(11)  # weight w.t(): a strided (11, 8) view
    t = torch.randint(0, 11, (2, 5))
    f = lambda h1, h2, w, bias, t: pyops.fused_linear_cross_view(h1, h2, w.t(), bias, t, temperature=0.8, chunk_size=3)
    check_compiled(f, [h1, h2, w, bias, t], grad_of=[0, 1, 2, 3])


def test_fused_linear_cross_view_loss():
    h1, h2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w, bias = torch.randn(8, 11), torch.randn(11)  # weight w.t(): a strided (11, 8) view
    t = torch.randint(0, 11, (2, 5))
    t[1, 2] = -100
    kw = dict(kl_ab_weight=0.4, kl_ba_weight=0.6, entropy_b_weight=0.1, ce_weight=1.0, temperature=0.8, chunk_size=3)
    f = lambda h1, h2, w, bias, t: pyops.fused_linear_cross_view_loss(h1, h2, w.t(), bias, t, **kw)
    check_compiled(f, [h1, h2, w, bias, t], grad_of=[0, 1, 2, 3])


def test_knn_patch_search():
    q = torch.randn(1, 13, 12, 2)  # query q.permute(0, 3, 1, 2): a channels-last (1, 2, 13, 12) view
    d = torch.randn(1, 2, 11, 12)
    f = lambda q, d: pyops.knn_patch_search(q.permute(0, 3, 1, 2), d, 3, patch_size=3, stride=1, window=5)
    check_compiled(f, [q, d], grad_of=[0, 1])


def test_patch_aggregate():
    values = torch.randn(1, 12, 12, 3)  # values.permute(0, 3, 1, 2): a channels-last (1, 3, 12, 12) view
    idx = torch.randint(0, 16, (1, 16, 4))
    weights = torch.randn(1, 4, 16)  # weights.transpose(1, 2): a strided (1, 16, 4) view
    f = lambda v, i, w: pyops.patch_aggregate(
        v.permute(0, 3, 1, 2), i, w.transpose(1, 2), patch_size=3, output_size=(12, 12)
    )
    check_compiled(f, [values, idx, weights], grad_of=[0, 2])


def test_knn():
    x = torch.randn(5, 40)  # points x.t(): a strided (40, 5) view
    y = torch.randn(2, 31, 5)
    f = lambda x, y: pyops.knn(x.t().expand(2, -1, -1), y, 4)
    check_compiled(f, [x, y], grad_of=[0, 1], exact=True)
    f = lambda x: pyops.knn(x.t(), x.t(), 3, exclude_self=True)
    check_compiled(f, [x], grad_of=[0], exact=True)


def _lines(n=8):
    return pyops.pet.parallel_beam_2d((n, n), 6, 10)


def test_joseph_project():
    s, e = _lines()
    img = torch.rand(2, 1, 8, 8)  # image img.permute(0, 2, 3, 1): a strided (2, 8, 8, 1) view
    f = lambda img, s, e: pyops.joseph_project(img.permute(0, 2, 3, 1), s, e, voxel_size=1.0)
    check_compiled(f, [img, s, e], grad_of=[0])


def test_joseph_backproject():
    s, e = _lines()
    y = torch.rand(s.shape[0], 2)  # y.t(): a strided (2, M) view
    f = lambda y, s, e: pyops.joseph_backproject(
        y.t(), s, e, image_shape=(8, 8, 1), voxel_size=1.0, image_origin=(-3.5, -3.5, 0.0)
    )
    check_compiled(f, [y, s, e], grad_of=[0])


def test_joseph_projector_forward_and_adjoint():
    s, e = _lines()
    proj = pyops.pet.JosephProjector((8, 8), 1.0, s, e)
    check_compiled(lambda x: proj(x), [torch.rand(3, 8, 8, 1)], grad_of=[0])
    check_compiled(lambda x: proj(x), [torch.rand(8, 8, 1, dtype=torch.float64)], grad_of=[0])  # unbatched
    check_compiled(lambda y: proj.adjoint(y), [torch.rand(2, s.shape[0])], grad_of=[0])
    check_compiled(lambda y: proj.adjoint(y), [torch.rand(s.shape[0])], grad_of=[0])  # unbatched


def test_gr_loss():
    logits = torch.randn(7, 6)
    observed = torch.zeros(6, 7)
    observed[torch.randint(0, 6, (7,)), torch.arange(7)] = 1  # observed.t(): strided (7, 6), one positive per row
    f = lambda z, o: pyops.gr_loss(z, o.t(), beta=(0.5, -1.0), alpha=(0.4, 1.5), q2=0.1, q3=0.0)
    check_compiled(f, [logits, observed], grad_of=[0])
    f = lambda z, o, beta: pyops.gr_loss(z, o.t(), beta=beta, reduction="none", require_positive=True)
    check_compiled(f, [logits, observed, torch.tensor([0.3, -2.0])], grad_of=[0])


def test_diagonal_stats():
    maps = torch.randn(3, 10, 10)
    f = lambda s: pyops.diagonal_stats(s.transpose(1, 2), num_lags=6)
    check_compiled(f, [maps], grad_of=[0])
    check_compiled(lambda s: pyops.diagonal_stats(s), [maps[0].double()], grad_of=[0])


@pytest.mark.parametrize("mode", ["fedgh", "pcgrad"])
def test_harmonize_gradients(mode):
    """pcgrad draws its orders from torch's default generator: the same seed gives the same
    draws in eager and compiled code."""
    x = torch.randn(5, 30)
    x[1] = -x[0] + 0.1 * x[1]  # some conflicts
    blocks = [torch.randn(5, 7).double(), torch.randn(5, 3).double()]

    def f(x, b0, b1, w):
        out, stats = pyops.harmonize_gradients(x, mode=mode, return_stats=True, order=[4, 2, 0, 1, 3])
        rows = pyops.harmonize_gradients([b0, b1], weights=w, mode=mode, reduction="none")
        return (out, stats.cosine, torch.tensor(stats.num_conflicts), *rows)

    w = torch.rand(5)
    torch.manual_seed(0)
    eager = f(x, *blocks, w)
    torch.manual_seed(0)
    comp = torch.compile(f, fullgraph=True)(x, *blocks, w)
    assert eager[2] > 0
    for a, b in zip(eager, comp):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (
            lambda x, w: pyops.harmonize_gradients(torch.where(x > 1.5, torch.nan, x)),
            ValueError,
            "NaN or inf .* first bad row",
        ),
        (lambda x, w: pyops.harmonize_gradients(x, weights=w.log() - w.log()[1]), ValueError, "weights must be finite"),
        (lambda x, w: pyops.harmonize_gradients(x, order=[0, 1, 2, 2, 4]), ValueError, "order must be a permutation"),
        (
            lambda x, w: pyops.harmonize_gradients(x, order=[0, 1, 2, 3, 7], mode="pcgrad"),
            ValueError,
            "order must be a permutation",
        ),
    ],
    ids=["nonfinite-gradients", "nonfinite-weights", "order-repeats", "pcgrad-order-out-of-range"],
)
def test_harmonize_gradients_value_checks_run_in_compiled_code(call, exc, msg):
    x = torch.randn(5, 30) * 2
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])  # log(0) - log(1) = -inf
    for fn in (call, torch.compile(call, fullgraph=True, backend="aot_eager")):
        with pytest.raises(exc, match=msg):
            fn(x, w)


def test_harmonize_gradients_generator_under_fullgraph_names_the_fix():
    x = torch.randn(4, 6)
    f = lambda x, g: pyops.harmonize_gradients(x, mode="pcgrad", generator=g)
    with pytest.raises(Exception, match="torch.compile cannot trace a torch.Generator"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(x, torch.Generator().manual_seed(0))


def test_harmonize_check_values_op():
    gram, w = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pyops.harmonize_check_values.default, (gram, w))
    with pytest.raises(ValueError, match=r"pyops::harmonize_check_values: weights must have shape \(K,\)"):
        torch.ops.pyops.harmonize_check_values(gram, w[:2])
    with pytest.raises(TypeError, match="pyops::harmonize_check_values: gram must be float64"):
        torch.ops.pyops.harmonize_check_values(gram.float(), w)
    with pytest.raises(ValueError, match="pyops::harmonize_check_values: weights is on meta"):
        torch.ops.pyops.harmonize_check_values(gram, w.to("meta"))
