# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The teleport map and the frames of diffusers latents: the pure maths of analytical teleportation.

Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models and its
Applications" (arXiv 2412.09726; earlier preprint arXiv 2311.10892): for Gaussian data ``x0 ~ N(mu, U diag(lam) U^T)``
the probability-flow ODE of any frame ``x_t = a_t x0 + s_t eps`` is linear, and its solution moves each eigen-direction
by ``psi_k(t) = sqrt((a_t^2 lam_k + s_t^2) / (a_T^2 lam_k + s_T^2))`` (the closed-form Gaussian solution of the
paper; the map itself is :func:`diffsamplers.schedule.gaussian_flow_map`, as the official code's ``edm_x_t_traj`` in
``Animadversio/GaussianTeleportationDiffusion`` computes it for the EDM frame). Replacing the high-noise part of a
sampler's trajectory by this map is the paper's "analytical teleportation".

This module holds what :class:`~diffsamplers.TeleportScheduler` needs and nothing that reads data:

* :func:`teleport`: the closed-form map applied with data statistics (float64 inside);
* :class:`GaussianStatsLike`: the attributes such statistics have (:class:`diffsamplers.GaussianStats`, which streams
  datasets and VAE latents into them, lives in :mod:`diffsamplers.pipelines`);
* frame helpers (:func:`latent_frame`, :func:`frame_coeffs`): which ``(a_t, s_t)`` the ``latents`` tensor of a
  diffusers scheduler carries.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Protocol, runtime_checkable

import torch

from ..schedule import FRAMES, Level, config_family, frame_level, gaussian_flow_map

__all__ = ["GaussianStatsLike", "check_stats", "frame_coeffs", "latent_frame", "teleport"]


@runtime_checkable
class GaussianStatsLike(Protocol):
    """Gaussian data statistics ``N(mean, U diag(eigvals) U^T + residual_variance (I - U U^T))``.

    :class:`diffsamplers.GaussianStats` is one; any object with these attributes (float tensors on any device) works
    with :func:`teleport` and :class:`~diffsamplers.TeleportScheduler`.
    """

    mean: torch.Tensor  # (D,)
    eigvecs: torch.Tensor  # (D, r), orthonormal columns
    eigvals: torch.Tensor  # (r,)
    residual_variance: float
    shape: tuple[int, ...]  # the per-sample shape, D values


def check_stats(stats: Any, name: str = "stats") -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``stats`` looks like :class:`GaussianStatsLike`."""
    if not isinstance(stats, GaussianStatsLike):
        missing = [a for a in ("mean", "eigvecs", "eigvals", "residual_variance", "shape") if not hasattr(stats, a)]
        raise TypeError(
            f"{name} must be a GaussianStats (or have its attributes; missing {', '.join(missing)}), "
            f"got {type(stats).__name__}"
        )
    mean, eigvecs, eigvals = stats.mean, stats.eigvecs, stats.eigvals
    if not all(isinstance(t, torch.Tensor) for t in (mean, eigvecs, eigvals)):
        raise TypeError(f"{name}.mean, .eigvecs and .eigvals must be torch.Tensors")
    dim = mean.numel()
    if eigvecs.ndim != 2 or eigvecs.shape[0] != dim or eigvals.numel() != eigvecs.shape[1]:
        raise ValueError(
            f"{name} is inconsistent: mean has {dim} values, eigvecs shape {tuple(eigvecs.shape)}, eigvals "
            f"{eigvals.numel()} values (expected (D, r) and r)"
        )
    if math.prod(tuple(stats.shape)) != dim:
        raise ValueError(f"{name}.shape {tuple(stats.shape)} does not hold its D = {dim} values")


# (mean, eigvecs, eigvals) of each statistics object per device, so repeated teleports do not re-upload U
_ON_DEVICE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on(stats: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tensors = (stats.mean, stats.eigvecs, stats.eigvals)
    try:
        cache = _ON_DEVICE.setdefault(stats, {})
    except TypeError:  # an object that cannot be weakly referenced: no cache
        cache = {}
    key = str(device)
    # the cache is keyed on the tensors too, so replacing an attribute of the statistics invalidates it
    hit = cache.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], tensors)):
        hit = cache[key] = (tensors, tuple(t.detach().to(device=device, dtype=torch.float64) for t in tensors))
    mean, eigvecs, eigvals = hit[1]
    return mean.reshape(-1), eigvecs, eigvals.reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# The teleport map
# ----------------------------------------------------------------------------------------------------------------


def teleport(x_T: torch.Tensor, stats: GaussianStatsLike, from_level: Level, to_level: Level) -> torch.Tensor:
    """Teleport samples along the closed-form probability-flow solution of the Gaussian ``stats``.

    Wang & Vastola (arXiv 2412.09726), the closed-form solution for Gaussian data: each eigen-direction ``u_k`` of
    ``x_T - a_T mu`` is scaled by ``psi_k = sqrt((a_t^2 lam_k + s_t^2) / (a_T^2 lam_k + s_T^2))`` and the mean term
    becomes ``a_t mu``; the directions outside ``span(U)`` use ``residual_variance`` as their ``lam``.

    Frames are given by their coefficients: a state ``x = alpha x0 + sigma eps`` sits at level ``(alpha, sigma)``.
    Use :func:`~diffsamplers.schedule.frame_level` to build them (``("vp", s)``, ``("ve", s)``, ``("flow", t)``) or
    :func:`frame_coeffs` to read them off a diffusers scheduler. The map is computed in float64 (needed at
    ``sigma ~ 80``) and cast back to the dtype of ``x_T``.

    Args:
        x_T (`torch.Tensor` of shape `(B, ...)`): samples at ``from_level``; each sample must have ``D`` values
            (any shape, flattened in C order, the order the statistics were accumulated in).
        stats (`GaussianStats`): the data statistics, in the same space as ``x_T`` (pixels or scaled latents).
        from_level (`tuple`): ``(alpha, sigma)`` of ``x_T``: floats or per-sample ``(B,)`` tensors; ``sigma > 0``.
        to_level (`tuple`): ``(alpha, sigma)`` to teleport to; ``sigma = 0`` gives the clean end.

    Returns:
        `torch.Tensor`: the teleported samples, same shape, dtype and device as ``x_T``.
    """
    if not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a torch.Tensor, got {type(x_T).__name__}")
    check_stats(stats)
    if x_T.ndim < 1 or x_T.shape[0] == 0:
        raise ValueError(f"x_T must have a leading batch dimension, got shape {tuple(x_T.shape)}")
    per_sample, dim = x_T[0].numel(), stats.mean.numel()
    if per_sample != dim:
        space = getattr(stats, "space", None)
        raise ValueError(
            f"x_T has {per_sample} values per sample (shape {tuple(x_T.shape[1:])}) but stats describe {dim}"
            f" (shape {tuple(stats.shape)}); were the statistics computed in this space"
            f"{f' ({space})' if space else ''}?"
        )
    # MPS has no float64, so compute there on the CPU
    device = torch.device("cpu") if x_T.device.type == "mps" else x_T.device
    mean, eigvecs, eigvals = _on(stats, device)
    x = x_T.detach().to(device=device, dtype=torch.float64).reshape(x_T.shape[0], -1)
    out = gaussian_flow_map(x, mean, eigvecs, eigvals, from_level, to_level, float(stats.residual_variance))
    return out.reshape(x_T.shape).to(device=x_T.device, dtype=x_T.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Frames: what the latents tensor of a diffusers scheduler holds
# ----------------------------------------------------------------------------------------------------------------

# diffusers schedulers whose latents live in the variance-exploding frame x = x0 + sigma eps: the pipeline scales the
# initial noise by init_noise_sigma and scale_model_input divides by sqrt(sigma^2 + 1) (k-diffusion's convention)
_VE_FRAME_SCHEDULERS = frozenset(
    {
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "LMSDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverSDEScheduler",
        "EDMEulerScheduler",
        "EDMDPMSolverMultistepScheduler",
        "CosineDPMSolverMultistepScheduler",
    }
)


def latent_frame(scheduler: Any) -> str:
    """The frame (``"vp"``, ``"ve"`` or ``"flow"``) of the latents a pipeline feeds to ``scheduler``.

    Args:
        scheduler: a diffusers scheduler, a diffsamplers one, or a wrapper with a ``base`` scheduler (unwrapped).

    Returns:
        `str`: ``"flow"`` for FlowMatch schedulers and DPM/UniPC with ``use_flow_sigmas``; ``"ve"`` for the
        k-diffusion-style Euler/Heun/LMS/KDPM2/EDM family; ``"vp"`` otherwise (DDIM, DDPM, DPM-Solver, UniPC, DEIS,
        PNDM and the diffsamplers VP schedulers).
    """
    inner = getattr(scheduler, "base", None)
    if inner is not None and hasattr(inner, "step") and hasattr(inner, "config"):
        # a wrapper (TeleportScheduler, diffsamplers' WrappedScheduler): the latents are those of its solver
        return latent_frame(inner)
    config = getattr(scheduler, "config", None)
    if config is None or not hasattr(scheduler, "step"):
        raise TypeError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
    schedule = getattr(scheduler, "noise_schedule", None)
    if schedule is not None and hasattr(scheduler, "alpha_t"):  # a diffsamplers scheduler: its own family
        return "flow" if schedule.family == "flow" else ("ve" if schedule.family == "ve" else "vp")
    names = {cls.__name__ for cls in type(scheduler).__mro__}
    if any(n.startswith("FlowMatch") for n in names) or config.get("use_flow_sigmas", False):
        return "flow"
    if names & _VE_FRAME_SCHEDULERS:
        return "ve"
    family = config_family({"_class_name": type(scheduler).__name__, **dict(config)})
    return "flow" if family == "flow" else ("ve" if family == "ve" else "vp")


def frame_coeffs(scheduler: Any, index: int, frame: str | None = None) -> tuple[float, float]:
    """``(alpha, sigma)`` of the latents at array index ``index`` of ``scheduler.timesteps`` (float64 floats).

    The values are read from the scheduler's own tables, the ones its ``step`` uses: ``sigmas`` for DPM/UniPC/Euler/
    FlowMatch (VP families convert with ``a = 1 / sqrt(1 + sigma^2)``, ``s = sigma a``, which also covers Karras and
    exponential sigma options and "leading" spacing), ``alphas_cumprod[timesteps[index]]`` for DDIM-like schedulers
    without ``sigmas`` (so SD's first timestep 981 and linear-beta's 999 are not taken as pure noise; the official
    code's DDIM hybrid also starts at ``alphas_cumprod[timesteps[0]]``).
    ``index == len(scheduler.timesteps)`` is the level after the last step.

    Args:
        scheduler: a diffusers scheduler after ``set_timesteps``.
        index (`int`): array index into ``scheduler.timesteps`` (Heun-style schedulers duplicate entries: grid point
            ``k`` is index ``k * scheduler.order``).
        frame (`str`, *optional*): override :func:`latent_frame`.

    Returns:
        `tuple[float, float]`: ``(alpha, sigma)``.
    """
    if _is_teleport_scheduler(scheduler):
        scheduler = scheduler.base
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        raise ValueError("scheduler has no timesteps: call set_timesteps first")
    n = len(timesteps)
    if not isinstance(index, int) or not 0 <= index <= n:
        raise ValueError(f"index must be an int in [0, {n}], got {index!r}")
    frame = frame or latent_frame(scheduler)
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if getattr(scheduler, "noise_schedule", None) is not None and hasattr(scheduler, "alpha_t"):
        # diffsamplers schedulers keep float64 (alpha, sigma) tables of their own grid
        if index < n:
            return float(scheduler.alpha_t[index]), float(scheduler.sigma_t[index])
        return float(scheduler.alpha_next[-1]), float(scheduler.sigma_next[-1])
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and len(sigmas) == n + 1:
        return frame_level(frame, float(sigmas[index]))
    if frame != "vp" or getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"cannot read the noise levels of {type(scheduler).__name__} in the {frame!r} frame")
    alphas_cumprod = scheduler.alphas_cumprod.double().cpu()
    if index < n:
        abar = float(alphas_cumprod[int(timesteps[index])])
    else:
        abar = float(getattr(scheduler, "final_alpha_cumprod", alphas_cumprod[0]))
    return math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))


def _is_teleport_scheduler(obj: Any) -> bool:
    return type(obj).__name__ == "TeleportScheduler" and hasattr(obj, "base")


