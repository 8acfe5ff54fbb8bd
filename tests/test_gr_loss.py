"""pyops.gr_loss against pyops.reference.gr_loss and against a direct transcription of the
paper's probability-space formulas (CPU; the Triton kernels: test_triton_interpret.py)."""

import math

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

import pyops
from pyops import reference

TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}
# gradients: relative to the largest |gradient| (GR's two unobserved terms cancel in places);
# float16 / bfloat16 gradients are rounded to the logits' dtype (one ulp: 2^-11, 2^-8)
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
SETTINGS = [  # beta (w, b), alpha (mu, sigma), q2, q3
    ((0.0, -2.0), (0.5, 2.0), 0.01, 1.0),  # the VOC defaults at epoch 1
    ((2.0, -2.0), (0.8, 0.5), 0.01, 1.0),  # ... at the last epoch
    ((1.5, -1.0), (0.6, 0.7), 0.7, 0.3),
    ((0.5, 0.0), (0.3, 1.0), 2.0, 1e-4),
    ((-3.0, 0.5), (0.1, 0.2), 0.0, 0.0),  # the log limits (BCE-like terms); keep it last
]


def make_inputs(shape, dtype=torch.float32, scale=4.0, obs_dtype=torch.float32, density=0.15):
    z = (torch.randn(shape) * scale).to(dtype)
    observed = torch.rand(shape) < density
    if observed.dim() > 0 and observed.shape[-1] > 0:
        observed[..., torch.randint(0, shape[-1], ())] = True
    return z, observed.to(obs_dtype)


def paper_transcription(logits, observed, beta, alpha, q2, q3):
    """The spec's formulas as the official code states them, in probability space (float64):
    L1 = -log(p + 1e-7), L2 = (1 - p^q2) / q2, L3 = (1 - (1 - p)^q3) / q3, k = sigmoid(w p + b),
    v = exp(-(p - mu)^2 / (2 sigma^2)), k and v from the detached p; mean over all entries."""
    p = torch.sigmoid(logits.double())
    pd = p.detach()
    k = 1 / (1 + torch.exp(-(beta[0] * pd + beta[1])))
    v = torch.exp(-0.5 * ((pd - alpha[0]) / alpha[1]) ** 2)
    loss = torch.zeros_like(p)
    pos, unobs = observed == 1, observed == 0
    loss[pos] = -torch.log(p[pos] + 1e-7)
    l2 = (1 - p[unobs] ** q2) / q2
    l3 = (1 - (1 - p[unobs]) ** q3) / q3
    loss[unobs] = v[unobs] * (k[unobs] * l2 + (1 - k[unobs]) * l3)
    return loss.mean()


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 1000), (3, 5, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_matches_reference(shape, dtype, reduction, setting):
    beta, alpha, q2, q3 = SETTINGS[setting]
    z, o = make_inputs(shape, dtype)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = pyops.gr_loss(z1, o, beta, alpha, q2, q3, reduction=reduction)
    ref = reference.gr_loss(z2, o, beta, alpha, q2, q3, reduction=reduction)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))
    up = torch.randn(out.shape, dtype=out.dtype)
    (g,) = torch.autograd.grad(out, z1, up)
    (gr,) = torch.autograd.grad(ref, z2, up)
    assert g.dtype == dtype
    scale = max(gr.abs().max().item(), 1e-30)
    rtol = 0 if dtype in (torch.float32, torch.float64) else GRAD_TOL[dtype]
    subnormal = 2 * 2.0**-24 if dtype == torch.float16 else 0.0  # mean-reduced float16 gradients underflow
    torch.testing.assert_close(g.double(), gr.double(), rtol=rtol, atol=GRAD_TOL[dtype] * scale + subnormal)


@pytest.mark.parametrize("setting", range(len(SETTINGS) - 1))  # q > 0 (the transcription divides by q)
def test_equals_paper_transcription(setting):
    beta, alpha, q2, q3 = SETTINGS[setting]
    z, o = make_inputs((29, 17), torch.float64, scale=3.0)
    z = torch.where(o == 1, z.clamp(min=-2.0), z)  # p >= 0.12 on positives: the +1e-7 shifts by < 1e-6
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = pyops.gr_loss(z1, o, beta, alpha, q2, q3)
    ref = paper_transcription(z2, o, beta, alpha, q2, q3)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)
    (g,) = torch.autograd.grad(out, z1)
    (gr,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-9)


def test_k_and_v_carry_no_gradient():
    """The closed-form gradient: positives -(1 - p); unobserved v (-k p^q2 (1 - p) + (1 - k)(1 - p)^q3 p)."""
    z, o = make_inputs((9, 8), torch.float64)
    z.requires_grad_()
    beta, alpha, q2, q3 = (1.2, -0.7), (0.4, 0.6), 0.3, 0.8
    (g,) = torch.autograd.grad(pyops.gr_loss(z, o, beta, alpha, q2, q3, reduction="sum"), z)
    p = torch.sigmoid(z.detach())
    k = torch.sigmoid(beta[0] * p + beta[1])
    v = torch.exp(-((p - alpha[0]) ** 2) / (2 * alpha[1] ** 2))
    expected = torch.where(o == 1, -(1 - p), v * (-k * p**q2 * (1 - p) + (1 - k) * (1 - p) ** q3 * p))
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("obs_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float64])
def test_observed_dtypes(obs_dtype):
    z, o = make_inputs((6, 21), obs_dtype=obs_dtype)
    torch.testing.assert_close(pyops.gr_loss(z, o), reference.gr_loss(z, o), rtol=2e-5, atol=2e-5)


def test_non_contiguous_and_tensor_parameters():
    z, o = make_inputs((12, 40))
    zt, ot = z.t(), o.t()
    beta = torch.tensor([1.0, -1.5])
    alpha = (torch.tensor(0.6), torch.tensor(0.9))
    out = pyops.gr_loss(zt, ot, beta, alpha, reduction="none")
    ref = reference.gr_loss(zt.contiguous(), ot.contiguous(), (1.0, -1.5), (0.6, 0.9), reduction="none")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_saturated_logits_stay_finite():
    z = torch.tensor([[100.0, -100.0, 1e4, -1e4, 30.0, -30.0, 0.0]])
    o = torch.tensor([[1, 0, 0, 0, 0, 0, 0]])
    for q2, q3 in [(0.01, 1.0), (0.0, 0.0), (0.5, 0.5)]:
        zz = z.clone().requires_grad_()
        out = pyops.gr_loss(zz, o, (2.0, -2.0), (0.8, 0.5), q2, q3, reduction="none")
        assert torch.isfinite(out).all()
        (g,) = torch.autograd.grad(out.sum(), zz)
        assert torch.isfinite(g).all()
        ref = reference.gr_loss(z.double(), o, (2.0, -2.0), (0.8, 0.5), q2, q3, reduction="none")
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # a positive at z = 1e4 costs softplus(-1e4) ~ 0 (the reference's log(p + 1e-7) would not)
    assert pyops.gr_loss(torch.tensor([[1e4]]), torch.tensor([[1]]), reduction="sum").item() == 0.0


def test_nan_logit_gives_nan_in_its_entry_only():
    z, o = make_inputs((4, 9))
    z[2, 3] = float("nan")
    out = pyops.gr_loss(z, o, reduction="none")
    assert torch.isnan(out[2, 3])
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[2, 3] = False
    assert torch.isfinite(out[mask]).all()
    assert torch.isnan(pyops.gr_loss(z, o))


def test_empty_inputs():
    for shape in [(0, 7), (5, 0), (0, 0)]:
        z = torch.zeros(shape, requires_grad=True)
        o = torch.zeros(shape)
        assert pyops.gr_loss(z, o, reduction="none").shape == shape
        assert pyops.gr_loss(z, o, reduction="sum").item() == 0.0
        loss = pyops.gr_loss(z, o)
        assert math.isnan(loss.item())  # the mean of nothing, as torch.mean
        (g,) = torch.autograd.grad(pyops.gr_loss(z, o, reduction="sum"), z)
        assert g.shape == shape


def test_gradcheck_float64():
    """Finite differences see k(p) and v(p) move with z, the defined gradient does not; with
    w = 0 (k constant) and sigma = 1e4 (dv/dp ~ 1e-8) the two agree, which checks the GCE terms."""
    z, o = make_inputs((5, 7), torch.float64, scale=2.0)
    z.requires_grad_()
    for reduction in ("mean", "none"):
        for q2, q3 in [(0.3, 0.6), (0.01, 1.0), (0.0, 0.0)]:
            assert torch.autograd.gradcheck(
                lambda x: pyops.gr_loss(x, o, (0.0, -1.0), (0.6, 1e4), q2, q3, reduction=reduction), (z,)
            )
    # with k and v moving, the finite differences must disagree (the test above has teeth)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda x: pyops.gr_loss(x, o, (3.0, -1.0), (0.6, 0.3), 0.3, 0.6), (z,))


def test_opcheck():
    z, o = make_inputs((6, 10))
    params = torch.tensor([1.0, -2.0, 0.5, 0.8], dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        args = (z.clone().requires_grad_(), o, params, 0.01, 1.0, reduction)
        torch.library.opcheck(torch.ops.pyops.gr_loss_fwd.default, args)
        grad = torch.randn(()) if reduction != "none" else torch.randn(6, 10)
        torch.library.opcheck(torch.ops.pyops.gr_loss_bwd.default, (grad, z, o, params, 0.01, 1.0, reduction))


def test_torch_compile_fullgraph():
    z, o = make_inputs((8, 30))

    def loss_fn(x, w, b):
        return pyops.gr_loss(x * 2, o, (w, b), (0.5, 2.0)) + x.sum() * 0

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    w, b = torch.tensor(0.5), torch.tensor(-2.0)  # tensors: a new epoch's schedule does not recompile
    grads = []
    for f in (loss_fn, compiled):
        x = z.clone().requires_grad_()
        loss = f(x, w, b)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_torch_compile_inductor_matches_eager():
    z, o = make_inputs((5, 17))
    fn = torch.compile(lambda x: pyops.gr_loss(x, o, reduction="none") * 2, fullgraph=True)
    torch.testing.assert_close(fn(z), pyops.gr_loss(z, o, reduction="none") * 2)


def test_double_backward_is_refused():
    z, o = make_inputs((3, 4), torch.float64)
    z.requires_grad_()
    (g,) = torch.autograd.grad(pyops.gr_loss(z, o), z, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


def _bad(**kw):
    z, o = make_inputs((4, 6))
    args = dict(logits=z, observed=o)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "case",
    [
        (dict(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.zeros(4, 6, dtype=torch.long)), TypeError, "logits must be float"),
        (dict(logits=torch.tensor(0.0), observed=torch.tensor(1.0)), ValueError, "0-d"),
        (dict(observed=torch.zeros(4, 5)), ValueError, "observed must have the logits' shape"),
        (dict(observed=torch.full((4, 6), 2.0)), ValueError, "observed must hold 0"),
        (dict(observed=torch.full((4, 6), -1)), ValueError, "observed must hold 0"),
        (dict(observed=torch.full((4, 6), 0.5)), ValueError, "observed must hold 0"),
        (dict(alpha=(0.5, 0.0)), ValueError, "sigma"),
        (dict(alpha=(0.5, -1.0)), ValueError, "sigma"),
        (dict(alpha=(0.5, torch.tensor(0.0))), ValueError, "sigma"),
        (dict(beta=(float("nan"), 0.0)), ValueError, "w must be finite"),
        (dict(beta=(1.0,)), ValueError, "beta must be a pair"),
        (dict(q2=-0.1), ValueError, "q2 must be a finite number >= 0"),
        (dict(q3=float("inf")), ValueError, "q3"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(case):
    kw, exc, msg = case
    with pytest.raises(exc, match=msg):
        pyops.gr_loss(**_bad(**kw))


def test_require_positive_names_the_row():
    z, o = make_inputs((5, 6))
    o[3] = 0
    pyops.gr_loss(z, o)  # allowed by default: an all-unobserved row is a valid loss input
    with pytest.raises(ValueError, match="row 3 of observed has no positive"):
        pyops.gr_loss(z, o, require_positive=True)


def test_raw_op_checks_shapes_and_labels():
    z, o = make_inputs((4, 6))
    params = torch.tensor([0.0, -2.0, 0.5, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="observed must have the logits' shape"):
        torch.ops.pyops.gr_loss_fwd(z, o[:, :5], params, 0.01, 1.0, "mean")
    with pytest.raises(ValueError, match=r"params must have shape \(4,\)"):
        torch.ops.pyops.gr_loss_fwd(z, o, params[:3], 0.01, 1.0, "mean")
    o[1, 2] = 3
    with pytest.raises(ValueError, match="flat index 8"):
        torch.ops.pyops.gr_loss_fwd(z, o, params, 0.01, 1.0, "mean")
