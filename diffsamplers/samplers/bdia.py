# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""BDIA-DDIM: exact diffusion inversion by bi-directional integration approximation.

Zhang, Lewis & Kleijn, "Exact Diffusion Inversion via Bi-directional Integration Approximation", arXiv 2307.10829
(ECCV 2024); official code https://github.com/guoqiang-zhang-x/BDIA. Notation follows
``/work/shared/research/bdia_polaris.md`` (the project's spec): states run from noise ``z_N`` to data ``z_0``,
``z_i`` lives at ``timesteps[N - i]`` and ``D_{i->k}(z_i) = alpha_k x0_i + sigma_k eps_i`` is the DDIM transport of
``z_i`` to level ``k`` with the single model evaluation made at ``z_i``. BDIA-DDIM (spec §1.2, the official
README's update with the DDIM integration approximations; the paper's equation numbers could not be checked, only its
abstract was readable) is

    z_{i-1} = gamma * z_{i+1} - gamma * D_{i->i+1}(z_i) + D_{i->i-1}(z_i),

linear in ``(z_{i+1}, z_i, eps_i)``, so ``z_{i+1}`` is recovered exactly from ``(z_i, z_{i-1})`` (spec §1.4).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ..schedule import ddim_step, is_edm_config, prediction_coefficients
from .base import COMMON_CONFIG_DOC, DiffSamplersScheduler, DiffSamplersSchedulerOutput


@dataclass
class BDIAInverseOutput(BaseOutput):
    """Output of :meth:`BDIAScheduler.inverse_step`.

    Args:
        upper_sample (`torch.Tensor`): ``z_{i+1}``, the state one level noisier than the step's input ``z_i``.
        pred_original_sample (`torch.Tensor`): the x0 prediction made at ``z_i``.
    """

    upper_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class BDIAScheduler(DiffSamplersScheduler):
    __doc__ = (
        """BDIA-DDIM (Zhang, Lewis & Kleijn, ECCV 2024): DDIM made exactly invertible at no extra model calls.

    Each step makes one model evaluation at ``z_i`` and forms two DDIM transports from it: forward to the next
    level and backward to the previous one. The previous slot's integral is re-estimated as a ``gamma`` mix of the
    step actually taken and the fresh backward estimate::

        z_{i-1} = D_{i->i-1}(z_i) + gamma * (z_{i+1} - D_{i->i+1}(z_i))

    ``gamma = 0`` is plain DDIM (``eta = 0``); ``gamma = 1`` is the symmetric, leapfrog-like rule. The first step
    of a run has no ``z_{i+1}`` and is a plain DDIM step, unless a run is started from a pair injected with
    :meth:`set_inversion_pair`. :meth:`inverse_step` recovers ``z_{i+1}`` from ``(z_i, z_{i-1})`` exactly (``gamma
    > 0``); it divides by ``gamma`` at every step, so round-off grows like ``gamma^-N`` during inversion: exact round
    trips want ``gamma`` near 1 (the official editing code uses 0.94) and float64 latents. Small ``gamma`` (the
    official text-to-image sampler uses 0.5 at 10 steps) is for sampling only.

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
            recommendations are 0.5 for 10-step and 1.0 for 40-step text-to-image sampling, and ``[0.92, 1.0]`` for
            round-trip editing."""
        + COMMON_CONFIG_DOC
    )

    order = 1

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """As :meth:`DiffSamplersScheduler.from_config`, except that an EDM config (``EDMEulerScheduler``,
        ``EDMDPMSolverMultistepScheduler``) returns a :class:`~diffsamplers.BDIAEDMScheduler` built from it (with
        the same keyword arguments, e.g. ``gamma``); other VE-style configs are refused."""
        if config is not None and hasattr(config, "keys") and is_edm_config(dict(config)):
            from .bdia_edm import BDIAEDMScheduler

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
        # z_{i+1}: the input sample of the previous step of this run (None before the first step); after a linear
        # step it is one of the float64 work buffers
        self._upper_sample: torch.Tensor | None = None

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
            `DiffSamplersSchedulerOutput` or `tuple`: ``prev_sample`` (``z_{i-1}``, in ``model_output``'s dtype)
            and ``pred_original_sample``.
        """
        if eta != 0.0 or variance_noise is not None:
            raise ValueError(f"BDIA is deterministic: eta must be 0 and variance_noise None, got eta={eta!r}")
        index = self._begin_step(timestep, model_output, sample)
        gamma = float(self.config.gamma)
        upper = self._upper_sample  # z_{i+1}, or None on the first step of a run
        next_upper = sample
        if self._pending_pair is not None:
            pair_upper, pair_lower = self._pending_pair
            self._pending_pair = None
            # a pipeline starting at z_{i+1}: hand back z_i, BDIA from the next step
            if same_sample(sample, pair_upper):
                x0, _ = self._x0_eps(model_output, sample, index, recompute_eps=bool(use_clipped_model_output))
                return self._finish(pair_lower.to(torch.float64), x0, pair_upper, model_output.dtype, return_dict)
            if not same_sample(sample, pair_lower):
                raise ValueError("the first step after set_inversion_pair must start from one of the injected samples")
            upper = pair_upper  # a custom loop starting at z_i
        if upper is not None and gamma != 0.0 and index == 0:
            raise ValueError("a BDIA step needs the level above it, so it cannot be made at the first timestep")
        if upper is None or gamma == 0.0 or self.config.clip_sample:
            # the first step of a run is plain DDIM (spec §1.3), gamma = 0 is DDIM bit for bit, and the x0 clip is not
            # linear: these take the general float64 path through (x0, eps)
            x0, eps = self._x0_eps(model_output, sample, index, recompute_eps=bool(use_clipped_model_output))
            # D_{i->i-1}(z_i): the plain DDIM step (Song et al. 2021, eq. 12 with eta = 0)
            prev_sample = ddim_step(
                x0, eps, self.alpha_t[index], self.sigma_t[index], self.alpha_next[index], self.sigma_next[index]
            )
            if upper is not None and gamma != 0.0:
                # D_{i->i+1}(z_i): DDIM backward to the previous entry of `timesteps` (never t + T // N)
                back = ddim_step(
                    x0, eps, self.alpha_t[index], self.sigma_t[index], self.alpha_t[index - 1], self.sigma_t[index - 1]
                )
                # BDIA-DDIM (spec §1.2): z_{i-1} = D_{i->i-1}(z_i) + gamma * (z_{i+1} - D_{i->i+1}(z_i)), in float64
                prev_sample = prev_sample + gamma * (upper.to(prev_sample.device, torch.float64) - back)
            return self._finish(prev_sample, x0, next_upper, model_output.dtype, return_dict)
        return self._linear_step(model_output, sample, upper, index, gamma, return_dict)

    def _linear_step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        upper: torch.Tensor,
        index: int,
        gamma: float,
        return_dict: bool,
    ) -> DiffSamplersSchedulerOutput | tuple:
        """The unclipped BDIA step as one float64 linear combination of ``(z_{i+1}, model_output, z_i)``.

        ``x0`` and ``eps`` are linear in ``(model_output, z_i)`` with host-side coefficients
        (:func:`~diffsamplers.schedule.prediction_coefficients`), so the spec's coefficient form (§1.2),
        ``z_{i-1} = gamma z_{i+1} + A x0 + B eps`` with ``A = a_{i-1} - gamma a_{i+1}`` and
        ``B = s_{i-1} - gamma s_{i+1}``, is ``gamma z_{i+1} + c_out model_output + c_x z_i``. It is accumulated in
        two reused float64 buffers (:class:`LinearWorkspace`) instead of materialising ``x0``, ``eps`` and both DDIM
        transports in fresh float64 tensors, which made the step several times the cost of a DPMSolver step on large
        latents. ``z_i`` is kept in float64 as the next step's ``z_{i+1}``.
        """
        a_t, s_t = self._level(self.alpha_t, index), self._level(self.sigma_t, index)
        a_lo, s_lo = self._level(self.alpha_next, index), self._level(self.sigma_next, index)
        a_up, s_up = self._level(self.alpha_t, index - 1), self._level(self.sigma_t, index - 1)
        (x0_out, x0_x), (eps_out, eps_x) = prediction_coefficients(self.config.prediction_type, a_t, s_t)
        k_x0, k_eps = a_lo - gamma * a_up, s_lo - gamma * s_up
        c_out, c_x = k_x0 * x0_out + k_eps * eps_out, k_x0 * x0_x + k_eps * eps_x

        dtype = model_output.dtype
        prev_sample, self._upper_sample = self._workspace.combine(
            upper, gamma, [(model_output, c_out)], sample, c_x, dtype
        )
        # pred_original_sample in the model's dtype (at least float32), as DDIMScheduler returns it; one pass on the
        # inputs rather than a float64 x0 and its cast
        compute = torch.promote_types(dtype, torch.float32)
        x0 = (model_output.to(compute) * x0_out).add_(sample.to(compute), alpha=x0_x).to(dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return DiffSamplersSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _finish(
        self,
        prev_sample: torch.Tensor,
        x0: torch.Tensor,
        next_upper: torch.Tensor,
        dtype: torch.dtype,
        return_dict: bool,
    ) -> DiffSamplersSchedulerOutput | tuple:
        self._upper_sample = next_upper
        self._step_index += 1
        prev_sample, x0 = prev_sample.to(dtype), x0.to(dtype)
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
        """Recover ``z_{i+1}`` exactly from ``(z_i, z_{i-1})``: the BDIA step at ``timestep`` solved backwards.

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
            `BDIAInverseOutput` or `tuple`: ``upper_sample`` (``z_{i+1}``, in ``model_output``'s dtype) and
            ``pred_original_sample``.
        """
        gamma = float(self.config.gamma)
        if eta != 0.0:
            raise ValueError(f"BDIA inversion needs a deterministic step: eta must be 0, got {eta!r}")
        if gamma <= 0.0:
            raise ValueError(f"BDIA inversion divides by gamma: gamma must be > 0, got {gamma!r}")
        if self.timesteps is None:
            raise ValueError("call set_timesteps before inverse_step")
        index = self.index_for_timestep(timestep)
        if index == 0:
            raise ValueError("inverse_step needs the level above `timestep`: it cannot invert the first timestep")
        x0, eps = self._x0_eps(model_output, sample, index, recompute_eps=bool(use_clipped_model_output))
        a_t, s_t = self.alpha_t[index], self.sigma_t[index]
        lower = ddim_step(x0, eps, a_t, s_t, self.alpha_next[index], self.sigma_next[index])  # D_{i->i-1}(z_i)
        back = ddim_step(x0, eps, a_t, s_t, self.alpha_t[index - 1], self.sigma_t[index - 1])  # D_{i->i+1}(z_i)
        # spec §1.4: z_{i+1} = (z_{i-1} - D_{i->i-1}(z_i)) / gamma + D_{i->i+1}(z_i), in float64
        upper = (lower_sample.to(torch.float64) - lower) / gamma + back
        upper, x0 = upper.to(model_output.dtype), x0.to(model_output.dtype)
        if not return_dict:
            return (upper, x0)
        return BDIAInverseOutput(upper_sample=upper, pred_original_sample=x0)


class LinearWorkspace:
    """Two float64 latents, reused across steps (and runs) of one latent shape, in which a BDIA step forms
    ``gamma * upper + sum_j c_j * term_j + c_keep * keep`` without allocating anything per step."""

    def __init__(self) -> None:
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def combine(
        self,
        upper: torch.Tensor | None,
        gamma: float,
        terms: Sequence[tuple[torch.Tensor, float]],
        keep: torch.Tensor,
        c_keep: float,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The combination in float64, cast to ``dtype`` (a fresh tensor), and ``keep`` in float64 (one of the
        buffers: the next step's ``upper``, valid until the step after it). ``upper=None`` drops that term."""
        buffers = self.buffers
        if buffers is None or buffers[0].shape != keep.shape or buffers[0].device != keep.device:
            buffers = tuple(torch.empty(keep.shape, dtype=torch.float64, device=keep.device) for _ in range(2))
        acc, spare = buffers
        if upper is None:
            (first, c_first), terms = terms[0], terms[1:]
            acc.copy_(first).mul_(c_first)
        else:
            if upper is not acc:  # upper not yet held in our buffer (a run's second step, an injected pair)
                acc.copy_(upper)
            acc.mul_(gamma)
        for term, coefficient in terms:  # each converted into the spare buffer: no float64 temporaries
            spare.copy_(term)
            acc.add_(spare, alpha=coefficient)
        spare.copy_(keep)  # added now and kept as the next step's upper
        acc.add_(spare, alpha=c_keep)
        self.buffers = (spare, acc)
        return acc.to(dtype, copy=True), spare  # a copy even for float64: acc is overwritten by the next step


def checked_gamma(gamma: float) -> float:
    """``gamma`` as a float, or a ``ValueError`` unless it is a number in ``[0, 1]`` (BDIA's weight)."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    return float(gamma)


def checked_pair(upper_sample: torch.Tensor, lower_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(upper, lower)`` pair of ``set_inversion_pair``, checked to be two tensors of one shape."""
    if not isinstance(upper_sample, torch.Tensor) or not isinstance(lower_sample, torch.Tensor):
        raise TypeError("set_inversion_pair takes two tensors (the upper and the lower state)")
    if upper_sample.shape != lower_sample.shape:
        raise ValueError(
            f"the pair must have one shape, got {tuple(upper_sample.shape)} and {tuple(lower_sample.shape)}"
        )
    return upper_sample, lower_sample


def same_sample(sample: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether ``sample`` is ``stored`` as the pipeline would hold it (same shape, equal after a cast)."""
    if sample is stored:
        return True
    if sample.shape != stored.shape:
        return False
    return bool(torch.equal(sample, stored.to(sample.device, sample.dtype)))
