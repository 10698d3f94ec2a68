# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Bespoke Non-Stationary solvers (Shaul, Singer, Chen, Le, Thabet, Pumarola & Lipman, "Bespoke Non-Stationary
Solvers for Fast Sampling of Diffusion and Flow Models", ICML 2024, arXiv 2403.01329).

No official code exists. A non-stationary (NS) solver gives every step its own linear combination of the start and
of all velocities so far (Sec. 3, Prop. 3.1), on learned times ``t_0 < ... < t_n``::

    y_{i+1} = a_i y_0 + sum_{j <= i} b_ij u_{t_j}(y_j)

It contains the Runge-Kutta and multistep families and their scale-time transforms (Thm 3.2). As for Bespoke the
steps run in conditional-OT coordinates, ``tau = alpha / (alpha + sigma)`` and ``y = x / (alpha + sigma)`` with the
bounded velocity ``u = x0_hat - eps_hat`` (arXiv 2310.19075, Thm 2.3): Euler there is DDIM, for every model type.
The paper's source-scale preconditioning for high guidance (Sec. 5, ``sigma_0`` = 5-10) is not offered.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from ..schedule import native_from_ot, ot_velocity
from ._fitted import check_fit_info, check_fitted_steps, refuse_begin_index, warn_if_off_fit
from .base import COMMON_CONFIG_DOC, DiffSamplersScheduler, DiffSamplersSchedulerOutput

__all__ = ["BNSScheduler", "euler_coefficients"]



def euler_coefficients(tau: list[float]) -> tuple[list[float], list[list[float]]]:
    """``(a, b)`` of Euler on the OT times ``tau`` written as an NS solver (the paper's initialisation, Sec. 5):
    ``a_i = 1`` and ``b_ij = tau_{j+1} - tau_j``."""
    gaps = [t1 - t0 for t0, t1 in zip(tau, tau[1:])]
    return [1.0] * len(gaps), [gaps[: i + 1] for i in range(len(gaps))]


class BNSScheduler(DiffSamplersScheduler):
    __doc__ = (
        """Bespoke Non-Stationary solver (arXiv 2403.01329) as a diffusers scheduler: one model call per step.

    Unfitted (``t=None``) it is Euler in OT coordinates on the config's own grid, each step from the sample it is
    given to the level DDIM steps to (``t - T // N``, which is not always the next grid entry): DDIM exactly, for
    every spacing and model type (the NS weights ``a_i = 1``, ``b_ij = tau_{j+1} - tau_j`` of the paper's Euler
    initialisation are the same solver where the levels agree). Fitted (by :func:`diffsamplers.train.bns.train_bns`),
    it runs at its ``num_steps`` only, from pure noise (img2img is refused: ``y_0`` is the fitted start), and warns
    at another resolution.

    Args:
        num_steps (`int`, *optional*): the fitted number of steps ``n``.
        t (`list[float]`, *optional*): the ``n + 1`` increasing OT times (the last is usually 1, the clean end).
        a (`list[float]`, *optional*): the ``n`` weights of the start ``y_0``.
        b (`list[list[float]]`, *optional*): ragged rows; row ``i`` has ``i + 1`` weights of the velocities so far.
        fit_info (`dict`, *optional*): provenance of the fit."""
        + COMMON_CONFIG_DOC
    )

    @register_to_config
    def __init__(
        self,
        num_steps: int | None = None,
        t: list[float] | None = None,
        a: list[float] | None = None,
        b: list[list[float]] | None = None,
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
        self._validate_common_config()
        check_fit_info(fit_info)
        self._check_params(num_steps, t, a, b)
        self._reset_state()

    @staticmethod
    def _check_params(n: Any, t: Any, a: Any, b: Any) -> None:
        given = [v is not None for v in (n, t, a, b)]
        if any(given) and not all(given):
            raise ValueError("give all of num_steps, t, a and b (a fitted BNS solver), or none")
        if not any(given):
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_steps must be a positive integer, got {n!r}")
        if len(t) != n + 1 or len(a) != n or len(b) != n:
            raise ValueError(f"t, a and b must have {n + 1}, {n} and {n} entries for {n} steps, got {len(t)}, "
                             f"{len(a)} and {len(b)}")
        for i, row in enumerate(b):
            if len(row) != i + 1:
                raise ValueError(f"b row {i} must have {i + 1} weights (one per velocity so far), got {len(row)}")
        values = np.concatenate([np.asarray(t, np.float64), np.asarray(a, np.float64)]
                                + [np.asarray(r, np.float64) for r in b])
        if not np.isfinite(values).all():
            raise ValueError("t, a and b must be finite")
        if not all(t1 > t0 for t0, t1 in zip(t, t[1:])) or t[0] < 0 or t[-1] > 1:
            raise ValueError(f"t must be strictly increasing OT times in [0, 1], got {t}")

    @property
    def is_fitted(self) -> bool:
        return self.config.t is not None

    def _reset_state(self) -> None:
        self._y_start: torch.Tensor | None = None
        self._velocities: list[torch.Tensor] = []  # fitted: every velocity of the run so far
        self._start_index = 0
        self._taken = 0

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Unfitted: the config's grid (as DDIM / FlowMatchEuler make it). Fitted: only the fitted step count is
        accepted and the grid is the fitted one."""
        if self.is_fitted:
            n = self.config.num_steps
            check_fitted_steps(type(self).__name__, n, num_inference_steps, timesteps, sigmas)
            ts, alpha, sigma = native_from_ot(self.noise_schedule, torch.tensor(self.config.t, dtype=torch.float64))
            if self.is_flow:
                noisiest = float(1.0 - self.noise_schedule.alpha_sigma(self.config.num_train_timesteps)[1])
            else:
                a_max, s_max = self.noise_schedule.alpha_sigma(self.config.num_train_timesteps - 1)
                noisiest = float(a_max / (a_max + s_max))
            if self.config.t[0] < noisiest - 1e-9:
                raise ValueError(f"t[0] = {self.config.t[0]} lies beyond the schedule's noisiest level (OT time "
                                 f"{noisiest:.6g}); the fit must start inside the model's training range")
            self.num_inference_steps = n
            self._a, self._b = list(self.config.a), [list(r) for r in self.config.b]
            stages = ts[:-1]
            if bool((stages == stages.round()).all()) and not self.is_flow:
                stages = stages.long()
            else:
                stages = stages.float()
            self.timesteps = stages.to(device)
            zero = torch.zeros(1, dtype=torch.float64)
            self.sigmas = (torch.cat([sigma[:-1], zero]) if self.is_flow
                           else torch.cat([sigma[:-1] / alpha[:-1], zero])).float()
            self._step_index = None
            self._begin_index = None
        else:
            super().set_timesteps(num_inference_steps, device, timesteps, sigmas, mu)
            ts = torch.cat([self.timesteps.double().cpu(), torch.tensor([-1.0], dtype=torch.float64)])
            alpha = torch.cat([self.alpha_t, self.alpha_next[-1:]])
            sigma = torch.cat([self.sigma_t, self.sigma_next[-1:]])
            self._a = self._b = None  # unfitted: DDIM's one-step Euler, from wherever the run starts (img2img)
            self._end_alpha, self._end_sigma = self.alpha_next, self.sigma_next
        self._alpha, self._sigma = alpha, sigma  # per grid point, float64 CPU
        self._reset_state()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if self.is_fitted:
            refuse_begin_index(type(self).__name__, begin_index)
        super().set_begin_index(begin_index)

    def check_fit(self, resolution: Any = None, guidance_scale: float | None = None) -> None:
        """Warn when used at another resolution or guidance scale than fitted."""
        warn_if_off_fit(type(self).__name__, self.config.fit_info, resolution, guidance_scale)

    def ot_times(self) -> list[float]:
        """The OT times ``tau`` of the current grid's points (after :meth:`set_timesteps`)."""
        return (self._alpha / (self._alpha + self._sigma)).tolist()

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
        """One NS step (one model call). ``eta`` must be 0 (the solver is deterministic); the other DDIM arguments are
        accepted so pipelines written for DDIM can call it positionally."""
        if eta:
            raise ValueError(f"BNSScheduler is deterministic: eta must be 0, got {eta}")
        j = self._begin_step(timestep, model_output, sample)
        alpha, sigma = float(self._alpha[j]), float(self._sigma[j])
        y, u = ot_velocity(model_output.double(), sample.double(), alpha, sigma, self.config.prediction_type)
        if self._y_start is None:
            if self.is_fitted:
                if j != 0:
                    refuse_begin_index(type(self).__name__, j)
                self.check_fit(resolution=tuple(sample.shape[-2:]))
            self._start_index, self._y_start = j, y
        if self._taken != j - self._start_index or u.shape != self._y_start.shape:
            raise ValueError("BNSScheduler steps must be taken in order on one batch; call set_timesteps to start a "
                             "new run")
        if self._a is None:  # Euler in OT time to DDIM's next level: one DDIM step
            a_n, s_n = float(self._end_alpha[j]), float(self._end_sigma[j])
            prev = (y + (a_n / (a_n + s_n) - alpha / (alpha + sigma)) * u) * (a_n + s_n)
        else:
            self._velocities.append(u)
            i = j - self._start_index
            y_next = self._a[i] * self._y_start
            for weight, v in zip(self._b[i], self._velocities):
                y_next = y_next + weight * v
            prev = y_next * float(self._alpha[j + 1] + self._sigma[j + 1])
        self._step_index = j + 1
        self._taken += 1
        if self._step_index == len(self.timesteps):  # free the history once the run is over
            self._reset_state()
        prev_sample = prev.to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return DiffSamplersSchedulerOutput(prev_sample=prev_sample)
