# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Second-order Tweedie for STSL (Rout et al. 2024, "Beyond First-Order Tweedie", CVPR, arXiv 2312.00852).

**A reconstruction.** STSL's code was never released (the official repository ``LituRout/stsl-inverse-edit`` holds
only a README), and its method section could not be checked. What is known from the abstract: a surrogate loss
that lower-bounds the second-order Tweedie approximation, needs only the trace of the Hessian of ``log p_t`` at
O(1) cost, and adds a drift to the reverse process. What follows is derived, not copied:

For ``x_t = a x0 + s eps`` and a noise prediction ``eps_hat``, Tweedie's formulas give
``E[x0 | x_t] = (x_t - s eps_hat) / a`` and ``Cov[x0 | x_t] = (s^2 / a^2) (I - s d eps_hat / d x_t)``
(Efron 2011; Meng et al. 2021, arXiv 2106.05527, eq. 6), so

    tr Cov[x0 | x_t] = (s^2 / a^2) (D - s div eps_hat(x_t)),

and ``E[||y - A x0||^2 | x_t] = ||y - A E[x0 | x_t]||^2 + tr(A Cov A^T)``: the second term is what first-order
methods (DPS, PSLD) drop. It is bounded below by a constant times ``tr Cov`` when the covariance lives in the row
space of ``A``; STSL's surrogate adds such a trace term, whose gradient ``-(s^3 / a^2) grad div eps_hat`` is
proportional to ``-grad tr Hessian log p_t`` (the drift the abstract describes). The divergence is estimated with
Hutchinson's estimator (Hutchinson 1989) and Rademacher probes, by finite differences of the network (one extra
call per probe) or by an exact vector-Jacobian product (no extra call, a double backward).

Unverified choices, all arguments of :func:`divergence` / :func:`tweedie_variance` and of
:meth:`InverseProblemSolver.stsl <diffsamplers.pipelines.inverse_problems.InverseProblemSolver.stsl>`: the
estimator (``scheme``), the number of probes, the finite-difference step, the weight ``rho`` (constant in time),
that the trace is normalised by ``D`` (a mean posterior variance, so ``rho`` does not scale with resolution), the
inner iterations per step and the PSLD gluing term.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["FD_SCHEMES", "divergence", "tweedie_variance"]

FD_SCHEMES = ("forward", "central", "vjp")


def _rademacher(shape: torch.Size, generator: Any, like: torch.Tensor) -> torch.Tensor:
    # drawn on the CPU so a seeded estimate does not depend on the device; with one generator per sample, a
    # sample's probes do not depend on the rest of the batch
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} for a batch of {shape[0]}")
        v = torch.stack([torch.randint(0, 2, tuple(shape[1:]), generator=g, dtype=torch.int8) for g in generator])
    else:
        v = torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int8)
    return (v.to(torch.float32) * 2 - 1).to(like.device, like.dtype)


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def divergence(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    probes: int = 1,
    fd_step: float = 1e-3,
    scheme: str = "forward",
    generator: Any = None,
) -> tuple[torch.Tensor, int]:
    """Hutchinson estimate of ``div fn(x) = tr(d fn / d x)`` per sample, differentiable w.r.t. ``x``.

    With Rademacher probes ``v``: ``"forward"`` takes ``<v, fn(x + h v) - fn(x)> / h``, ``"central"``
    ``<v, fn(x + h v) - fn(x - h v)> / (2 h)``, and ``"vjp"`` the exact ``v^T J v`` from one vector-Jacobian product
    of ``out`` (built with ``create_graph``, so its gradient is a double backward). The step is relative:
    ``h = fd_step * rms(x)`` per sample (detached), the ``1e-3 ||z|| / sqrt(D)`` rule of thumb.

    Args:
        fn (`Callable`): maps a batch `(B, ...)` to a batch of the same shape (the noise prediction).
        x (`torch.Tensor`): where to evaluate; must require grad for ``"vjp"``.
        out (`torch.Tensor`, *optional*): ``fn(x)`` if already computed (reused by ``"forward"`` and ``"vjp"``).
        probes (`int`, defaults to 1): number of probes averaged.
        fd_step (`float`, defaults to 1e-3): relative finite-difference step.
        scheme (`str`, defaults to `"forward"`): one of :data:`FD_SCHEMES`.
        generator (`torch.Generator` or list, *optional*): CPU generator of the probes, or one per sample.

    Returns:
        `(torch.Tensor, int)`: the estimate `(B,)` and the number of extra calls of ``fn`` it made.
    """
    if scheme not in FD_SCHEMES:
        raise ValueError(f"scheme must be one of {FD_SCHEMES}, got {scheme!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    if not fd_step > 0:
        raise ValueError(f"fd_step must be positive, got {fd_step!r}")
    calls = 0
    if out is None and scheme != "central":
        out, calls = fn(x), 1
    if scheme == "vjp" and not out.requires_grad:
        raise ValueError("scheme='vjp' needs x to require grad and out = fn(x) to carry its graph")
    h = fd_step * x.detach().flatten(1).pow(2).mean(1).sqrt().clamp(min=1e-8)
    h = h.reshape(-1, *([1] * (x.ndim - 1)))
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(probes):
        v = _rademacher(x.shape, generator, x)
        if scheme == "forward":
            total = total + _per_sample_dot(v, fn(x + h * v) - out) / h.flatten()
            calls += 1
        elif scheme == "central":
            total = total + _per_sample_dot(v, fn(x + h * v) - fn(x - h * v)) / (2 * h.flatten())
            calls += 2
        else:
            (jtv,) = torch.autograd.grad(out, x, grad_outputs=v, create_graph=True)
            total = total + _per_sample_dot(v, jtv)
    return total / probes, calls


def tweedie_variance(eps_div: torch.Tensor, alpha: Any, sigma: Any, dim: int) -> torch.Tensor:
    """Mean posterior variance ``tr Cov[x0 | x_t] / D = (s^2 / a^2) (1 - s div eps_hat / D)`` (second-order Tweedie).

    Args:
        eps_div (`torch.Tensor`): ``div eps_hat(x_t)`` per sample `(B,)` (exact or from :func:`divergence`).
        alpha (`float` or `torch.Tensor`): ``a`` at ``t`` (scalar or `(B,)`).
        sigma (`float` or `torch.Tensor`): ``s`` at ``t``.
        dim (`int`): ``D``, the number of elements per sample.
    """
    a = torch.as_tensor(alpha, dtype=eps_div.dtype, device=eps_div.device)
    s = torch.as_tensor(sigma, dtype=eps_div.dtype, device=eps_div.device)
    return (s / a) ** 2 * (1 - s * eps_div / dim)
