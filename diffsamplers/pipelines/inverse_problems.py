# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Posterior sampling for linear inverse problems with a pretrained diffusers model: DPS, PSLD and STSL.

Given a measurement ``y = A x0 + sigma_y n`` (see :mod:`diffsamplers.pipelines.operators`), each method runs a DDIM
/ DDPM reverse process and pulls every step towards images consistent with ``y`` by the gradient, w.r.t. the current
sample, of a per-sample loss through the denoiser's Tweedie estimate ``x0_hat`` (and the VAE decoder):

- **DPS** (Chung et al. 2023, arXiv 2209.14687, Alg. 1): ``zeta ||y - A D(x0_hat)||``, in pixel space or through the
  decoder (latent DPS). The norm is not squared, as in the official code, which equals the paper's step
  ``zeta' / ||y - A x0_hat||`` (DPS issue #20).
- **PSLD** (Rout et al. 2023, arXiv 2307.00619, Alg. 2): the latent data fit ``omega ||y - A D(z0_hat)||`` plus the
  "gluing" term ``gamma ||z0_hat - E(A^T y + (I - A^T A) D(z0_hat))||`` through the encoder.
- **STSL** (Rout et al. 2024, arXiv 2312.00852): PSLD's loss plus ``rho`` times the second-order Tweedie posterior
  variance, a **reconstruction** (no code was released); see :mod:`diffsamplers.pipelines.stsl`.

Deliberate differences from the official code: step sizes are per sample (the DPS and PSLD code take
``torch.linalg.norm`` over the whole batch, so one sample's step depends on the others); PSLD's loss is
deterministic (its code adds fresh measurement noise to ``A D(z0_hat)`` inside the loss); everything runs in float32
(PSLD defaults to autocast), so weights tuned there may need retuning.

Gradients are taken only w.r.t. the sample (parameters are frozen for the call and restored after; nothing is kept
between steps), inside ``torch.enable_grad()``, so a solve works under an outer ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..schedule import NoiseSchedule, ddim_step, to_x0_eps
from .operators import MeasurementOperator
from .stsl import FD_SCHEMES, divergence, tweedie_variance

__all__ = ["GUIDANCE_RULES", "IdentityAutoencoder", "InverseProblemOutput", "InverseProblemSolver"]

GUIDANCE_RULES = ("output", "score")

# loss(z_t, z0_hat, eps_hat, step) -> per-sample losses (B,); step carries t, alpha, sigma and a denoiser handle
GuidanceLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "GuidanceStep"], Any]


@dataclass
class InverseProblemOutput:
    """What a solve returns.

    Args:
        images (`torch.Tensor`): `(B, C, H, W)` reconstructions in [-1, 1] (clamped), float32, on the CPU.
        latents (`torch.Tensor`): the final samples of the reverse process (latents, or the images for a pixel
            model), before decoding and clamping.
        nfe (`int`): denoiser calls made (a batch call counts once; STSL's probes count too).
        seconds (`float`): wall-clock time of the solve.
        guidance_norms (`torch.Tensor`): `(steps, B)` per-sample norm of the guidance gradient applied at each step
            (the last inner step's), to see where the guidance acts and whether a weight is too large.
    """

    images: torch.Tensor
    latents: torch.Tensor
    nfe: int
    seconds: float
    guidance_norms: torch.Tensor


@dataclass
class GuidanceStep:
    """The state a guidance loss sees at one evaluation: the timestep, its ``(alpha, sigma)``, the denoiser and the
    per-sample generators (for random probes that do not depend on the batch)."""

    timestep: int
    alpha: float
    sigma: float
    solver: "InverseProblemSolver"
    generators: list[torch.Generator | None] | None = None

    @property
    def generator(self) -> Any:
        """One generator for the batch when all samples share it, else the per-sample list."""
        gens = self.generators or [None]
        return gens[0] if len(set(map(id, gens))) == 1 else gens

    def noise_prediction(self, z: torch.Tensor) -> torch.Tensor:
        """``eps_hat(z, t)`` by one more (counted) denoiser call, differentiable w.r.t. ``z``."""
        return self.solver._predict(z, self.timestep, self.alpha, self.sigma)[1]


class IdentityAutoencoder(nn.Module):
    """``E = D = I``: runs the latent methods (PSLD, STSL) on a pixel-space denoiser, the linear-Gaussian setting of
    their derivations (a check, not a use case: their gluing term is then ``||A^T (y - A x0_hat)||``)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def _check_weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    # one norm per sample: the DPS / PSLD code's batch-wide norm couples the samples' step sizes
    return x.flatten(1).norm(dim=1)


def _generators(generator: Any, batch: int) -> list[torch.Generator | None]:
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)} but the measurement has {batch} samples")
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    return [generator] * batch


def _randn(shape: Sequence[int], gens: list[torch.Generator | None]) -> torch.Tensor:
    # one CPU draw per sample: a sample's noise does not depend on the batch or the device
    if len(set(map(id, gens))) == 1:
        return torch.randn((len(gens), *shape), generator=gens[0])
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


class InverseProblemSolver:
    """DPS, PSLD and STSL on a diffusers denoiser (UNet, DiT, any ``model(x, t, **cond).sample``) and its VAE.

    Build it with :meth:`from_pipeline` (``StableDiffusionPipeline``, ``DiTPipeline``, ``DDPMPipeline``, ...), or
    from components. Timesteps follow the scheduler config's ``timestep_spacing`` (as ``DDIMScheduler`` does), and
    the model's ``prediction_type`` (epsilon, v, sample) is converted to ``(z0_hat, eps_hat)``.

    Args:
        denoiser (`nn.Module`): called as ``denoiser(z, t, **conditioning).sample`` (or returning a tuple / tensor).
            An output with twice the input channels (a learned-variance DiT) is cut to its first half.
        scheduler (`SchedulerMixin` or config): gives the noise schedule and prediction type.
        vae (`AutoencoderKL`, *optional*): latent model if given (upcast to float32 in place: fp16 VAEs overflow
            under gradients); ``None`` for a pixel-space model (DPS only); :class:`IdentityAutoencoder` for PSLD /
            STSL in pixel space.
        conditioning (`dict`, *optional*): extra denoiser keyword arguments, each a tensor with batch size 1 or the
            batch size (``encoder_hidden_states``, ``class_labels``); expanded to the batch.
        sample_shape (`tuple`, *optional*): `(C, h, w)` of one sample the denoiser takes (default: its config's
            ``in_channels`` and ``sample_size``).
        gradient_checkpointing (`bool`, defaults to `False`): turn on the modules' gradient checkpointing during a
            solve (memory for compute: the VAE decode with grads dominates at 512^2, diffusers issue #10350).
        progress_bar (`bool`, defaults to `True`): a tqdm bar over the steps.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler: Any,
        vae: nn.Module | None = None,
        conditioning: dict[str, Any] | None = None,
        sample_shape: Sequence[int] | None = None,
        gradient_checkpointing: bool = False,
        progress_bar: bool = True,
    ):
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"denoiser must be a torch.nn.Module, got {type(denoiser).__name__}")
        config = getattr(scheduler, "config", scheduler)
        self.schedule = NoiseSchedule.from_config(config)
        if self.schedule.family != "vp":
            raise ValueError(
                f"scheduler must describe a VP (DDPM-type) schedule, got the {self.schedule.family!r} family: DPS, "
                "PSLD and STSL are written for x_t = a x0 + s eps with a DDIM / DDPM reverse process"
            )
        self.prediction_type = dict(config).get("prediction_type", "epsilon")
        self.denoiser = denoiser
        self.vae = vae
        if isinstance(vae, nn.Module) and any(p.dtype != torch.float32 for p in vae.parameters()):
            vae.to(torch.float32)
        self.conditioning = dict(conditioning or {})
        if sample_shape is None:
            cfg = denoiser.config
            size = cfg.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            sample_shape = (cfg.in_channels, *size)
        self.sample_shape = tuple(int(v) for v in sample_shape)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.progress_bar = bool(progress_bar)
        self.nfe = 0
        self._cond: dict[str, torch.Tensor] = {}

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        prompt: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
        class_labels: Any = None,
        **kwargs: Any,
    ) -> "InverseProblemSolver":
        """A solver on a pipeline's denoiser (``unet`` or ``transformer``), ``vae`` and ``scheduler``.

        Args:
            pipe (`DiffusionPipeline`): e.g. ``StableDiffusionPipeline`` (text-conditioned: ``prompt`` or
                ``prompt_embeds``; default the empty prompt, no CFG, as PSLD runs), ``DiTPipeline`` (``class_labels``;
                default the null class 1000, i.e. the unconditional model) or ``DDPMPipeline`` (pixel space).
            prompt (`str`, *optional*): encoded with the pipeline's text encoder.
            prompt_embeds (`torch.Tensor`, *optional*): `(1 or B, L, C)` text embeddings instead of ``prompt``.
            class_labels (`int` or `list[int]`, *optional*): class conditioning of a class-conditional denoiser.
            **kwargs: passed to the constructor (``gradient_checkpointing``, ``progress_bar``, ``sample_shape``).
        """
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is None or getattr(pipe, "scheduler", None) is None:
            raise ValueError(f"pipe must have a denoiser (unet or transformer) and a scheduler: {type(pipe).__name__}")
        conditioning: dict[str, Any] = {}
        if getattr(denoiser.config, "cross_attention_dim", None) is not None:
            if prompt_embeds is None:
                if getattr(pipe, "text_encoder", None) is None or not hasattr(pipe, "encode_prompt"):
                    raise ValueError("this pipeline's denoiser is text-conditioned: pass prompt_embeds")
                prompt_embeds = pipe.encode_prompt(prompt or "", denoiser.device, 1, False)[0]
            conditioning["encoder_hidden_states"] = prompt_embeds
        elif getattr(denoiser.config, "num_embeds_ada_norm", None) is not None:  # DiT: class-conditional
            labels = 1000 if class_labels is None else class_labels  # DiTPipeline's unconditional label
            conditioning["class_labels"] = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        kwargs.setdefault("progress_bar", not getattr(pipe, "_progress_bar_config", {}).get("disable", False))
        return cls(denoiser, pipe.scheduler, vae=getattr(pipe, "vae", None), conditioning=conditioning, **kwargs)

    # -- the pieces ---------------------------------------------------------------------------------------------

    @property
    def scale(self) -> tuple[float, float]:
        """``(scaling_factor, shift_factor)`` of the VAE's latents (``(1, 0)`` without a diffusers VAE)."""
        cfg = getattr(self.vae, "config", None)
        if cfg is None:
            return 1.0, 0.0
        return float(getattr(cfg, "scaling_factor", 1.0) or 1.0), float(getattr(cfg, "shift_factor", 0.0) or 0.0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(C, H, W)` of the images the operator acts on (decoded samples)."""
        if self.vae is None or isinstance(self.vae, IdentityAutoencoder):
            return self.sample_shape
        cfg = self.vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        return (cfg.out_channels, self.sample_shape[1] * factor, self.sample_shape[2] * factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) from samples; differentiable."""
        if self.vae is None or isinstance(self.vae, IdentityAutoencoder):
            return z
        sf, shift = self.scale
        return self.vae.decode(z / sf + shift).sample

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]: the posterior mean (deterministic, as PSLD uses it); differentiable."""
        if self.vae is None or isinstance(self.vae, IdentityAutoencoder):
            return x
        sf, shift = self.scale
        return (self.vae.encode(x).latent_dist.mean - shift) * sf

    def _predict(self, z: torch.Tensor, t: int, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z0_hat, eps_hat)`` from one counted denoiser call."""
        self.nfe += 1
        batch = z.shape[0]
        kwargs = {k: (v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v).to(z.device)
                  for k, v in self._cond.items()}
        dtype = getattr(self.denoiser, "dtype", z.dtype)
        timestep = torch.full((batch,), t, device=z.device, dtype=torch.long)
        out = self.denoiser(z.to(dtype), timestep, **kwargs)
        out = getattr(out, "sample", out)
        out = out[0] if isinstance(out, tuple) else out
        if out.shape[1] == 2 * z.shape[1]:  # learned variance (DiT): the first half is the prediction
            out = out[:, : z.shape[1]]
        return to_x0_eps(out.float(), z, alpha, sigma, self.prediction_type)

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """Parameters without grads and checkpointing as asked, for the duration of a solve; restored after."""
        modules = [m for m in (self.denoiser, self.vae) if isinstance(m, nn.Module)]
        params = [p for m in modules for p in m.parameters()]
        flags = [p.requires_grad for p in params]
        switched = []
        if self.gradient_checkpointing:
            for m in modules:
                if getattr(m, "_supports_gradient_checkpointing", False) and not m.is_gradient_checkpointing:
                    m.enable_gradient_checkpointing()
                    switched.append(m)
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            for m in switched:
                m.disable_gradient_checkpointing()

    # -- the shared loop ----------------------------------------------------------------------------------------

    def guided_sample(
        self,
        loss: GuidanceLoss,
        batch_size: int,
        num_inference_steps: int,
        eta: float = 0.0,
        rule: str = "output",
        inner_steps: int = 1,
        generator: Any = None,
        latents: torch.Tensor | None = None,
    ) -> InverseProblemOutput:
        """The reverse process all three methods share, with any differentiable per-sample guidance loss.

        At each step ``t -> t_next`` the loss is evaluated at ``z_t`` (through ``z0_hat = (z_t - s eps_hat) / a``)
        and its gradient ``g`` w.r.t. ``z_t`` applied by ``rule``:

        - ``"output"`` (DPS, PSLD): ``z_next = DDIM(z_t, eps_hat) - g``, the papers' form with the step size folded
          into the loss's weights;
        - ``"score"``: ``-g`` is added to the score, i.e. ``z0_hat -= (s^2 / a) g`` and ``eps_hat += s g`` before the
          step. With ``loss = -log p(y | z_t)`` this is exact posterior sampling (up to discretisation): the check
          that schedule, signs and operators are right.

        ``inner_steps`` > 1 first takes ``inner_steps - 1`` plain gradient steps ``z_t -= g`` at the same ``t``.

        Args:
            loss (`Callable`): ``loss(z_t, z0_hat, eps_hat, step) -> (B,)`` or a tuple of such terms (their
                gradients are taken one by one and summed); ``step`` is a :class:`GuidanceStep`.
            batch_size (`int`): samples to draw.
            num_inference_steps (`int`): reverse steps.
            eta (`float`, defaults to 0): DDIM stochasticity; 1 is the DDPM ancestral step (DPS's sampler).
            rule (`str`, defaults to `"output"`): one of :data:`GUIDANCE_RULES`.
            inner_steps (`int`, defaults to 1): loss evaluations (and gradient steps) per reverse step.
            generator (`torch.Generator` or list, *optional*): CPU generator(s), one per sample for batch-independent
                draws; seeds the start, the ancestral noise and any probes.
            latents (`torch.Tensor`, *optional*): the start ``z_T`` instead of a draw.
        """
        steps = _check_int(num_inference_steps, "num_inference_steps")
        inner = _check_int(inner_steps, "inner_steps")
        if rule not in GUIDANCE_RULES:
            raise ValueError(f"rule must be one of {GUIDANCE_RULES}, got {rule!r}")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {eta!r}")
        gens = _generators(generator, batch_size)
        device = next(self.denoiser.parameters(), torch.empty(0)).device
        if latents is None:
            z = _randn(self.sample_shape, gens).to(device)
        else:
            if tuple(latents.shape) != (batch_size, *self.sample_shape):
                raise ValueError(f"latents must have shape {(batch_size, *self.sample_shape)}, "
                                 f"got {tuple(latents.shape)}")
            z = latents.detach().to(device, torch.float32)
        self._cond = {k: torch.as_tensor(v) for k, v in self.conditioning.items()}
        for k, v in self._cond.items():
            if v.shape[0] not in (1, batch_size):
                raise ValueError(f"conditioning {k!r} has batch size {v.shape[0]}, expected 1 or {batch_size}")
        timesteps = [int(t) for t in self.schedule.ddim_timesteps(steps)[0]]
        self.nfe = 0
        norms = []
        start = time.perf_counter()
        from tqdm.auto import tqdm

        with self._frozen(), torch.enable_grad():
            for i, t in enumerate(tqdm(timesteps, disable=not self.progress_bar, desc="posterior sampling")):
                t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                a, s = (float(v) for v in self.schedule.alpha_sigma(t))
                a_n, s_n = (float(v) for v in self.schedule.alpha_sigma(t_next))
                step = GuidanceStep(t, a, s, self, gens)
                for k in range(inner):
                    zt = z.detach().requires_grad_(True)
                    z0, eps = self._predict(zt, t, a, s)
                    terms = loss(zt, z0, eps, step)
                    terms = terms if isinstance(terms, tuple) else (terms,)
                    grad = torch.zeros_like(zt)
                    for j, value in enumerate(terms):
                        if value.shape != (batch_size,):
                            raise ValueError(f"loss must return one value per sample, got shape {tuple(value.shape)}")
                        if not value.requires_grad:  # a term constant in z_t (an exact trace of a linear model)
                            continue
                        # one backward per term: summed inside autograd, a large term (STSL's finite-difference
                        # trace at high noise) would round a small one away in float32
                        (g,) = torch.autograd.grad(value.sum(), zt, retain_graph=j + 1 < len(terms))
                        grad = grad + torch.nan_to_num(g.detach())
                    z0, eps = z0.detach(), eps.detach()
                    if k + 1 < inner:
                        z = z - grad
                norms.append(_per_sample_norm(grad).cpu())
                if rule == "score":
                    z0, eps = z0 - (s * s / a) * grad, eps + s * grad
                noise = _randn(self.sample_shape, gens).to(device) if eta > 0 else None
                z = ddim_step(z0, eps, a, s, a_n, s_n, eta=eta, noise=noise)
                if rule == "output":
                    z = z - grad
                z = z.detach()
        with torch.no_grad():
            images = self.decode(z).float().clamp(-1, 1).cpu()
        seconds = time.perf_counter() - start
        return InverseProblemOutput(images, z.cpu(), self.nfe, seconds, torch.stack(norms))

    # -- the methods --------------------------------------------------------------------------------------------

    def _check_problem(self, operator: Any, measurement: Any) -> int:
        if not isinstance(operator, MeasurementOperator):
            raise TypeError(f"operator must be a MeasurementOperator, got {type(operator).__name__}")
        operator.check_measurement(measurement, self.image_shape, "measurement")
        return measurement.shape[0]

    def _need_vae(self, method: str) -> None:
        if self.vae is None:
            raise ValueError(
                f"{method} is a latent method and needs a pipeline with a VAE (vae=None here); use dps for a pixel "
                "model, or vae=IdentityAutoencoder() to run it in pixel space"
            )

    def _data_fit(self, operator: MeasurementOperator, y: torch.Tensor, omega: float, gamma: float) -> GuidanceLoss:
        """PSLD's loss (DPS's when ``gamma = 0``), per sample."""

        def loss(zt: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor, step: GuidanceStep) -> torch.Tensor:
            x0 = self.decode(z0).float()
            target = y.to(x0)
            value = omega * _per_sample_norm(target - operator(x0))
            if gamma > 0:
                glued = self.encode(operator.project(x0, target)).float()
                value = value + gamma * _per_sample_norm(z0 - glued)
            return value

        return loss

    def dps(
        self,
        operator: MeasurementOperator,
        measurement: torch.Tensor,
        num_inference_steps: int = 1000,
        scale: float = 0.5,
        eta: float = 1.0,
        generator: Any = None,
        latents: torch.Tensor | None = None,
    ) -> InverseProblemOutput:
        """DPS (Chung et al. 2023, arXiv 2209.14687, Alg. 1): ``z_next = DDPM(z_t) - scale grad ||y - A D(z0_hat)||``.

        Args:
            operator (`MeasurementOperator`): ``A``.
            measurement (`torch.Tensor`): ``y``, `(B, ...)` as ``operator`` maps the decoded images.
            num_inference_steps (`int`, defaults to 1000): reverse steps (= model calls); DPS uses 1000.
            scale (`float`, defaults to 0.5): ``zeta``; the official configs use 0.5 (inpainting) and 0.3 (SR, blur).
            eta (`float`, defaults to 1): 1 = DPS's DDPM ancestral sampler, 0 = DDIM.
            generator (`torch.Generator` or list, *optional*): one per sample for batch-independent results.
            latents (`torch.Tensor`, *optional*): the start instead of a draw.
        """
        batch = self._check_problem(operator, measurement)
        scale = _check_weight(scale, "scale")
        return self.guided_sample(self._data_fit(operator, measurement, scale, 0.0), batch, num_inference_steps,
                                  eta=eta, generator=generator, latents=latents)

    def psld(
        self,
        operator: MeasurementOperator,
        measurement: torch.Tensor,
        num_inference_steps: int = 1000,
        omega: float = 1.0,
        gamma: float = 0.1,
        eta: float = 0.0,
        generator: Any = None,
        latents: torch.Tensor | None = None,
    ) -> InverseProblemOutput:
        """PSLD (Rout et al. 2023, arXiv 2307.00619, Alg. 2): DDIM plus the gradient of
        ``omega ||y - A D(z0_hat)|| + gamma ||z0_hat - E(A^T y + (I - A^T A) D(z0_hat))||``.

        Args:
            operator (`MeasurementOperator`): ``A``, on decoded images.
            measurement (`torch.Tensor`): ``y``.
            num_inference_steps (`int`, defaults to 1000): DDIM steps (= model calls); PSLD uses 1000.
            omega (`float`, defaults to 1): data-fit weight (official defaults 1; 0.1 box inpainting; 0.9 SR on LDM).
            gamma (`float`, defaults to 0.1): gluing weight (0.01 box inpainting); 0 gives latent DPS.
            eta (`float`, defaults to 0): DDIM stochasticity.
            generator (`torch.Generator` or list, *optional*): one per sample for batch-independent results.
            latents (`torch.Tensor`, *optional*): the start instead of a draw.
        """
        self._need_vae("psld")
        batch = self._check_problem(operator, measurement)
        loss = self._data_fit(operator, measurement, _check_weight(omega, "omega"), _check_weight(gamma, "gamma"))
        return self.guided_sample(loss, batch, num_inference_steps, eta=eta, generator=generator, latents=latents)

    def stsl(
        self,
        operator: MeasurementOperator,
        measurement: torch.Tensor,
        num_inference_steps: int = 100,
        omega: float = 1.0,
        gamma: float = 0.1,
        rho: float = 0.01,
        probes: int = 1,
        fd_step: float = 1e-3,
        scheme: str = "forward",
        inner_steps: int = 1,
        eta: float = 0.0,
        generator: Any = None,
        latents: torch.Tensor | None = None,
    ) -> InverseProblemOutput:
        """STSL, **reconstructed** (Rout et al. 2024, arXiv 2312.00852; no code was released): PSLD's loss plus
        ``rho * tr Cov[z0 | z_t] / D``, the second-order Tweedie posterior variance
        ``(s^2 / a^2) (1 - s div eps_hat / D)`` with a Hutchinson estimate of the divergence
        (:func:`~diffsamplers.pipelines.stsl.divergence`). Its gradient adds the drift ``-grad tr Hessian log p_t``
        (scaled), pushing ``z_t`` towards lower posterior uncertainty. Each unverified choice is an argument.

        Model calls per step: ``inner_steps * (1 + probes)`` for ``"forward"``, ``inner_steps * (1 + 2 probes)``
        for ``"central"``, ``inner_steps`` for ``"vjp"`` (then a double backward). ``rho = 0`` is exactly PSLD (or
        latent DPS with ``gamma = 0``) and makes no extra calls.

        Args:
            operator (`MeasurementOperator`): ``A``, on decoded images.
            measurement (`torch.Tensor`): ``y``.
            num_inference_steps (`int`, defaults to 100): DDIM steps.
            omega (`float`, defaults to 1): data-fit weight.
            gamma (`float`, defaults to 0.1): PSLD gluing weight (0: no encoder pass).
            rho (`float`, defaults to 0.01): weight of the posterior-variance term (unverified; tune it).
            probes (`int`, defaults to 1): Hutchinson probes per evaluation.
            fd_step (`float`, defaults to 1e-3): relative finite-difference step.
            scheme (`str`, defaults to `"forward"`): ``"forward"``, ``"central"`` or ``"vjp"`` (exact per probe and
                no extra model calls, but a double backward through the denoiser: attention then runs on the math
                kernel, which is slower and uses more memory).
            inner_steps (`int`, defaults to 1): loss evaluations (gradient steps) per reverse step.
            eta (`float`, defaults to 0): DDIM stochasticity.
            generator (`torch.Generator` or list, *optional*): also seeds the probes.
            latents (`torch.Tensor`, *optional*): the start instead of a draw.
        """
        self._need_vae("stsl")
        batch = self._check_problem(operator, measurement)
        rho = _check_weight(rho, "rho")
        _check_int(probes, "probes")
        if scheme not in FD_SCHEMES:
            raise ValueError(f"scheme must be one of {FD_SCHEMES}, got {scheme!r}")
        if not fd_step > 0:
            raise ValueError(f"fd_step must be positive, got {fd_step!r}")
        data_fit = self._data_fit(operator, measurement, _check_weight(omega, "omega"), _check_weight(gamma, "gamma"))
        dim = int(torch.tensor(self.sample_shape).prod())

        def loss(zt: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor, step: GuidanceStep) -> torch.Tensor:
            value = data_fit(zt, z0, eps, step)
            if rho == 0:
                return value
            div, _ = divergence(step.noise_prediction, zt, out=eps, probes=probes, fd_step=fd_step, scheme=scheme,
                                generator=step.generator)
            return value, rho * tweedie_variance(div, step.alpha, step.sigma, dim)

        # the exact VJP differentiates the denoiser twice; the fused CPU/GPU attention kernels have no double
        # backward, the math kernel has
        kernels = sdpa_kernel(SDPBackend.MATH) if scheme == "vjp" and rho > 0 else contextlib.nullcontext()
        with kernels:
            return self.guided_sample(loss, batch, num_inference_steps, eta=eta, inner_steps=inner_steps,
                                      generator=generator, latents=latents)
