"""methods.byhe (in progress): the SCS-map head's alignment with the label, and the losses."""
import math

import pytest
import torch

from methods.byhe import BYHEHead, BYHENet, byhe_loss, mask_loss, rowwise_neg_pearson, spectral_sparsity
from methods.rppg.scs import scs_label


def test_net_output_aligns_with_the_scs_label():
    net = BYHENet(shrink=4).eval()
    L = 70
    video = torch.rand(2, 3, L, 36, 36) * 255
    R_hat, mask = net(video)
    t = torch.arange(L, dtype=torch.float32) / 30
    R = scs_label(torch.sin(2 * math.pi * 1.3 * t).repeat(2, 1))
    assert R_hat.shape == R.shape == (2, L - 25, L - 25)  # N = L - 25 on both sides
    torch.testing.assert_close(R_hat.diagonal(dim1=1, dim2=2), torch.ones(2, L - 25), atol=1e-5, rtol=0)
    losses = byhe_loss(R_hat, R, mask, torch.ones(36, 36))
    assert set(losses) == {"pearson", "mse", "spectral", "mask", "loss"}
    losses["loss"].backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_head_windows_are_channel_major_flattened_slices():
    head = BYHEHead(channels=2, window=3, dropout=0.0)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(6))
        head.proj.bias.zero_()
    feats = torch.randn(1, 2, 6)
    R = head(feats)
    W = torch.stack([feats[0, :, i:i + 3].flatten() for i in range(4)])
    Wn = W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(R[0], Wn @ Wn.T)


def test_loss_properties():
    t = torch.arange(80, dtype=torch.float64) / 30
    R = scs_label(torch.sin(2 * math.pi * 1.5 * t)[None])
    assert rowwise_neg_pearson(R, R).abs() < 1e-12
    assert rowwise_neg_pearson(R, R * 3 + 1).abs() < 1e-12  # per-row affine invariance
    assert rowwise_neg_pearson(R, -R) == pytest.approx(2.0)
    pure = torch.sin(2 * math.pi * 4 * torch.arange(64) / 64)[None]
    noisy = torch.randn(1, 64)
    assert spectral_sparsity(pure) < 1e-5 < 0.5 < spectral_sparsity(noisy)  # float32 FFT leakage ~1e-6
    att = torch.full((1, 5, 4, 4), 0.5)
    skin = torch.zeros(8, 8)
    skin[2:6, 2:6] = 1
    expected = ((att - torch.nn.functional.interpolate(skin[None, None], size=(4, 4), mode="area")[0].gt(0.5).float())
                ** 2).mean()
    torch.testing.assert_close(mask_loss(att, skin), expected)
    with pytest.raises(ValueError, match="one shape"):
        rowwise_neg_pearson(R, R[:, :-1, :-1])
