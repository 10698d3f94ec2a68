# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""POLARIS: a per-step guidance scale chosen in closed form during inversion, then replayed by timestep.

Chen et al., "POLARIS: Projection-Orthogonal Least Squares for Robust and Adaptive Inversion", arXiv 2512.00369;
official code https://github.com/Chatonz/POLARIS (``reconstruction/ddim.py``, ``editing/sage.py``). DDIM inversion
moves ``z_{k-1} -> z_k`` with a noise prediction made before ``z_k`` exists; POLARIS picks the guidance scale of
step ``k`` so that the guided prediction changes as little as possible from the previous step's,

    omega_k = argmin_w || du + w (dc - du) ||^2 = <du, du - dc> / ||du - dc||^2,

with ``du = u_k - u_{k-1}`` and ``dc = c_k - c_{k-1}`` the step-to-step changes of the unconditional and
conditional outputs. At the optimum the residual is orthogonal to ``dc - du`` (the "projection-orthogonal" of the
name). The closed form is the official code's (the paper's own equation number could not be checked).

Settings as in the official scripts: the first inversion step (nothing cached) and a denominator at or below
``den_eps = 1e-6`` fall back to ``omega_init``; omega is clamped to ``[0, 15]``; sums run over the whole tensor,
batch included (one omega per batch), or per sample as an option. Unlike three of the official scripts
(``reconstruction/ddim.py``, ``editing/mask_p2p.py``, ``restoration/ddrm.py``, which index the list in denoising
order and so apply the first inversion step's omega at the noisiest generation step), the scales are stored by
timestep value and replayed by it, as ``editing/sage.py`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from ._guidance import combine, timestep_key

OMEGA_MIN = 0.0
OMEGA_MAX = 15.0
DEN_EPS = 1e-6


def polaris_omega(
    delta_uncond: torch.Tensor,
    delta_cond: torch.Tensor,
    per_sample: bool = False,
    omega_init: float = 1.0,
    omega_min: float = OMEGA_MIN,
    omega_max: float = OMEGA_MAX,
    den_eps: float = DEN_EPS,
) -> torch.Tensor:
    """The closed-form POLARIS scale ``<du, du - dc> / ||du - dc||^2`` (float64), one value per sample.

    Args:
        delta_uncond (`torch.Tensor`): ``u_k - u_{k-1}``, shape `(B, ...)`.
        delta_cond (`torch.Tensor`): ``c_k - c_{k-1}``, same shape.
        per_sample (`bool`, defaults to `False`): one omega per sample (sums over each sample) instead of one for
            the batch (sums over the whole tensor, the official code's reduction).
        omega_init (`float`, defaults to 1.0): the value where the denominator is at most ``den_eps``.
        omega_min (`float`, defaults to 0.0), omega_max (`float`, defaults to 15.0): the clamp.
        den_eps (`float`, defaults to 1e-6): the official absolute guard on ``||du - dc||^2``.

    Returns:
        `torch.Tensor`: shape `(B,)`, float64 (all entries equal unless ``per_sample``).
    """
    if delta_uncond.shape != delta_cond.shape or delta_uncond.ndim < 1:
        raise ValueError(
            f"delta_uncond and delta_cond must have one shape (B, ...), got {tuple(delta_uncond.shape)} and "
            f"{tuple(delta_cond.shape)}"
        )
    du, dc = delta_uncond.double(), delta_cond.double()
    diff = du - dc
    dims = tuple(range(1, du.ndim)) if per_sample else tuple(range(du.ndim))
    num, den = (du * diff).sum(dims), (diff * diff).sum(dims)
    usable = den > den_eps
    # the guarded division keeps the fallback branch free of 0/0 (NaN) values
    omega = torch.where(usable, num / torch.where(usable, den, torch.ones_like(den)), torch.full_like(den, omega_init))
    omega = omega.clamp(omega_min, omega_max)
    return omega.expand(du.shape[0]).clone() if omega.ndim == 0 else omega


class PolarisGuidance:
    """The POLARIS policy of one inversion: computes omega at each step from the current and the cached previous
    ``(u, c)``, guides with it, and records it in :attr:`scales` keyed by timestep value.

    Args:
        omega_init (`float`, defaults to 1.0): the scale at the first step and the fallback (the official value is
            1.0; :func:`~diffsamplers.pipelines.inversion.invert` passes its ``guidance_scale``).
        omega_min (`float`, defaults to 0.0), omega_max (`float`, defaults to 15.0): the clamp.
        den_eps (`float`, defaults to 1e-6): the denominator guard.
        per_sample (`bool`, defaults to `False`): one omega per sample instead of one per batch.
    """

    needs_uncond = True

    def __init__(
        self,
        omega_init: float = 1.0,
        omega_min: float = OMEGA_MIN,
        omega_max: float = OMEGA_MAX,
        den_eps: float = DEN_EPS,
        per_sample: bool = False,
    ):
        for name, value in (("omega_init", omega_init), ("omega_min", omega_min), ("omega_max", omega_max),
                            ("den_eps", den_eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not omega_min <= omega_init <= omega_max:
            raise ValueError(
                f"omega_init must lie in [omega_min, omega_max] = [{omega_min}, {omega_max}], got {omega_init}"
            )
        if den_eps < 0:
            raise ValueError(f"den_eps must be >= 0, got {den_eps}")
        self.omega_init, self.omega_min, self.omega_max = float(omega_init), float(omega_min), float(omega_max)
        self.den_eps, self.per_sample = float(den_eps), bool(per_sample)
        self.scales: dict[float, torch.Tensor] = {}
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def omega(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Omega for this step (shape `(B,)`), and cache ``(u, c)`` for the next one."""
        if self._previous is None:
            omega = torch.full((cond.shape[0],), self.omega_init, dtype=torch.float64)
        else:
            prev_u, prev_c = self._previous
            omega = polaris_omega(
                uncond - prev_u, cond - prev_c, self.per_sample, self.omega_init, self.omega_min, self.omega_max,
                self.den_eps,
            ).cpu()
        self._previous = (uncond, cond)
        return omega

    def __call__(self, timestep: Any, uncond: torch.Tensor | None, cond: torch.Tensor, record: bool = True):
        """The guided output at ``timestep``; ``record=False`` for a step whose scale is never replayed (BDIA's
        DDIM first step, made at the label of the step after it)."""
        if uncond is None:
            raise ValueError("POLARIS needs the unconditional output at every step")
        omega = self.omega(uncond, cond)
        if record:
            self.scales[timestep_key(timestep)] = omega
        return combine(uncond, cond, omega)
