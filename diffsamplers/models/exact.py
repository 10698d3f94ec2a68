# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Reference solutions of the probability-flow ODE for the exact testbed.

Every frame ``x_t = alpha_t x0 + sigma_t eps`` is a rescaling of one ODE: with ``theta = arctan(sigma / alpha)``
and ``z = x / sqrt(alpha^2 + sigma^2)`` (the variance-preserving state ``cos(theta) x0 + sin(theta) eps``), the
probability-flow ODE (Song et al. 2021, eq. 13; Karras et al. 2022, eq. 4) reads

    dz/dtheta = cos(theta) eps_hat(z) - sin(theta) x0_hat(z)      (the v-prediction),

whose right-hand side is bounded on the whole interval [0, pi/2]: pure noise (alpha = 0: flow sigma = 1, zero
terminal SNR) and clean data (sigma = 0) are ordinary end points. It is solved with torchdiffeq's dopri5 in
float64 and mapped back by ``x = sqrt(alpha^2 + sigma^2) * z``.
For a single Gaussian the ODE is linear and solved in closed form (Wang & Vastola, spectral form).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..schedule import NoiseSchedule, gaussian_flow_map


def _levels(schedule: NoiseSchedule, t_start: Any, t_end: Any) -> tuple[float, float, float, float]:
    a0, s0 = (float(v) for v in schedule.alpha_sigma(t_start))
    if t_end is None:
        a1, s1 = 1.0, 0.0
    else:
        a1, s1 = (float(v) for v in schedule.alpha_sigma(t_end))
    return a0, s0, a1, s1


def exact_solution(
    model: Any,
    x_T: torch.Tensor,
    t_start: Any,
    t_end: Any = None,
    *,
    method: str = "ode",
    rtol: float = 1e-10,
    atol: float = 1e-10,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve the probability-flow ODE of a :class:`GaussianMixtureModel` from ``x_T`` at diffusers timestep
    ``t_start`` (float allowed) to ``t_end`` (``None``: clean data, sigma = 0).

    Args:
        model: the mixture; its ``schedule`` gives the frame of ``x_T`` and of the result.
        x_T (`torch.Tensor`): start samples, shape (B, C, H, W), in the model's frame.
        method (`str`): ``"ode"`` (torchdiffeq dopri5, float64) or ``"closed_form"`` (single Gaussian only).
        rtol, atol (`float`): dopri5 tolerances (at most 1e-8 for reference use).
        class_labels (`torch.Tensor`, *optional*): condition each sample on a class.

    Returns:
        float64 tensor of the shape of ``x_T``.
    """
    if method not in ("ode", "closed_form"):
        raise ValueError(f"method must be 'ode' or 'closed_form', got {method!r}")
    a0, s0, a1, s1 = _levels(model.schedule, t_start, t_end)
    x = x_T.detach().to(torch.float64).reshape(x_T.shape[0], -1).cpu()
    if method == "closed_form":
        return _closed_form(model, x, a0, s0, a1, s1).reshape(x_T.shape)

    from torchdiffeq import odeint

    classes = None if class_labels is None else torch.as_tensor(class_labels).reshape(-1).long()
    batch = x.shape[0]

    def velocity(theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cos, sin = torch.cos(theta), torch.sin(theta)
        x0, eps = model.posterior(z, cos.expand(batch), sin.expand(batch), classes)
        return cos * eps - sin * x0

    grid = torch.tensor([math.atan2(s0, a0), math.atan2(s1, a1)], dtype=torch.float64)
    if grid[1] == grid[0]:
        return x_T.detach().to(torch.float64).clone()
    z = odeint(velocity, x / math.hypot(a0, s0), grid, method="dopri5", rtol=rtol, atol=atol)[-1]
    return (math.hypot(a1, s1) * z).reshape(x_T.shape)


def _closed_form(model: Any, x: torch.Tensor, a0: float, s0: float, a1: float, s1: float) -> torch.Tensor:
    """Wang & Vastola's closed-form probability flow for one Gaussian (arXiv 2412.09726; the spectral solution)."""
    if model.means.shape[0] != 1:
        raise ValueError("the closed form needs a single-Gaussian model (K = 1)")
    lam, U = torch.linalg.eigh(model.covariances()[0])
    return gaussian_flow_map(x, model.means[0], U, lam, (a0, s0), (a1, s1))
