# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""SLAMScheduler: few-step sampling with a Sub-Path Linear Approximation Model (SLAM / SPLAM) or any LCM.

Xu et al., "Accelerating Image Generation with Sub-path Linear Approximation Model", ECCV 2024, arXiv 2404.13903;
official training code https://github.com/MCG-NJU/SPLAM (``splam/train_splam_distill_sd_wds.py``). A SLAM student is
an LCM-format consistency model evaluated at sub-path parameter ``slam_gamma = 1``, so sampling is the multi-step
consistency sampler of Latent Consistency Models (Luo et al., arXiv 2310.04378, Algorithm 3), i.e. diffusers'
``LCMScheduler``, which this class subclasses (LCM and SLAM checkpoint configs load into it unchanged).

What it adds:

- ``renoise``: how the next level is reached between consistency jumps. ``"fresh"`` (the official sampler) re-noises
  the denoised estimate with new Gaussian noise and is bit for bit ``LCMScheduler``; ``"deterministic"`` re-uses the
  noise implied by the jump, ``(x_t - alpha_t * denoised) / sigma_t`` (a DDIM step from the consistency estimate, so
  the output is a deterministic function of ``x_T``); ``"tcd"`` goes deterministically to ``s = floor((1 - eta) *
  t_prev)`` and forward-diffuses from ``s`` to ``t_prev`` (Zheng et al., Trajectory Consistency Distillation,
  arXiv 2402.19159, Sec. 4.3 strategic stochastic sampling; ``tcd_eta = 0`` equals ``"deterministic"``).
  Stochasticity lives in the config, never in a ``step`` argument called ``eta``: LCM pipelines pass ``eta=None``
  and SD pipelines ``eta=0.0`` to any scheduler whose ``step`` accepts it.
- ``sigma_data``: the constant LCM hard-codes in its boundary scalings, configurable (default identical).
- The sub-path maths shared with the trainer (:mod:`diffsamplers.train.slam`), written once here: the SL-ODE point
  ``x(gamma) = gamma z + (1 - gamma) a y`` with ``a = alpha_hi / alpha_lo``, its noise level ``sigma_gamma``
  (the official "variance" rule and the commented "linear" alternative), the x0 estimate at that level, and the
  mapping of ``slam_gamma`` to the ``timestep_cond`` scalar ``10 - 10 gamma`` that diffusers pipelines derive from
  ``guidance_scale - 1``: **SLAM checkpoints need ``guidance_scale=1.0``** (pipeline defaults 7.5 / 8.5 would feed
  gamma = 0.35 / 0.25).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_lcm import LCMScheduler, LCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ..schedule import config_family
from .checks import check_config_argument, check_custom_timesteps, check_learned_variance, check_num_inference_steps

RENOISE_MODES = ("fresh", "deterministic", "tcd")
SIGMA_RULES = ("variance", "linear")


class SLAMScheduler(LCMScheduler):
    """Multi-step consistency sampling for SLAM/LCM students, with a choice of re-noising.

    Every ``LCMScheduler`` argument keeps its name and default; the additions are:

    Args:
        sigma_data (`float`, defaults to 0.5): data scale of the boundary scalings
            ``c_skip = sd^2 / ((s t)^2 + sd^2)``, ``c_out = s t / sqrt((s t)^2 + sd^2)`` with
            ``s = timestep_scaling`` (LCM's hard-coded 0.5).
        renoise (`str`, defaults to `"fresh"`): ``"fresh"`` (official, = ``LCMScheduler``), ``"deterministic"`` or
            ``"tcd"``; see the module docstring.
        tcd_eta (`float`, defaults to 0.3): the TCD stochasticity in [0, 1] (TCD's "gamma"; unrelated to SLAM's
            sub-path parameter), used only with ``renoise="tcd"``.
    """

    _compatibles = ["LCMScheduler", "TCDScheduler", "DDIMScheduler", "DDPMScheduler", "PNDMScheduler",
                    "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Any = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        sigma_data: float = 0.5,
        renoise: str = "fresh",
        tcd_eta: float = 0.3,
    ):
        if renoise not in RENOISE_MODES:
            raise ValueError(f"renoise must be one of {RENOISE_MODES}, got {renoise!r}")
        if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be a positive number, got {sigma_data!r}")
        if not (isinstance(tcd_eta, (int, float)) and 0.0 <= tcd_eta <= 1.0):
            raise ValueError(f"tcd_eta must be a number in [0, 1], got {tcd_eta!r}")
        if not (isinstance(timestep_scaling, (int, float)) and math.isfinite(timestep_scaling)
                and timestep_scaling > 0):
            raise ValueError(f"timestep_scaling must be a positive number, got {timestep_scaling!r}")
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")
        if not (isinstance(original_inference_steps, int) and 1 <= original_inference_steps <= num_train_timesteps):
            raise ValueError(
                "original_inference_steps must be an int in [1, num_train_timesteps], "
                f"got {original_inference_steps!r}"
            )
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas,
            original_inference_steps=original_inference_steps,
            clip_sample=clip_sample, clip_sample_range=clip_sample_range, set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, timestep_scaling=timestep_scaling,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """As diffusers' ``from_config``; a path or Hub id raises a ``TypeError`` (use ``from_pretrained``), and
        flow-matching, EDM/VE and learned-variance configs a ``ValueError``: consistency sampling here is the
        discrete VP algorithm of LCM."""
        check_config_argument(config, cls)
        if config is not None:
            source = dict(config)
            check_learned_variance(source, cls)
            family = config_family(source)
            if family != "vp":
                raise ValueError(f"{cls.__name__} needs a discrete VP (DDPM/DDIM/LCM) config, got a {family} config "
                                 f"({source.get('_class_name')})")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # -- boundary scalings ----------------------------------------------------------------------------------------

    @staticmethod
    def scalings(timestep: Any, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[Any, Any]:
        """LCM's ``(c_skip, c_out)`` at ``timestep`` (a number or tensor): ``c_skip(0) = 1``, ``c_out(0) = 0`` (the
        consistency boundary condition ``f(x, 0) = x``) and ``c_skip + c_out^2 = 1`` (LCM, arXiv 2310.04378, Sec. 4.2;
        diffusers ``LCMScheduler.get_scalings_for_boundary_condition_discrete``)."""
        scaled = timestep * timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        return c_skip, c_out

    def get_scalings_for_boundary_condition_discrete(self, timestep: int) -> tuple[Any, Any]:
        # LCM assigns self.sigma_data = 0.5 here on every call; the config value is used instead
        return self.scalings(timestep, self.config.timestep_scaling, self.config.sigma_data)

    # -- the sub-path linear ODE (arXiv 2404.13903, Sec. 3; official training code) -------------------------------

    @staticmethod
    def subpath_point(z: torch.Tensor, y: torch.Tensor, alpha_hi: Any, alpha_lo: Any, slam_gamma: Any) -> torch.Tensor:
        """``x(gamma) = (1 - gamma) a y + gamma z`` with ``a = alpha_hi / alpha_lo``: the straight line from the
        cleaner point ``y`` (rescaled to the signal level of ``z``) at ``gamma = 0`` to ``z`` at ``gamma = 1``."""
        ratio = alpha_hi / alpha_lo
        return (1 - slam_gamma) * ratio * y + slam_gamma * z

    @staticmethod
    def subpath_sigma(alpha_hi: Any, sigma_hi: Any, alpha_lo: Any, sigma_lo: Any, slam_gamma: Any,
                      rule: str = "variance") -> Any:
        """Noise level of ``x(gamma)``: ``"variance"`` (official) ``sqrt(a^2 s_lo^2 + gamma^2 (s_hi^2 - a^2 s_lo^2))``,
        the level if ``z`` were drawn from ``y`` by the forward kernel; ``"linear"`` ``gamma s_hi + (1 - gamma) a
        s_lo``, the level on an exact DDIM path. Both give ``a s_lo`` at ``gamma = 0`` and ``s_hi`` at 1."""
        ratio = alpha_hi / alpha_lo
        if rule == "variance":
            low = (ratio * sigma_lo) ** 2
            return (low + slam_gamma**2 * (sigma_hi**2 - low)) ** 0.5
        if rule == "linear":
            return slam_gamma * sigma_hi + (1 - slam_gamma) * ratio * sigma_lo
        raise ValueError(f"rule must be one of {SIGMA_RULES}, got {rule!r}")

    @staticmethod
    def subpath_x0(eps: torch.Tensor, x_gamma: torch.Tensor, alpha_hi: Any, sigma_gamma: Any) -> torch.Tensor:
        """The x0 estimate of a sub-path point: ``(x(gamma) - sigma_gamma eps) / alpha_hi`` (every point of the line
        carries the signal level ``alpha_hi``)."""
        return (x_gamma - sigma_gamma * eps) / alpha_hi

    @staticmethod
    def gamma_to_cond_scalar(slam_gamma: Any) -> Any:
        """The scalar the official code embeds for ``gamma`` in the ``timestep_cond`` slot: ``10 - 10 gamma``."""
        return 10.0 - 10.0 * slam_gamma

    @staticmethod
    def guidance_scale_for_gamma(slam_gamma: Any) -> Any:
        """The pipeline ``guidance_scale`` that makes diffusers embed ``gamma`` (pipelines embed ``scale - 1``):
        ``11 - 10 gamma``, so 1.0 for the ``gamma = 1`` every SLAM sampler uses."""
        return 11.0 - 10.0 * slam_gamma

    @staticmethod
    def gamma_embedding(slam_gamma: Any, embedding_dim: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``timestep_cond`` for ``gamma``: the sinusoidal embedding of ``1000 * (10 - 10 gamma)``, the same function
        as diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` of ``guidance_scale - 1``
        (VDM, arXiv 2107.00630, App. B sinusoids; sin half first)."""
        if not isinstance(embedding_dim, int) or embedding_dim < 2 or embedding_dim % 2:
            raise ValueError(f"embedding_dim must be an even int >= 2, got {embedding_dim!r}")
        w = torch.as_tensor(SLAMScheduler.gamma_to_cond_scalar(torch.as_tensor(slam_gamma)), dtype=torch.float32)
        w = w.reshape(-1) * 1000.0
        half = embedding_dim // 2
        freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
        emb = w.to(dtype)[:, None] * freqs[None, :]
        return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """LCM's grid (``original_inference_steps`` k-spaced origin points, then ``floor(linspace)`` picks), with
        bad counts and bad custom timesteps refused by name before diffusers sees them."""
        if timesteps is None:
            check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        else:
            check_custom_timesteps(timesteps, self.config.num_train_timesteps)
        if original_inference_steps is not None:
            check_num_inference_steps(original_inference_steps, self.config.num_train_timesteps)
        super().set_timesteps(num_inference_steps, device=device, original_inference_steps=original_inference_steps,
                              timesteps=timesteps, strength=strength)

    def _check_step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> None:
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has shape "
                             f"{tuple(sample.shape)}")
        if self.step_index is None and self.begin_index is None:
            t = torch.as_tensor(timestep).to(self.timesteps.device)
            if not bool((self.timesteps == t).any()):
                raise ValueError(f"timestep {float(t)} is not in this scheduler's timesteps "
                                 f"{self.timesteps.tolist()}: start at timesteps[0]")

    # -- sampling -------------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> LCMSchedulerOutput | tuple:
        """One consistency jump from ``timestep`` and the move to the next scheduled level.

        Same signature and outputs as ``LCMScheduler.step``: ``prev_sample`` (the input of the next step; on the last
        step the denoised estimate itself, so one step adds no noise) and ``denoised`` (what LCM pipelines decode).
        """
        self._check_step(model_output, timestep, sample)
        if self.config.renoise == "fresh":
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        # the LCM jump itself, with re-noising switched to the last-step branch of the parent (prev = denoised)
        last = self.step_index == self.num_inference_steps - 1
        index = self._step_index
        self._step_index = self.num_inference_steps - 1
        try:
            _, denoised = super().step(model_output, timestep, sample, return_dict=False)
        finally:
            self._step_index = index
        if last:
            prev_sample = denoised
        else:
            prev_t = int(self.timesteps[self.step_index + 1])
            ac_t = self.alphas_cumprod[int(timestep)].to(sample.device, sample.dtype)
            ac_prev = self.alphas_cumprod[prev_t].to(sample.device, sample.dtype)
            # the noise the jump implies: x_t = alpha_t denoised + sigma_t eps
            eps = (sample - ac_t.sqrt() * denoised) / (1 - ac_t).sqrt()
            if self.config.renoise == "deterministic":
                s = prev_t
            else:
                s = int(math.floor((1 - self.config.tcd_eta) * prev_t))
            ac_s = self.alphas_cumprod[s].to(sample.device, sample.dtype)
            prev_sample = ac_s.sqrt() * denoised + (1 - ac_s).sqrt() * eps
            if s != prev_t:
                # forward diffusion from level s to prev_t (TCD, arXiv 2402.19159, Sec. 4.3)
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
                ratio = ac_prev / ac_s
                prev_sample = ratio.sqrt() * prev_sample + (1 - ratio).sqrt() * noise
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
