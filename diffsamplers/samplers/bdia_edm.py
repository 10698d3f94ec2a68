# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""BDIA-EDM: EDM samplers made exactly invertible by bi-directional integration approximation.

Zhang, Lewis & Kleijn, "Exact Diffusion Inversion via Bi-directional Integration Approximation", arXiv 2307.10829
(ECCV 2024; official code https://github.com/guoqiang-zhang-x/BDIA), say in their abstract that BDIA applies to EDM
(Karras et al. 2022, arXiv 2206.00364) and improves its FID. **Unverified**: their BDIA-EDM construction itself
(which increment is Euler or Heun, the time grid, ``gamma``) could not be read, only the abstract and the official
README (which has no EDM code), so which of the two forms below the paper uses, if either, is unknown; the Heun form
in particular is this project's derivation, not the paper's. States run from noise to data along the grid ``sigma_0 >
sigma_1 > ... > sigma_N`` (EDMEulerScheduler's, ``sigma_N`` = 0 or ``sigma_min``); ``x_k`` lives at ``sigma_k``, in
EDM's unscaled frame ``x = x0 + sigma eps``. With EDM's denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x;
c_noise)`` and the ODE direction ``d_k = (x_k - D(x_k; sigma_k)) / sigma_k`` (Karras et al. eq. 3, sigma(t) = t),
every step is BDIA's general update (the official README's, with the forward and backward integration
approximations of one state ``x_k``)

    x_{k+1} = x_k + Delta_f(x_k) + gamma * (x_{k-1} - x_k - Delta_b(x_k)),   Delta_b(x_k) = (sigma_{k-1} - sigma_k) d_k

with ``Delta_f`` either

* ``solver="euler"`` (default): ``(sigma_{k+1} - sigma_k) d_k``, one model call. At ``alpha = 1`` DDIM's transport
  ``D_{k->j}(x_k) = x0 + sigma_j eps`` *is* this Euler step, so this is the README's BDIA-DDIM update (the one the
  official code implements) on an EDM model; or
* ``solver="heun"``: EDM's Heun step (two model calls from ``x_k``; Euler into the last level, as in Karras et al.,
  Algorithm 1).

Both increments depend on ``x_k`` alone, so the update is linear in ``x_{k-1}`` and is solved for it exactly:
``x_{k-1} = (x_{k+1} - x_k - Delta_f(x_k)) / gamma + x_k + Delta_b(x_k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ..schedule import edm_preconditioning, is_edm_config
from ._bdia_common import (
    BDIAInverseOutput,
    LinearWorkspace,
    StateView,
    checked_gamma,
    checked_pair,
    output_dtypes,
    same_sample,
)
from .base import DiffSamplersScheduler, DiffSamplersSchedulerOutput
from .checks import check_model_output, check_num_inference_steps

PREDICTION_TYPES_EDM = ("epsilon", "v_prediction")
SIGMA_SCHEDULES = ("karras", "exponential")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVERS = ("euler", "heun")


@dataclass
class BDIAEDMPredictorOutput(BaseOutput):
    """Output of :meth:`BDIAEDMScheduler.heun_predictor`: where the second model call of a Heun step is made.

    Args:
        sample (`torch.Tensor`): the Euler predictor ``x_k + (sigma_{k+1} - sigma_k) d_k``, in the sample's dtype
            (the point :meth:`BDIAEDMScheduler.step` hands a pipeline for that call; the same tensor for float64
            states).
        timestep (`torch.Tensor`): the timestep (EDM's ``c_noise``) of ``sigma_{k+1}``, at which to evaluate it.
    """

    sample: torch.Tensor
    timestep: torch.Tensor


class BDIAEDMScheduler(DiffSamplersScheduler):
    """BDIA-EDM: BDIA's exactly invertible update on EDM's deterministic Euler or Heun sampler (Karras et al. 2022).

    With ``d_k = (x_k - D(x_k; sigma_k)) / sigma_k`` on EDMEulerScheduler's grid ``sigma_0 > ... > sigma_N``::

        Delta_f = (sigma_{k+1} - sigma_k) d_k        solver="euler": 1 model call (BDIA-DDIM in EDM's frame)
                = EDM Heun step sigma_k -> sigma_{k+1}  solver="heun": 2 calls; a 1-call Euler step into the last level
        Delta_b = (sigma_{k-1} - sigma_k) d_k        (Euler back to the previous level, reusing d_k: no call)
        x_{k+1} = x_k + Delta_f + gamma * (x_{k-1} - x_k - Delta_b)      (float64, cast back to the sample's dtype)

    The first interval of a run has no ``x_{k-1}`` and is a plain Euler/Heun step; ``gamma = 0`` is
    ``EDMEulerScheduler`` (``solver="euler"``) or EDM Heun (``"heun"``, 2N - 1 calls for N levels, as
    ``HeunDiscreteScheduler``), evaluated in float64: it agrees with EDMEulerScheduler's float32 arithmetic to float32
    rounding, not to the last bit. ``sigma_{k-1}`` is always the previous level of the grid, the level of the
    run's previous state. **Unverified**: which construction the paper's BDIA-EDM uses (see the module docstring).

    Why Euler is the default: with Euler both ways the backward estimate's error cancels the forward one's to
    leading order (local error ``(h_f^2 - gamma h_b^2) x'' / 2``), as in BDIA-DDIM, and ``gamma = 1`` is second order
    (error ratio 4.1 per doubling of 80-320 levels on ``toy_2d``, where EDM Euler gives 1.95); Heun's forward step has
    no ``h^2`` term to cancel, so with ``gamma > 0`` the Euler ``Delta_b`` leaves ``gamma h_b^2 x'' / 2`` and the Heun
    form is first order (ratio 2.2 at ``gamma = 1``). Measured on the exact testbed (RMSE against ``exact_solution``
    from sigma_0 = 80, 64 samples, default EDM config, ``GaussianMixtureModel.digits``;
    ``benchmarks/bdia_edm_testbed.py``) at equal model calls:

    ==================  =======  =======  =======  =======
    model calls         5        9        19       39
    ==================  =======  =======  =======  =======
    EDM Euler           0.30     0.19     0.11     0.061
    euler, gamma 0.5    0.33     0.068    0.017    0.011
    euler, gamma 0.9    0.33     0.32     0.033    0.0032
    euler, gamma 1.0    0.46     0.46     0.080    0.013
    EDM Heun            2.2      0.63     0.097    0.018
    heun, gamma 0.5     15       0.42     0.13     0.043
    heun, gamma 1.0     7.9      1.0      0.26     0.082
    ==================  =======  =======  =======  =======

    As for BDIA-DDIM on Karras grids, ``gamma`` near 1 over-corrects the uneven first steps of short runs: for
    sampling with 10-20 calls ``gamma = 0.5`` is best, and it is the default; inversion wants ``gamma`` in
    ``[0.9, 1]`` (set it explicitly), where the recursion is far more sensitive to perturbations (next paragraph).

    Precision: the two carried states ``x_{k-1}`` and ``x_k`` (and Heun's predictor) stay in float64 inside the
    scheduler; a pipeline's half-precision latents are only their rounded view. When the ``sample`` of a step is the
    tensor the previous step returned (the same object, not edited in place since), the step uses its float64 copy; any
    other ``sample`` (edited or replaced latents) is used as given. This matters because on Karras grids the BDIA
    recursion has a parasitic root of magnitude above 1 (about -1.47 at ``gamma = 1``): any perturbation grows from
    step to step. Rounding the carried states to float16 moved the final samples of a 20-level ``gamma = 1`` run on the
    digits testbed (data range 1.8) by 11 (bfloat16: 63); with float64 states what is left is the amplified rounding of
    the model's own half-precision output: 0.08 (Euler; bfloat16 0.4) and 0.03 (Heun; bfloat16 0.15) at ``gamma = 1``,
    but 7e-4 (bfloat16 6e-3, as EDM's own sampler) at ``gamma = 0.5``, hence that default. ``prev_sample`` is returned
    in ``sample``'s dtype and ``pred_original_sample`` in the promotion of ``sample``'s and ``model_output``'s dtypes
    (as ``DDIMScheduler``).

    Before :meth:`set_timesteps` the scheduler holds EDMEulerScheduler's construction grid (``num_train_timesteps +
    1`` levels; ``num_inference_steps`` is None), so ``timesteps``, ``sigmas``, ``scale_model_input`` and
    ``add_noise`` work as they do there.

    Step protocol: ``solver="euler"`` is EDMEulerScheduler's (``order = 1``, one call per entry of ``timesteps``).
    ``solver="heun"`` is diffusers' Heun pattern (``order = 2``; ``timesteps`` is ``[t_0, t_1, t_1, ..., t_{N-1},
    t_{N-1}]``): the first call at ``t_k`` is made at ``x_k`` and returns the Euler predictor, the next call (at
    ``t_{k+1}``) is made at that predictor and returns ``x_{k+1}``; the call at ``t_{N-1}`` that ends the list makes
    the final Euler step. Both work in ``StableDiffusionPipeline``-style loops (``scale_model_input`` then ``step``).

    Exact inversion recovers ``x_{k-1} = (x_{k+1} - x_k - Delta_f) / gamma + x_k + Delta_b`` from ``(x_k,
    x_{k+1})`` (needs ``gamma > 0``; round-off grows like ``gamma^-N``, so use ``gamma`` near 1 and float64)::

        scheduler.set_timesteps(N)
        upper, lower = x_N_minus_1, x_N                     # the last state of a run and its final sample
        for t in scheduler.level_timesteps.flip(0)[:-1]:    # t_{N-1}, ..., t_1
            out = model(scheduler.scale_model_input(upper, t), t).sample
            pred = scheduler.heun_predictor(out, t, upper)  # None for Euler steps (solver="euler", last level)
            out2 = None if pred is None else model(
                scheduler.scale_model_input(pred.sample, pred.timestep), pred.timestep).sample
            upper, lower = scheduler.inverse_step(out, t, upper, lower, predictor_output=out2).upper_sample, upper
        # (upper, lower) is now (x_0, x_1): regenerate with set_inversion_pair(upper, lower)

    ``BDIAScheduler.from_config`` of an EDM config returns this class, and ``from_config`` accepts
    ``EDMEulerScheduler`` and ``EDMDPMSolverMultistepScheduler`` configs (Playground v2.5, CosXL), ignoring their
    solver keys; VP and flow configs are refused (use :class:`~diffsamplers.BDIAScheduler`).

    Args:
        gamma (`float`, defaults to 0.5): weight of the backward correction, in ``[0, 1]``. 0 is EDM's Euler (or
            Heun) sampler; inversion needs ``gamma > 0`` and round trips want ``[0.9, 1.0]`` (pass it: the default
            is the stable choice for sampling, see "Precision" above).
        sigma_min (`float`, defaults to 0.002): smallest noise level of the grid, as in EDMEulerScheduler.
        sigma_max (`float`, defaults to 80.0): largest noise level, where sampling starts.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data, in EDM's preconditioning.
        sigma_schedule (`str`, defaults to `"karras"`): `"karras"` (EDM's rho-spaced grid) or `"exponential"`
            (log-uniform, CosXL).
        num_train_timesteps (`int`, defaults to 1000): kept for diffusers' config (``len(scheduler)``).
        prediction_type (`str`, defaults to `"epsilon"`): what the network's raw output ``F`` is preconditioned as:
            `"epsilon"` (``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``) or `"v_prediction"`
            (``c_out`` negated), exactly as EDMEulerScheduler.
        rho (`float`, defaults to 7.0): the Karras grid's exponent.
        final_sigmas_type (`str`, defaults to `"zero"`): the level after the last timestep: `"zero"` (clean data)
            or `"sigma_min"` (then the last interval has zero length and its step is the gamma correction alone).
        solver (`str`, defaults to `"euler"`): the forward increment: `"euler"` (one model call per level) or
            `"heun"` (EDM's second-order step, two calls per level but the last; see above for the accuracy).
    """

    _compatibles: ClassVar[list[str]] = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    _supports_ve = True

    @register_to_config
    def __init__(
        self,
        gamma: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: Literal["karras", "exponential"] = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        solver: Literal["euler", "heun"] = "euler",
    ):
        self.register_to_config(gamma=checked_gamma(gamma))  # a plain float in the saved config
        for name, value, allowed in (
            ("solver", solver, SOLVERS),
            ("prediction_type", prediction_type, PREDICTION_TYPES_EDM),
            ("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES),
            ("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 < float(sigma_min) < float(sigma_max):
            raise ValueError(
                f"sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}"
            )
        if not float(sigma_data) > 0.0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data!r}")
        if not float(rho) > 0.0:
            raise ValueError(f"rho must be positive, got {rho!r}")
        steps = num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        self.noise_schedule = None
        self.alphas_cumprod = None
        self._pending_pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self._workspace = LinearWorkspace()  # the float64 states of the Euler form's step, kept across runs
        # EDMEulerScheduler fills its grid at construction (num_train_timesteps + 1 levels), so scale_model_input
        # and add_noise work before set_timesteps; num_inference_steps stays None there as well
        self._set_grid(self._reference())
        self.num_inference_steps: int | None = None

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """As diffusers' ``from_config``, for EDM configs only (``EDMEulerScheduler``,
        ``EDMDPMSolverMultistepScheduler`` or this class's own); their solver keys are ignored, and
        ``thresholding=True`` is refused. Any other config (VP, flow, or VE-style schedulers whose timesteps are
        not EDM's ``log(sigma) / 4``, such as consistency models') raises a ``ValueError``."""
        if config is not None and hasattr(config, "keys") and not is_edm_config(dict(config)):
            raise ValueError(
                f"{cls.__name__} needs an EDM config (EDMEulerScheduler, EDMDPMSolverMultistepScheduler), got "
                f"{dict(config).get('_class_name')}; use BDIAScheduler for VP and flow configs"
            )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def is_flow(self) -> bool:
        return False

    @property
    def order(self) -> int:
        """Model calls per interval, as pipelines read it: 1 for ``solver="euler"``, 2 for ``"heun"``."""
        return 2 if self.config.solver == "heun" else 1

    @property
    def _heun(self) -> bool:
        return self.config.solver == "heun"

    @property
    def init_noise_sigma(self) -> float:
        """``sqrt(sigma_max^2 + 1)``, as EDMEulerScheduler (pipelines scale unit noise by it)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    # -- per-run state ------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._upper_sample: torch.Tensor | None = None  # x_{k-1}: the previous state of this run
        self._current: torch.Tensor | None = None  # x_k between the two calls of a Heun step
        self._predicted = StateView()  # the float64 predictor handed out by that first call, and its view
        self._first_output: torch.Tensor | None = None  # the model output at x_k, between the two calls
        self._pair_lower: torch.Tensor | None = None  # an injected x_k handed back again by the wasted second call
        self._workspace.carried.clear()  # x_k of the next step: the float64 state the last step handed out a cast of

    def reset(self) -> None:
        """Forget the run in progress and any injected pair (``set_timesteps`` keeps an unconsumed pair)."""
        self._reset_state()
        self._step_index = None
        self._pending_pair = None

    def set_inversion_pair(self, upper_sample: torch.Tensor, lower_sample: torch.Tensor) -> None:
        """Start the next run from an inverted pair ``(x_{k-1}, x_k)`` instead of a plain Heun first step.

        The pair survives the next :meth:`set_timesteps` (pipelines call it inside ``__call__``) and is consumed by
        the first ``step`` of the next run, which must be made either

        * with ``sample`` equal to ``upper_sample`` (a stock pipeline called with ``latents=upper_sample``): that
          call (and with Heun the next one, the second slot of the skipped interval) ignores the model output and
          returns ``lower_sample``, and the following step applies BDIA (one or two wasted model calls); or
        * with ``sample`` equal to ``lower_sample`` at its own level's timestep (a custom loop that starts there,
          found by ``index_for_timestep``, or ``set_begin_index(k)``, ``2 k`` for Heun): the step applies BDIA
          with ``x_{k-1} = upper_sample`` directly.

        The pair must come from the same grid, ``gamma`` and model as the run (for example from
        :meth:`inverse_step`); the first step checks only that ``sample`` is one of the two, up to a few roundings
        (a stock pipeline multiplies its ``latents`` by ``init_noise_sigma``: call it with ``latents=upper_sample /
        scheduler.init_noise_sigma``; the run continues from the injected tensors themselves, so the rounding does
        not matter). Keep the pair in float64 for an exact round trip.
        """
        self._pending_pair = checked_pair(upper_sample, lower_sample)

    # -- grid ---------------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Set EDMEulerScheduler's grid (in the Heun layout) and reset all per-run state.

        Args:
            num_inference_steps (`int`, *optional*): number of grid levels N; a run makes 2N - 1 model calls.
            device (`str` or `torch.device`, *optional*): where ``self.timesteps`` lives.
            timesteps (`list`, *optional*): not supported (EDMEulerScheduler takes none); must be ``None``.
            sigmas (`list[float]` or `torch.Tensor`, *optional*): passed to ``EDMEulerScheduler.set_timesteps``,
                which (diffusers 0.42) reads them as positions in ``[0, 1]`` along its sigma schedule (0 is
                ``sigma_max``, 1 is ``sigma_min``): strictly increasing, in ``[0, 1]``.
            mu (`float`, *optional*): no dynamic shifting in EDM; must be ``None``.

        Sets ``level_sigmas`` (float64, the N + 1 distinct levels, EDMEulerScheduler's ``sigmas``),
        ``level_timesteps`` (its N ``timesteps``, ``c_noise = log(sigma) / 4``), and ``timesteps``/``sigmas`` in
        HeunDiscreteScheduler's layout: ``[t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}]`` and the matching sigmas with the
        final level appended.
        """
        if timesteps is not None or mu is not None:
            raise ValueError("BDIAEDMScheduler takes neither custom timesteps nor mu; give num_inference_steps")
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("give num_inference_steps or sigmas")
            # EDM's sigma grid is continuous: any number of levels is distinct (as in EDMEulerScheduler)
            num_inference_steps = check_num_inference_steps(num_inference_steps, None)
        else:
            sigmas = _checked_ramp(sigmas)
        reference = self._reference()
        reference.set_timesteps(num_inference_steps, sigmas=sigmas)
        self._set_grid(reference, device)

    def _reference(self):
        """An EDMEulerScheduler with this config: its grids are the ones used here."""
        from diffusers import EDMEulerScheduler

        keys = EDMEulerScheduler._get_init_keys(EDMEulerScheduler)
        return EDMEulerScheduler(**{k: v for k, v in self.config.items() if k in keys})

    def _set_grid(self, reference: Any, device: str | torch.device | None = None) -> None:
        """Take ``reference``'s grid (in the Heun layout for ``solver="heun"``) and reset all per-run state."""
        levels = reference.sigmas.double()  # sigma_0 > ... > sigma_{N-1}, then sigma_N (0 or sigma_min)
        ts = reference.timesteps
        n = len(ts)
        if n < 1 or not bool((levels[1:n] < levels[: n - 1]).all()) or not bool((levels[:n] > 0).all()):
            raise ValueError("sigmas must give a strictly decreasing grid of positive noise levels")
        self.num_inference_steps = n
        self._num_levels = n
        self.level_sigmas = levels
        self.level_timesteps = ts.to(device)
        if self._heun:
            # HeunDiscreteScheduler's layout: every level after the first is visited twice (predictor, next state)
            self.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)]).to(device)
            self.sigmas = torch.cat([levels[:1], levels[1:-1].repeat_interleave(2), levels[-1:]]).float()
        else:  # EDMEulerScheduler's own layout
            self.timesteps = ts.to(device)
            self.sigmas = levels.float()
        self._level_floats = [float(s) for s in levels]  # host-side scalars: no device sync inside step
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def _level_of_call(self, index: int) -> tuple[int, bool]:
        """Call ``index`` -> (level k of the interval k -> k+1, whether it is the second call of a Heun step)."""
        if not self._heun:
            return index, False
        return index // 2, index % 2 == 1

    def _level_index(self, timestep: Any) -> int:
        """The grid level k of a timestep (any of its duplicates)."""
        return self.index_for_timestep(timestep, self.level_timesteps)  # the levels are distinct

    # -- EDM preconditioning (EDMEulerScheduler's formulas) ----------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """EDM's ``c_in x = x / sqrt(sigma^2 + sigma_data^2)`` at the call's level.

        Inside a run the level is the current call's; outside one (inversion loops) it is looked up from
        ``timestep`` without starting a run.
        """
        if self._step_index is not None and self.timesteps is not None and self._step_index < len(self.timesteps):
            # Heun: call c is made at level (c + 1) // 2 (the second call at the predictor's level)
            call = self._step_index
            sigma = self._level_floats[(call + 1) // 2 if self._heun else call]
        else:
            sigma = self._level_floats[self._level_index(timestep)]
        return sample * edm_preconditioning(sigma, self.config.sigma_data)[0]

    def _preconditioning(self, sigma: float) -> tuple[float, float]:
        """EDM's ``(c_skip, c_out)`` at ``sigma`` (EDMEulerScheduler.precondition_outputs)."""
        return edm_preconditioning(sigma, self.config.sigma_data, self.config.prediction_type)[1:]

    def _denoised(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float) -> torch.Tensor:
        """EDM's ``D(x; sigma) = c_skip x + c_out F`` in float64."""
        c_skip, c_out = self._preconditioning(sigma)
        return c_skip * sample.double() + c_out * model_output.double()

    def _derivative_at(self, model_output: torch.Tensor, sample: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """``(D(x_k; sigma_k), d_k = (x_k - D) / sigma_k)`` in float64."""
        sigma = self._level_floats[k]
        denoised = self._denoised(model_output, sample, sigma)
        return denoised, (sample.double() - denoised) / sigma

    def _slope_coefficients(self, k: int) -> tuple[float, float]:
        """``(a_x, a_F)`` with ``d = (x - D(x; sigma_k)) / sigma_k = a_x x + a_F F``: ``a_x = (1 - c_skip) / sigma_k
        = sigma_k / (sigma_k^2 + sigma_data^2)`` (no cancellation) and ``a_F = -c_out / sigma_k``."""
        sigma = self._level_floats[k]
        return sigma / (sigma**2 + self.config.sigma_data**2), -self._preconditioning(sigma)[1] / sigma

    def _denoised_output(self, model_output: torch.Tensor, sample: torch.Tensor, k: int) -> torch.Tensor:
        """``D(x; sigma_k)`` for ``pred_original_sample``: in the promotion of ``sample``'s and ``model_output``'s
        dtypes (as ``DDIMScheduler`` returns its x0), one pass in at least float32."""
        c_skip, c_out = self._preconditioning(self._level_floats[k])
        dtype = output_dtypes(sample, model_output)[1]
        compute = torch.promote_types(dtype, torch.float32)
        return (model_output.to(compute) * c_out).add_(sample.to(compute), alpha=c_skip).to(dtype)

    def _predictor(self, sample: torch.Tensor, model_output: torch.Tensor, k: int) -> torch.Tensor:
        """Heun's Euler predictor ``x_k + h d_k = (1 + h a_x) x_k + h a_F F`` (``h = sigma_{k+1} - sigma_k``) in the
        sample's dtype, computed in at least float32: the second call's input (sampling passes its carried ``x_k`` in
        float64). Sampling and inversion both call this function, so the model sees the same point in both."""
        h = self._level_floats[k + 1] - self._level_floats[k]
        a_x, a_f = self._slope_coefficients(k)
        compute = torch.promote_types(sample.dtype, torch.float32)
        return (model_output.to(compute) * (h * a_f)).add_(sample.to(compute), alpha=1.0 + h * a_x).to(sample.dtype)

    def _forward_increment(
        self, sample: torch.Tensor, derivative: torch.Tensor, k: int, predictor: torch.Tensor | None, out2: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``Delta_f(x_k)`` (float64) and the second call's x0: Heun's averaged slope, or Euler on the last
        interval (``out2`` is None there)."""
        h = self._level_floats[k + 1] - self._level_floats[k]
        if out2 is None:  # Karras et al. Algorithm 1: the step to the final level is Euler
            return h * derivative, None
        sigma_next = self._level_floats[k + 1]
        denoised = self._denoised(out2, predictor, sigma_next)
        derivative2 = (predictor.double() - denoised) / sigma_next
        return h * (0.5 * derivative + 0.5 * derivative2), denoised

    def _backward_increment(self, derivative: torch.Tensor, k: int) -> torch.Tensor:
        """``Delta_b(x_k) = (sigma_{k-1} - sigma_k) d_k``: Euler back to the previous level."""
        return (self._level_floats[k - 1] - self._level_floats[k]) * derivative

    # -- sampling -----------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DiffSamplersSchedulerOutput | tuple:
        """One call of the Heun protocol: the predictor after the first call of an interval, ``x_{k+1}`` after the
        second (or after the single call of the last interval).

        The arguments after ``sample`` are ``EDMEulerScheduler.step``'s, in its order, so a call written for it works
        positionally too; BDIA is deterministic, so ``s_churn`` must be 0 (``s_tmin``, ``s_tmax`` and ``s_noise``
        only shape the churn and are then unused).

        Args:
            model_output (`torch.Tensor`): the (guided) raw network output ``F`` at ``(scale_model_input(sample),
                timestep)``.
            timestep (`float` or `torch.Tensor`): the current entry of ``self.timesteps``.
            sample (`torch.Tensor`): ``x_k`` on a first call, the returned predictor on a second call.
            s_churn (`float`, defaults to 0.0): EDM's stochastic churn; any other value raises a ``ValueError``.
            s_tmin, s_tmax, s_noise (`float`): EDM's churn window and noise scale; unused without churn.
            generator (`torch.Generator`, *optional*): accepted for pipeline compatibility; unused.
            return_dict (`bool`, defaults to `True`): return a
                :class:`~diffsamplers.samplers.base.DiffSamplersSchedulerOutput` rather than a tuple.

        Returns:
            `DiffSamplersSchedulerOutput` or `tuple`: ``prev_sample`` (the next model input, in ``sample``'s dtype)
            and ``pred_original_sample`` (the denoised ``D`` of this call, in the promotion of ``sample``'s and
            ``model_output``'s dtypes).
        """
        if s_churn != 0.0:
            raise ValueError(f"BDIA is deterministic: s_churn must be 0, got {s_churn!r}")
        index = self._begin_step(timestep, model_output, sample)
        k, second = self._level_of_call(index)
        last = k == self._num_levels - 1
        if second:
            return self._second_call(model_output, sample, k, return_dict)
        # x_k: our float64 copy when the pipeline hands back the cast of our last output; gamma = 0 (EDM's own
        # sampler) has no carried state and takes the sample as given
        current = sample if float(self.config.gamma) == 0.0 else self._workspace.current(sample)
        if self._current is None and self._upper_sample is None and self._pending_pair is not None:
            pair_upper, pair_lower = self._pending_pair
            # the lower sample first and exactly: in half precision neighbouring states lie within the rounding
            # slack that recognising a rescaled upper sample needs
            if same_sample(sample, pair_lower):  # a custom loop starting at x_k
                if k == 0:
                    raise ValueError("a BDIA step needs the level above it: it cannot be made at the first timestep")
                self._upper_sample, current = pair_upper, pair_lower
            elif _matches(sample, pair_upper):  # a pipeline starting at x_{k-1}: hand back x_k, BDIA from level k + 1
                self._pending_pair = None
                self._upper_sample = pair_upper
                self._pair_lower = pair_lower if self._heun and not last else None
                return self._output(
                    self._workspace.carried.hand_out(pair_lower, sample.dtype),
                    self._denoised_output(model_output, sample, k),
                    return_dict,
                )
            else:
                raise ValueError("the first step after set_inversion_pair must start from one of the injected samples")
            self._pending_pair = None
        if not self._heun or last:  # Euler, and Heun's last interval (Algorithm 1 steps into sigma_N by Euler)
            return self._euler_step(model_output, sample, current, k, return_dict)
        # the first call of a Heun step: keep (x_k, F_k) and ask for the model at the predictor
        # the predictor in float64 from the carried x_k: the second call gets back its view, as a state's
        self._current, self._first_output = current, model_output
        predicted = self._predicted.hand_out(self._predictor(current.double(), model_output, k), sample.dtype)
        return self._output(predicted, self._denoised_output(model_output, sample, k), return_dict)

    def _euler_step(
        self, model_output: torch.Tensor, sample: torch.Tensor, current: torch.Tensor, k: int, return_dict: bool
    ) -> DiffSamplersSchedulerOutput | tuple:
        """The Euler form as one float64 linear combination of ``(x_{k-1}, F, x_k)`` with host-side coefficients.

        ``d_k = a_x x_k + a_F F`` with ``a_x = (1 - c_skip) / sigma_k = sigma_k / (sigma_k^2 + sigma_data^2)`` and
        ``a_F = -c_out / sigma_k``, so the update is ``x_{k+1} = gamma x_{k-1} + ((1 - gamma) + s a_x) x_k + s a_F F``
        with ``s = h_f - gamma h_b``; it is accumulated in reused float64 buffers (as BDIA-DDIM's linear step), not
        through fresh float64 temporaries for ``D``, ``d_k`` and both increments. ``current`` is ``x_k`` (float64
        when carried over from the previous step), ``sample`` the pipeline's view of it (the model's input).
        """
        gamma, upper, slope = self._bdia_terms(k, self._level_floats[k + 1] - self._level_floats[k])
        a_x, a_f = self._slope_coefficients(k)
        prev_sample, self._upper_sample = self._workspace.combine(
            upper, gamma, [(model_output, slope * a_f)], current, (1.0 - gamma) + slope * a_x, sample.dtype
        )
        return self._output(prev_sample, self._denoised_output(model_output, sample, k), return_dict)

    def _bdia_terms(self, k: int, slope: float) -> tuple[float, torch.Tensor | None, float]:
        """``(gamma, x_{k-1}, slope - gamma h_b)``: the weight of the run's previous state and the net weight of
        ``d_k`` in the update; ``(0, None, slope)`` on a run's first interval and for ``gamma = 0``."""
        gamma, upper = float(self.config.gamma), self._upper_sample
        if upper is None or gamma == 0.0:
            return 0.0, None, slope
        return gamma, upper, slope - gamma * (self._level_floats[k - 1] - self._level_floats[k])

    def _output(
        self, prev_sample: torch.Tensor, denoised: torch.Tensor, return_dict: bool
    ) -> DiffSamplersSchedulerOutput | tuple:
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return DiffSamplersSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _second_call(
        self, model_output: torch.Tensor, sample: torch.Tensor, k: int, return_dict: bool
    ) -> DiffSamplersSchedulerOutput | tuple:
        if self._pair_lower is not None:  # the Heun slot of an interval skipped by an injected pair
            lower, self._pair_lower = self._pair_lower, None
            return self._output(
                self._workspace.carried.hand_out(lower, sample.dtype),
                self._denoised_output(model_output, sample, k + 1),
                return_dict,
            )
        if self._current is None:
            raise ValueError(
                "this call is the second (corrector) call of a Heun step, but no first call preceded it: "
                "a run must begin at a first call (index_for_timestep finds one; set_begin_index takes an even index)"
            )
        current, first_output = self._current, self._first_output
        self._current = self._first_output = None
        # the float64 predictor p when the pipeline hands back its view, else (an edited input) what it was given
        point = self._predicted.resolve(sample)
        self._predicted.clear()
        # x_{k+1} = x_k + h (d_k + d') / 2 + gamma (x_{k-1} - x_k - h_b d_k), with d_k = a_x x_k + a_F F_k and the
        # predictor's d' = b_x p + b_F F': one float64 combination of (x_{k-1}, F_k, p, F', x_k)
        h = self._level_floats[k + 1] - self._level_floats[k]
        gamma, upper, slope = self._bdia_terms(k, 0.5 * h)
        a_x, a_f = self._slope_coefficients(k)
        b_x, b_f = self._slope_coefficients(k + 1)
        terms = [(first_output, slope * a_f), (point, 0.5 * h * b_x), (model_output, 0.5 * h * b_f)]
        prev_sample, self._upper_sample = self._workspace.combine(
            upper, gamma, terms, current, (1.0 - gamma) + slope * a_x, sample.dtype
        )
        return self._output(prev_sample, self._denoised_output(model_output, sample, k + 1), return_dict)

    # -- inversion ----------------------------------------------------------------------------------------------

    def heun_predictor(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor
    ) -> BDIAEDMPredictorOutput | None:
        """Where :meth:`inverse_step` needs its second model call: the Heun predictor of ``x_k`` and its timestep.

        Args:
            model_output (`torch.Tensor`): the (guided) raw network output at ``(scale_model_input(x_k), timestep)``.
            timestep (`float` or `torch.Tensor`): ``t_k``, the timestep of ``sample``'s level.
            sample (`torch.Tensor`): ``x_k``.

        Returns:
            `BDIAEDMPredictorOutput` (``sample``, ``timestep``): evaluate the model there (after
            ``scale_model_input(sample, timestep)``) and pass its output as ``predictor_output``; ``None`` on the
            last level, whose step is a single Euler call, and always with ``solver="euler"``. The run's step index is
            not touched.
        """
        check_model_output(model_output, sample)
        k = self._level_index(timestep)
        if not self._heun or k == self._num_levels - 1:
            return None
        return BDIAEDMPredictorOutput(
            sample=self._predictor(sample, model_output, k), timestep=self.level_timesteps[k + 1]
        )

    def inverse_step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        lower_sample: torch.Tensor,
        predictor_output: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> BDIAInverseOutput | tuple:
        """Recover ``x_{k-1}`` exactly from ``(x_k, x_{k+1})``: the BDIA-EDM step at ``timestep`` solved backwards,
        ``x_{k-1} = (x_{k+1} - x_k - Delta_f(x_k)) / gamma + x_k + Delta_b(x_k)``.

        Both model outputs must be the ones sampling would get (same timestep labels, conditioning, guidance and
        dtype). The step index of a sampling run is not touched; call :meth:`set_timesteps` before an inversion loop
        all the same: it clears any unfinished run, whose call index ``scale_model_input`` follows (as diffusers'
        EDM schedulers do) in place of the ``timestep`` it is given.

        Args:
            model_output (`torch.Tensor`): the raw network output at ``(scale_model_input(x_k, timestep), timestep)``.
            timestep (`float` or `torch.Tensor`): ``t_k``, the timestep of ``sample``'s level; not the first one
                (there is no level above it).
            sample (`torch.Tensor`): ``x_k``.
            lower_sample (`torch.Tensor`): ``x_{k+1}``, what sampling produced from ``x_k``.
            predictor_output (`torch.Tensor`, *optional*): the network output at the point and timestep returned by
                :meth:`heun_predictor`; required except on the last level (an Euler step), where it must be ``None``.
            return_dict (`bool`, defaults to `True`): return a :class:`~diffsamplers.BDIAInverseOutput` rather than a
                tuple.

        Returns:
            `BDIAInverseOutput` or `tuple`: ``upper_sample`` (``x_{k-1}``, in ``sample``'s dtype) and
            ``pred_original_sample`` (the denoised ``D(x_k; sigma_k)``, in the dtype :meth:`step` gives it).
        """
        gamma = float(self.config.gamma)
        if gamma <= 0.0:
            raise ValueError(f"BDIA inversion divides by gamma: gamma must be > 0, got {gamma!r}")
        k = self._level_index(timestep)
        if k == 0:
            raise ValueError("inverse_step needs the level above `timestep`: it cannot invert the first timestep")
        last = not self._heun or k == self._num_levels - 1
        if last and predictor_output is not None:
            raise ValueError("predictor_output must be None for an Euler step (solver='euler', or the last level)")
        if not last and predictor_output is None:
            raise ValueError("predictor_output is required: the Heun step needs the model at heun_predictor's point")
        check_model_output(model_output, sample)
        check_model_output(lower_sample, sample, name="lower_sample")
        if predictor_output is not None:
            check_model_output(predictor_output, sample, name="predictor_output")
        denoised, derivative = self._derivative_at(model_output, sample, k)
        predictor = None if last else self._predictor(sample, model_output, k)
        delta_f, _ = self._forward_increment(sample, derivative, k, predictor, predictor_output)
        x = sample.double()
        # BDIA's update solved for x_{k-1}, with EDM's increments, in float64
        upper = (
            (lower_sample.to(x.device, torch.float64) - x - delta_f) / gamma
            + x
            + self._backward_increment(derivative, k)
        )
        upper, denoised = upper.to(sample.dtype), denoised.to(output_dtypes(sample, model_output)[1])
        if not return_dict:
            return (upper, denoised)
        return BDIAInverseOutput(upper_sample=upper, pred_original_sample=denoised)

    # -- noising ------------------------------------------------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """``x0 + sigma noise`` at the levels of grid timesteps (one per sample or a scalar), as EDMEulerScheduler."""
        ts = torch.as_tensor(timesteps).reshape(-1)
        sigma = torch.tensor([self._level_floats[self._level_index(t)] for t in ts], dtype=original_samples.dtype)
        sigma = sigma.to(original_samples.device).reshape((-1,) + (1,) * (original_samples.ndim - 1))
        return original_samples + noise * sigma


def _matches(sample: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether ``sample`` is ``stored`` up to a few roundings in ``sample``'s dtype (a pipeline multiplies its
    ``latents`` by ``init_noise_sigma``, so an injected sample comes back scaled and rescaled)."""
    if sample is stored:
        return True
    if sample.shape != stored.shape:
        return False
    eps = 16 * torch.finfo(sample.dtype).eps
    stored = stored.to(sample.device, torch.float64)
    return bool(torch.allclose(sample.double(), stored, rtol=eps, atol=eps * float(stored.abs().max())))


def _checked_ramp(sigmas: Any) -> torch.Tensor:
    """Custom ``sigmas`` of :meth:`BDIAEDMScheduler.set_timesteps` as a float64 tensor: EDMEulerScheduler's positions
    along its schedule, so finite, strictly increasing and in ``[0, 1]``."""
    try:
        ramp = torch.as_tensor(
            np.asarray(sigmas.cpu() if isinstance(sigmas, torch.Tensor) else sigmas), dtype=torch.float64
        )
    except (TypeError, ValueError) as err:
        raise TypeError(f"sigmas must be a 1-D list of numbers, got {sigmas!r}") from err
    if ramp.ndim != 1 or len(ramp) < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D list of numbers, got shape {tuple(ramp.shape)}")
    if not bool(torch.isfinite(ramp).all()) or float(ramp.min()) < 0.0 or float(ramp.max()) > 1.0:
        raise ValueError(f"sigmas are positions along the EDM schedule: they must lie in [0, 1], got {ramp.tolist()}")
    if len(ramp) > 1 and not bool((ramp[1:] > ramp[:-1]).all()):
        raise ValueError(f"sigmas must be strictly increasing positions (0 = sigma_max), got {ramp.tolist()}")
    return ramp
