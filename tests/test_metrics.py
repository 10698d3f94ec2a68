# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Per-pair metrics against ground truth (diffsamplers.eval.metrics)."""

import os

import pytest
import torch

from diffsamplers.eval import metrics
from diffsamplers.eval.metrics import lpips, lpips_available, psnr, rmse, ssim


def _pair(n: int = 3, size: int = 16, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(n, 3, size, size, generator=g)
    pred = (target + noise * torch.randn(target.shape, generator=g)).clamp(0, 1)
    return pred, target


def test_psnr_per_image():
    pred, target = _pair()
    values = psnr(pred, target)
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    assert values.shape == (3,)
    torch.testing.assert_close(values, 10 * torch.log10(1 / mse))
    assert torch.isinf(psnr(target, target)).all()


def test_ssim_per_image():
    pred, target = _pair()
    values = ssim(pred, target)
    assert values.shape == (3,)
    assert (values < 1).all() and (values > 0.5).all()
    torch.testing.assert_close(ssim(target, target), torch.ones(3, dtype=torch.float64))
    single = ssim(pred[1:2], target[1:2])
    torch.testing.assert_close(single[0], values[1])  # per image, not pooled over the batch


def test_rmse_latents_any_range():
    g = torch.Generator().manual_seed(1)
    a, b = 4 * torch.randn(5, 4, 8, 8, generator=g), 4 * torch.randn(5, 4, 8, 8, generator=g)
    values = rmse(a, b)
    assert values.shape == (5,) and values.dtype == torch.float64
    torch.testing.assert_close(values, (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt())
    assert rmse(a, a).eq(0).all()


def test_validation_names_the_argument():
    pred, target = _pair()
    with pytest.raises(TypeError, match="`pred`"):
        psnr(pred.numpy(), target)
    with pytest.raises(TypeError, match=r"`target`.*x.float\(\) / 255"):
        ssim(pred, (target * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"`target` must be in \[0, 1\].*\(x \+ 1\) / 2"):
        psnr(pred, target * 2 - 1)
    with pytest.raises(ValueError, match="`pred` must be in"):
        psnr(pred * 3, target)
    with pytest.raises(ValueError, match="same shape"):
        psnr(pred[:2], target)
    with pytest.raises(ValueError, match=r"`pred` must have shape \(N, C, H, W\)"):
        psnr(pred[0], target[0])
    with pytest.raises(ValueError, match="11x11"):
        ssim(pred[..., :8, :8], target[..., :8, :8])
    with pytest.raises(TypeError, match="`target`"):
        rmse(pred, [1.0])
    # tiny excursions (fp16 decoding) are clamped, not rejected
    assert torch.isfinite(psnr(pred + 5e-5, target)).all()


def test_lpips_without_weights_returns_none(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert not lpips_available("alex")
    pred, target = _pair()
    with pytest.warns(UserWarning, match="alexnet.*nothing is downloaded"):
        assert lpips(pred, target) is None
    with pytest.raises(ValueError, match="net_type"):
        lpips_available("resnet")


def test_lpips_with_local_weights(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    # a random squeezenet saved where torchvision would cache the ImageNet one: exercises the offline path only
    url = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), checkpoints / os.path.basename(url))
    old_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    metrics._lpips_net.cache_clear()
    try:
        assert lpips_available("squeeze")
        pred, target = _pair(n=2, size=32)
        values = lpips(pred, target, net_type="squeeze")
        assert values.shape == (2,) and (values > 0).all()
        assert lpips(target, target, net_type="squeeze").abs().max() < 1e-6
    finally:
        torch.hub.set_dir(old_dir)
        metrics._lpips_net.cache_clear()
