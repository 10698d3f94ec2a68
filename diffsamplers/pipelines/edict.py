# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""EDICT: exact diffusion inversion by two coupled DDIM sequences.

Wallace, Gokul & Naik, "EDICT: Exact Diffusion Inversion via Coupled Transformations", arXiv 2211.12446 (CVPR 2023);
official code https://github.com/salesforce/EDICT. Two latents ``(x, y)`` start equal; each denoising step updates
one with the model evaluated at the other, affine-coupling style, then mixes them:

    x' = A x + B f(y),     y' = A y + B f(x'),
    x'' = p x' + (1 - p) y',     y'' = p y' + (1 - p) x'',

with ``A x + B f`` the DDIM step (Song et al. 2021, arXiv 2010.02502, eq. 12 with eta = 0) written as a linear map
of the current latent and of the model output ``f``, and the mixing weight ``p = 0.93`` (the paper's value). Every
line is solved backwards exactly, so inversion reverses sampling up to round-off (float64, as the official code
runs), at two model evaluations per step (four passes with CFG). As the official code does (``leapfrog_steps``),
the two sequences swap roles at every other step.

The DDIM step is taken in the model's own frame (:func:`~diffsamplers.schedule.prediction_coefficients`): for
epsilon prediction ``A = alpha_next / alpha_t`` and ``B = sigma_next - sigma_t alpha_next / alpha_t`` (the paper's
coefficients); for a flow-matching velocity ``A = 1`` and ``B = sigma_next - sigma_t`` (an Euler step, well defined
at ``sigma_t = 1`` where ``alpha_t = 0``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..schedule import prediction_coefficients

EDICT_MIX = 0.93  # the paper's mixing weight p

Denoiser = Callable[[torch.Tensor, Any], torch.Tensor]


def edict_coefficients(prediction_type: str, alpha_t: float, sigma_t: float, alpha_next: float,
                       sigma_next: float) -> tuple[float, float]:
    """``(A, B)`` of the DDIM step ``z_next = A z_t + B model_output`` from level ``t`` to level ``next``."""
    (x0_out, x0_x), (eps_out, eps_x) = prediction_coefficients(prediction_type, alpha_t, sigma_t)
    a_n, s_n = float(alpha_next), float(sigma_next)
    return a_n * x0_x + s_n * eps_x, a_n * x0_out + s_n * eps_out


def _checked_mix(mix: float) -> float:
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 < float(mix) <= 1.0:
        raise ValueError(f"edict_mix must be a number in (0, 1], got {mix!r}")
    return float(mix)


def _step_setup(grid: Any, index: int, mix: float) -> tuple[Any, float, float, bool, float]:
    """The step's timestep, ``(A, B)``, whether the sequences swap roles (every other step, the official code's
    ``leapfrog_steps``) and the checked mixing weight; the same for a step and its inverse."""
    a, b = edict_coefficients(
        grid.config.prediction_type, grid.alpha_t[index], grid.sigma_t[index], grid.alpha_next[index],
        grid.sigma_next[index],
    )
    return grid.timesteps[index], a, b, index % 2 == 1, _checked_mix(mix)


def edict_step(denoise: Denoiser, grid: Any, index: int, x: torch.Tensor, y: torch.Tensor,
               mix: float = EDICT_MIX) -> tuple[torch.Tensor, torch.Tensor]:
    """One EDICT denoising step at ``grid.timesteps[index]`` from the pair ``(x, y)``.

    Args:
        denoise (`callable`): ``denoise(latents, timestep)`` -> the (guided) model output.
        grid: a scheduler after ``set_timesteps`` with float64 level tables ``alpha_t``, ``sigma_t``,
            ``alpha_next``, ``sigma_next`` (as :class:`~diffsamplers.BDIAScheduler` has) and ``timesteps``.
        index (`int`): the step's position in ``grid.timesteps``.
        x, y (`torch.Tensor`): the coupled latents (float64 for an exact inverse).
        mix (`float`, defaults to 0.93): the mixing weight ``p``.
    """
    t, a, b, swap, mix = _step_setup(grid, index, mix)
    if swap:
        x, y = y, x
    x_inter = a * x + b * denoise(y, t)
    y_inter = a * y + b * denoise(x_inter, t)
    x_new = mix * x_inter + (1 - mix) * y_inter
    y_new = mix * y_inter + (1 - mix) * x_new
    return (y_new, x_new) if swap else (x_new, y_new)


def edict_inverse_step(denoise: Denoiser, grid: Any, index: int, x_new: torch.Tensor, y_new: torch.Tensor,
                       mix: float = EDICT_MIX) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`edict_step` solved backwards: the pair before the step at ``grid.timesteps[index]``."""
    t, a, b, swap, mix = _step_setup(grid, index, mix)
    if swap:
        x_new, y_new = y_new, x_new
    y_inter = (y_new - (1 - mix) * x_new) / mix
    x_inter = (x_new - (1 - mix) * y_inter) / mix
    y = (y_inter - b * denoise(x_inter, t)) / a
    x = (x_inter - b * denoise(y, t)) / a
    return (y, x) if swap else (x, y)


def edict_invert(denoise: Denoiser, grid: Any, latents: torch.Tensor, mix: float = EDICT_MIX,
                 begin_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert clean ``latents`` to the noise pair ``(x_T, y_T)`` over ``grid.timesteps[begin_index:]`` (all of it
    by default)."""
    x = y = latents
    for index in range(len(grid.timesteps) - 1, begin_index - 1, -1):
        x, y = edict_inverse_step(denoise, grid, index, x, y, mix)
    return x, y


def edict_generate(denoise: Denoiser, grid: Any, x: torch.Tensor, y: torch.Tensor, mix: float = EDICT_MIX,
                   begin_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise the pair ``(x_T, y_T)`` over ``grid.timesteps[begin_index:]``; both halves of the result are the
    sample."""
    for index in range(begin_index, len(grid.timesteps)):
        x, y = edict_step(denoise, grid, index, x, y, mix)
    return x, y
