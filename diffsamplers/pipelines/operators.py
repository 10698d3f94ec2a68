# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Linear measurement operators ``y = A x + sigma_y n`` for inverse problems, on images in [-1, 1].

Each operator is a ``torch.nn.Module`` with ``forward(x) = A x`` and ``adjoint(y) = A^T y`` (the exact transpose, not
a pseudo-inverse or an up-sampler), and a stated measurement noise ``noise_sigma`` in the [-1, 1] image range (DPS,
Chung et al. 2023, arXiv 2209.14687, Sec. 4 and its official configs use ``sigma_y = 0.05`` on [-1, 1] images, half
the nominal level on [0, 1]). The conventions follow the official DPS / PSLD code so the baselines match it:

- inpainting keeps the image shape and zero-fills the hidden pixels (``A = A^T = diag(mask)``);
- super-resolution averages ``factor x factor`` blocks (``A^T`` spreads each value over its block, divided by
  ``factor^2``);
- blur is a per-channel convolution with zero padding (``A^T`` is the transposed convolution).
"""

from __future__ import annotations

import abc
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BlurOperator",
    "BoxInpainting",
    "GaussianBlur",
    "InpaintingOperator",
    "MeasurementOperator",
    "RandomInpainting",
    "SuperResolution",
]


def _check_sigma(noise_sigma: float) -> float:
    if isinstance(noise_sigma, bool) or not isinstance(noise_sigma, (int, float)) or not noise_sigma >= 0:
        raise ValueError(f"noise_sigma must be a non-negative number, got {noise_sigma!r}")
    return float(noise_sigma)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return value


class MeasurementOperator(nn.Module, abc.ABC):
    """Base class: a linear map ``A`` from images `(B, C, H, W)` to measurements, with its adjoint and noise level.

    Subclasses implement :meth:`forward`, :meth:`adjoint` and :meth:`measurement_shape`.

    Args:
        noise_sigma (`float`, defaults to 0.05): standard deviation of the additive Gaussian measurement noise, in
            the [-1, 1] image range.
    """

    def __init__(self, noise_sigma: float = 0.05):
        super().__init__()
        self.noise_sigma = _check_sigma(noise_sigma)

    @abc.abstractmethod
    def measurement_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of ``A x`` for one image of shape ``(C, H, W)``; a ``ValueError`` for images it cannot take."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for images `(B, C, H, W)`, without noise."""

    @abc.abstractmethod
    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y``: the exact transpose of :meth:`forward`."""

    def check_image(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """``x`` if it is a float `(B, C, H, W)` tensor the operator accepts, else a ``ValueError`` naming it."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating point torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
        self.measurement_shape(x.shape[1:])  # raises on a size the operator cannot take
        return x

    def check_measurement(self, y: torch.Tensor, image_shape: Sequence[int], name: str = "measurement") -> None:
        """Raise a ``ValueError`` naming ``name`` unless ``y`` has the shape ``A x`` has for images ``image_shape``."""
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            raise TypeError(f"{name} must be a floating point torch.Tensor, got {type(y).__name__}")
        expected = self.measurement_shape(tuple(image_shape)[-3:])
        if y.ndim != 4 or tuple(y.shape[1:]) != expected:
            raise ValueError(
                f"{name} has shape {tuple(y.shape)} but {type(self).__name__} maps images of shape "
                f"{tuple(image_shape)[-3:]} to (B, {', '.join(map(str, expected))})"
            )

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A noisy measurement ``A x + noise_sigma * n`` with ``n ~ N(0, I)`` (drawn on the CPU, so seeded draws do
        not depend on the device)."""
        y = self.forward(self.check_image(x))
        noise = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device, y.dtype)
        return y + self.noise_sigma * noise

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``A^T y + (I - A^T A) x``: PSLD's "gluing" target (Rout et al. 2023, arXiv 2307.00619, eq. 8). For a
        mask it is ``x`` with the observed pixels replaced by ``y``."""
        return x + self.adjoint(y - self.forward(x))


class InpaintingOperator(MeasurementOperator):
    """``A x = mask * x`` for a fixed 0/1 mask (1 = observed); self-adjoint; the measurement keeps the image shape.

    Args:
        mask (`torch.Tensor`): `(H, W)`, `(1, H, W)` or `(C, H, W)` of zeros and ones, broadcast over channels.
        noise_sigma (`float`, defaults to 0.05): measurement noise in the [-1, 1] range.
    """

    def __init__(self, mask: torch.Tensor, noise_sigma: float = 0.05):
        super().__init__(noise_sigma)
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3 or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask must be a 0/1 tensor of shape (H, W) or (C, H, W), got shape {tuple(mask.shape)}")
        self.register_buffer("mask", mask)

    def measurement_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        c, h, w = tuple(image_shape)
        mc, mh, mw = self.mask.shape
        if (h, w) != (mh, mw) or mc not in (1, c):
            raise ValueError(f"images of shape {(c, h, w)} do not match the mask of shape {(mc, mh, mw)}")
        return (c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.mask.to(y)

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mask * (x + noise_sigma * n)``: hidden pixels stay exactly zero, so ``y`` lies in the range of ``A`` and
        the residual of a consistent reconstruction is ``noise_sigma * sqrt(observed pixels)``."""
        return self.forward(super().measure(x, generator))


class BoxInpainting(InpaintingOperator):
    """Hide a ``box_size`` rectangle (DPS / PSLD box inpainting); centred unless ``top_left`` is given.

    Args:
        image_size (`int` or `(int, int)`): `(H, W)` of the images.
        box_size (`int` or `(int, int)`): height and width of the hidden box.
        top_left (`(int, int)`, *optional*): the box's first row and column (default: centred).
        noise_sigma (`float`, defaults to 0.05): measurement noise in the [-1, 1] range.
    """

    def __init__(self, image_size: int | Sequence[int], box_size: int | Sequence[int],
                 top_left: Sequence[int] | None = None, noise_sigma: float = 0.05):
        h, w = _pair(image_size, "image_size")
        bh, bw = _pair(box_size, "box_size")
        if bh > h or bw > w:
            raise ValueError(f"box_size {(bh, bw)} does not fit in image_size {(h, w)}")
        top, left = ((h - bh) // 2, (w - bw) // 2) if top_left is None else tuple(int(v) for v in top_left)
        if not (0 <= top <= h - bh and 0 <= left <= w - bw):
            raise ValueError(f"top_left {(top, left)} puts the box outside the image")
        mask = torch.ones(h, w)
        mask[top:top + bh, left:left + bw] = 0
        super().__init__(mask, noise_sigma)


class RandomInpainting(InpaintingOperator):
    """Hide a random ``fraction`` of the pixels (the same pixels in every channel), drawn once from ``seed``.

    Args:
        image_size (`int` or `(int, int)`): `(H, W)` of the images.
        fraction (`float`, defaults to 0.5): share of hidden pixels in ``[0, 1)`` (PSLD's configs hide 30-70%).
        seed (`int`, defaults to 0): seed of the mask.
        noise_sigma (`float`, defaults to 0.05): measurement noise in the [-1, 1] range.
    """

    def __init__(self, image_size: int | Sequence[int], fraction: float = 0.5, seed: int = 0,
                 noise_sigma: float = 0.05):
        h, w = _pair(image_size, "image_size")
        if not 0 <= fraction < 1:
            raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
        hidden = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))[: round(fraction * h * w)]
        mask = torch.ones(h * w)
        mask[hidden] = 0
        super().__init__(mask.view(h, w), noise_sigma)


class SuperResolution(MeasurementOperator):
    """Down-sampling by ``factor x factor`` average pooling; ``A^T`` spreads each value over its block / factor^2.

    Args:
        factor (`int`): 2, 4, ... (image sides must be multiples of it).
        noise_sigma (`float`, defaults to 0.05): measurement noise in the [-1, 1] range.
    """

    def __init__(self, factor: int, noise_sigma: float = 0.05):
        super().__init__(noise_sigma)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        self.factor = factor

    def measurement_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        c, h, w = tuple(image_shape)
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {(h, w)} is not a multiple of the super-resolution factor {self.factor}")
        return (c, h // self.factor, w // self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor**2


class BlurOperator(MeasurementOperator):
    """Convolution of every channel with a given kernel (e.g. a motion-blur kernel), zero padding, same size out.

    Args:
        kernel (`torch.Tensor`): `(k, k)` with odd ``k``; used as given (normalise it to sum 1 for a blur).
        noise_sigma (`float`, defaults to 0.05): measurement noise in the [-1, 1] range.
    """

    def __init__(self, kernel: torch.Tensor, noise_sigma: float = 0.05):
        super().__init__(noise_sigma)
        kernel = torch.as_tensor(kernel, dtype=torch.float32)
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
            raise ValueError(f"kernel must be a square (k, k) tensor with odd k, got shape {tuple(kernel.shape)}")
        self.register_buffer("kernel", kernel)

    def measurement_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(image_shape)

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.to(x)[None, None].expand(x.shape[1], 1, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._weight(x), padding=self.kernel.shape[0] // 2, groups=x.shape[1])

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(y, self._weight(y), padding=self.kernel.shape[0] // 2, groups=y.shape[1])


class GaussianBlur(BlurOperator):
    """Blur by a normalised Gaussian kernel (DPS: 61x61, intensity 3.0 at 256^2; scale both with the image).

    Args:
        kernel_size (`int`): odd side of the kernel.
        sigma (`float`): standard deviation of the Gaussian, in pixels.
        noise_sigma (`float`, defaults to 0.05): measurement noise in the [-1, 1] range.
    """

    def __init__(self, kernel_size: int, sigma: float, noise_sigma: float = 0.05):
        odd = isinstance(kernel_size, int) and not isinstance(kernel_size, bool) and kernel_size % 2 == 1
        if not odd or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if not sigma > 0 or math.isinf(sigma):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        r = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
        g = torch.exp(-0.5 * (r / sigma) ** 2)
        kernel = g[:, None] * g[None, :]
        super().__init__((kernel / kernel.sum()).float(), noise_sigma)
