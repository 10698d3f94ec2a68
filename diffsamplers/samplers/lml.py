# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""LML, Levenberg-Marquardt-Langevin sampling (Wang, Yin et al., "Unleashing High-Quality Image Generation in
Diffusion Sampling Using Second-Order Levenberg-Marquardt-Langevin", arXiv 2505.24222, ICCV 2025), on diffusers'
solvers.

The operator and where it enters each solver follow the authors' official code, github.com/zituitui/LML-diffusion-
sampler (MIT; read at commit e19cbdc, files ``scheduler/scheduling_ddim_lm.py``,
``scheduler/scheduling_dpmsolver_multistep_lm.py`` and ``scheduler/scheduling_flow_match_euler_discrete_lm.py``).
Only the paper's abstract and figures could be read when this was written, not its method section, theorems or
tables, so equation numbers of the paper are not given here. **Unverified**: that the released rank-one factor
``u`` (below) is the paper's low-rank Hessian approximation, the paper's error bound and convergence result, and
all of its reported numbers.
"""

from __future__ import annotations

import math
import warnings
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
    """The released LML operator on a batch of directions ``g``, per sample over all non-batch dims (as in the
    official scheduler files).

    ``u = kappa * g_prev + (1 - kappa) * g`` (``u = g`` without a previous direction), then the damped rank-one
    Levenberg-Marquardt solve ``d = lambda * (lambda * I + u u^T)^{-1} g = g - u <u, g> / (lambda + |u|^2)``
    (Sherman-Morrison), renormalised to the length of ``g``: ``LM(g) = |g| / |d| * d``.

    ``formula="stable"`` evaluates the operator without cancellation. With ``r = u - g = kappa * delta``,
    ``delta = g_prev - g``, ``d`` is proportional to ``g * (lambda + <u, r>) - r * <u, g>``; ``d`` lies in the span of
    ``g`` and ``g_prev``, so every reduction is read off their 2x2 Gram matrix, computed in float64 (float32 on MPS),
    and ``LM(g) = A g + B delta`` is formed elementwise in float32 (float64 for float64 input); see
    :func:`_lm_coefficients`. At ``kappa = 0`` (``u = g``) the operator is the identity in exact arithmetic, and
    ``g`` itself is returned.

    ``formula="reference"`` is the released order of operations in float32. With typical ``lambda`` (1e-3) and
    ``|g|^2`` (1e2 to 1e4) the subtraction ``g - u <u, g> / (lambda + |u|^2)`` cancels catastrophically, so it
    perturbs ``g`` even at ``kappa = 0`` (by a relative ``eps32 * |g|^2 / lambda`` or so); it is here only to
    reproduce the released behaviour. A zero ``d`` returns ``g``.

    Returns a tensor of ``g``'s shape and dtype.
    """
    if formula == "stable":
        if g_prev is None or lm_kappa == 0:
            return g
        dtype = torch.promote_types(g.dtype, torch.float32)
        gf, pf = g.to(dtype), g_prev.to(dtype)
        a_minus_1, b = _coefficient_tensors(gf, pf, lm_lambda, lm_kappa)
        return torch.addcmul(gf, gf, a_minus_1).addcmul_(pf - gf, b).to(g.dtype)
    batch = g.shape[0]
    gf = g.reshape(batch, -1).to(torch.float32)
    u = gf if g_prev is None else lm_kappa * g_prev.reshape(batch, -1).to(torch.float32) + (1 - lm_kappa) * gf
    d = gf - u * ((u * gf).sum(-1, keepdim=True) / (lm_lambda + (u * u).sum(-1, keepdim=True)))
    accumulate = _accumulate_dtype(g.device)
    g_norm = torch.linalg.vector_norm(gf, dim=-1, keepdim=True, dtype=accumulate)
    d_norm = torch.linalg.vector_norm(d, dim=-1, keepdim=True, dtype=accumulate)
    ok = d_norm > 0
    scale = torch.where(ok, g_norm / torch.where(ok, d_norm, torch.ones_like(d_norm)), torch.ones_like(d_norm))
    out = torch.where(ok, d * scale.to(d.dtype), gf)
    return out.reshape(g.shape).to(g.dtype)


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    """float64 for the reductions, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _lm_coefficients(
    gg: torch.Tensor, gp: torch.Tensor, pp: torch.Tensor, lm_lambda: float, lm_kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A - 1, B)`` with ``LM(g) = A g + B (g_prev - g)``, per sample, from the float64 (float32 on MPS) tensors
    ``<g, g>``, ``<g, g_prev>`` and ``<g_prev, g_prev>``.

    With ``delta = g_prev - g``, ``u = g + kappa delta`` and ``d = a g - kappa b delta``, ``a = lambda + <u, r>``,
    ``b = <u, g>``. Writing ``d = lambda g + (|u|^2 g - <u, g> u)`` (the second term is orthogonal to ``u``) gives
    ``|d|^2 = lambda^2 |g|^2 + kappa^2 det(G) (2 lambda + |u|^2)`` with ``det(G) = |g|^2 |g_prev|^2 - <g, g_prev>^2``:
    a sum of non-negative terms, so the only cancellation left is the Gram determinant itself. In float64, from dot
    products of float32 data (whose products are exact), its relative error is about ``eps64 / sin^2`` of the angle
    between ``g`` and ``g_prev``, far below the float32 rounding of the result unless ``g_prev`` is parallel to ``g``
    to about 8 digits. Then ``A = |g| / |d| * a`` and ``B = -|g| / |d| * kappa * b``; ``A - 1`` is returned so that
    a step adding ``(A - 1) g`` keeps float64 accuracy in the coefficient. A zero ``g`` gives ``(-1, 0)``, i.e.
    ``LM(0) = 0``. (The Triton kernels of :mod:`._lml_triton` evaluate the same expressions, term for term.)
    """
    lam, kappa = lm_lambda, lm_kappa
    g_delta = gp - gg  # <g, delta>
    delta_delta = (pp - gp) - g_delta  # |delta|^2
    u_g = gg + kappa * g_delta  # b = <u, g>
    u_r = kappa * (g_delta + kappa * delta_delta)  # <u, r>, r = kappa delta
    det = (gg * pp - gp * gp).clamp(min=0.0)  # rounding can leave it slightly negative
    d_sq = lam * lam * gg + (kappa * kappa) * det * (u_g + u_r + 2.0 * lam)
    # lambda > 0, so d_sq = 0 only for g = 0; the floor then gives scale 0, u_g = 0, and LM(0) = 0 without a branch
    scale = (gg / d_sq.clamp(min=torch.finfo(d_sq.dtype).tiny)).sqrt()  # |g| / |d|
    return scale * (u_r + lam) - 1.0, (-kappa) * scale * u_g


def _coefficient_tensors(
    g: torch.Tensor, g_prev: torch.Tensor, lm_lambda: float, lm_kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_lm_coefficients` for the batch ``g`` (first dim = samples), from one batched float64 Gram product of
    ``(g, g_prev)``, shaped to broadcast over ``g`` and in its dtype."""
    batch = g.shape[0]
    pair = torch.stack((g.reshape(batch, -1), g_prev.reshape(batch, -1)), dim=1).to(_accumulate_dtype(g.device))
    gram = torch.bmm(pair, pair.transpose(1, 2))  # (B, 2, 2): <g, g>, <g, g_prev>, <g_prev, g_prev>
    a_minus_1, b = _lm_coefficients(gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1], lm_lambda, lm_kappa)
    shape = (batch,) + (1,) * (g.ndim - 1)
    return a_minus_1.to(g.dtype).view(shape), b.to(g.dtype).view(shape)


# what the fused kernels read besides the float32 directions (a half-precision pipeline's sample)
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON: Any = None  # the _lml_triton module once imported, False if the import failed
_TRITON_CHECKED: dict[torch.device, bool] = {}  # per device: whether the kernels passed their check there


def _triton_module(device: torch.device) -> Any:
    """:mod:`._lml_triton`, imported on first use and checked on each device (see :func:`_check_kernels`); ``None``
    (with one warning) where Triton is missing or its kernels fail there."""
    global _TRITON
    if _TRITON is None:
        try:
            from . import _lml_triton

            _TRITON = _lml_triton
        except Exception as error:  # ImportError, or a Triton that cannot set itself up
            warnings.warn(f"LMLScheduler: fused Triton kernels unavailable ({error}); using the eager correction")
            _TRITON = False
    if not _TRITON:
        return None
    checked = _TRITON_CHECKED.get(device)
    if checked is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # the check reads a result back: it waits for a step outside the graph capture
        checked = _TRITON_CHECKED[device] = _check_kernels(_TRITON, device)
    return _TRITON if checked else None


def _check_kernels(module: Any, device: torch.device) -> bool:
    """Compile the fused correction on ``device`` and compare it with :func:`lm_correct`, with a stored and with a
    given direction; a failure (no C compiler for Triton's launcher, a wrong result) warns and returns ``False``.
    The comparison reads its result back to the host, so CUDA's sync debug mode is lifted around it."""
    debug_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    try:
        if debug_mode:
            torch.cuda.set_sync_debug_mode(0)
        generator = torch.Generator().manual_seed(0)
        g, g_prev = (torch.randn((2, 3000), generator=generator).to(device) for _ in range(2))
        fused = module.FusedCorrection(g, 10.0, 0.5)
        stored = torch.empty_like(g)
        reference = lm_correct(g, g_prev, 10.0, 0.5)
        out = fused(g, torch.zeros_like(g), 1.0, 0.0, g_prev, g, torch.empty_like(g), 1.0, g_out=stored)
        given = fused(g, None, 1.0, 0.0, g_prev, None, torch.empty_like(g), 1.0)
        error = max(float((out - reference).abs().max()), float((given - reference).abs().max()))
        if not error < 1e-4 or not torch.equal(stored, g):
            raise RuntimeError(f"self-check failed (max error {error:.3g})")
        return True
    except Exception as error:
        warnings.warn(f"LMLScheduler: fused Triton kernels unusable on {device} ({error}); using the eager correction")
        return False
    finally:
        if debug_mode:
            torch.cuda.set_sync_debug_mode(debug_mode)


class LMLScheduler(WrappedScheduler):
    __doc__ = (
        r"""
    Levenberg-Marquardt-Langevin (Wang, Yin et al. 2025, arXiv 2505.24222) on a diffusers solver: DDIM (the noise
    direction), DPMSolverMultistep (``"dpmsolver"``/``"dpmsolver++"``, orders 1-3; the whole increment) or
    FlowMatchEuler (the velocity), where the official scheduler files of github.com/zituitui/LML-diffusion-sampler
    put the correction.

    At each step the solver's first-order direction ``g`` is replaced by ``LM(g)`` (see :func:`lm_correct`): the
    component of ``g`` along the rank-one "Hessian" direction ``u = kappa * g_prev + (1 - kappa) * g`` (``g_prev``
    the uncorrected direction of the previous step) is damped by ``lambda / (lambda + |u|^2)``, and the result is
    rescaled to ``|g|``. No model call is added. That ``u`` is the paper's low-rank Hessian factor is our reading
    of the released code and is **unverified** against the paper, whose method section we could not read; so are the
    paper's reported results.

    **What the released defaults do.** With ``kappa = 0`` (the default of every official script) ``u = g`` and
    ``LM(g) = g`` exactly: the operator is the identity in exact arithmetic and ``lambda`` has no effect. The
    released float32 formula differs from the identity only through catastrophic cancellation (see
    :func:`lm_correct`); ``formula="reference"`` reproduces that, ``"stable"`` (default) computes the operator without
    cancellation, so ``kappa = 0`` here is exactly the base solver. The defaults below keep the released
    ``lambda = 1, kappa = 0``: this scheduler is then the base solver, bit for bit.

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

    **On the bundled digits DDPM** (``diffsamplers bench``, 256 samples, ground truth DPM-Solver++(2M) with 200
    steps, CPU), the testbed's best setting (DPM-Solver++(2M) increment, ``lambda=10, kappa=0.5``) against its
    base at NFE 4 / 6 / 8 / 10 / 20: RMSE vs ground truth 0.185 / 0.125 / 0.088 / 0.066 / 0.028 against 0.203 /
    0.126 / 0.090 / 0.072 / 0.037; FID vs ground truth 9.0 / 2.6 / 2.1 / 0.77 / 0.064 against 61 / 9.1 / 2.0 /
    0.63 / 0.17. It beats its base at NFE 4 and 6 (and in RMSE everywhere) and is level or slightly worse in FID
    at NFE 8 and 10. The released defaults remain the base solver.

    The result has ``sample``'s dtype (a float16 model output with a float32 sample gives float32); the solver and
    the correction run in at least float32.

    Args:
        base_scheduler (`str`, *optional*): `"DDIMScheduler"`, `"DPMSolverMultistepScheduler"` or
            `"FlowMatchEulerDiscreteScheduler"`; defaults to FlowMatchEuler for flow-matching configs and to
            `"DPMSolverMultistepScheduler"` (the official scripts' solver) otherwise.
        lm_lambda (`float`, defaults to 1.0): the damping ``lambda`` > 0 (official default 1.0; scripts 1e-4 ... 5).
        lm_kappa (`float`, defaults to 0.0): the EMA weight ``kappa`` in [0, 1] of the previous direction in ``u``.
        freeze_fraction (`float`, defaults to 0.0): in [0, 1); as the official DDIM ``freeze``, the correction is
            applied only where ``t < num_train_timesteps * (1 - freeze_fraction)`` (strictly), so the noisiest
            fraction of the run is left alone; 0 corrects every step.
        placement (`str`, defaults to `"auto"`): `"noise_direction"` (DDIM only: ``x_next = a_next * x0 +
            sqrt(1 - a_next^2 - std^2) * LM(eps) + std * z``, x0 from the raw prediction), `"increment"` (``x_next =
            c * x + LM(x_next - c * x)``, ``c`` the solver's sample coefficient; deterministic steps only) or
            `"velocity"` (FlowMatchEuler only: ``x_next = x + dt * LM(v)``); `"auto"` picks the official one.
        formula (`str`, defaults to `"stable"`): `"stable"` or `"reference"` (see above).
        use_lm (`bool`, defaults to `True`): `False` runs the base solver unchanged.

    Attributes:
        fused_kernels (`bool`, defaults to `True`): on CUDA float32 directions, compute the correction with one
            fused Triton kernel (two for samples of over 2^17 elements; :mod:`diffsamplers.samplers._lml_triton`:
            the same float64 reductions, results equal to the eager path's to float32 rounding) instead of about a
            dozen small eager kernels, which made the step launch-bound. Set it to `False` for the eager path; that
            is used anyway where Triton is missing or its kernels fail to compile.
"""
        + BASE_CONFIG_DOC
    )

    _fused_devices = ("cuda",)  # the tests add "cpu" under TRITON_INTERPRET=1
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
        # a run-time switch, not config: whether CUDA float32 steps use the fused Triton correction
        self.fused_kernels = True
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
        self._lm_parameters = (float(self.config.lm_lambda), float(self.config.lm_kappa))
        if "_fused" not in self.__dict__:
            self._fused: Any = None  # a _lml_triton.FusedCorrection once a CUDA step used it (kept across runs)
        self._apply_at: list[bool] | None = None
        if self._timesteps_cpu is not None:
            # the official DDIM rule, t < 1000 (1 - freeze), with the schedule's own length; freeze_fraction = 0
            # corrects every step (a flow schedule starts at t = 1000, which the strict rule would leave out)
            freeze = self.config.freeze_fraction
            limit = self.base.config.num_train_timesteps * (1 - freeze)
            self._apply_at = [freeze == 0 or t < limit for t in self._timesteps_cpu]

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
        g_prev = self._g_prev
        # the freeze rule; without a previous direction the stable operator is the identity
        correct = self._apply_at[index] and (g_prev is not None or self.config.formula == "reference")
        # the base solver runs in at least float32 while LML is on (WrappedScheduler.step casts to sample's dtype)
        dtype = torch.promote_types(torch.promote_types(model_output.dtype, sample.dtype), torch.float32)
        work = model_output.to(dtype)

        placement = self.lm_placement
        if placement == "velocity":
            # FlowMatch-Euler: x_next = x + (sigma_next - sigma) * LM(v)  (stochastic: x0 = x - sigma * LM(v))
            velocity = self._corrected(work, g_prev, None, 1.0) if correct else work
            self._g_prev = work
            return self._call_base(velocity, timestep, sample, step_kwargs)

        if placement == "increment" and step_kwargs.get("eta"):
            raise ValueError("placement='increment' needs a deterministic step: eta must be 0")
        result = self._call_base(work, timestep, sample, step_kwargs)
        prev = result.prev_sample.to(dtype)
        x = sample.to(dtype)
        if placement == "increment":
            # the whole multistep increment g = x_next - c x (official DPM-Solver LM file): x_next = c x + LM(g)
            c = self._increment_coefficient(index)
            stable = self.config.formula == "stable"
            fused = self._fused_increment(prev, sample, c, g_prev) if correct and stable else None
            if fused is not None:
                self._g_prev, result.prev_sample = fused
                return result
            g = torch.sub(prev, x, alpha=c)
            weight = 1.0  # x_next = prev + (LM(g) - g)
        else:
            # DDIM eq. (12): only the "direction pointing to x_t" uses LM(eps); x0 keeps the raw prediction
            alpha, sigma, alpha_next, sigma_next = self._levels[index]
            if step_kwargs.get("use_clipped_model_output") and result.pred_original_sample is not None:
                g = (x - alpha * result.pred_original_sample.to(dtype)) / sigma
            else:
                g = to_x0_eps(work, x, alpha, sigma, self.prediction_type)[1]
            std = self._ddim_noise_std(index, step_kwargs.get("eta", 0.0))
            weight = math.sqrt(max(sigma_next**2 - std**2, 0.0))
        self._g_prev = g
        if correct:
            result.prev_sample = self._corrected(g, g_prev, prev, weight)
        return result

    def _corrected(
        self, g: torch.Tensor, g_prev: torch.Tensor | None, base: torch.Tensor | None, weight: float
    ) -> torch.Tensor:
        """A fresh ``base + weight * (LM(g) - g)`` (``base=None``: ``LM(g)`` itself), with the fused kernel where
        this step can take it."""
        config = self.config
        if config.formula == "reference":
            corrected = lm_correct(g, g_prev, config.lm_lambda, config.lm_kappa, "reference")
            return corrected if base is None else base + weight * (corrected - g)
        fused = self._fused_correction(g, g_prev, *(() if base is None else (base,)))
        if fused is not None:
            out = self._run_fused(fused, g, None, 1.0, 0.0, g_prev, base, torch.empty_like(g), weight)
            if out is not None:
                return out
        # LM(g) - g = (A - 1) g + B (g_prev - g), added without forming LM(g) (whose rounding would cancel)
        a_minus_1, b = _coefficient_tensors(g, g_prev, *self._lm_parameters)
        target = g if base is None else base
        return torch.addcmul(target, g, a_minus_1, value=weight).addcmul_(g_prev - g, b, value=weight)

    def _fused_increment(
        self, prev: torch.Tensor, sample: torch.Tensor, c: float, g_prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(g, x_next)`` of the increment placement in one fused kernel, which forms ``g = prev - c x`` itself and
        reads a half-precision sample and writes a result of its dtype; ``None`` where the eager path runs."""
        fused = self._fused_correction(prev, g_prev, sample)
        if fused is None:
            return None
        g = torch.empty_like(prev)
        new = self._run_fused(fused, prev, sample, 1.0, -c, g_prev, prev, torch.empty_like(sample), 1.0, g_out=g)
        return None if new is None else (g, new)

    def _run_fused(self, fused: Any, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """``fused(*args, **kwargs)``, or ``None`` (with a warning, and the eager path from then on for this device)
        if a kernel variant fails to compile here: that happens before its launch, and the one launch that may
        precede it (long rows) only stores ``g`` into a fresh tensor that the eager path does not use."""
        try:
            return fused(*args, **kwargs)
        except Exception as error:
            warnings.warn(f"LMLScheduler: fused Triton correction failed ({error}); using the eager correction")
            _TRITON_CHECKED[fused.device] = False
            self._fused = None
            return None

    def _fused_correction(self, like: torch.Tensor, g_prev: torch.Tensor | None, *others: torch.Tensor) -> Any:
        """The fused Triton correction (see :mod:`._lml_triton`) when this step can take it: ``fused_kernels``
        on, CUDA float32 tensors (contiguous, no autograd), a previous direction, and Triton importable; else
        ``None`` (the eager path)."""
        if (
            not self.fused_kernels
            or g_prev is None
            or like.device.type not in self._fused_devices
            or like.dtype != torch.float32
        ):
            return None
        tensors = (like, g_prev, *others)
        if g_prev.dtype != like.dtype or any(
            t.shape != like.shape
            or t.device != like.device
            or t.dtype not in _FUSED_DTYPES
            or not t.is_contiguous()
            or t.requires_grad
            for t in tensors
        ):
            return None
        lm_lambda, lm_kappa = self._lm_parameters
        fused = self._fused
        if fused is None or not fused.matches(like, lm_lambda, lm_kappa):
            module = _triton_module(like.device)
            if module is None:
                return None
            fused = self._fused = module.FusedCorrection(like, lm_lambda, lm_kappa)
        return fused
