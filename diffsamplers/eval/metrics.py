# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Per-pair metrics between a sampler's outputs and the ground truth of the same seeds.

Convention: images are float tensors ``(N, C, H, W)`` in **[0, 1]**, what diffusers pipelines return with
``output_type="pt"``. Images in [-1, 1] must be mapped with ``(x + 1) / 2`` first; uint8 images with ``x / 255``.
Every metric returns one value per pair, shape ``(N,)``, so callers can average, take quantiles or bootstrap.
Per-pair metrics only make sense for deterministic (ODE) samplers; for stochastic ones compare distributions (FID).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["lpips", "lpips_available", "psnr", "rmse", "ssim"]

# tolerance for values just outside [0, 1] from resampling or fp16 decoding; they are clamped
_RANGE_TOL = 1e-4
_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def _check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        hint = "; convert uint8 images with x.float() / 255" if x.dtype == torch.uint8 else ""
        raise TypeError(f"`{name}` must be a floating point tensor, got {x.dtype}{hint}")
    return x


def _check_images(x: object, name: str) -> torch.Tensor:
    x = _check_tensor(x, name)
    if x.ndim != 4:
        raise ValueError(f"`{name}` must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= -_RANGE_TOL and hi <= 1 + _RANGE_TOL):
            hint = "; map [-1, 1] images with (x + 1) / 2" if lo < 0 else ""
            raise ValueError(f"`{name}` must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")
    return x.clamp(0, 1)


def _check_pair(pred: object, target: object, images: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    check = _check_images if images else _check_tensor
    pred, target = check(pred, "pred"), check(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(f"`pred` and `target` must be on the same device, got {pred.device} and {target.device}")
    return pred, target


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root mean squared error per sample, over all non-batch dimensions; for latents (any range).

    Args:
        pred (`torch.Tensor`): ``(N, ...)`` float samples, e.g. a few-step sampler's latents.
        target (`torch.Tensor`): same shape, e.g. the ground-truth latents of the same seeds.

    Returns:
        `torch.Tensor`: float64, shape ``(N,)``.
    """
    pred, target = _check_pair(pred, target, images=False)
    if pred.ndim < 1 or pred.shape[0] == 0:
        raise ValueError(f"`pred` must have a non-empty batch dimension, got shape {tuple(pred.shape)}")
    diff = pred.double() - target.double()
    return diff.reshape(diff.shape[0], -1).pow(2).mean(dim=1).sqrt()


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, with ``data_range=1`` (images in [0, 1]).

    Computed by ``torchmetrics.functional.peak_signal_noise_ratio`` per image (not pooled over the batch), in
    float64. Identical images give ``inf``.

    Args:
        pred (`torch.Tensor`): ``(N, C, H, W)`` in [0, 1].
        target (`torch.Tensor`): ``(N, C, H, W)`` in [0, 1].

    Returns:
        `torch.Tensor`: float64, shape ``(N,)``.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pred, target = _check_pair(pred, target)
    return peak_signal_noise_ratio(pred.double(), target.double(), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image, with ``data_range=1`` and torchmetrics' defaults (11x11 Gaussian, sigma 1.5).

    Args:
        pred (`torch.Tensor`): ``(N, C, H, W)`` in [0, 1], ``H, W >= 11``.
        target (`torch.Tensor`): ``(N, C, H, W)`` in [0, 1].

    Returns:
        `torch.Tensor`: float64, shape ``(N,)``.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = _check_pair(pred, target)
    if min(pred.shape[2:]) < 11:
        raise ValueError(f"`pred` must be at least 11x11 for SSIM's 11x11 window, got {tuple(pred.shape[2:])}")
    return structural_similarity_index_measure(pred.double(), target.double(), data_range=1.0, reduction="none")


def _lpips_weight_files(net_type: str) -> list[Path]:
    """Files LPIPS needs: the torchvision backbone in the torch hub cache and torchmetrics' bundled linear heads."""
    import torchmetrics.functional.image.lpips as tm_lpips
    import torchvision

    weights = getattr(torchvision.models, _LPIPS_BACKBONES[net_type]).DEFAULT
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    heads = Path(tm_lpips.__file__).parent / "lpips_models" / f"{net_type}.pth"
    return [backbone, heads]


def lpips_available(net_type: str = "alex") -> bool:
    """Whether LPIPS with this backbone can run offline (its weights are on disk; nothing is downloaded).

    Args:
        net_type (`str`, *optional*, defaults to `"alex"`): `"alex"`, `"vgg"` or `"squeeze"`.
    """
    if net_type not in _LPIPS_BACKBONES:
        raise ValueError(f"`net_type` must be one of {sorted(_LPIPS_BACKBONES)}, got {net_type!r}")
    try:
        return all(path.is_file() for path in _lpips_weight_files(net_type))
    except ImportError:
        return False


@functools.lru_cache(maxsize=4)
def _lpips_net(net_type: str, device: str) -> torch.nn.Module:
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    return _NoTrainLpips(net=net_type).to(device)


def lpips(pred: torch.Tensor, target: torch.Tensor, net_type: str = "alex") -> torch.Tensor | None:
    """LPIPS distance per image (torchmetrics' implementation), or `None` when its weights are not on disk.

    torchmetrics ships the linear heads, but the backbone is torchvision's ImageNet network, which torchvision would
    download into ``$TORCH_HOME/hub/checkpoints``. Nothing is downloaded here: without that file a warning names it
    and `None` is returned (see :func:`lpips_available`). The network is cached per backbone and device.

    Args:
        pred (`torch.Tensor`): ``(N, 3, H, W)`` in [0, 1].
        target (`torch.Tensor`): ``(N, 3, H, W)`` in [0, 1].
        net_type (`str`, *optional*, defaults to `"alex"`): backbone, `"alex"`, `"vgg"` or `"squeeze"`.

    Returns:
        `torch.Tensor` or `None`: float32, shape ``(N,)``.
    """
    pred, target = _check_pair(pred, target)
    if pred.shape[1] != 3:
        raise ValueError(f"`pred` must have 3 channels for LPIPS, got {pred.shape[1]}")
    if not lpips_available(net_type):
        missing = [str(p) for p in _lpips_weight_files(net_type) if not p.is_file()]
        message = f"LPIPS ({net_type}) skipped: weights not on disk ({', '.join(missing)}); nothing is downloaded"
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
        return None
    net = _lpips_net(net_type, str(pred.device))
    with torch.no_grad():
        # normalize=True maps [0, 1] to the [-1, 1] the network expects
        return net(pred.float(), target.float(), normalize=True).reshape(-1)
