# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""OLSS: Optimal Linear Subspace Search (Duan, Wang, Chen, Huang & Qian, CIKM 2023, arXiv 2305.14677).

Official code: ``alibaba/EasyNLP`` (``diffusion/olss_scheduler/olss.py``) and ``Artiprocher/FastSDXL``
(``FastSDXL/OLSS.py``). Every step of a linear sampler lies in the span of the initial noise and the model outputs
computed so far (Sec. 3 of the paper); OLSS learns the coefficients of that combination by least squares::

    x_{i+1} = coef_x[i] * x_T + sum_{j <= i} coef_e[i][j] * e_j

The coefficients are fitted by :func:`diffsamplers.train.olss.fit_olss`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from ..schedule import prediction_coefficients
from ._fitted import check_fit_info, check_fitted_steps, refuse_begin_index, warn_if_off_fit
from .base import COMMON_CONFIG_DOC, DiffSamplersScheduler, DiffSamplersSchedulerOutput

__all__ = ["OLSSScheduler"]


class OLSSScheduler(DiffSamplersScheduler):
    __doc__ = (
        """OLSS (arXiv 2305.14677): each step is a fitted linear combination of ``x_T`` and all model outputs so far.

    Unfitted (``solver_timesteps=None``), the coefficients are DDIM's own, expanded exactly through the recursion
    (``eta = 0``, any step count and grid, as ``DDIMScheduler``/``FlowMatchEulerDiscreteScheduler`` make them): the
    scheduler is then DDIM, which is also how an OLSS fit is initialised. Fitted, it runs only at its
    ``len(solver_timesteps)`` steps, from pure noise (``set_begin_index`` > 0, i.e. img2img, is refused), and warns
    when the sample's resolution differs from the fitted one. Arithmetic is float64; ``prev_sample`` has the
    sample's dtype.

    Unlike the official code the step index is counted (never looked up by value, which breaks on duplicated
    timesteps) and all history is reset by ``set_timesteps``.

    Args:
        solver_timesteps (`list[float]`, *optional*): the fitted grid of diffusers timesteps (decreasing).
        coef_x (`list[float]`, *optional*): the weight of ``x_T`` at each step.
        coef_e (`list[list[float]]`, *optional*): ragged rows; row ``i`` has ``i + 1`` weights of the model outputs.
        fit_info (`dict`, *optional*): provenance: model id and hash, resolution, guidance scale, reference solver
            and steps, number of training trajectories, per-step fit MSE, validation RMSE."""
        + COMMON_CONFIG_DOC
    )

    @register_to_config
    def __init__(
        self,
        solver_timesteps: list[float] | None = None,
        coef_x: list[float] | None = None,
        coef_e: list[list[float]] | None = None,
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
        self._check_coefficients(solver_timesteps, coef_x, coef_e)
        self._reset_state()

    @staticmethod
    def _check_coefficients(solver_timesteps: Any, coef_x: Any, coef_e: Any) -> None:
        given = [v is not None for v in (solver_timesteps, coef_x, coef_e)]
        if any(given) and not all(given):
            raise ValueError("give all of solver_timesteps, coef_x and coef_e (a fitted OLSS), or none (DDIM)")
        if not any(given):
            return
        n = len(solver_timesteps)
        if n < 1 or len(coef_x) != n or len(coef_e) != n:
            raise ValueError(
                f"solver_timesteps, coef_x and coef_e must have one entry per step, got lengths {n}, {len(coef_x)} "
                f"and {len(coef_e)}"
            )
        for i, row in enumerate(coef_e):
            if len(row) != i + 1:
                raise ValueError(f"coef_e row {i} must have {i + 1} weights (one per model output so far), got "
                                 f"{len(row)}")
        values = np.concatenate([np.asarray(coef_x, dtype=np.float64)] + [np.asarray(r, np.float64) for r in coef_e])
        if not np.isfinite(values).all():
            raise ValueError("coef_x and coef_e must be finite")
        ts = np.asarray(solver_timesteps, dtype=np.float64)
        if not np.isfinite(ts).all() or (n > 1 and not (ts[1:] < ts[:-1]).all()):
            raise ValueError(f"solver_timesteps must be finite and strictly decreasing, got {list(solver_timesteps)}")

    @property
    def is_fitted(self) -> bool:
        return self.config.solver_timesteps is not None

    # -- per-run state ------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._x_start: torch.Tensor | None = None
        self._outputs: list[torch.Tensor] = []
        self._rows: list[tuple[float, list[float]]] | None = None
        self._start_index = 0

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """As :meth:`DiffSamplersScheduler.set_timesteps` when unfitted (DDIM). Fitted: only the fitted step count
        (or ``None``) is accepted, custom grids are refused, and ``mu`` is ignored (the grid is the fitted one)."""
        if not self.is_fitted:
            super().set_timesteps(num_inference_steps, device, timesteps, sigmas, mu)
            return
        n = len(self.config.solver_timesteps)
        check_fitted_steps(type(self).__name__, n, num_inference_steps, timesteps, sigmas)
        ts = torch.tensor(self.config.solver_timesteps, dtype=torch.float64)
        if bool((ts == ts.round()).all()) and not self.is_flow:
            ts = ts.long()  # VP models take integer timesteps, as diffusers' grids give them
        else:
            ts = ts.float()
        alpha, sigma = self.noise_schedule.alpha_sigma(ts)
        self.num_inference_steps = n
        self.timesteps = ts.to(device)
        zero = torch.zeros(1, dtype=torch.float64)
        self.sigmas = (torch.cat([sigma, zero]) if self.is_flow else torch.cat([sigma / alpha, zero])).float()
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if self.is_fitted:
            refuse_begin_index(type(self).__name__, begin_index)
        super().set_begin_index(begin_index)

    def check_fit(self, resolution: Any = None, guidance_scale: float | None = None) -> None:
        """Warn if this fitted scheduler is used at another resolution (``(H, W)`` of the latents, or the full
        ``(C, H, W)``) or guidance scale than it was fitted at."""
        warn_if_off_fit(type(self).__name__, self.config.fit_info, resolution, guidance_scale)

    # -- coefficients -------------------------------------------------------------------------------------------

    def _ddim_rows(self, start: int) -> list[tuple[float, list[float]]]:
        """DDIM's steps from ``start`` expanded into rows over ``(x_start, e_start, ..., e_i)`` (exact recursion)."""
        cx, ce = 1.0, []
        rows = []
        for i in range(start, len(self.timesteps)):
            (x0_out, x0_x), (eps_out, eps_x) = prediction_coefficients(
                self.config.prediction_type, self.alpha_t[i], self.sigma_t[i]
            )
            a_n, s_n = float(self.alpha_next[i]), float(self.sigma_next[i])
            mult_x, mult_e = a_n * x0_x + s_n * eps_x, a_n * x0_out + s_n * eps_out
            cx, ce = mult_x * cx, [mult_x * c for c in ce] + [mult_e]
            rows.append((cx, list(ce)))
        return rows

    def coefficients(self) -> tuple[list[float], list[list[float]]]:
        """``(coef_x, coef_e)`` of the current grid (DDIM's expansion when unfitted; call ``set_timesteps`` first)."""
        if self.is_fitted:
            return list(self.config.coef_x), [list(r) for r in self.config.coef_e]
        if self.timesteps is None:
            raise ValueError("call set_timesteps before coefficients")
        rows = self._ddim_rows(0)
        return [r[0] for r in rows], [r[1] for r in rows]

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
        """One OLSS step. ``eta`` must be 0 (the solver is deterministic); the other DDIM arguments are accepted so
        pipelines written for DDIM can call it positionally."""
        if eta:
            raise ValueError(f"OLSSScheduler is deterministic: eta must be 0, got {eta}")
        index = self._begin_step(timestep, model_output, sample)
        if self._x_start is None:
            if self.is_fitted and index != 0:
                refuse_begin_index(type(self).__name__, index)
            if self.is_fitted:
                self.check_fit(resolution=tuple(sample.shape[-2:]))
            self._start_index = index
            self._x_start = sample.detach().to(torch.float64)
            self._rows = (
                list(zip(self.config.coef_x, self.config.coef_e)) if self.is_fitted else self._ddim_rows(index)
            )
        if len(self._outputs) != index - self._start_index:
            raise ValueError("OLSSScheduler steps must be taken in order; call set_timesteps to start a new run")
        if model_output.shape != self._x_start.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but this run started with shape "
                f"{tuple(self._x_start.shape)}; call set_timesteps to start a new run"
            )
        self._outputs.append(model_output.detach().to(torch.float64))
        cx, ce = self._rows[index - self._start_index]
        prev = cx * self._x_start
        for weight, e in zip(ce, self._outputs):
            prev = prev + float(weight) * e
        self._step_index = index + 1
        if self._step_index == len(self.timesteps):  # free the history once the run is over
            self._x_start, self._outputs = None, []
        prev_sample = prev.to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return DiffSamplersSchedulerOutput(prev_sample=prev_sample)
