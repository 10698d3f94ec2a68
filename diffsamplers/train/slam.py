# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""SLAM distillation (SPLAD) on ``accelerate``: a few-step consistency student of any frozen epsilon teacher.

Xu et al., "Accelerating Image Generation with Sub-path Linear Approximation Model", ECCV 2024, arXiv 2404.13903,
official code https://github.com/MCG-NJU/SPLAM (``splam/train_splam_distill_sd_wds.py``); the consistency
parametrisation and the LCD baseline are Latent Consistency Models (Luo et al., arXiv 2310.04378, Sec. 4 and
Algorithm 1; diffusers ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``).

One training step, per sample (all maths of the sub-path in :class:`~diffsamplers.samplers.slam.SLAMScheduler`):

1. ``n ~ U{0..N-1}``, ``t_hi = (n + 1) k - 1``, ``t_lo = max(t_hi - k, 0)`` with ``k = T / N``; ``z = x_{t_hi}``.
2. Teacher (frozen): one DDIM step ``z -> y`` at ``t_lo`` (with classifier-free guidance for conditional teachers).
3. Target (EMA copy, no grad): the consistency function at ``(y, t_lo)`` and ``gamma = 1``.
4. ``gamma ~ U[0, 1)`` (``gamma_sampling="uniform"``; ``"fixed:1.0"`` is LCD exactly), the SL-ODE point
   ``x_gamma = gamma z + (1 - gamma) (alpha_hi / alpha_lo) y`` at noise level ``sigma_gamma``; the student predicts
   ``c_skip(t_hi) x_gamma + c_out(t_hi) (x_gamma - sigma_gamma eps) / alpha_hi``.
5. Pseudo-Huber (``sqrt(d^2 + c^2) - c``) or L2 loss to the target; AdamW with gradient clipping; then the EMA
   ``target <- mu target + (1 - mu) student`` over the trained parameters.

The student learns ``gamma`` through one of two inputs (``gamma_cond``):

- ``"time_cond_proj"`` (official): the sinusoidal embedding of ``10 - 10 gamma`` in the UNet's ``timestep_cond`` slot
  (a ``UNet2DConditionModel`` with ``time_cond_proj_dim``; added from the teacher's config when it has none, the
  new projection initialised randomly as upstream or with zeros so that the student starts as the teacher).
- ``"effective_timestep"``: no new module. The network sees ``x_gamma / sqrt(alpha_hi^2 + sigma_gamma^2)`` at the
  float timestep whose signal-to-noise ratio is ``alpha_hi^2 / sigma_gamma^2``, i.e. exactly the input of a
  teacher-shaped network at that noise level; at ``gamma = 1`` this is the plain call at ``t_hi``, so the student is
  an ordinary denoiser of the teacher's class and samples with ``SLAMScheduler`` in any pipeline (the only choice
  for ``UNet2DModel`` teachers, which have no ``timestep_cond``).

Checkpoints (``checkpoint-<step>/``) are safetensors plus JSON written by this module, not ``accelerate.save_state``:
accelerate pickles the optimizer, the RNG states and registered objects and unpickles them with
``weights_only=False``, which this package never does. What they hold: student and target weights, the optimizer
state, the learning-rate schedule, the step and the trainer's random generator, so a resumed run continues with the
identical next loss (for dataloaders whose order does not depend on hidden random state, e.g. unshuffled ones).
Everything else — ``mixed_precision``, gradient accumulation, multi-GPU by ``accelerate launch`` — is accelerate's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .._io import atomic_write, load_safetensors, read_json
from ..samplers.slam import SIGMA_RULES, SLAMScheduler
from ..schedule import NoiseSchedule

GAMMA_CONDS = ("auto", "time_cond_proj", "effective_timestep")
LOSS_TYPES = ("huber", "l2")
CFG_FORMS = ("lcm", "imagen")
MODES = ("full", "lora")
CHECKPOINT_PREFIX = "checkpoint-"
_STATE_NAME = "trainer_state.json"
# every conv / linear a diffusers UNet block has; LoRA targets the ones that exist in the model (LCM-LoRA's list)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                        "time_emb_proj")


@dataclass
class SLAMConfig:
    """Options of :class:`SLAMDistiller` (official defaults unless noted).

    Args:
        num_ddim_timesteps (`int`, defaults to 50): teacher solver grid N (skipping interval k = T / N); also the
            student's ``original_inference_steps``.
        gamma_sampling (`str`, defaults to `"uniform"`): ``"uniform"`` (gamma ~ U[0, 1)), ``"fixed:G"``
            (``"fixed:1.0"`` is LCD, the LCM objective) or ``"beta:A,B"``.
        sigma_rule (`str`, defaults to `"variance"`): noise level along the sub-path, ``"variance"`` or ``"linear"``.
        gamma_cond (`str`, defaults to `"auto"`): ``"time_cond_proj"``, ``"effective_timestep"``, or ``"auto"``
            (``time_cond_proj`` for networks whose forward takes ``timestep_cond``, else ``effective_timestep``).
        time_cond_proj_dim (`int`, defaults to 256): embedding width when a projection has to be added.
        cond_proj_init (`str`, defaults to `"random"`): ``"random"`` (official) or ``"zeros"`` for a new projection.
        guidance_w (`float`, *optional*): classifier-free guidance of a conditional teacher (official 8.0, LCM form
            ``eps_c + w (eps_c - eps_u)``); needs ``unconditional_condition``; ``None`` = 8.0 when one is given.
        cfg_form (`str`, defaults to `"lcm"`): ``"lcm"`` as above or ``"imagen"`` ``eps_u + w (eps_c - eps_u)``.
        timestep_scaling (`float`, defaults to 10.0) / sigma_data (`float`, defaults to 0.5): boundary scalings.
        loss_type (`str`, defaults to `"huber"`): ``"huber"`` (pseudo-Huber, ``huber_c``) or ``"l2"``.
        huber_c (`float`, defaults to 1e-3): pseudo-Huber constant.
        ema_decay (`float`, defaults to 0.95): target-network EMA rate.
        use_target_network (`bool`, *optional*): separate EMA target; default True for full, False for LoRA (targets
            then come from the student itself under no-grad, as LCM-LoRA).
        mode (`str`, defaults to `"full"`): ``"full"`` fine-tuning or ``"lora"`` (needs ``peft``).
        lora_rank / lora_alpha / lora_dropout / lora_target_modules: LoRA settings (64, 64, 0.0, the layers of
            ``DEFAULT_LORA_TARGETS`` present in the model).
        learning_rate (`float`, defaults to 8e-6): AdamW rate (the official full-UNet value; small models want more).
        adam_beta1 / adam_beta2 / adam_weight_decay / adam_epsilon: AdamW (0.9, 0.999, 0.0, 1e-8).
        max_grad_norm (`float`, defaults to 1.0): gradient clipping.
        lr_scheduler (`str`, defaults to `"constant"`) / lr_warmup_steps (`int`, defaults to 0): diffusers' schedules.
        gradient_accumulation_steps (`int`, defaults to 1) / mixed_precision (`str`, defaults to `"no"`): accelerate's.
        cast_teacher (`bool`, defaults to `True`): run the frozen teacher in the mixed-precision dtype.
        max_train_steps (`int`, defaults to 1000): optimiser steps.
        checkpointing_steps (`int`, defaults to 500) / checkpoints_total_limit (`int`, *optional*): checkpoints.
        seed (`int`, defaults to 0): seeds the student init of new modules and the trainer's own generator.
    """

    num_ddim_timesteps: int = 50
    gamma_sampling: str = "uniform"
    sigma_rule: str = "variance"
    gamma_cond: str = "auto"
    time_cond_proj_dim: int = 256
    cond_proj_init: str = "random"
    guidance_w: float | None = None
    cfg_form: str = "lcm"
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    loss_type: str = "huber"
    huber_c: float = 1e-3
    ema_decay: float = 0.95
    use_target_network: bool | None = None
    mode: str = "full"
    lora_rank: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    learning_rate: float = 8e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    cast_teacher: bool = True
    max_train_steps: int = 1000
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        def positive_int(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("num_ddim_timesteps", "time_cond_proj_dim", "lora_rank", "max_train_steps",
                     "checkpointing_steps", "gradient_accumulation_steps"):
            positive_int(name)
        if self.checkpoints_total_limit is not None:
            positive_int("checkpoints_total_limit")
        parse_gamma_sampling(self.gamma_sampling)
        choices = dict(sigma_rule=SIGMA_RULES, gamma_cond=GAMMA_CONDS, cond_proj_init=("random", "zeros"),
                       cfg_form=CFG_FORMS, loss_type=LOSS_TYPES, mode=MODES,
                       mixed_precision=("no", "fp16", "bf16", "fp8"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("timestep_scaling", "sigma_data", "huber_c", "learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must be a number in [0, 1), got {self.ema_decay!r}")
        if self.guidance_w is not None and not (isinstance(self.guidance_w, (int, float)) and self.guidance_w >= 0):
            raise ValueError(f"guidance_w must be a number >= 0, got {self.guidance_w!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_gamma_sampling(spec: str) -> tuple[str, tuple[float, ...]]:
    """``"uniform"`` -> ``("uniform", ())``, ``"fixed:1.0"`` -> ``("fixed", (1.0,))``, ``"beta:2,1"`` ->
    ``("beta", (2.0, 1.0))``; anything else raises a ValueError naming ``gamma_sampling``."""
    if not isinstance(spec, str):
        raise TypeError(f"gamma_sampling must be a str, got {type(spec).__name__}")
    kind, _, rest = spec.partition(":")
    try:
        values = tuple(float(v) for v in rest.split(",")) if rest else ()
    except ValueError:
        values = None
    if kind == "uniform" and values == ():
        return kind, values
    if kind == "fixed" and values is not None and len(values) == 1 and 0.0 <= values[0] <= 1.0:
        return kind, values
    if kind == "beta" and values is not None and len(values) == 2 and min(values) > 0:
        return kind, values
    raise ValueError(
        f"gamma_sampling must be 'uniform', 'fixed:G' (0 <= G <= 1) or 'beta:A,B' (A, B > 0), got {spec!r}"
    )


def _accepts(model: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _denoise(
    model: Any, x: torch.Tensor, t: torch.Tensor, cond: Any = None, timestep_cond: Any = None
) -> torch.Tensor:
    kwargs = {}
    if cond is not None:
        kwargs["encoder_hidden_states"] = cond
    if timestep_cond is not None:
        kwargs["timestep_cond"] = timestep_cond
    out = model(x, t, **kwargs)
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


def _split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    """A batch is latents, ``(latents, conditions)`` or a dict with ``"latents"`` (and ``"conditions"``)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        if "latents" not in batch:
            raise ValueError(f"a dict batch needs a 'latents' entry, got keys {sorted(batch)}")
        return batch["latents"], batch.get("conditions")
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"a batch must be a tensor, a (latents, conditions) pair or a dict, got {type(batch).__name__}")


def _module_folder(model: Any) -> str:
    return "transformer" if "Transformer" in type(model).__name__ else "unet"


class SLAMDistiller:
    """Distil a frozen epsilon teacher into a few-step SLAM (or, with ``gamma_sampling="fixed:1.0"``, LCD) student.

    Args:
        teacher (`torch.nn.Module`): a diffusers denoiser (``UNet2DModel``, ``UNet2DConditionModel``, ...) or any
            module called as ``teacher(sample, timestep[, encoder_hidden_states=...][, timestep_cond=...])``.
        scheduler_config (`dict`): the teacher's diffusers scheduler config (discrete VP, epsilon prediction).
        train_dataloader (`Iterable`): batches of latents (tensor, ``(latents, conditions)`` or a dict).
        config (`SLAMConfig`, *optional*): the options.
        output_dir (`str`, *optional*): where checkpoints go (required for :meth:`save_checkpoint`).
        unconditional_condition (`torch.Tensor`, *optional*): the empty-prompt condition of one sample, for CFG.
        accelerator_kwargs (`dict`, *optional*): extra ``accelerate.Accelerator`` arguments (e.g. ``cpu=True``).
    """

    def __init__(self, teacher: torch.nn.Module, scheduler_config: Any, train_dataloader: Iterable,
                 config: SLAMConfig | None = None, *, output_dir: str | None = None,
                 unconditional_condition: torch.Tensor | None = None, accelerator_kwargs: dict | None = None):
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        self.config = config = config or SLAMConfig()
        if not isinstance(config, SLAMConfig):
            raise TypeError(f"config must be a SLAMConfig, got {type(config).__name__}")
        if not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        sched = dict(scheduler_config)
        if sched.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("scheduler_config: SLAM distillation supports epsilon-prediction teachers only, got "
                             f"prediction_type={sched.get('prediction_type')!r} (the sub-path x0 conversion is "
                             "derived for epsilon)")
        self.schedule = NoiseSchedule.from_config(sched)
        if self.schedule.family != "vp":
            raise ValueError(
                f"scheduler_config: SLAM distillation needs a discrete VP schedule, got {self.schedule.family}"
            )
        T = self.schedule.num_train_timesteps
        if T % config.num_ddim_timesteps:
            raise ValueError(f"num_ddim_timesteps ({config.num_ddim_timesteps}) must divide num_train_timesteps ({T})")
        self.scheduler_config = sched
        self.gamma_kind, self.gamma_args = parse_gamma_sampling(config.gamma_sampling)
        self.lcd = self.gamma_kind == "fixed" and self.gamma_args[0] == 1.0
        self.output_dir = output_dir
        self.unconditional_condition = unconditional_condition
        self.guidance_w = config.guidance_w if config.guidance_w is not None else 8.0
        if config.guidance_w is not None and config.guidance_w > 0 and unconditional_condition is None:
            raise ValueError("guidance_w needs unconditional_condition (the empty-prompt condition)")

        self.accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                                       **(accelerator_kwargs or {}))
        device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)

        self.teacher = teacher.requires_grad_(False).eval()
        self.teacher.to(device, self.weight_dtype if config.cast_teacher else None)
        gamma_cond = config.gamma_cond
        if gamma_cond == "auto":
            gamma_cond = "time_cond_proj" if _accepts(teacher, "timestep_cond") else "effective_timestep"
        if gamma_cond == "time_cond_proj" and not _accepts(teacher, "timestep_cond"):
            raise ValueError(f"gamma_cond='time_cond_proj' needs a network whose forward takes timestep_cond; "
                             f"{type(teacher).__name__} does not: use gamma_cond='effective_timestep'")
        self.gamma_cond = gamma_cond
        student = self._make_student(teacher.float() if not config.cast_teacher else teacher)
        self.teacher.to(device, self.weight_dtype if config.cast_teacher else None)
        use_target = config.use_target_network
        self.use_target = (config.mode == "full") if use_target is None else bool(use_target)
        student.train()
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the student has no trainable parameters")
        self.target = None
        if self.use_target:
            self.target = copy.deepcopy(student).requires_grad_(False).eval().to(device)
        optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate,
                                      betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                     num_training_steps=config.max_train_steps)
        self.student, self.optimizer, self.lr_scheduler = self.accelerator.prepare(student, optimizer, lr_scheduler)
        self.dataloader = train_dataloader
        self.global_step = 0
        self.generator = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        self.history: list[float] = []

    # -- models ---------------------------------------------------------------------------------------------------

    def _make_student(self, teacher: torch.nn.Module) -> torch.nn.Module:
        config = self.config
        needs_proj = (self.gamma_cond == "time_cond_proj" and hasattr(teacher, "config")
                      and getattr(teacher.config, "time_cond_proj_dim", None) is None)
        if needs_proj:
            # a mutable copy of the config (writing into the FrozenDict does not update the attribute, diffusers #6518)
            cfg = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
            cfg["time_cond_proj_dim"] = config.time_cond_proj_dim
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                student = type(teacher).from_config(cfg)
            missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
            # non-strict loading hides mistakes: only the new projection may be missing
            bad = [k for k in missing if not k.startswith("time_embedding.cond_proj")]
            if bad or unexpected:
                raise ValueError(f"teacher weights do not fit the student: missing {bad}, unexpected {unexpected}")
            if config.cond_proj_init == "zeros":
                torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        else:
            student = copy.deepcopy(teacher)
        student = student.float().to(self.accelerator.device)
        if config.mode == "lora":
            student = self._add_lora(student)
        else:
            student.requires_grad_(True)
        return student

    def _add_lora(self, student: torch.nn.Module) -> torch.nn.Module:
        try:
            import peft  # noqa: F401
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("mode='lora' needs peft (pip install peft)") from err
        student.requires_grad_(False)
        student.add_adapter(lora_config(student, self.config))
        if self.gamma_cond == "time_cond_proj":
            # the gamma projection is not a LoRA layer: trained fully and saved next to the adapter
            student.time_embedding.cond_proj.requires_grad_(True)
        return student

    # -- one step of the objective --------------------------------------------------------------------------------

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.schedule.alpha_sigma(t)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha.to(like.device, torch.float32).reshape(shape), sigma.to(like.device, torch.float32).reshape(shape)

    def _sample_gamma(self, n: int) -> torch.Tensor:
        if self.gamma_kind == "uniform":
            return torch.rand(n, generator=self.generator)
        if self.gamma_kind == "fixed":
            return torch.full((n,), self.gamma_args[0])
        a, b = self.gamma_args
        # Beta(a, b) from two Gamma draws of the trainer's own generator (torch.distributions takes none)
        u = torch._standard_gamma(torch.full((n,), a), generator=self.generator)
        v = torch._standard_gamma(torch.full((n,), b), generator=self.generator)
        return u / (u + v)

    def _teacher_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        with torch.no_grad():
            dtype = next(self.teacher.parameters()).dtype
            if cond is None or self.unconditional_condition is None or self.guidance_w == 0:
                return _denoise(self.teacher, x.to(dtype), t, cond).float()
            uncond = self.unconditional_condition.to(cond.device, cond.dtype).expand_as(cond)
            eps = _denoise(self.teacher, torch.cat([x, x]).to(dtype), torch.cat([t, t]), torch.cat([uncond, cond]))
            eps_u, eps_c = eps.float().chunk(2)
            w = self.guidance_w
            return eps_c + w * (eps_c - eps_u) if self.config.cfg_form == "lcm" else eps_u + w * (eps_c - eps_u)

    def _consistency(self, model: Any, x: torch.Tensor, t: torch.Tensor, cond: Any, gamma: torch.Tensor | None,
                     x_alpha: torch.Tensor, x_sigma: torch.Tensor, t_alpha: torch.Tensor, t_sigma: torch.Tensor,
                     t_scale: torch.Tensor) -> torch.Tensor:
        """``c_skip(t) x + c_out(t) (x - sigma eps) / alpha`` of ``model``; ``gamma=None`` is the plain call at ``t``
        (the target, and the student of LCD); otherwise the sub-path point at level ``x_sigma``."""
        timestep_cond = None
        inp, t_in = x, t
        if self.gamma_cond == "time_cond_proj":
            g = torch.ones(x.shape[0]) if gamma is None else gamma
            timestep_cond = SLAMScheduler.gamma_embedding(g, self._cond_dim(model)).to(x.device)
        elif gamma is not None:
            # effective timestep: the level whose SNR is alpha^2 / sigma_gamma^2, with the input rescaled to unit
            # signal-plus-noise variance, exactly as the teacher saw inputs there
            norm = (x_alpha**2 + x_sigma**2).sqrt()
            inp = x / norm
            t_eff = self.schedule.timestep_from_ve_sigma((x_sigma / x_alpha).reshape(-1).double().cpu())
            t_in = t_eff.to(x.device, torch.float32)
        with self.accelerator.autocast():
            eps = _denoise(model, inp, t_in, cond, timestep_cond).float()
        x0 = SLAMScheduler.subpath_x0(eps, x, x_alpha, x_sigma)
        c_skip, c_out = SLAMScheduler.scalings(t_scale, self.config.timestep_scaling, self.config.sigma_data)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * x0

    def _cond_dim(self, model: Any) -> int:
        model = self.accelerator.unwrap_model(model)
        dim = getattr(getattr(model, "config", None), "time_cond_proj_dim", None)
        return int(dim or self.config.time_cond_proj_dim)

    def compute_loss(self, latents: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The SLAM (or LCD) loss of one batch; draws ``n``, the noise and ``gamma`` from the trainer's generator."""
        config = self.config
        device = self.accelerator.device
        x0 = latents.to(device, torch.float32)
        b = x0.shape[0]
        T = self.schedule.num_train_timesteps
        k = T // config.num_ddim_timesteps
        idx = torch.randint(0, config.num_ddim_timesteps, (b,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator).to(device)
        gamma = self._sample_gamma(b)
        t_hi = (idx + 1) * k - 1
        t_lo = (t_hi - k).clamp(min=0)
        a_hi, s_hi = self._coefficients(t_hi, x0)
        a_lo, s_lo = self._coefficients(t_lo, x0)
        t_hi_d, t_lo_d = t_hi.to(device), t_lo.to(device)
        z = a_hi * x0 + s_hi * noise
        eps_t = self._teacher_eps(z, t_hi_d, cond)
        # one DDIM step of the teacher; at t_lo = 0 it lands on alpha_bar_0 (not 1), as upstream
        y = a_lo * (z - s_hi * eps_t) / a_hi + s_lo * eps_t
        with torch.no_grad():
            target_model = self.target if self.target is not None else self.student
            target = self._consistency(target_model, y, t_lo_d, cond, None, a_lo, s_lo, a_lo, s_lo,
                                       t_lo.float().to(device))
        g = gamma.to(device).reshape((-1,) + (1,) * (x0.ndim - 1))
        if self.lcd:
            pred = self._consistency(self.student, z, t_hi_d, cond, None, a_hi, s_hi, a_hi, s_hi,
                                     t_hi.float().to(device))
        else:
            x_g = SLAMScheduler.subpath_point(z, y, a_hi, a_lo, g)
            s_g = SLAMScheduler.subpath_sigma(a_hi, s_hi, a_lo, s_lo, g, config.sigma_rule)
            pred = self._consistency(self.student, x_g, t_hi_d, cond, gamma, a_hi, s_g, a_hi, s_hi,
                                     t_hi.float().to(device))
        return distillation_loss(pred, target, config.loss_type, config.huber_c)

    # -- the loop -------------------------------------------------------------------------------------------------

    def _batches(self):
        """Batches forever; a resumed run skips the batches its epoch already consumed."""
        try:
            per_epoch = len(self.dataloader)
        except TypeError:
            per_epoch = None
        skip = (self.global_step * self.config.gradient_accumulation_steps) % per_epoch if per_epoch else 0
        while True:
            for i, batch in enumerate(self.dataloader):
                if skip and i < skip:
                    continue
                yield batch
            skip = 0

    def ema_update(self) -> None:
        """``target <- mu target + (1 - mu) student`` over the trained parameters (LCM, arXiv 2310.04378, Alg. 1)."""
        if self.target is None:
            return
        mu = self.config.ema_decay
        student = self.accelerator.unwrap_model(self.student)
        online = dict(student.named_parameters())
        with torch.no_grad():
            for name, p in self.target.named_parameters():
                q = online[name]
                if q.requires_grad:
                    p.mul_(mu).add_(q.detach().to(p.dtype), alpha=1 - mu)

    def train_step(self, batch: Any) -> float:
        """One (accumulated) optimiser step; returns the loss."""
        latents, cond = _split_batch(batch)
        with self.accelerator.accumulate(self.student):
            loss = self.compute_loss(latents, cond)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.sync_gradients:
            self.ema_update()
            self.global_step += 1
        return float(loss.detach())

    def train(self, max_train_steps: int | None = None, progress: bool = True, log_every: int = 100) -> list[float]:
        """Train until ``max_train_steps`` (default: the config's), checkpointing every ``checkpointing_steps`` when
        ``output_dir`` is set; returns the losses of this call."""
        from tqdm.auto import tqdm

        total = max_train_steps or self.config.max_train_steps
        losses = []
        bar = tqdm(total=total, initial=self.global_step, desc="slam distill",
                   disable=not (progress and self.accelerator.is_local_main_process))
        batches = self._batches()
        start = time.perf_counter()
        while self.global_step < total:
            loss = self.train_step(next(batches))
            losses.append(loss)
            self.history.append(loss)
            bar.update(1)
            if self.global_step % log_every == 0:
                recent = sum(losses[-log_every:]) / len(losses[-log_every:])
                bar.set_postfix(loss=f"{recent:.4g}")
                if not bar.disable and not getattr(bar, "_isatty", True):
                    print(f"step {self.global_step} loss {recent:.5g} {time.perf_counter() - start:.0f}s", flush=True)
            if self.output_dir and self.global_step % self.config.checkpointing_steps == 0:
                self.save_checkpoint()
        bar.close()
        return losses

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write ``checkpoint-<step>/`` (safetensors + JSON) and drop the oldest beyond ``checkpoints_total_limit``."""
        from safetensors.torch import save

        if path is None:
            if not self.output_dir:
                raise ValueError("save_checkpoint needs a path or the distiller's output_dir")
            path = os.path.join(self.output_dir, f"{CHECKPOINT_PREFIX}{self.global_step}")
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return path
        os.makedirs(path, exist_ok=True)
        student = self.accelerator.unwrap_model(self.student)
        tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
        if self.target is not None:
            tensors.update({f"target.{k}": v for k, v in self.target.state_dict().items()})
        opt = self.optimizer.state_dict()
        for i, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{i}.{key}"] = torch.as_tensor(value)
        tensors["generator"] = self.generator.get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(os.path.join(path, "state.safetensors"), save(tensors))
        state = dict(global_step=self.global_step, param_groups=opt["param_groups"],
                     lr_scheduler=self.lr_scheduler.state_dict(), config=self.config.to_json(),
                     history=self.history)
        atomic_write(os.path.join(path, _STATE_NAME), (json.dumps(state, default=_json_default) + "\n").encode())
        self._prune_checkpoints()
        return path

    def _prune_checkpoints(self) -> None:
        limit = self.config.checkpoints_total_limit
        if not limit or not self.output_dir:
            return
        found = sorted(list_checkpoints(self.output_dir), key=lambda p: _checkpoint_step(p))
        for old in found[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Resume from a checkpoint folder, or ``"latest"`` (the highest step in ``output_dir``)."""
        if path == "latest":
            found = list_checkpoints(self.output_dir) if self.output_dir else []
            if not found:
                raise ValueError(f"resume 'latest': no {CHECKPOINT_PREFIX}* folder in output_dir={self.output_dir!r}")
            path = max(found, key=_checkpoint_step)
        state_path = os.path.join(path, _STATE_NAME)
        state = read_json(state_path)
        tensors, _, _ = load_safetensors(os.path.join(path, "state.safetensors"))
        try:
            student = self.accelerator.unwrap_model(self.student)
            student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")})
            if self.target is not None:
                self.target.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("target.")})
            opt_state: dict = {}
            for key, value in tensors.items():
                if key.startswith("optimizer."):
                    _, i, name = key.split(".", 2)
                    opt_state.setdefault(int(i), {})[name] = value
            self.optimizer.load_state_dict(dict(state=opt_state, param_groups=state["param_groups"]))
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.generator.set_state(tensors["generator"])
            self.global_step = int(state["global_step"])
            self.history = list(state.get("history", []))
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(f"{path}: not a checkpoint of this distiller ({err})") from err

    # -- export ---------------------------------------------------------------------------------------------------

    def scheduler(self) -> SLAMScheduler:
        """The student's sampler: the teacher's schedule with ``original_inference_steps = N``."""
        keys = set(SLAMScheduler._get_init_keys(SLAMScheduler))
        cfg = {k: v for k, v in self.scheduler_config.items() if k in keys}
        cfg.update(original_inference_steps=self.config.num_ddim_timesteps,
                   timestep_scaling=self.config.timestep_scaling, sigma_data=self.config.sigma_data)
        return SLAMScheduler(**cfg)

    def save_student(self, path: str, which: str = "online", info: dict | None = None) -> str:
        """Save a ``from_pretrained`` folder: ``unet/`` (or ``transformer/``; the ``"online"`` student or the EMA
        ``"target"``), ``scheduler/`` and ``distill.json``; in LoRA mode ``unet_lora/`` (the adapter, plus the gamma
        projection) instead of the full network."""
        if which not in ("online", "target"):
            raise ValueError(f"which must be 'online' or 'target', got {which!r}")
        if which == "target" and self.target is None:
            raise ValueError("which='target': this run has no target network")
        model = self.accelerator.unwrap_model(self.student) if which == "online" else self.target
        folder = _module_folder(model)
        os.makedirs(path, exist_ok=True)
        if self.config.mode == "lora":
            save_lora_student(model, os.path.join(path, f"{folder}_lora"), self.config,
                              with_cond_proj=self.gamma_cond == "time_cond_proj")
        else:
            model.save_pretrained(os.path.join(path, folder), safe_serialization=True)
        self.scheduler().save_pretrained(os.path.join(path, "scheduler"))
        meta = dict(method="LCD" if self.lcd else "SLAM", network=which, gamma_cond=self.gamma_cond,
                    steps=self.global_step, config=self.config.to_json(), **(info or {}))
        atomic_write(os.path.join(path, "distill.json"), (json.dumps(meta, indent=2, default=_json_default) + "\n")
                     .encode())
        return path


def distillation_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "huber",
                      huber_c: float = 1e-3) -> torch.Tensor:
    """Mean L2 or pseudo-Huber ``sqrt((a - b)^2 + c^2) - c`` (Song & Dhariwal, arXiv 2310.14189, Sec. 3.3), in
    float32."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2).mean()
    if loss_type == "huber":
        return (diff.pow(2) + huber_c**2).sqrt().sub(huber_c).mean()
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def lora_config(model: torch.nn.Module, config: SLAMConfig):
    """peft ``LoraConfig`` on the layers of ``config.lora_target_modules`` (default: ``DEFAULT_LORA_TARGETS``) that
    ``model`` has."""
    from peft import LoraConfig

    wanted = config.lora_target_modules or list(DEFAULT_LORA_TARGETS)
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    present = sorted({w for w in wanted if any(n == w or n.endswith("." + w) for n in names)})
    if not present:
        raise ValueError(f"lora_target_modules: none of {wanted} is a Linear/Conv2d of {type(model).__name__}")
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      init_lora_weights="gaussian", target_modules=present)


def save_lora_student(model: torch.nn.Module, path: str, config: SLAMConfig, with_cond_proj: bool = False) -> str:
    """``adapter_model.safetensors`` (peft state dict, plus ``time_embedding.cond_proj.*`` when trained) and
    ``adapter_config.json`` (rank, alpha, targets)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    os.makedirs(path, exist_ok=True)
    tensors = dict(get_peft_model_state_dict(model))
    if with_cond_proj:
        tensors.update({f"cond_proj.{k}": v for k, v in model.time_embedding.cond_proj.state_dict().items()})
    # the adapter's own config: after injection the targets are LoRA layers, no longer Linear/Conv2d
    lcfg = next(iter(model.peft_config.values()))
    meta = dict(r=lcfg.r, lora_alpha=lcfg.lora_alpha, lora_dropout=lcfg.lora_dropout,
                target_modules=sorted(lcfg.target_modules), cond_proj=with_cond_proj)
    atomic_write(os.path.join(path, "adapter_model.safetensors"),
                 save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    atomic_write(os.path.join(path, "adapter_config.json"), (json.dumps(meta, indent=2) + "\n").encode())
    return path


def load_lora_student(base: torch.nn.Module, path: str) -> torch.nn.Module:
    """Re-create a LoRA student: a copy of the teacher ``base`` with the adapter of ``path`` (and the gamma projection,
    which ``load_lora_weights`` would not create) loaded."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    cfg_path = os.path.join(path, "adapter_config.json")
    meta = read_json(cfg_path)
    tensors, _, _ = load_safetensors(os.path.join(path, "adapter_model.safetensors"))
    try:
        lcfg = LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], lora_dropout=meta["lora_dropout"],
                          target_modules=meta["target_modules"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{cfg_path} is not an adapter config written by save_lora_student ({err!r})") from err
    model = copy.deepcopy(base)
    if meta.get("cond_proj"):
        cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
        proj = {k[len("cond_proj."):]: v for k, v in tensors.items() if k.startswith("cond_proj.")}
        cfg["time_cond_proj_dim"] = proj["weight"].shape[1]
        fresh = type(model).from_config(cfg)
        fresh.load_state_dict(model.state_dict(), strict=False)
        fresh.time_embedding.cond_proj.load_state_dict(proj)
        model = fresh
    model.add_adapter(lcfg)
    result = set_peft_model_state_dict(model, {k: v for k, v in tensors.items() if not k.startswith("cond_proj.")})
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path}: adapter keys that fit no LoRA layer: {unexpected[:5]}")
    return model.eval()


def list_checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-<step>`` folders in ``output_dir``."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return [os.path.join(output_dir, d) for d in os.listdir(output_dir)
            if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", d) and os.path.isdir(os.path.join(output_dir, d))]


def _checkpoint_step(path: str) -> int:
    return int(os.path.basename(path)[len(CHECKPOINT_PREFIX):])


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# the bundled digits students and their bench entries


def bundled_student_path(method: str = "slam") -> str:
    """Folder of a bundled distilled student of the digits DDPM: ``"slam"`` or ``"lcd"`` (the LCD baseline)."""
    from ..models.digits import BUNDLED_DIR

    if method not in ("slam", "lcd"):
        raise ValueError(f"method must be 'slam' or 'lcd', got {method!r}")
    return os.path.join(BUNDLED_DIR, f"digits-{method}")


def load_student(path: str, device: str | torch.device = "cpu", **scheduler_kwargs: Any) -> tuple[Any, SLAMScheduler]:
    """A saved student folder (``unet/`` or ``transformer/``, ``scheduler/``) as ``(network, SLAMScheduler)``; extra
    keyword arguments override the scheduler config (e.g. ``renoise="deterministic"``)."""
    from diffusers.models import AutoModel

    if not os.path.isdir(path):
        raise ValueError(f"path {path!r}: no such student folder")
    sub = "transformer" if os.path.isdir(os.path.join(path, "transformer")) else "unet"
    if not os.path.isdir(os.path.join(path, sub)) or not os.path.isdir(os.path.join(path, "scheduler")):
        raise ValueError(f"path {path!r}: a student folder holds unet/ (or transformer/) and scheduler/")
    net = AutoModel.from_pretrained(path, subfolder=sub, use_safetensors=True).eval().to(device)
    config = SLAMScheduler.load_config(path, subfolder="scheduler")
    return net, SLAMScheduler.from_config(config, **scheduler_kwargs)
