# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""BDIA-DDIM: exact diffusion inversion by bi-directional integration approximation.

Zhang, Lewis & Kleijn, "Exact Diffusion Inversion via Bi-directional Integration Approximation", arXiv 2307.10829
(ECCV 2024); official code https://github.com/guoqiang-zhang-x/BDIA. States run from noise ``z_N`` to data ``z_0``,
``z_i`` lives at ``timesteps[N - i]`` and ``D_{i->k}(z_i) = alpha_k x0_i + sigma_k eps_i`` is the DDIM transport of
``z_i`` to level ``k`` with the single model evaluation made at ``z_i``. BDIA-DDIM is

    z_{i-1} = gamma * z_{i+1} - gamma * D_{i->i+1}(z_i) + D_{i->i-1}(z_i),

linear in ``(z_{i+1}, z_i, eps_i)``, so ``z_{i+1}`` is recovered exactly from ``(z_i, z_{i-1})``:
``z_{i+1} = (z_{i-1} - D_{i->i-1}(z_i)) / gamma + D_{i->i+1}(z_i)``.

Sources and what is unverified: the update and its inversion are the official README's (its "BDIA-DDIM" section, in
the convention since its commit 789f0a9 of 2023-12-16, where ``gamma`` weights the backward term and ``gamma = 0``
is DDIM) and the official code's (``text-to-image/stablediffusionV2/ldm/models/diffusion/BDIAddim.py`` for sampling,
with a plain DDIM first step; ``image-editing/bdia_edict_functions.py`` for the inversion, which returns the pair
``(z_N, z_{N-1})``). The paper's own section and equation numbers for them are **unverified**: only its abstract
could be read, so none is cited here. The ``gamma`` recommendations (0.5 at 10 and 1.0 at 40 text-to-image steps,
``[0.92, 1.0]`` for editing) are the official README's.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from ..schedule import ddim_step, is_edm_config, prediction_coefficients
from ._bdia_common import (
    BDIAInverseOutput,
    LinearWorkspace,
    checked_gamma,
    checked_pair,
    output_dtypes,
    same_sample,
)
from .base import COMMON_CONFIG_DOC, DiffSamplersScheduler, DiffSamplersSchedulerOutput
from .bdia_edm import BDIAEDMScheduler
from .checks import check_model_output

__all__ = ["BDIAInverseOutput", "BDIAScheduler"]


class BDIAScheduler(DiffSamplersScheduler):
    __doc__ = (
        """BDIA-DDIM (Zhang, Lewis & Kleijn, ECCV 2024): DDIM made exactly invertible at no extra model calls.

    Each step makes one model evaluation at ``z_i`` and forms two DDIM transports from it: forward to the next
    level and backward to the previous one. The previous slot's integral is re-estimated as a ``gamma`` mix of the
    step actually taken and the fresh backward estimate::

        z_{i-1} = D_{i->i-1}(z_i) + gamma * (z_{i+1} - D_{i->i+1}(z_i))

    ``gamma = 0`` is plain DDIM (``eta = 0``), evaluated in float64 and cast back: not bit-identical to
    ``DDIMScheduler``, whose arithmetic is float32, but within float32 rounding of it (about ``2e-7`` relative on
    float32 latents); with float64 latents and DDIM's tables made float64 the two agree exactly (v prediction: to
    ``1e-14``). ``gamma = 1`` is the symmetric, leapfrog-like rule. The first step of a run has no ``z_{i+1}`` and
    is a plain DDIM step, unless a run is started from a pair injected with :meth:`set_inversion_pair`.
    :meth:`inverse_step` recovers ``z_{i+1}`` from ``(z_i, z_{i-1})`` exactly (``gamma > 0``); it divides by
    ``gamma`` at every step, so round-off grows like ``gamma^-N`` during inversion: exact round trips want ``gamma``
    near 1 (the official editing code uses 0.94) and float64 latents. Small ``gamma`` (the official text-to-image
    sampler uses 0.5 at 10 steps) is for sampling only.

    Precision: the recursion carries ``z_{i+1}`` and ``z_i`` in float64 inside the scheduler. A pipeline holding
    half-precision latents holds only a rounded view of them: when the ``sample`` given to :meth:`step` is the tensor
    the previous step returned (the same object, not edited in place since), the step uses its own float64 copy; any
    other ``sample`` (latents the pipeline edited or replaced) is used as given. Without this the rounding of the
    carried states feeds BDIA's parasitic mode (root ``-gamma`` on a zero-velocity model, larger in magnitude on uneven
    grids), which ``gamma`` near 1 does not damp. ``prev_sample`` is returned in ``sample``'s dtype and
    ``pred_original_sample`` in the promotion of ``sample``'s and ``model_output``'s dtypes, as ``DDIMScheduler``
    returns them.

    Choosing ``gamma``: where DDIM is an Euler step (flow coordinates; ``x / alpha`` in ``sigma / alpha`` for VP,
    up to the ratio of the alphas), the step's local error is ``(h_f^2 - gamma h_b^2) / 2`` times the trajectory's
    curvature to leading order, with ``h_f`` and ``h_b`` the forward and backward step lengths, so ``gamma = 1``
    suits grids of even steps. Grids that end with a step much shorter than the one before it (``"leading"``
    spacing and Karras grids, whose last step goes from the smallest training noise level to clean data) make
    ``gamma = 1`` over-correct that step: on the exact Gaussian-mixture testbed it is then worse than DDIM at 5-10
    steps, while ``gamma = 0.5`` beats DDIM at 10 and 20 steps on every grid tried (``"linspace"`` at 5 steps
    excepted); with ``"trailing"`` spacing ``gamma`` near 1 is best.

    The update is linear in the sample's own frame, so it applies unchanged to VP schedules (epsilon, sample and
    v prediction), to flow-matching configs (there DDIM is the Euler step of the velocity field) and to Karras
    sigma grids of VP configs (``use_karras_sigmas=True``: DDIM is then EDM's Euler step in ``x / alpha``).
    EDM/VE configs (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``, with EDM's input/output
    preconditioning) have their own class: ``BDIAScheduler.from_config`` of one returns a
    :class:`~diffsamplers.BDIAEDMScheduler` (BDIA on EDM's Euler or Heun sampler), so
    ``pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config)`` works on EDM pipelines too.

    Args:
        gamma (`float`, defaults to 1.0): weight of the backward correction, in ``[0, 1]``. 0 is DDIM; the official
            recommendations (README of https://github.com/guoqiang-zhang-x/BDIA) are 0.5 for 10-step and 1.0 for
            40-step text-to-image sampling, and ``[0.92, 1.0]`` for round-trip editing."""
        + COMMON_CONFIG_DOC
    )

    order = 1

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """As :meth:`DiffSamplersScheduler.from_config`, except that an EDM config (``EDMEulerScheduler``,
        ``EDMDPMSolverMultistepScheduler``) returns a :class:`~diffsamplers.BDIAEDMScheduler` built from it (with
        the same keyword arguments, e.g. ``gamma``); other VE-style configs are refused."""
        if config is not None and hasattr(config, "keys") and is_edm_config(dict(config)):
            return BDIAEDMScheduler.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @register_to_config
    def __init__(
        self,
        gamma: float = 1.0,
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
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
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
        self.register_to_config(gamma=checked_gamma(gamma))  # a plain float in the saved config
        self._validate_common_config()
        self._pending_pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self._workspace = LinearWorkspace()  # float64 buffers of the linear step, kept across runs of one shape
        self._reset_state()

    # -- per-run state ------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        # z_{i+1}: the input state of the previous step of this run (None before the first step); after a linear
        # step it is one of the float64 work buffers
        self._upper_sample: torch.Tensor | None = None
        self._workspace.carried.clear()  # z_i of the next step: the float64 state the last step handed out a cast of

    def reset(self) -> None:
        """Forget the run in progress and any injected pair (``set_timesteps`` keeps an unconsumed pair)."""
        self._reset_state()
        self._step_index = None
        self._pending_pair = None

    def set_inversion_pair(self, upper_sample: torch.Tensor, lower_sample: torch.Tensor) -> None:
        """Start the next run from an inverted pair ``(z_{i+1}, z_i)`` instead of a DDIM first step.

        The pair survives the next :meth:`set_timesteps` (pipelines call it inside ``__call__``) and is consumed by
        the first ``step`` of the next run, which must be made either

        * with ``sample`` equal to ``upper_sample`` (a stock pipeline called with ``latents=upper_sample``): the
          step ignores the model output and returns ``lower_sample``, and the next step applies BDIA (one wasted
          model call); or
        * with ``sample`` equal to ``lower_sample`` at the following timestep (a custom loop that starts there with
          ``set_begin_index``): the step applies BDIA with ``z_{i+1} = upper_sample`` directly.

        The pair must come from the same timesteps, ``gamma`` and model as the run (for example from
        :meth:`inverse_step`); the first step checks only that ``sample`` is one of the two. Keep the pair in
        float64 for an exact round trip.
        """
        self._pending_pair = checked_pair(upper_sample, lower_sample)

    # -- sampling -----------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DiffSamplersSchedulerOutput | tuple:
        """One BDIA-DDIM step from ``sample = z_i`` (at ``timestep``) to ``z_{i-1}``.

        Args:
            model_output (`torch.Tensor`): the (guided) model output at ``(sample, timestep)``.
            timestep (`int`, `float` or `torch.Tensor`): an entry of ``self.timesteps``.
            sample (`torch.Tensor`): ``z_i``.
            eta (`float`, defaults to 0.0): accepted for ``DDIMPipeline``; BDIA is deterministic, so any value
                other than 0 raises a ``ValueError``.
            use_clipped_model_output (`bool`, *optional*): as in ``DDIMScheduler``: with ``clip_sample``, derive the
                noise from the clipped x0 (otherwise the model's noise is kept; ``None`` means ``False``).
            generator (`torch.Generator`, *optional*): accepted for pipeline compatibility; unused.
            variance_noise (`torch.Tensor`, *optional*): accepted for pipeline compatibility; must be ``None``.
            return_dict (`bool`, defaults to `True`): return a
                :class:`~diffsamplers.samplers.base.DiffSamplersSchedulerOutput` rather than a tuple.

        Returns:
            `DiffSamplersSchedulerOutput` or `tuple`: ``prev_sample`` (``z_{i-1}``, in ``sample``'s dtype) and
            ``pred_original_sample`` (in the promotion of ``sample``'s and ``model_output``'s dtypes, as
            ``DDIMScheduler``).
        """
        if eta != 0.0 or variance_noise is not None:
            raise ValueError(f"BDIA is deterministic: eta must be 0 and variance_noise None, got eta={eta!r}")
        index = self._begin_step(timestep, model_output, sample)
        gamma = float(self.config.gamma)
        dtypes = output_dtypes(sample, model_output)
        recompute_eps = bool(use_clipped_model_output)
        upper = self._upper_sample  # z_{i+1} (float64 after a step), or None on the first step of a run
        # z_i: our float64 copy when the pipeline hands back the cast of our last output; gamma = 0 (DDIM) has no
        # carried state and takes the sample as given
        current = sample if gamma == 0.0 else self._workspace.current(sample)
        if self._pending_pair is not None:
            pair_upper, pair_lower = self._pending_pair
            self._pending_pair = None
            # a pipeline starting at z_{i+1}: hand back z_i, BDIA from the next step
            if same_sample(sample, pair_upper):
                x0, _ = self._x0_eps(model_output, sample, index, recompute_eps=recompute_eps)
                return self._finish(pair_lower.to(torch.float64), x0, pair_upper, dtypes, return_dict)
            if not same_sample(sample, pair_lower):
                raise ValueError("the first step after set_inversion_pair must start from one of the injected samples")
            upper, current = pair_upper, pair_lower  # a custom loop starting at z_i
        if upper is not None and gamma != 0.0 and index == 0:
            raise ValueError("a BDIA step needs the level above it, so it cannot be made at the first timestep")
        if upper is None or gamma == 0.0 or self.config.clip_sample:
            # the first step of a run is plain DDIM (as in the official BDIAddim.py), gamma = 0 is DDIM, and the x0
            # clip is not linear: these take the general float64 path through (x0, eps)
            x0, eps = self._x0_eps(model_output, current, index, recompute_eps=recompute_eps)
            # D_{i->i-1}(z_i): the plain DDIM step (Song et al. 2021, arXiv 2010.02502, eq. 12 with eta = 0)
            prev_sample = ddim_step(
                x0, eps, self.alpha_t[index], self.sigma_t[index], self.alpha_next[index], self.sigma_next[index]
            )
            if upper is not None and gamma != 0.0:
                # D_{i->i+1}(z_i): DDIM backward to the previous entry of `timesteps` (never t + T // N)
                back = ddim_step(
                    x0, eps, self.alpha_t[index], self.sigma_t[index], self.alpha_t[index - 1], self.sigma_t[index - 1]
                )
                # z_{i-1} = D_{i->i-1}(z_i) + gamma * (z_{i+1} - D_{i->i+1}(z_i)), in float64
                prev_sample = prev_sample + gamma * (upper.to(prev_sample.device, torch.float64) - back)
            return self._finish(prev_sample, x0, current, dtypes, return_dict)
        return self._linear_step(model_output, sample, current, upper, index, gamma, dtypes, return_dict)

    def _linear_step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        current: torch.Tensor,
        upper: torch.Tensor,
        index: int,
        gamma: float,
        dtypes: tuple[torch.dtype, torch.dtype],
        return_dict: bool,
    ) -> DiffSamplersSchedulerOutput | tuple:
        """The unclipped BDIA step as one float64 linear combination of ``(z_{i+1}, model_output, z_i)``.

        ``x0`` and ``eps`` are linear in ``(model_output, z_i)`` with host-side coefficients
        (:func:`~diffsamplers.schedule.prediction_coefficients`), so the update in coefficient form,
        ``z_{i-1} = gamma z_{i+1} + A x0 + B eps`` with ``A = a_{i-1} - gamma a_{i+1}`` and
        ``B = s_{i-1} - gamma s_{i+1}``, is ``gamma z_{i+1} + c_out model_output + c_x z_i``. It is accumulated in
        two reused float64 buffers (:class:`LinearWorkspace`) instead of materialising ``x0``, ``eps`` and both DDIM
        transports in fresh float64 tensors, which made the step several times the cost of a DPMSolver step on large
        latents. ``current`` is ``z_i`` (float64 when carried over from the previous step; ``sample`` is the
        pipeline's view of it, the model's input), kept in float64 as the next step's ``z_{i+1}``.
        """
        a_t, s_t = self._level(self.alpha_t, index), self._level(self.sigma_t, index)
        a_lo, s_lo = self._level(self.alpha_next, index), self._level(self.sigma_next, index)
        a_up, s_up = self._level(self.alpha_t, index - 1), self._level(self.sigma_t, index - 1)
        (x0_out, x0_x), (eps_out, eps_x) = prediction_coefficients(self.config.prediction_type, a_t, s_t)
        k_x0, k_eps = a_lo - gamma * a_up, s_lo - gamma * s_up
        c_out, c_x = k_x0 * x0_out + k_eps * eps_out, k_x0 * x0_x + k_eps * eps_x

        prev_sample, self._upper_sample = self._workspace.combine(
            upper, gamma, [(model_output, c_out)], current, c_x, dtypes[0]
        )
        # pred_original_sample at the model's input, in DDIMScheduler's dtype (computed in at least float32); one
        # pass on the inputs rather than a float64 x0 and its cast
        compute = torch.promote_types(dtypes[1], torch.float32)
        x0 = (model_output.to(compute) * x0_out).add_(sample.to(compute), alpha=x0_x).to(dtypes[1])
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return DiffSamplersSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _finish(
        self,
        prev_sample: torch.Tensor,
        x0: torch.Tensor,
        next_upper: torch.Tensor,
        dtypes: tuple[torch.dtype, torch.dtype],
        return_dict: bool,
    ) -> DiffSamplersSchedulerOutput | tuple:
        """Close a step made on the general path: ``prev_sample`` (float64) is carried, its cast returned."""
        self._upper_sample = next_upper
        self._step_index += 1
        prev_sample, x0 = self._workspace.carried.hand_out(prev_sample, dtypes[0]), x0.to(dtypes[1])
        if not return_dict:
            return (prev_sample, x0)
        return DiffSamplersSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    @staticmethod
    def _level(table: torch.Tensor, index: int) -> float:
        return float(table[index])

    # -- inversion ----------------------------------------------------------------------------------------------

    def inverse_step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        lower_sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = False,
        return_dict: bool = True,
    ) -> BDIAInverseOutput | tuple:
        """Recover ``z_{i+1}`` exactly from ``(z_i, z_{i-1})``: the BDIA step at ``timestep`` solved backwards,
        ``z_{i+1} = (z_{i-1} - D_{i->i-1}(z_i)) / gamma + D_{i->i+1}(z_i)`` (the official README's inversion).

        ``model_output`` must be the output sampling would get at ``(z_i, timestep)``: same timestep label,
        conditioning, guidance and dtype. The step index of a sampling run is not touched.

        Args:
            model_output (`torch.Tensor`): the (guided) model output at ``(sample, timestep)``.
            timestep (`int`, `float` or `torch.Tensor`): the entry of ``self.timesteps`` at which ``sample`` lives;
                not the first one (there is no level above it).
            sample (`torch.Tensor`): ``z_i``.
            lower_sample (`torch.Tensor`): ``z_{i-1}``, the output of the sampling step at ``timestep``.
            eta (`float`, defaults to 0.0): must be 0 (a stochastic step is not invertible).
            use_clipped_model_output (`bool`, *optional*): as in :meth:`step`; use the value sampling used.
            return_dict (`bool`, defaults to `True`): return a :class:`BDIAInverseOutput` rather than a tuple.

        Returns:
            `BDIAInverseOutput` or `tuple`: ``upper_sample`` (``z_{i+1}``, in ``sample``'s dtype) and
            ``pred_original_sample`` (in the dtype :meth:`step` gives it).
        """
        gamma = float(self.config.gamma)
        if eta != 0.0:
            raise ValueError(f"BDIA inversion needs a deterministic step: eta must be 0, got {eta!r}")
        if gamma <= 0.0:
            raise ValueError(f"BDIA inversion divides by gamma: gamma must be > 0, got {gamma!r}")
        check_model_output(model_output, sample)
        check_model_output(lower_sample, sample, name="lower_sample")
        if self.timesteps is None:
            raise ValueError("call set_timesteps before inverse_step")
        index = self.index_for_timestep(timestep)
        if index == 0:
            raise ValueError("inverse_step needs the level above `timestep`: it cannot invert the first timestep")
        x0, eps = self._x0_eps(model_output, sample, index, recompute_eps=bool(use_clipped_model_output))
        a_t, s_t = self.alpha_t[index], self.sigma_t[index]
        lower = ddim_step(x0, eps, a_t, s_t, self.alpha_next[index], self.sigma_next[index])  # D_{i->i-1}(z_i)
        back = ddim_step(x0, eps, a_t, s_t, self.alpha_t[index - 1], self.sigma_t[index - 1])  # D_{i->i+1}(z_i)
        upper = (lower_sample.to(lower.device, torch.float64) - lower) / gamma + back
        upper_dtype, x0_dtype = output_dtypes(sample, model_output)
        upper, x0 = upper.to(upper_dtype), x0.to(x0_dtype)
        if not return_dict:
            return (upper, x0)
        return BDIAInverseOutput(upper_sample=upper, pred_original_sample=x0)
