# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""What every diffsamplers scheduler shares: the diffusers contract on top of :mod:`diffsamplers.schedule`.

A subclass declares its own ``__init__`` with ``@register_to_config`` (taking the diffusers argument names listed in
:data:`COMMON_CONFIG_DOC`), calls :meth:`DiffSamplersScheduler._validate_common_config` and implements ``step``.
Everything else (timestep grids identical to diffusers', step-index bookkeeping, ``add_noise``/``scale_noise``,
``from_config`` from flow-matching configs) lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ..schedule import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    config_family,
    flow_timesteps,
    karras_sigmas,
    make_betas,
    to_x0_eps,
)
from .checks import (
    check_config_argument,
    check_learned_variance,
    check_model_output,
    check_schedule_arguments,
)

COMMON_CONFIG_DOC = """
        num_train_timesteps (`int`, defaults to 1000): number of training timesteps.
        beta_start (`float`, defaults to 0.0001): first beta of a VP schedule.
        beta_end (`float`, defaults to 0.02): last beta of a VP schedule.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`.
        trained_betas (`np.ndarray` or `list[float]`, *optional*): explicit betas.
        prediction_type (`str`, defaults to `"epsilon"`): what the model predicts: `"epsilon"`, `"sample"`,
            `"v_prediction"` or `"flow_prediction"` (a velocity; selects the rectified-flow schedule). Set
            automatically when loading a `FlowMatch*` config.
        timestep_spacing (`str`, defaults to `"leading"`): `"leading"`, `"trailing"` or `"linspace"`, as in DDIM.
        steps_offset (`int`, defaults to 0): offset added to `"leading"` timesteps.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale betas to zero terminal SNR.
        set_alpha_to_one (`bool`, defaults to `True`): whether the level after the last timestep is clean data
            (otherwise `alphas_cumprod[0]`), as in DDIM.
        clip_sample (`bool`, defaults to `False`): clip the predicted x0 to `[-clip_sample_range, clip_sample_range]`
            (pixel-space models only).
        clip_sample_range (`float`, defaults to 1.0): the clipping range.
        use_karras_sigmas (`bool`, defaults to `False`): VP only: place the steps on a Karras sigma grid.
        shift (`float`, defaults to 1.0): flow only: static timestep shift (SD3 uses 3.0).
        use_dynamic_shifting (`bool`, defaults to `False`): flow only: resolution-dependent shift with `mu`.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: flow only: read by SD3/Flux pipelines to
            compute `mu`.
        shift_terminal (`float`, *optional*): flow only: stretch the shifted schedule to end at this sigma.
        time_shift_type (`str`, defaults to `"exponential"`): flow only: `"exponential"` or `"linear"`.
"""


# diffusers options no diffsamplers scheduler implements yet, and whose silent omission would change the image
# (a subclass that implements one takes it as an ``__init__`` argument, which lifts the refusal)
_REFUSED_CONFIG_FLAGS = ("thresholding", "invert_sigmas")


@dataclass
class DiffSamplersSchedulerOutput(BaseOutput):
    """Output of a diffsamplers scheduler's ``step``.

    Args:
        prev_sample (`torch.Tensor`): the sample at the next (less noisy) level; the next model input.
        pred_original_sample (`torch.Tensor`, *optional*): the x0 prediction of this step.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class DiffSamplersScheduler(SchedulerMixin, ConfigMixin):
    """Base of the diffsamplers schedulers: grids, indices and noising, shared by every method."""

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    init_noise_sigma = 1.0

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """As diffusers' ``from_config``; a ``FlowMatch*`` config (which has no ``prediction_type``) selects
        ``prediction_type="flow_prediction"`` (a DPMSolver/UniPC ``use_flow_sigmas`` config also carries its
        ``flow_shift`` over as ``shift``); an EDM config, and options the class cannot honour (``thresholding``,
        ``invert_sigmas``) and learned-variance DDPM configs are refused with a ``ValueError``; a string (a path
        or Hub id: use ``from_pretrained``) with a ``TypeError``."""
        check_config_argument(config, cls)
        if config is not None:
            source = dict(config)
            check_learned_variance(source, cls)
            if "prediction_type" not in kwargs and config_family(source) == "flow":
                kwargs["prediction_type"] = "flow_prediction"
            # DPMSolver/UniPC flow configs name the shift `flow_shift`; without this it would silently be 1.0
            if source.get("use_flow_sigmas") and "flow_shift" in source and "shift" not in kwargs:
                kwargs["shift"] = source["flow_shift"]
            for flag in _REFUSED_CONFIG_FLAGS:
                if source.get(flag) and flag not in cls._get_init_keys(cls):
                    raise ValueError(
                        f"{cls.__name__} does not support `{flag}=True` (from {source.get('_class_name')}): "
                        "it would silently change the image; set it to False in the config"
                    )
            if config_family(source) == "ve" and not getattr(cls, "_supports_ve", False):
                raise ValueError(
                    f"{cls.__name__} does not support EDM/VE configs ({source.get('_class_name')}); "
                    "use a VP (DDIM/DPMSolver/Euler) or FlowMatch config"
                )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _validate_common_config(self) -> None:
        c = self.config
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {c.prediction_type!r}")
        if c.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {c.timestep_spacing!r}")
        if c.trained_betas is None and c.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {c.beta_schedule!r}")
        if int(c.num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {c.num_train_timesteps}")
        self.noise_schedule = NoiseSchedule.from_config(dict(c))
        # diffusers' VP schedulers expose these float32 tables (some pipelines and callbacks read them); None for flow
        if self.noise_schedule.family == "vp":
            self.betas = make_betas(dict(c)).float()
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = self.noise_schedule.alphas_cumprod.float()
            self.final_alpha_cumprod = torch.tensor(self.noise_schedule.final_alpha_cumprod)
        else:
            self.betas = self.alphas = self.alphas_cumprod = None
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def is_flow(self) -> bool:
        return self.noise_schedule.family == "flow"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- timesteps ----------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Set the grid of model evaluations and reset all per-run state.

        Args:
            num_inference_steps (`int`, *optional*): number of steps (model calls for one-call-per-step methods).
            device (`str` or `torch.device`, *optional*): where ``self.timesteps`` lives.
            timesteps (`list`, *optional*): custom decreasing diffusers timesteps.
            sigmas (`list[float]`, *optional*): custom decreasing sigmas: flow sigmas for flow configs (shifted as
                FlowMatchEuler shifts them), else ``sigma/alpha`` noise levels.
            mu (`float`, *optional*): flow only: dynamic-shifting parameter (Flux/SD3 pipelines pass it).
        """
        if timesteps is not None and sigmas is not None and not self.is_flow:
            raise ValueError("give only one of timesteps and sigmas")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("give num_inference_steps, timesteps or sigmas")
        # flow grids live on continuous time: any number of steps is distinct there
        train_steps = None if self.is_flow else self.config.num_train_timesteps
        num_inference_steps, checked = check_schedule_arguments(num_inference_steps, timesteps, sigmas, train_steps)
        timesteps = None if checked is None else checked.tolist()
        schedule = self.noise_schedule
        if self.is_flow:
            if self.config.use_dynamic_shifting and mu is None:
                raise ValueError("mu must be passed when use_dynamic_shifting is True")
            ts, flow_sigmas = flow_timesteps(self.config, num_inference_steps, sigmas, mu, timesteps)
            ts = ts.float()
            levels = flow_sigmas.double()
            alpha, sigma = 1 - levels, levels
            alpha_t, sigma_t, alpha_n, sigma_n = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
        else:
            if timesteps is not None or sigmas is not None:
                if timesteps is not None:
                    ts = torch.as_tensor(np.asarray(timesteps))
                else:
                    ts = schedule.timestep_from_ve_sigma(torch.as_tensor(np.asarray(sigmas, dtype=np.float64)))
                    if len(ts) > 1 and not bool((ts[1:] < ts[:-1]).all()):
                        raise ValueError("sigmas must map to strictly decreasing timesteps (distinct noise levels)")
                prev = torch.cat([ts[1:].double(), torch.tensor([-1.0], dtype=torch.float64)])
            elif self.config.use_karras_sigmas:
                ve = schedule.ve_sigma(torch.arange(self.config.num_train_timesteps))
                ks = karras_sigmas(float(ve[0]), float(ve[-1]), num_inference_steps)
                ts = schedule.timestep_from_ve_sigma(ks).float()
                prev = torch.cat([ts[1:].double(), torch.tensor([-1.0], dtype=torch.float64)])
            else:
                ts, prev = schedule.ddim_timesteps(num_inference_steps)
            alpha_t, sigma_t = schedule.alpha_sigma(ts)
            alpha_n, sigma_n = schedule.alpha_sigma(prev)
        self.num_inference_steps = len(ts)
        self.timesteps = ts.to(device)
        # float64 level tables on the CPU (no host-device sync inside step)
        self.alpha_t, self.sigma_t, self.alpha_next, self.sigma_next = alpha_t, sigma_t, alpha_n, sigma_n
        # diffusers' conventions: FlowMatch's sigmas in [0, 1] for flow, else the noise level sigma / alpha
        self.sigmas = (
            torch.cat([sigma_t, sigma_n[-1:]]).float()
            if self.is_flow
            else torch.cat([sigma_t / alpha_t, (sigma_n / alpha_n)[-1:]]).float()
        )
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def _reset_state(self) -> None:
        """Clear method-specific per-run state (called by ``set_timesteps``)."""

    # -- indices (diffusers' conventions) -----------------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``begin_index`` (pipelines call this before their loop)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: Any, schedule_timesteps: torch.Tensor | None = None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == torch.as_tensor(timestep).to(schedule_timesteps.device)).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps")
        return int(indices[1 if len(indices) > 1 else 0])

    def _begin_step(self, timestep: Any, model_output: torch.Tensor, sample: torch.Tensor) -> int:
        """The index of this call (initialised on the first call of a run), after checking the step's tensors."""
        check_model_output(model_output, sample)
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(
                timestep
            )
        if self._step_index >= len(self.timesteps):
            raise ValueError("step called more times than there are timesteps; call set_timesteps again")
        return self._step_index

    # -- model output -> (x0, eps) ------------------------------------------------------------------------------

    def _x0_eps(
        self, model_output: torch.Tensor, sample: torch.Tensor, index: int, recompute_eps: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The float64 data and noise predictions at step ``index`` (x0 clipped if ``clip_sample``).

        With clipping, ``recompute_eps=True`` re-derives eps from the clipped x0 (so ``alpha x0 + sigma eps`` is
        still the sample); ``False`` keeps the model's eps, which is what ``DDIMScheduler`` does unless its
        ``use_clipped_model_output`` is set.
        """
        a, s = self.alpha_t[index], self.sigma_t[index]
        x = sample.double()  # converted once: the clipped branch needs it again
        x0, eps = to_x0_eps(model_output.double(), x, a, s, self.config.prediction_type)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
            if recompute_eps:
                eps = (x - a * x0) / s
        return x0, eps

    # -- noising ------------------------------------------------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """``alpha_t * x0 + sigma_t * noise`` at diffusers timesteps (one per sample or a scalar)."""
        alpha, sigma = self.noise_schedule.alpha_sigma(torch.as_tensor(timesteps).cpu())
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = alpha.to(original_samples.device, original_samples.dtype).reshape(shape)
        sigma = sigma.to(original_samples.device, original_samples.dtype).reshape(shape)
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor) -> torch.Tensor:
        """Flow pipelines' img2img noising (SD3/Flux): the same forward marginal."""
        return self.add_noise(sample, noise, timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """VP and flow inputs go to the model unscaled."""
        return sample
