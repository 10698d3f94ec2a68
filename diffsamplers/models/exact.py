# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Reference solutions of the probability-flow ODE for the exact testbed.

Any frame ``x_t = alpha_t x0 + sigma_t eps`` reduces to the variance-exploding ODE of ``y = x / alpha`` in the
noise level ``s = sigma / alpha`` (Karras et al. 2022, eq. 4 with their s(t) = 1):

    dy/ds = (y - D(y; s)) / s = eps_hat(y; s),

so the reference is solved in ``s`` with torchdiffeq's dopri5 in float64, and mapped back by ``x = alpha * y``.
For a single Gaussian the ODE is linear and solved in closed form (Wang & Vastola, spectral form).
"""

from __future__ import annotations

from typing import Any

import torch

from ..schedule import NoiseSchedule, gaussian_flow_map


def _levels(schedule: NoiseSchedule, t_start: Any, t_end: Any) -> tuple[float, float, float, float]:
    a0, s0 = (float(v) for v in schedule.alpha_sigma(t_start))
    if t_end is None:
        a1, s1 = 1.0, 0.0
    else:
        a1, s1 = (float(v) for v in schedule.alpha_sigma(t_end))
    if a0 <= 0:
        raise ValueError("t_start has alpha = 0 (zero terminal SNR): start the ODE one level below it")
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

    def velocity(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # in VE coordinates: alpha = 1 / sqrt(1 + s^2) scaling is irrelevant; use alpha = 1, sigma = s
        ones = torch.ones(batch, dtype=torch.float64)
        d = model.posterior_mean(y, ones, ones * s, classes)
        return (y - d) / s

    grid = torch.tensor([s0 / a0, s1 / a1], dtype=torch.float64)
    if grid[1] == grid[0]:
        return x_T.detach().to(torch.float64).clone()
    y = odeint(velocity, x / a0, grid, method="dopri5", rtol=rtol, atol=atol)[-1]
    return (a1 * y).reshape(x_T.shape)


def _closed_form(model: Any, x: torch.Tensor, a0: float, s0: float, a1: float, s1: float) -> torch.Tensor:
    """Wang & Vastola's solution for one Gaussian (research spec adaptive_dualfast_teleport.md, eq. 3.2)."""
    if model.means.shape[0] != 1:
        raise ValueError("the closed form needs a single-Gaussian model (K = 1)")
    lam, U = torch.linalg.eigh(model.covariances()[0])
    return gaussian_flow_map(x, model.means[0], U, lam, (a0, s0), (a1, s1))
