# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Bespoke solvers (Shaul, Perez, Chen, Thabet, Pumarola & Lipman, "Bespoke Solvers for Generative Flow Models",
ICLR 2024, arXiv 2310.19075): RK1/RK2 on a learned scale-time transformation of the sampling ODE.

No official code exists (``facebookresearch/flow_matching`` issue 5); the steps follow the paper's Eqs. 17 and
19-20 (scale-time velocity Eq. 16). The solver works in the conditional-OT coordinates of any Gaussian path,
``tau = alpha / (alpha + sigma)`` and ``y = x / (alpha + sigma)``: there ``y = tau x0 + (1 - tau) eps`` and the
velocity is ``x0_hat - eps_hat``, bounded at both ends for every model type (epsilon, v, x0, flow), and one Euler
step is exactly one DDIM step (a schedule change is a scale-time change, the paper's Thm 2.3).

Parameters on the grid ``r_j = j h'`` (``h' = 1 / n`` for RK1, ``1 / (2 n)`` for RK2): OT times ``t_j`` (increasing),
their rates ``t_dot_j`` (independent parameters, Sec. 2.3), scales ``s_j > 0`` (``s_0 = 1``) and ``s_dot_j``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from ..schedule import native_from_ot, ot_velocity
from ._fitted import check_fit_info, check_fitted_steps, refuse_begin_index, warn_if_off_fit
from .base import COMMON_CONFIG_DOC, DiffSamplersScheduler, DiffSamplersSchedulerOutput

__all__ = ["BespokeScheduler", "rk1_step", "rk2_stage1", "rk2_stage2"]

BESPOKE_BASES = ("rk1", "rk2")


def rk1_step(y, u, h, t_dot, s, s_dot, s_next):
    """RK1-Bespoke (Eq. 17): ``y_next = (s + h s_dot) / s_next * y + h t_dot s / s_next * u``."""
    return ((s + h * s_dot) / s_next) * y + (h * t_dot * s / s_next) * u


def rk2_stage1(y, u, h, t_dot, s, s_dot, s_half):
    """RK2-Bespoke half step (Eq. 19): the midpoint state, returned in original coordinates (``z / s_half``)."""
    z = (s + 0.5 * h * s_dot) * y + 0.5 * h * t_dot * s * u
    return z / s_half


def rk2_stage2(y, y_half, u_half, h, s, t_dot_half, s_half, s_dot_half, s_next):
    """RK2-Bespoke full step (Eq. 20) from ``y``, the midpoint ``y_half = z / s_half`` and the velocity there."""
    z = y_half * s_half
    return (s * y + h * ((s_dot_half / s_half) * z + t_dot_half * s_half * u_half)) / s_next


class BespokeScheduler(DiffSamplersScheduler):
    __doc__ = (
        """Bespoke RK1/RK2 solver (arXiv 2310.19075) as a diffusers scheduler.

    Unfitted (``t=None``), ``solver_type="rk1"`` is DDIM exactly, on the config's own grid (identity scale, ``t_dot``
    the grid's gaps: the DDIM embedding), and ``solver_type="rk2"`` is the midpoint rule in OT coordinates on that
    grid (two model calls per step). Fitted (by :func:`diffsamplers.train.bespoke.train_bespoke`), it runs at its
    ``num_steps`` only, from pure noise (img2img is refused: an RK2 slice could start on a half step, and the scale
    starts at ``s_0 = 1``), and warns at another resolution.

    ``order`` is 2 for RK2: ``timesteps`` then holds ``2 n`` entries (stage times), as ``KDPM2DiscreteScheduler``.

    Args:
        solver_type (`str`, defaults to `"rk1"`): `"rk1"` (Euler) or `"rk2"` (midpoint).
        num_steps (`int`, *optional*): the fitted number of steps ``n``.
        t, t_dot, s, s_dot (`list[float]`, *optional*): the fitted OT times (``m + 1``), rates (``m``), scales
            (``m + 1``, ``s[0] = 1``) and scale rates (``m``), ``m = n`` (RK1) or ``2 n`` (RK2).
        fit_info (`dict`, *optional*): provenance of the fit."""
        + COMMON_CONFIG_DOC
    )

    @register_to_config
    def __init__(
        self,
        solver_type: str = "rk1",
        num_steps: int | None = None,
        t: list[float] | None = None,
        t_dot: list[float] | None = None,
        s: list[float] | None = None,
        s_dot: list[float] | None = None,
        fit_info: dict | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: Literal["epsilon", "sample", "v_prediction", "flow_prediction"] = "epsilon",
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        set_alpha_to_one: bool = True,
        use_karras_sigmas: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
    ):
        if solver_type not in BESPOKE_BASES:
            raise ValueError(f"solver_type must be one of {BESPOKE_BASES}, got {solver_type!r}")
        self._validate_common_config()
        check_fit_info(fit_info)
        self._check_params(solver_type, num_steps, t, t_dot, s, s_dot)
        self.order = 2 if solver_type == "rk2" else 1
        self._reset_state()

    @staticmethod
    def _check_params(base, n, t, t_dot, s, s_dot) -> None:
        given = [v is not None for v in (n, t, t_dot, s, s_dot)]
        if any(given) and not all(given):
            raise ValueError("give all of num_steps, t, t_dot, s and s_dot (a fitted solver), or none")
        if not any(given):
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_steps must be a positive integer, got {n!r}")
        m = n * (2 if base == "rk2" else 1)
        for name, values, length in (("t", t, m + 1), ("t_dot", t_dot, m), ("s", s, m + 1), ("s_dot", s_dot, m)):
            if len(values) != length or not all(math.isfinite(float(v)) for v in values):
                raise ValueError(f"{name} must have {length} finite values for {base} with {n} steps, got {values}")
        if not all(b > a for a, b in zip(t, t[1:])) or t[0] < 0 or t[-1] > 1:
            raise ValueError(f"t must be strictly increasing OT times in [0, 1], got {t}")
        if min(t_dot) <= 0 or min(s) <= 0 or float(s[0]) != 1.0:
            raise ValueError("t_dot and s must be positive and s[0] must be 1")

    @property
    def is_fitted(self) -> bool:
        return self.config.t is not None

    def _reset_state(self) -> None:
        self._y: torch.Tensor | None = None  # RK2: the step's start in OT coordinates

    # -- grids --------------------------------------------------------------------------------------------------

    def _native(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(timestep, alpha, sigma)`` of OT times ``tau`` (float64)."""
        return native_from_ot(self.noise_schedule, tau)

    def _cleanest_ot_time(self) -> torch.Tensor:
        """The OT time of the cleanest level a model can be evaluated at (timestep 0 of a VP schedule)."""
        if self.is_flow:
            return torch.tensor(1.0, dtype=torch.float64)
        alpha, sigma = self.noise_schedule.alpha_sigma(0)
        return alpha / (alpha + sigma)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Unfitted: the config's grid (as DDIM / FlowMatchEuler make it); RK2 adds the OT midpoints. Fitted: only
        the fitted step count is accepted and the grid is the fitted one."""
        rk2 = self.config.solver_type == "rk2"
        if self.is_fitted:
            n = self.config.num_steps
            check_fitted_steps(type(self).__name__, n, num_inference_steps, timesteps, sigmas)
            tau = torch.tensor(self.config.t, dtype=torch.float64)
            self._t_dot = list(self.config.t_dot)
            self._s, self._s_dot = list(self.config.s), list(self.config.s_dot)
            self._h = 1.0 / (2 * n if rk2 else n)
            ts, alpha, sigma = self._native(tau)
            self.num_inference_steps = n
        else:
            super().set_timesteps(num_inference_steps, device, timesteps, sigmas, mu)
            n = self.num_inference_steps
            tau_t = self.alpha_t / (self.alpha_t + self.sigma_t)
            tau_n = self.alpha_next / (self.alpha_next + self.sigma_next)
            if rk2:
                # midpoint in OT time between each step's start and end, but no cleaner than the cleanest level
                # the model was trained at: on a fine VP grid the last midpoint would fall past timestep 0, where
                # the model cannot be evaluated (the first stage's rate then lands the half step there)
                mid = torch.minimum(0.5 * (tau_t + tau_n), self._cleanest_ot_time())
                ts_mid, a_mid, s_mid = self._native(mid)
                tau = torch.stack([tau_t, mid], 1).reshape(-1)
                tau = torch.cat([tau, tau_n[-1:]])
                self._h = 1.0 / (2 * n)
                self._t_dot = (torch.stack([2 * (mid - tau_t), tau_n - tau_t], 1).reshape(-1) * n).tolist()
                ts = torch.stack([self.timesteps.double().cpu(), ts_mid], 1).reshape(-1)
                alpha = torch.cat([torch.stack([self.alpha_t, a_mid], 1).reshape(-1), self.alpha_next[-1:]])
                sigma = torch.cat([torch.stack([self.sigma_t, s_mid], 1).reshape(-1), self.sigma_next[-1:]])
                ts = torch.cat([ts, torch.tensor([-1.0], dtype=torch.float64)])
            else:
                self._h = 1.0 / n
                self._t_dot = ((tau_n - tau_t) * n).tolist()
                ts = torch.cat([self.timesteps.double().cpu(), torch.tensor([-1.0], dtype=torch.float64)])
                alpha = torch.cat([self.alpha_t, self.alpha_next[-1:]])
                sigma = torch.cat([self.sigma_t, self.sigma_next[-1:]])
                tau = torch.cat([tau_t, tau_n[-1:]])
            m = len(self._t_dot)
            self._s, self._s_dot = [1.0] * (m + 1), [0.0] * m
            # where DDIM steps to a level other than the next grid entry ("linspace" spacing) the step's end level
            self._end_alpha, self._end_sigma = self.alpha_next, self.sigma_next
        stages = ts[:-1]
        if bool((stages == stages.round()).all()) and not self.is_flow:
            stages = stages.long()
        else:
            stages = stages.float()
        self.timesteps = stages.to(device)
        self._alpha, self._sigma = alpha, sigma  # per grid point, float64 CPU
        zero = torch.zeros(1, dtype=torch.float64)
        self.sigmas = (torch.cat([sigma[:-1], zero]) if self.is_flow
                       else torch.cat([sigma[:-1] / alpha[:-1], zero])).float()
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def stage_grid(self) -> dict:
        """The grid of the current run (after :meth:`set_timesteps`): per grid point ``j`` the OT time ``tau``, the
        native ``alpha``/``sigma`` (float64), the stage ``timesteps``, and the parameters ``t_dot``, ``s``, ``s_dot``
        with the grid spacing ``h`` (half a step for RK2). What a fit's local-error loss needs."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before stage_grid")
        alpha, sigma = self._alpha, self._sigma
        return dict(tau=alpha / (alpha + sigma), alpha=alpha, sigma=sigma, timesteps=self.timesteps,
                    t_dot=list(self._t_dot), s=list(self._s), s_dot=list(self._s_dot), h=self._h)

    def set_begin_index(self, begin_index: int = 0) -> None:
        if self.is_fitted or (self.config.solver_type == "rk2" and begin_index % 2):
            refuse_begin_index(type(self).__name__, begin_index)
        super().set_begin_index(begin_index)

    def check_fit(self, resolution: Any = None, guidance_scale: float | None = None) -> None:
        """Warn when used at another resolution or guidance scale than fitted."""
        warn_if_off_fit(type(self).__name__, self.config.fit_info, resolution, guidance_scale)

    def _end_level(self, j: int) -> tuple[float, float]:
        """Native level the output of grid step ``j`` lives at."""
        if not self.is_fitted and self.config.solver_type == "rk1":
            return float(self._end_alpha[j]), float(self._end_sigma[j])
        return float(self._alpha[j + 1]), float(self._sigma[j + 1])

    # -- step ---------------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> DiffSamplersSchedulerOutput | tuple:
        """One stage: RK1 steps once per call; RK2 returns the midpoint on even calls and the step on odd ones."""
        if eta:
            raise ValueError(f"BespokeScheduler is deterministic: eta must be 0, got {eta}")
        j = self._begin_step(timestep, model_output, sample)
        if j == 0 and self.is_fitted:
            self.check_fit(resolution=tuple(sample.shape[-2:]))
        a, s_ = float(self._alpha[j]), float(self._sigma[j])
        y, u = ot_velocity(model_output.double(), sample.double(), a, s_, self.config.prediction_type)
        h, td, sc, sd = self._h, self._t_dot, self._s, self._s_dot  # h: the grid spacing (half a step for RK2)
        if self.config.solver_type == "rk1":
            y_next = rk1_step(y, u, h, td[j], sc[j], sd[j], sc[j + 1])
        elif j % 2 == 0:
            self._y = y
            y_next = rk2_stage1(y, u, 2 * h, td[j], sc[j], sd[j], sc[j + 1])
        else:
            if self._y is None or self._y.shape != y.shape:
                raise ValueError("an RK2 step's second stage needs its first; call set_timesteps to start a new run")
            y_next = rk2_stage2(self._y, y, u, 2 * h, sc[j - 1], td[j], sc[j], sd[j], sc[j + 1])
            self._y = None
        a_n, s_n = self._end_level(j)
        prev = y_next * (a_n + s_n)
        self._step_index = j + 1
        prev_sample = prev.to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return DiffSamplersSchedulerOutput(prev_sample=prev_sample)
