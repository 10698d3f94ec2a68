# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Shared diffusion maths: one continuous-time view of every diffusers noise schedule.

Every method in this package is written against the marginal ``x_t = alpha_t * x0 + sigma_t * eps`` with
``lambda_t = log(alpha_t / sigma_t)``. This module turns any diffusers scheduler config into that view
(:class:`NoiseSchedule`), converts between the model parameterisations (epsilon, sample, v, flow velocity) and
provides the first-order DDIM / exponential-integrator step that the methods share.

Three families are recognised:

* ``"vp"``: discrete variance-preserving schedules (DDPM, DDIM, DPMSolver, UniPC, Euler configs with ``betas``).
  ``alpha = sqrt(alphas_cumprod[t])``; float timesteps interpolate ``log(sigma / alpha)`` linearly between the
  integer training timesteps, the same rule diffusers' ``_sigma_to_t`` inverts.
* ``"flow"``: rectified flow (FlowMatchEuler configs, SD3 / Flux): ``sigma = t / num_train_timesteps``,
  ``alpha = 1 - sigma``.
* ``"ve"``: EDM / Karras sigmas (``EDMEulerScheduler`` configs): ``alpha = 1``; the timestep given to the model is
  EDM's ``c_noise = log(sigma) / 4``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
import torch

# diffusers' own builders, so our alphas_cumprod are bit-identical to the schedulers'
from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar, rescale_zero_terminal_snr

PredictionType = Literal["epsilon", "sample", "v_prediction", "flow_prediction"]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# ----------------------------------------------------------------------------------------------------------------
# Discrete VP schedules (the same betas diffusers builds)
# ----------------------------------------------------------------------------------------------------------------


def make_betas(config: Mapping[str, Any]) -> torch.Tensor:
    """The float32 betas diffusers builds from a VP scheduler config."""
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    trained_betas = config.get("trained_betas")
    beta_schedule = config.get("beta_schedule", "linear")
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)  # cosine (Nichol & Dhariwal 2021)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def config_family(config: Mapping[str, Any]) -> Literal["vp", "flow", "ve"]:
    """Which family of noise schedule a diffusers scheduler config describes."""
    class_name = str(config.get("_class_name", ""))
    if (
        class_name.startswith("FlowMatch")
        or config.get("use_flow_sigmas")
        or config.get("prediction_type") == "flow_prediction"
        or ("shift" in config and "beta_start" not in config)
    ):
        return "flow"
    if class_name.startswith("EDM") or ("sigma_max" in config and "beta_start" not in config):
        return "ve"
    return "vp"


def is_edm_config(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config is EDM's (Karras et al. 2022 preconditioning and ``c_noise = log(sigma) / 4``):
    ``EDM*`` schedulers and ``BDIAEDMScheduler`` by ``_class_name`` (which loaded configs carry), or an unnamed
    config with EDM's keys (``sigma_data`` and ``sigma_schedule``). Other VE-style configs (consistency models,
    score-SDE VE, Stable Audio's cosine DPM-Solver) label their timesteps differently."""
    class_name = str(config.get("_class_name", ""))
    if class_name:
        return class_name.startswith("EDM") or class_name == "BDIAEDMScheduler"
    return config_family(config) == "ve" and "sigma_data" in config and "sigma_schedule" in config


def _as_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "config") and not isinstance(config, Mapping):  # a scheduler instance
        config = {"_class_name": type(config).__name__, **config.config}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a diffusers scheduler config (a mapping), got {type(config).__name__}")
    return dict(config)


# ----------------------------------------------------------------------------------------------------------------
# The continuous-time view
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class NoiseSchedule:
    """``alpha_t``, ``sigma_t`` and ``lambda_t`` for the timesteps of one diffusers noise schedule.

    Build it with :meth:`from_config` from any diffusers scheduler config (or a scheduler instance). All values are
    float64 CPU tensors; timesteps below zero (or ``None`` passed as ``t_end`` elsewhere) denote the clean end.

    Args:
        family (`str`): ``"vp"``, ``"flow"`` or ``"ve"``.
        num_train_timesteps (`int`): length of the training schedule.
        alphas_cumprod (`torch.Tensor`, *optional*): the VP family's cumulative alphas (float64).
        final_alpha_cumprod (`float`): the VP level DDIM steps to after its last timestep (1.0 when
            ``set_alpha_to_one``, else ``alphas_cumprod[0]``).
        config (`dict`): the config it was built from.
    """

    family: Literal["vp", "flow", "ve"]
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None = None
    final_alpha_cumprod: float = 1.0
    config: dict | None = None

    @classmethod
    def from_config(cls, config: Any) -> "NoiseSchedule":
        config = _as_dict(config)
        family = config_family(config)
        num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        if family != "vp":
            return cls(family, num_train_timesteps, config=config)
        alphas_cumprod = torch.cumprod(1.0 - make_betas(config), dim=0).double()  # float32 maths like diffusers
        final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
        return cls(family, num_train_timesteps, alphas_cumprod, final, config)

    # -- VP helpers ---------------------------------------------------------------------------------------------

    @property
    def log_sigmas(self) -> torch.Tensor:
        """``log(sigma_t / alpha_t)`` at the integer training timesteps (VP only)."""
        ac = self.alphas_cumprod
        return 0.5 * (torch.log1p(-ac) - torch.log(ac))

    # -- forward map --------------------------------------------------------------------------------------------

    def alpha_sigma(self, timestep: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` as float64 tensors of the timestep's shape (negative timesteps: the clean end)."""
        t = torch.as_tensor(timestep, dtype=torch.float64).cpu()
        if self.family == "flow":
            sigma = (t / self.num_train_timesteps).clamp(min=0.0)
            return 1.0 - sigma, sigma
        if self.family == "ve":
            sigma = torch.where(t < -1e8, torch.zeros_like(t), torch.exp(4.0 * t))
            return torch.ones_like(sigma), sigma
        log_sigmas = self.log_sigmas
        n = self.num_train_timesteps
        tc = t.clamp(0, n - 1)
        low = tc.floor().long().clamp(max=n - 2)
        w = tc - low
        log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]
        alpha = torch.rsqrt(1 + torch.exp(2 * log_sigma))
        # a zero-terminal-SNR schedule has log_sigma = inf at its last timestep
        sigma = torch.where(torch.isinf(log_sigma), torch.ones_like(alpha), alpha * torch.exp(log_sigma))
        # integer timesteps use diffusers' own table exactly
        exact = tc == tc.round()
        ac = self.alphas_cumprod[tc.round().long()]
        alpha = torch.where(exact, ac.sqrt(), alpha)
        sigma = torch.where(exact, (1 - ac).sqrt(), sigma)
        final = torch.tensor(self.final_alpha_cumprod, dtype=torch.float64)
        clean = t < 0
        alpha = torch.where(clean, final.sqrt(), alpha)
        sigma = torch.where(clean, (1 - final).sqrt(), sigma)
        return alpha, sigma

    def lambda_(self, timestep: Any) -> torch.Tensor:
        """Half log-SNR ``lambda_t = log(alpha_t / sigma_t)``."""
        alpha, sigma = self.alpha_sigma(timestep)
        return torch.log(alpha) - torch.log(sigma)

    def ve_sigma(self, timestep: Any) -> torch.Tensor:
        """``sigma_t / alpha_t``: the noise level of ``x_t / alpha_t`` (what diffusers stores in ``sigmas``)."""
        alpha, sigma = self.alpha_sigma(timestep)
        return sigma / alpha

    # -- inverse map --------------------------------------------------------------------------------------------

    def timestep_from_ve_sigma(self, ve_sigma: Any) -> torch.Tensor:
        """The (float) diffusers timestep whose ``sigma_t / alpha_t`` equals ``ve_sigma``."""
        s = torch.as_tensor(ve_sigma, dtype=torch.float64).cpu()
        if self.family == "flow":
            return self.num_train_timesteps * s / (1 + s)
        if self.family == "ve":
            return torch.log(s) / 4.0
        log_sigmas = self.log_sigmas
        log_s = torch.log(s.clamp(min=1e-300))
        # log_sigmas increases with t: locate the bracketing interval
        idx = torch.searchsorted(log_sigmas, log_s.reshape(-1)).reshape(log_s.shape)
        low = (idx - 1).clamp(0, self.num_train_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
        return low.double() + w

    def timestep_from_lambda(self, lam: Any) -> torch.Tensor:
        """The diffusers timestep with half log-SNR ``lam``."""
        return self.timestep_from_ve_sigma(torch.exp(-torch.as_tensor(lam, dtype=torch.float64)))

    # -- grids --------------------------------------------------------------------------------------------------

    def ddim_timesteps(self, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps, prev_timesteps)`` exactly as ``DDIMScheduler`` walks them (VP family).

        ``prev_timesteps[i] = timesteps[i] - T // N`` (negative = the final level), which is DDIM's rule; with
        ``"linspace"`` spacing it is not the next grid entry, a quirk of DDIM we keep so reductions hold exactly.
        """
        cfg = self.config or {}
        n, T = int(num_inference_steps), self.num_train_timesteps
        spacing = cfg.get("timestep_spacing", "leading")
        offset = int(cfg.get("steps_offset", 0))
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
        ts = torch.from_numpy(ts.copy())
        return ts, ts - T // n


def flow_timesteps(
    config: Mapping[str, Any],
    num_inference_steps: int | None = None,
    sigmas: Any = None,
    mu: float | None = None,
    timesteps: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)`` of a flow-matching config, exactly as ``FlowMatchEulerDiscreteScheduler`` makes them
    (shift, dynamic shifting with ``mu``, terminal stretch, Karras/exponential/beta options); ``sigmas`` ends in 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    keys = FlowMatchEulerDiscreteScheduler._get_init_keys(FlowMatchEulerDiscreteScheduler)
    reference = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if k in keys})
    reference.set_timesteps(
        num_inference_steps=num_inference_steps,
        sigmas=None if sigmas is None else list(np.asarray(sigmas, dtype=np.float64)),
        mu=mu,
        timesteps=None if timesteps is None else list(np.asarray(timesteps, dtype=np.float64)),
    )
    return reference.timesteps, reference.sigmas


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. (5): ``num_inference_steps`` sigmas from ``sigma_max`` down to ``sigma_min``."""
    ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


# ----------------------------------------------------------------------------------------------------------------
# Prediction conversions
# ----------------------------------------------------------------------------------------------------------------


def _check_prediction_type(prediction_type: str, name: str = "prediction_type") -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{name} must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _bcast(value: Any, like: torch.Tensor) -> Any:
    """A coefficient ready to multiply ``like``: scalars stay on the host as Python floats (a CPU scalar copied to
    the GPU would cost a host-device sync every step); per-sample vectors are moved and reshaped to broadcast."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.device.type == "cpu":
        return float(value)
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


def to_x0_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha: Any, sigma: Any, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` implied by a model output of ``prediction_type`` at ``x_t = alpha x0 + sigma eps``.

    Works in the dtype of ``model_output``; pass float64 tensors for float64 maths. ``alpha``/``sigma`` may be
    scalars or per-sample vectors.
    """
    _check_prediction_type(prediction_type)
    a, s = _bcast(alpha, model_output), _bcast(sigma, model_output)
    x, out = sample.to(model_output.dtype), model_output
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "sample":
        return out, (x - a * out) / s
    if prediction_type == "v_prediction":  # v = a eps - s x0
        norm = a * a + s * s
        return (a * x - s * out) / norm, (s * x + a * out) / norm
    # flow velocity u = eps - x0
    return (x - s * out) / (a + s), (x + a * out) / (a + s)


def prediction_coefficients(
    prediction_type: str, alpha: float, sigma: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The linear map of :func:`to_x0_eps` at one scalar level, as host floats.

    Returns ``((x0_k_out, x0_k_x), (eps_k_out, eps_k_x))`` with ``x0 = x0_k_out * model_output + x0_k_x * x_t`` and
    ``eps = eps_k_out * model_output + eps_k_x * x_t``. A step that is linear in ``(x0, eps)`` can then fold its own
    level coefficients into two numbers and touch each input tensor once, instead of materialising ``x0`` and
    ``eps``. ``alpha`` and ``sigma`` are scalars (Python floats or 0-d CPU tensors), evaluated in float64.
    """
    _check_prediction_type(prediction_type)
    a, s = float(alpha), float(sigma)
    if prediction_type == "epsilon":
        return (-s / a, 1.0 / a), (1.0, 0.0)
    if prediction_type == "sample":
        return (1.0, 0.0), (-a / s, 1.0 / s)
    if prediction_type == "v_prediction":  # v = a eps - s x0
        norm = a * a + s * s
        return (-s / norm, a / norm), (a / norm, s / norm)
    # flow velocity u = eps - x0
    return (-s / (a + s), 1.0 / (a + s)), (a / (a + s), 1.0 / (a + s))


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: Any, sigma: Any, prediction_type: str) -> torch.Tensor:
    """The model output of ``prediction_type`` that corresponds to ``(x0, eps)``."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return _bcast(alpha, eps) * eps - _bcast(sigma, eps) * x0
    return eps - x0


def convert_model_output(
    model_output: torch.Tensor, sample: torch.Tensor, alpha: Any, sigma: Any, from_type: str, to_type: str
) -> torch.Tensor:
    """Convert a model output between ``epsilon``, ``sample``, ``v_prediction`` and ``flow_prediction``."""
    _check_prediction_type(to_type, "to_type")
    if from_type == to_type:
        _check_prediction_type(from_type, "from_type")
        return model_output
    x0, eps = to_x0_eps(model_output, sample, alpha, sigma, from_type)
    return from_x0_eps(x0, eps, alpha, sigma, to_type)


# ----------------------------------------------------------------------------------------------------------------
# The shared first-order step
# ----------------------------------------------------------------------------------------------------------------


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: Any,
    sigma_t: Any,
    alpha_next: Any,
    sigma_next: Any,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) written in ``(alpha, sigma)``: the first-order exponential integrator.

    ``x_next = alpha_next * x0 + sqrt(sigma_next^2 - std^2) * eps + std * noise`` with
    ``std = eta * sigma_next * sqrt(1 - exp(2 (lambda_t - lambda_next)))``. For ``eta = 0`` this is deterministic
    DDIM in any frame: in the flow frame it is exactly the Euler step ``x + (sigma_next - sigma_t) * v``.
    """
    a_n, s_n = _bcast(alpha_next, x0), _bcast(sigma_next, x0)
    if eta == 0.0:
        return a_n * x0 + s_n * eps
    if noise is None:
        raise ValueError("noise must be given when eta > 0")
    a_t, s_t = _bcast(alpha_t, x0), _bcast(sigma_t, x0)
    # 1 - SNR_t / SNR_next, the DDPM posterior's variance fraction
    std = eta * s_n * _sqrt_nonneg(1 - (a_t * s_n) ** 2 / (a_n * s_t) ** 2)
    return a_n * x0 + _sqrt_nonneg(s_n**2 - std**2) * eps + std * noise.to(x0.dtype)


def ot_velocity(
    model_output: torch.Tensor, sample: torch.Tensor, alpha: Any, sigma: Any, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, u)``: the state in conditional-OT coordinates, ``y = x / (alpha + sigma)``, and its velocity
    ``dy / dtau = x0_hat - eps_hat`` in OT time ``tau = alpha / (alpha + sigma)``.

    Every Gaussian path is a scale-time change of the OT path (Shaul et al., arXiv 2310.19075, Thm 2.3); there
    ``y = tau x0 + (1 - tau) eps``, the velocity is bounded at both ends for every model type, and one Euler step
    is one DDIM step. Learned solvers (Bespoke, BNS) work in these coordinates.
    """
    x0, eps = to_x0_eps(model_output, sample, alpha, sigma, prediction_type)
    return sample / (_bcast(alpha, sample) + _bcast(sigma, sample)), x0 - eps


def native_from_ot(schedule: "NoiseSchedule", tau: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(timestep, alpha, sigma)`` (float64) of OT times ``tau`` on ``schedule``: the inverse of
    ``tau = alpha / (alpha + sigma)``. Flow: ``sigma = 1 - tau``; VP: the (float) timestep of the same log-SNR, with
    ``alpha^2 + sigma^2 = 1``; ``tau = 1`` is the clean end (timestep -1), ``tau = 0`` pure noise."""
    tau = torch.as_tensor(tau, dtype=torch.float64).cpu()
    if schedule.family == "flow":
        sigma = 1.0 - tau
        return sigma * schedule.num_train_timesteps, tau, sigma
    if schedule.family != "vp":
        raise ValueError(f"OT times are defined here for VP and flow schedules, not {schedule.family!r}")
    ts = schedule.timestep_from_lambda(torch.log(tau) - torch.log1p(-tau.clamp(max=1 - 1e-300)))
    ts = torch.where((ts - ts.round()).abs() < 1e-6, ts.round(), ts)
    ts = torch.where(tau >= 1, torch.full_like(ts, -1.0), ts)
    # tau = 0 is pure noise (zero-terminal-SNR schedules reach it at their last training timestep)
    ts = torch.where(tau <= 0, torch.full_like(ts, schedule.num_train_timesteps - 1.0), ts)
    scale = torch.rsqrt(tau**2 + (1 - tau) ** 2)  # alpha + sigma with alpha^2 + sigma^2 = 1
    return ts, tau * scale, (1 - tau) * scale


def edm_preconditioning(sigma: Any, sigma_data: float, prediction_type: str = "epsilon") -> tuple[Any, Any, Any]:
    """EDM's ``(c_in, c_skip, c_out)`` at noise level ``sigma`` (Karras et al. 2022, Table 1), as diffusers' EDM
    schedulers use them: the network sees ``c_in x`` and ``D(x; sigma) = c_skip x + c_out F``; ``"v_prediction"``
    negates ``c_out``. ``sigma`` may be a float or a tensor."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction' for EDM, got {prediction_type!r}")
    total = sigma**2 + sigma_data**2
    root = total**0.5
    c_out = sigma * sigma_data / root
    return 1.0 / root, sigma_data**2 / total, -c_out if prediction_type == "v_prediction" else c_out


def _sqrt_nonneg(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clamp(min=0).sqrt()
    return math.sqrt(max(value, 0.0))


# ----------------------------------------------------------------------------------------------------------------
# Gaussian data: the closed-form probability flow and the frames of diffusers latents
# ----------------------------------------------------------------------------------------------------------------

FRAMES = ("vp", "ve", "flow")
Level = tuple[Any, Any]


def _as_level(level: Any, name: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma)`` as float64 tensors of shape (1, 1) or (B, 1), validated."""
    if not isinstance(level, (tuple, list)) or len(level) != 2:
        raise TypeError(f"{name} must be an (alpha, sigma) pair, got {type(level).__name__}")
    out = []
    for value in level:
        # as_tensor(dtype=...) so that Python floats are never rounded through the float32 default dtype
        v = torch.as_tensor(value, dtype=dtype).detach().to(device=device).reshape(-1, 1)
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise ValueError(f"{name} must hold finite, non-negative (alpha, sigma), got {level!r}")
        out.append(v)
    return out[0], out[1]


def gaussian_flow_map(
    x: torch.Tensor,
    mean: torch.Tensor,
    eigvecs: torch.Tensor,
    eigvals: torch.Tensor,
    from_level: Level,
    to_level: Level,
    residual_variance: float = 0.0,
) -> torch.Tensor:
    """The exact probability-flow map of Gaussian data between two noise levels, on flat vectors.

    This is the shared core of :func:`teleport` and of the single-Gaussian reference solution
    (``diffsamplers.models.exact_solution(..., method="closed_form")`` can call it with ``residual_variance=0``).
    It runs in the dtype of ``x`` (pass float64 for reference use).

    Args:
        x (`torch.Tensor` of shape `(B, D)`): states at ``from_level``.
        mean (`torch.Tensor` of shape `(D,)`): data mean ``mu``.
        eigvecs (`torch.Tensor` of shape `(D, r)`): orthonormal eigenvectors ``U`` (``r <= D``).
        eigvals (`torch.Tensor` of shape `(r,)`): their variances ``lam`` (clipped at 0 here).
        from_level (`tuple`): ``(alpha_T, sigma_T)`` of ``x``; scalars or per-sample ``(B,)`` tensors.
        to_level (`tuple`): ``(alpha_t, sigma_t)`` to map to.
        residual_variance (`float`, defaults to 0.0): the isotropic variance ``lam_perp`` of the directions
            orthogonal to ``U``.

    Returns:
        `torch.Tensor` of shape `(B, D)`: the states at ``to_level``.
    """
    a0, s0 = _as_level(from_level, "from_level", x.dtype, x.device)
    a1, s1 = _as_level(to_level, "to_level", x.dtype, x.device)
    mean, eigvecs = mean.to(x), eigvecs.to(x)
    lam = eigvals.to(x).clamp(min=0)  # eigh of a rank-deficient covariance returns tiny negative values
    lam_perp = max(float(residual_variance), 0.0)
    # the map is only defined from a noisy level: at s_T = 0 a zero-variance direction has psi = 0 / 0
    if bool((s0 <= 0).any()):
        raise ValueError(f"from_level must be a noisy level (sigma > 0), got sigma = {s0.flatten().tolist()}")
    resid = x - a0 * mean  # x_T - a_T mu
    coeff = resid @ eigvecs  # u_k^T (x_T - a_T mu), (B, r)
    # Wang & Vastola (arXiv 2412.09726), the Gaussian solution per eigendirection:
    # psi_k(t) = sqrt((a_t^2 lam_k + s_t^2) / (a_T^2 lam_k + s_T^2))
    psi = torch.sqrt((a1**2 * lam + s1**2) / (a0**2 * lam + s0**2))
    out = a1 * mean + (coeff * psi) @ eigvecs.T
    if eigvecs.shape[1] < eigvecs.shape[0]:
        # complement of span(U): one isotropic residual variance for the discarded eigendirections (a low-rank
        # fit); lam_perp = 0 gives s_t / s_T
        psi_perp = torch.sqrt((a1**2 * lam_perp + s1**2) / (a0**2 * lam_perp + s0**2))
        out = out + psi_perp * (resid - coeff @ eigvecs.T)
    return out


def frame_level(frame: str, sigma: Any) -> tuple[Any, Any]:
    """``(alpha, sigma)`` of a noise level written in a scheduler frame (the coordinates its ``latents`` carry).

    Args:
        frame (`str`): ``"vp"`` (DDIM/DPM/UniPC latents; ``sigma`` is the VE sigma ``sqrt((1 - abar) / abar)`` that
            diffusers stores in ``scheduler.sigmas``), ``"ve"`` (Euler/Heun/EDM latents ``x0 + sigma eps``) or
            ``"flow"`` (FlowMatch latents ``(1 - sigma) x0 + sigma eps``).
        sigma (`float` or `torch.Tensor`): the frame's noise coordinate; non-negative.

    Returns:
        `tuple`: ``(alpha, sigma_t)`` with ``x = alpha x0 + sigma_t eps``.
    """
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if bool((s < 0).any()) or (frame == "flow" and bool((s > 1).any())):
        raise ValueError(f"sigma must be in [0, inf) ([0, 1] for the flow frame), got {sigma!r}")
    if frame == "ve":
        alpha, sig = torch.ones_like(s), s
    elif frame == "flow":
        alpha, sig = 1.0 - s, s
    else:
        # a = 1 / sqrt(1 + sigma^2), s = sigma a; sigma = inf (zero terminal SNR) is pure noise
        alpha = torch.where(torch.isinf(s), torch.zeros_like(s), torch.rsqrt(1.0 + s**2))
        sig = torch.where(torch.isinf(s), torch.ones_like(s), s * torch.rsqrt(1.0 + s**2))
    if s.ndim == 0:
        return float(alpha), float(sig)
    return alpha, sig
