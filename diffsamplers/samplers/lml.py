# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""LML, Levenberg-Marquardt-Langevin (Wang, Yin et al., arXiv 2505.24222, ICCV 2025) on diffusers' solvers.

Research notes: /work/shared/research/lml_stsl.md part 1 (the spec, "§1.x" below).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ..schedule import to_x0_eps
from .wrapping import BASE_CONFIG_DOC, WrappedScheduler

PLACEMENTS = ("auto", "noise_direction", "increment", "velocity")
FORMULAS = ("stable", "reference")
_AUTO_PLACEMENT = {
    "DDIMScheduler": "noise_direction",
    "DPMSolverMultistepScheduler": "increment",
    "FlowMatchEulerDiscreteScheduler": "velocity",
}


def lm_correct(
    g: torch.Tensor,
    g_prev: torch.Tensor | None,
    lm_lambda: float,
    lm_kappa: float,
    formula: str = "stable",
) -> torch.Tensor:
    """The released LML operator on a batch of directions ``g`` (spec §1.3), per sample over all non-batch dims.

    ``u = kappa * g_prev + (1 - kappa) * g`` (``u = g`` without a previous direction), then the damped rank-one
    Levenberg-Marquardt solve ``d = lambda * (lambda * I + u u^T)^{-1} g = g - u <u, g> / (lambda + |u|^2)``
    (Sherman-Morrison), renormalised to the length of ``g``: ``LM(g) = |g| / |d| * d``.

    ``formula="stable"`` (spec §1.6, recommendation 1) evaluates ``d`` without cancellation through
    ``r = u - g = kappa * (g_prev - g)``: ``d ~ g * (lambda + <u, r>) - r * <u, g>``, elementwise in float32 (float64
    for float64 input) with float64 reductions (float32 on MPS), and returns ``g`` itself when ``kappa = 0`` (the
    operator is then the identity in exact arithmetic, §1.6a).
    ``formula="reference"`` is the released order of operations in float32, whose cancellation perturbs ``g`` even
    at ``kappa = 0`` (§1.6b); it is here only to reproduce that behaviour. A zero ``d`` returns ``g``.

    Returns a tensor of ``g``'s shape and dtype.
    """
    if g_prev is None and formula == "stable":
        return g
    if formula == "stable" and lm_kappa == 0:
        return g
    batch = g.shape[0]
    if formula == "stable":
        # elementwise work in float32 (float64 for float64 input), every reduction accumulated in float64
        dtype = torch.promote_types(g.dtype, torch.float32)
        gf = g.reshape(batch, -1).to(dtype)
        r = (g_prev.reshape(batch, -1).to(dtype) - gf) * lm_kappa
        u = gf + r
        u_r = (u * r).sum(-1, keepdim=True, dtype=torch.float64)
        u_g = (u * gf).sum(-1, keepdim=True, dtype=torch.float64)
        d = gf * (lm_lambda + u_r).to(dtype) - r * u_g.to(dtype)
    else:
        gf = g.reshape(batch, -1).to(torch.float32)
        u = gf if g_prev is None else lm_kappa * g_prev.reshape(batch, -1).to(torch.float32) + (1 - lm_kappa) * gf
        d = gf - u * ((u * gf).sum(-1, keepdim=True) / (lm_lambda + (u * u).sum(-1, keepdim=True)))
    accumulate = torch.float32 if g.device.type == "mps" else torch.float64
    g_norm = torch.linalg.vector_norm(gf, dim=-1, keepdim=True, dtype=accumulate)
    d_norm = torch.linalg.vector_norm(d, dim=-1, keepdim=True, dtype=accumulate)
    ok = d_norm > 0
    scale = torch.where(ok, g_norm / torch.where(ok, d_norm, torch.ones_like(d_norm)), torch.ones_like(d_norm))
    out = torch.where(ok, d * scale.to(d.dtype), gf)
    return out.reshape(g.shape).to(g.dtype)


class LMLScheduler(WrappedScheduler):
    __doc__ = (
        r"""
    Levenberg-Marquardt-Langevin (Wang, Yin et al. 2025, arXiv 2505.24222) on a diffusers solver: DDIM (the noise
    direction), DPMSolverMultistep (``"dpmsolver"``/``"dpmsolver++"``, orders 1-3; the whole increment) or
    FlowMatchEuler (the velocity), as in the official scheduler files (spec §1.3).

    At each step the solver's first-order direction ``g`` is replaced by ``LM(g)`` (see :func:`lm_correct`): the
    component of ``g`` along the rank-one "Hessian" direction ``u = kappa * g_prev + (1 - kappa) * g`` (``g_prev``
    the uncorrected direction of the previous step) is damped by ``lambda / (lambda + |u|^2)``, and the result is
    rescaled to ``|g|``. No model call is added. That ``u`` is the paper's low-rank Hessian factor is our reading
    of the released code and is **unverified** against the paper (spec §1.2); so are the paper's results (§1.5).

    **What the released defaults do.** With ``kappa = 0`` (the default of every official script) ``u = g`` and
    ``LM(g) = g`` exactly: the operator is the identity in exact arithmetic and ``lambda`` has no effect (spec
    §1.6a). The released float32 formula is not the identity only through catastrophic cancellation (§1.6b);
    ``formula="reference"`` reproduces that, ``"stable"`` (default) computes the operator without cancellation, so
    ``kappa = 0`` here is exactly the base solver. The defaults below keep the released ``lambda = 1, kappa = 0``:
    this scheduler is then the base solver, bit for bit.

    **Testbed measurement** (exact Gaussian-mixture testbed, ``exact_testbed_errors`` with ``TESTBED_CONFIG``, 32
    samples, seed 0; FlowMatch-Euler on the same mixture with ``shift=3``; RMSE / base RMSE at NFE 5 / 10; ``lambda``
    from 1e-4 to 1e3 by decades, ``kappa`` 0.1 / 0.5 / 0.9). The data are 64-dimensional, so ``|g|^2`` is O(1-100)
    and the ``lambda`` values below do not transfer to image latents.

    * ``kappa = 0``: identical to the base (exact). The released float32 formula at ``kappa = 0`` stays within 1 %
      of the base for ``lambda >= 1e-2`` and is erratic below: ``lambda = 1e-4``: 2.71 / 0.97 (DDIM increment),
      2.19 / 1.19 (DPM-Solver-3), 0.99 / 0.98 (DDIM noise direction).
    * ``kappa > 0`` with ``lambda`` well below ``|g|^2``: worse everywhere, by 1.3x to 3000x (the component along
      ``u ~ g`` is removed and the remainder rescaled to ``|g|``).
    * Some settings beat their base, all with ``lambda`` of the order of ``|g|^2``: DPM-Solver++(2M) increment
      ``lambda=10, kappa=0.5``: 0.88 / 0.76 (NFE 20: 0.51); DPM-Solver-3 increment ``lambda=100, kappa=0.5``:
      0.86 / 0.99; DDIM increment ``lambda=100, kappa=0.5``: 0.77 / 0.95; FlowMatch-Euler velocity ``lambda=10,
      kappa=0.1``: 0.63 / 0.53. Ten times smaller ``lambda`` turns each into a loss (DPM-Solver++(2M),
      ``lambda=1, kappa=0.5``: 4.3 / 9.0).
    * The official DDIM placement (noise direction) beats its base for no setting (best 1.00 / 1.00 at
      ``lambda = 1000``; ``lambda <= 10``: 1.1x to 7x).

    So the defaults keep the released ``lambda = 1, kappa = 0`` (RMSE 0.192 / 0.097 / 0.047 at NFE 5 / 10 / 20, that
    of DPM-Solver++(2M); DDIM 0.223 / 0.145 / 0.098); the winning settings above are testbed-specific.

    Args:
        base_scheduler (`str`, *optional*): `"DDIMScheduler"`, `"DPMSolverMultistepScheduler"` or
            `"FlowMatchEulerDiscreteScheduler"`; defaults to FlowMatchEuler for flow-matching configs and to
            `"DPMSolverMultistepScheduler"` (the official scripts' solver) otherwise.
        lm_lambda (`float`, defaults to 1.0): the damping ``lambda`` > 0 (official default 1.0; scripts 1e-4 ... 5).
        lm_kappa (`float`, defaults to 0.0): the EMA weight ``kappa`` in [0, 1] of the previous direction in ``u``.
        freeze_fraction (`float`, defaults to 0.0): in [0, 1); the correction is skipped at timesteps above
            ``num_train_timesteps * (1 - freeze_fraction)`` (the noisiest fraction; official DDIM ``freeze``).
        placement (`str`, defaults to `"auto"`): `"noise_direction"` (DDIM only: ``x_next = a_next * x0 +
            sqrt(1 - a_next^2 - std^2) * LM(eps) + std * z``, x0 from the raw prediction), `"increment"` (``x_next =
            c * x + LM(x_next - c * x)``, ``c`` the solver's sample coefficient; deterministic steps only) or
            `"velocity"` (FlowMatchEuler only: ``x_next = x + dt * LM(v)``); `"auto"` picks the official one.
        formula (`str`, defaults to `"stable"`): `"stable"` or `"reference"` (see above).
        use_lm (`bool`, defaults to `True`): `False` runs the base solver unchanged.
"""
        + BASE_CONFIG_DOC
    )

    _supported_bases = ("DDIMScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
    _default_base = "DPMSolverMultistepScheduler"

    @register_to_config
    def __init__(
        self,
        base_scheduler: str | None = None,
        lm_lambda: float = 1.0,
        lm_kappa: float = 0.0,
        freeze_fraction: float = 0.0,
        placement: str = "auto",
        formula: str = "stable",
        use_lm: bool = True,
        num_train_timesteps: int | None = None,
        beta_start: float | None = None,
        beta_end: float | None = None,
        beta_schedule: str | None = None,
        trained_betas: list[float] | None = None,
        prediction_type: str | None = None,
        clip_sample: bool | None = None,
        clip_sample_range: float | None = None,
        set_alpha_to_one: bool | None = None,
        steps_offset: int | None = None,
        thresholding: bool | None = None,
        dynamic_thresholding_ratio: float | None = None,
        sample_max_value: float | None = None,
        timestep_spacing: str | None = None,
        rescale_betas_zero_snr: bool | None = None,
        solver_order: int | None = None,
        algorithm_type: str | None = None,
        solver_type: str | None = None,
        lower_order_final: bool | None = None,
        euler_at_final: bool | None = None,
        use_karras_sigmas: bool | None = None,
        use_exponential_sigmas: bool | None = None,
        use_beta_sigmas: bool | None = None,
        use_lu_lambdas: bool | None = None,
        use_flow_sigmas: bool | None = None,
        flow_shift: float | None = None,
        final_sigmas_type: str | None = None,
        lambda_min_clipped: float | None = None,
        variance_type: str | None = None,
        predict_x0: bool | None = None,
        disable_corrector: list[int] | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift: float | None = None,
        use_dynamic_shifting: bool | None = None,
        base_shift: float | None = None,
        max_shift: float | None = None,
        base_image_seq_len: int | None = None,
        max_image_seq_len: int | None = None,
        invert_sigmas: bool | None = None,
        shift_terminal: float | None = None,
        time_shift_type: str | None = None,
        stochastic_sampling: bool | None = None,
    ) -> None:
        if isinstance(lm_lambda, bool) or not isinstance(lm_lambda, (int, float)) or not 0 < lm_lambda < math.inf:
            raise ValueError(f"lm_lambda must be a finite number > 0, got {lm_lambda!r}")
        if isinstance(lm_kappa, bool) or not isinstance(lm_kappa, (int, float)) or not 0.0 <= lm_kappa <= 1.0:
            raise ValueError(f"lm_kappa must be a number in [0, 1], got {lm_kappa!r}")
        if (
            isinstance(freeze_fraction, bool)
            or not isinstance(freeze_fraction, (int, float))
            or not 0.0 <= freeze_fraction < 1.0
        ):
            raise ValueError(f"freeze_fraction must be a number in [0, 1), got {freeze_fraction!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if formula not in FORMULAS:
            raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
        if not isinstance(use_lm, bool):
            raise ValueError(f"use_lm must be a bool, got {use_lm!r}")
        self._init_wrapper()

    @property
    def lm_placement(self) -> str:
        """The placement in use (``"auto"`` resolved for the wrapped solver)."""
        placement = self.config.placement
        return _AUTO_PLACEMENT[self.config.base_scheduler] if placement == "auto" else placement

    @property
    def lm_active(self) -> bool:
        """Whether steps differ from the base solver's (``use_lm`` and not the exact identity)."""
        c = self.config
        return c.use_lm and (c.lm_kappa > 0 or c.formula == "reference")

    def _check_base(self) -> None:
        name, placement = self.config.base_scheduler, self.lm_placement
        algorithm = self.base.config.get("algorithm_type")
        if algorithm is not None and algorithm not in ("dpmsolver", "dpmsolver++"):
            raise ValueError(f"algorithm_type must be 'dpmsolver' or 'dpmsolver++' for LML, got {algorithm!r}")
        if placement == "noise_direction" and name != "DDIMScheduler":
            raise ValueError(f"placement='noise_direction' needs a DDIMScheduler base, got {name}")
        if placement == "velocity" and name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"placement='velocity' needs a FlowMatchEulerDiscreteScheduler base, got {name}")
        if placement == "increment" and self.base.config.get("stochastic_sampling"):
            raise ValueError("placement='increment' needs a deterministic step; stochastic_sampling is on")

    def _reset_state(self) -> None:
        self._g_prev: torch.Tensor | None = None
        self._apply_at: list[bool] | None = None
        if self._timesteps_cpu is not None:
            # official DDIM freeze rule t < 1000 (1 - freeze), with the schedule's own length and "<=" so that a flow
            # schedule's t = 1000 is not frozen at freeze_fraction = 0
            limit = self.base.config.num_train_timesteps * (1 - self.config.freeze_fraction)
            self._apply_at = [t <= limit for t in self._timesteps_cpu]

    @property
    def previous_direction(self) -> torch.Tensor | None:
        """The uncorrected direction ``g`` of the last step (``g_prev`` of the next one)."""
        return self._g_prev

    def _increment_coefficient(self, index: int) -> float:
        """``c`` of ``x_next = c * x + increment`` for the deterministic step ``index``."""
        alpha, sigma, alpha_next, sigma_next = self._levels[index]
        name = self.config.base_scheduler
        if name == "FlowMatchEulerDiscreteScheduler":
            return 1.0
        if name == "DPMSolverMultistepScheduler" and self.base.config.algorithm_type == "dpmsolver++":
            return sigma_next / sigma  # x_t = (sigma_t / sigma_s) x + ... (DPM-Solver++, Lu et al. 2022b eq. 9)
        return alpha_next / alpha  # DDIM / DPM-Solver: x_t = (alpha_t / alpha_s) x + ... (Lu et al. 2022a eq. 3.7)

    def _wrapped_step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        index: int,
        step_kwargs: dict[str, Any],
    ) -> BaseOutput:
        if not self.lm_active:
            return self._call_base(model_output, timestep, sample, step_kwargs)
        config = self.config
        apply = self._apply_at[index]
        out_dtype = model_output.dtype
        # the base solver runs in at least float32 while LML is on; the result is cast back to the output dtype
        work = model_output.to(torch.promote_types(model_output.dtype, torch.float32))
        g_prev = self._g_prev

        def correct(g: torch.Tensor) -> torch.Tensor:
            return lm_correct(g, g_prev, config.lm_lambda, config.lm_kappa, config.formula) if apply else g

        placement = self.lm_placement
        if placement == "velocity":
            # FlowMatch-Euler: x_next = x + (sigma_next - sigma) * LM(v)  (stochastic: x0 = x - sigma * LM(v))
            self._g_prev = work
            result = self._call_base(correct(work), timestep, sample, step_kwargs)
            result.prev_sample = result.prev_sample.to(out_dtype)
            return result

        if placement == "increment" and step_kwargs.get("eta"):
            raise ValueError("placement='increment' needs a deterministic step: eta must be 0")
        result = self._call_base(work, timestep, sample, step_kwargs)
        prev = result.prev_sample.to(work.dtype)
        x = sample.to(work.dtype)
        if placement == "noise_direction":
            # DDIM eq. (12): only the "direction pointing to x_t" uses LM(eps); x0 keeps the raw prediction
            alpha, sigma, alpha_next, sigma_next = self._levels[index]
            eta = step_kwargs.get("eta", 0.0)
            if step_kwargs.get("use_clipped_model_output") and result.pred_original_sample is not None:
                g = (x - alpha * result.pred_original_sample.to(work.dtype)) / sigma
            else:
                g = _epsilon(work, x, alpha, sigma, self.prediction_type)
            coefficient = math.sqrt(max(sigma_next**2 - self._ddim_noise_std(index, eta) ** 2, 0.0))
            new = prev + coefficient * (correct(g) - g)
        else:
            c = self._increment_coefficient(index)
            g = prev - c * x  # the whole multistep increment (official DPM-Solver LM files)
            new = c * x + correct(g)
        self._g_prev = g
        result.prev_sample = new.to(out_dtype)
        return result


def _epsilon(output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction_type: str) -> torch.Tensor:
    """DDIM's ``pred_epsilon`` from a model output (scalar levels stay on the host: no host-device transfer)."""
    return to_x0_eps(output, x, alpha, sigma, prediction_type)[1]
