# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Inversion and editing on diffusers pipelines: DDIM, BDIA, EDICT and POLARIS behind one API.

``invert(pipe, images, method=..., num_inference_steps=..., guidance_scale=..., <condition>)`` encodes the images
with the VAE's posterior mean and runs the deterministic sampler backwards to noise; ``reconstruct(pipe, inv)``
regenerates from that noise with the same condition and per-step guidance, ``edit(pipe, inv, <new condition>)``
with another. Methods:

* ``"ddim"``: DDIM inversion, the approximate baseline (null-text inversion's definition, Mokady et al. 2023,
  arXiv 2211.09794, Sec. 3.1). VP models use diffusers' ``DDIMInverseScheduler`` and regenerate with
  ``DDIMScheduler``, as diffusers users run it. Its convention: ``step(out, t, z)`` moves ``z`` from level
  ``t - T // N`` to level ``t``, and the model is called at the destination label ``t`` on a latent still at the
  source level, one grid entry off from the label sampling later uses there (the origin-destination discrepancy
  its PR #3865 shifted the timesteps for). Flow models (SD3-style) get plain Euler inversion with the same
  destination-label convention.
* ``"bdia"``: BDIA-DDIM exact inversion (Zhang, Lewis & Kleijn, arXiv 2307.10829; official code
  https://github.com/guoqiang-zhang-x/BDIA, ``image-editing/bdia_edict_functions.py``): one DDIM inversion step from
  the clean latent, then :meth:`~diffsamplers.BDIAScheduler.inverse_step`; the result is the pair
  ``(z_N, z_{N-1})``, regenerated through :meth:`~diffsamplers.BDIAScheduler.set_inversion_pair`. Exact at any
  guidance (the same guided output in both directions), on VP and flow configs; same cost as DDIM.
* ``"edict"``: EDICT's coupled exact inversion (:mod:`.edict`), twice DDIM's model calls.
* ``"polaris"``: the per-step scale of POLARIS (:mod:`.polaris`) during a DDIM (``polaris_backend="ddim"``) or
  BDIA (``"bdia"``) inversion, stored by timestep and replayed in :func:`reconstruct`; with BDIA it stays exact.

All methods share one grid: the pipeline's ``timestep_spacing`` if it is ``"leading"`` or ``"trailing"``, else
``"trailing"`` (``DDIMInverseScheduler`` has no ``"linspace"``), for VP configs; the ``FlowMatchEulerDiscrete``
sigmas for flow configs. The denoiser runs in ``dtype`` (float64 by default, as the official BDIA and EDICT code
run: exactness needs it); it is cast for the call and cast back, losslessly.

Supported pipelines: ``DiTPipeline`` (``class_labels``; CFG against the null class
``transformer.config.num_embeds_ada_norm``, which ``DiTPipeline`` hard-codes as 1000), Stable Diffusion-style
pipelines with a ``UNet2DConditionModel`` and ``encode_prompt`` (``prompt`` / ``negative_prompt`` or
``prompt_embeds`` / ``negative_prompt_embeds``), SDXL-style ones (a ``"text_time"`` UNet: also ``prompt_2`` /
``negative_prompt_2`` or ``pooled_prompt_embeds`` / ``negative_pooled_prompt_embeds``), and SD3-style flow pipelines
with an ``SD3Transformer2DModel`` (prompts or the four embeddings). Flux-style pipelines (packed latents, an
embedded guidance scale) are not supported.
"""

from __future__ import annotations

import abc
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..samplers.bdia import BDIAScheduler
from ..schedule import config_family, ddim_step, to_x0_eps
from ._guidance import ConstantGuidance, ReplayGuidance
from .edict import EDICT_MIX, edict_generate, edict_invert
from .polaris import DEN_EPS, OMEGA_MAX, OMEGA_MIN, PolarisGuidance

__all__ = ["Inversion", "decode_images", "edit", "encode_images", "invert", "reconstruct"]

METHODS = ("ddim", "bdia", "edict", "polaris")
_RANGE_TOL = 1e-3  # images a resampling left slightly outside [-1, 1] are accepted
POLARIS_BACKENDS = ("ddim", "bdia")


# ---------------------------------------------------------------------------------------------------------------
# pipeline adapters: the condition, one (unconditional, conditional) model evaluation, the VAE
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Condition:
    """A prepared condition: what the denoiser takes for the conditional and the unconditional pass."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    given: dict[str, Any]  # the arguments as the caller gave them (for the record)

    def batched(self, with_uncond: bool) -> dict[str, torch.Tensor]:
        if not with_uncond:
            return self.cond
        return {k: torch.cat([self.cond[k], self.uncond[k]]) for k in self.cond}


class _Adapter(abc.ABC):
    """What the inversion loops need from one pipeline family."""

    condition_names: tuple[str, ...] = ()
    denoiser_name = ""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.denoiser = getattr(pipe, self.denoiser_name)
        self.vae = pipe.vae
        self.model_calls = 0  # denoiser passes per sample since the last reset (a CFG evaluation counts 2)

    # -- the VAE ------------------------------------------------------------------------------------------------

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_image_size(self, height: int, width: int) -> None:
        f = self.vae_scale()
        if height % f or width % f:
            raise ValueError(f"images must have a height and width divisible by {f}, got {height}x{width}")

    def check_latent_size(self, height: int, width: int) -> None:
        """Latent sizes the denoiser takes (any, unless the model fixes it)."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        mean = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean  # the posterior mean, not a draw
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (mean - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
        return vae.decode(z).sample

    # -- the denoiser -------------------------------------------------------------------------------------------

    def condition(self, given: dict[str, Any], latents: torch.Tensor, dtype: torch.dtype) -> _Condition:
        """The checked condition for ``latents`` (one entry per latent, or one broadcast to all)."""
        unknown = sorted(set(given) - set(self.condition_names))
        if unknown:
            raise TypeError(
                f"{type(self.pipe).__name__} takes its condition as {', '.join(self.condition_names)}; it cannot "
                f"take {', '.join(unknown)}"
            )
        given = {k: v for k, v in given.items() if v is not None}
        return self._condition(given, latents.shape[0], dtype, tuple(latents.shape[2:]))

    @abc.abstractmethod
    def _condition(self, given: dict[str, Any], batch_size: int, dtype: torch.dtype,
                   latent_size: tuple[int, int]) -> _Condition:
        """The checked condition, broadcast to ``batch_size`` and in ``dtype``."""

    @abc.abstractmethod
    def _call(self, latents: torch.Tensor, timesteps: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One denoiser pass on ``latents`` with the (batched) condition ``inputs``."""

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, timestep: Any, condition: _Condition, with_uncond: bool):
        """``(u, c)``: the unconditional (``None`` unless ``with_uncond``) and conditional outputs at ``latents``,
        from one batched pass as the pipelines make it (conditional half first)."""
        batch = latents.shape[0]
        x = torch.cat([latents, latents]) if with_uncond else latents
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(x.shape[0])
        out = self._call(x.to(self.denoiser.dtype), t, condition.batched(with_uncond))
        out = out[:, : self.latent_channels].to(latents.dtype)  # learned-variance models also output a variance
        self.model_calls += 2 if with_uncond else 1
        return (out[batch:], out[:batch]) if with_uncond else (None, out)


def _broadcast(value: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    if value.shape[0] == batch_size:
        return value
    if value.shape[0] == 1:
        return value.expand(batch_size, *value.shape[1:])
    raise ValueError(f"{name} must have 1 or {batch_size} (the number of images) entries, got {value.shape[0]}")


_POOLED_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def _check_pooled_condition(pipe: Any, given: dict[str, Any], encoders: tuple[str, ...]) -> bool:
    """Checks of a condition with pooled embeddings (SDXL, SD3): a prompt (which needs the text encoders) or
    the embeddings; returns whether the pipeline has a text encoder."""
    has_encoder = any(getattr(pipe, name, None) is not None for name in encoders)
    if "prompt" in given and "prompt_embeds" in given:
        raise ValueError("give prompt or prompt_embeds, not both")
    if "prompt" not in given:
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            if name not in given:
                raise ValueError(f"{name} must be given when prompt is not ({type(pipe).__name__})")
    elif not has_encoder:
        raise ValueError("prompt needs the pipeline's text encoders, which are None: pass prompt_embeds")
    return has_encoder


def _pooled_embeddings(embeds: Any, batch_size: int, device: Any, dtype: torch.dtype) -> list[torch.Tensor]:
    """``(prompt, negative, pooled, negative pooled)`` embeddings, broadcast to the batch, on the denoiser."""
    return [_broadcast(e.to(device, dtype), batch_size, name) for e, name in zip(embeds, _POOLED_NAMES)]


class _DiTAdapter(_Adapter):
    condition_names = ("class_labels",)
    denoiser_name = "transformer"

    def check_latent_size(self, height: int, width: int) -> None:
        size = int(self.denoiser.config.sample_size)
        if (height, width) != (size, size):
            raise ValueError(
                f"the DiT takes {size}x{size} latents ({size * self.vae_scale()}x{size * self.vae_scale()} images), "
                f"got {height}x{width} latents"
            )

    def check_image_size(self, height: int, width: int) -> None:
        super().check_image_size(height, width)
        f = self.vae_scale()
        self.check_latent_size(height // f, width // f)

    def _condition(self, given: dict[str, Any], batch_size: int, dtype: torch.dtype,
                   latent_size: tuple[int, int]) -> _Condition:
        if "class_labels" not in given:
            raise ValueError("class_labels must be given for a DiTPipeline (one class per image, or one for all)")
        labels = given["class_labels"]
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels = [labels]
        if isinstance(labels, torch.Tensor):
            labels = labels.reshape(-1).tolist()
        null = int(self.denoiser.config.num_embeds_ada_norm)
        if (
            not isinstance(labels, (list, tuple))
            or not labels
            or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < null for c in labels)
        ):
            raise ValueError(f"class_labels must be ints in 0..{null - 1} (one per image, or one), got {labels!r}")
        device = self.denoiser.device
        cond = _broadcast(torch.tensor(labels, device=device), batch_size, "class_labels")
        return _Condition({"class_labels": cond}, {"class_labels": torch.full_like(cond, null)},
                          {"class_labels": list(labels)})

    def _call(self, latents, timesteps, inputs):
        return self.denoiser(latents, timestep=timesteps, class_labels=inputs["class_labels"]).sample


class _StableDiffusionAdapter(_Adapter):
    condition_names = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds")
    denoiser_name = "unet"

    def check_latent_size(self, height: int, width: int) -> None:
        f = 2 ** (len(self.denoiser.config.block_out_channels) - 1)
        if height % f or width % f:
            raise ValueError(f"the UNet takes latents with a height and width divisible by {f}, got {height}x{width}")

    def check_image_size(self, height: int, width: int) -> None:
        super().check_image_size(height, width)
        self.check_latent_size(height // self.vae_scale(), width // self.vae_scale())

    def _condition(self, given: dict[str, Any], batch_size: int, dtype: torch.dtype,
                   latent_size: tuple[int, int]) -> _Condition:
        if "prompt" not in given and "prompt_embeds" not in given:
            raise ValueError(f"{type(self.pipe).__name__} needs prompt or prompt_embeds as its condition")
        if "prompt" in given and "prompt_embeds" in given:
            raise ValueError("give prompt or prompt_embeds, not both")
        pipe, device = self.pipe, self.denoiser.device
        if "prompt" in given and getattr(pipe, "text_encoder", None) is None:
            raise ValueError("prompt needs the pipeline's text encoder, which is None: pass prompt_embeds")
        cond, uncond = pipe.encode_prompt(
            given.get("prompt"), device, 1, True, given.get("negative_prompt"),
            prompt_embeds=given.get("prompt_embeds"), negative_prompt_embeds=given.get("negative_prompt_embeds"),
        )
        name = "prompt_embeds" if "prompt_embeds" in given else "prompt"
        cond, uncond = _broadcast(cond, batch_size, name), _broadcast(uncond, batch_size, "negative_prompt_embeds")
        return _Condition({"encoder_hidden_states": cond.to(dtype)}, {"encoder_hidden_states": uncond.to(dtype)},
                          dict(given))

    def _call(self, latents, timesteps, inputs):
        return self.denoiser(latents, timesteps, encoder_hidden_states=inputs["encoder_hidden_states"]).sample


class _StableDiffusionXLAdapter(_StableDiffusionAdapter):
    """SDXL-style UNets (``addition_embed_type="text_time"``): the pooled text embedding and the size/crop time ids
    (``original_size = target_size`` = the image's size, no crop) go in ``added_cond_kwargs``, as the pipeline
    builds them."""

    condition_names = _StableDiffusionAdapter.condition_names + (
        "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
    )

    def _condition(self, given: dict[str, Any], batch_size: int, dtype: torch.dtype,
                   latent_size: tuple[int, int]) -> _Condition:
        pipe, device = self.pipe, self.denoiser.device
        _check_pooled_condition(pipe, given, ("text_encoder", "text_encoder_2"))
        embeds = pipe.encode_prompt(
            prompt=given.get("prompt"), prompt_2=given.get("prompt_2"), device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=given.get("negative_prompt"),
            negative_prompt_2=given.get("negative_prompt_2"), prompt_embeds=given.get("prompt_embeds"),
            negative_prompt_embeds=given.get("negative_prompt_embeds"),
            pooled_prompt_embeds=given.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=given.get("negative_pooled_prompt_embeds"),
        )
        pe, npe, pooled, npooled = _pooled_embeddings(embeds, batch_size, device, dtype)
        size = (latent_size[0] * self.vae_scale(), latent_size[1] * self.vae_scale())
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype,
                                          text_encoder_projection_dim=int(pooled.shape[-1]))
        time_ids = time_ids.to(device).repeat(batch_size, 1)
        return _Condition({"encoder_hidden_states": pe, "text_embeds": pooled, "time_ids": time_ids},
                          {"encoder_hidden_states": npe, "text_embeds": npooled, "time_ids": time_ids}, dict(given))

    def _call(self, latents, timesteps, inputs):
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        return self.denoiser(latents, timesteps, encoder_hidden_states=inputs["encoder_hidden_states"],
                             added_cond_kwargs=added).sample


class _SD3Adapter(_Adapter):
    condition_names = (
        "prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    denoiser_name = "transformer"

    def _condition(self, given: dict[str, Any], batch_size: int, dtype: torch.dtype,
                   latent_size: tuple[int, int]) -> _Condition:
        pipe, device = self.pipe, self.denoiser.device
        if not _check_pooled_condition(pipe, given, ("text_encoder", "text_encoder_2", "text_encoder_3")):
            for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
                if name not in given:
                    raise ValueError(f"{name} must be given: this pipeline has no text encoder to encode ''")
            embeds = [given[k] for k in _POOLED_NAMES]
        else:
            prompt = given.get("prompt")
            embeds = pipe.encode_prompt(
                prompt=prompt, prompt_2=prompt, prompt_3=prompt, device=device, do_classifier_free_guidance=True,
                negative_prompt=given.get("negative_prompt"), prompt_embeds=given.get("prompt_embeds"),
                negative_prompt_embeds=given.get("negative_prompt_embeds"),
                pooled_prompt_embeds=given.get("pooled_prompt_embeds"),
                negative_pooled_prompt_embeds=given.get("negative_pooled_prompt_embeds"),
            )
        pe, npe, pooled, npooled = _pooled_embeddings(embeds, batch_size, device, dtype)
        return _Condition({"encoder_hidden_states": pe, "pooled_projections": pooled},
                          {"encoder_hidden_states": npe, "pooled_projections": npooled}, dict(given))

    def _call(self, latents, timesteps, inputs):
        return self.denoiser(hidden_states=latents, timestep=timesteps, **inputs).sample


def _adapter(pipe: Any) -> _Adapter:
    transformer = getattr(pipe, "transformer", None)
    unet = getattr(pipe, "unet", None)
    kind = type(transformer).__name__ if transformer is not None else type(unet).__name__
    if getattr(pipe, "vae", None) is None or getattr(pipe, "scheduler", None) is None:
        raise TypeError(
            f"pipe must be a latent diffusers pipeline with a vae and a scheduler, got {type(pipe).__name__}"
        )
    if kind == "DiTTransformer2DModel":
        return _DiTAdapter(pipe)
    if kind == "SD3Transformer2DModel":
        return _SD3Adapter(pipe)
    if kind == "UNet2DConditionModel" and hasattr(pipe, "encode_prompt"):
        added = unet.config.addition_embed_type
        if added == "text_time" and hasattr(pipe, "_get_add_time_ids"):
            return _StableDiffusionXLAdapter(pipe)
        if added is not None:
            raise TypeError(
                f"pipe: {type(pipe).__name__} needs added conditions of type {added!r}; supported are DiTPipeline, "
                "Stable Diffusion, SDXL and SD3-style pipelines"
            )
        return _StableDiffusionAdapter(pipe)
    raise TypeError(
        f"pipe: {type(pipe).__name__} (denoiser {kind}) is not supported; supported are DiTPipeline, "
        "Stable Diffusion- and SDXL-style (UNet2DConditionModel) and SD3-style (SD3Transformer2DModel) pipelines"
    )


@contextlib.contextmanager
def _denoiser_in(module: torch.nn.Module, dtype: torch.dtype):
    """Run ``module`` in ``dtype``, then give each parameter and buffer its own dtype back (a float32 or float16
    tensor survives the round trip through float64 unchanged)."""
    # tensor by tensor: ModelMixin.to(dtype) warns on every call, and buffers that are not floats stay as they are
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    original = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, d in zip(tensors, original):
            t.data = t.data.to(d)


# ---------------------------------------------------------------------------------------------------------------
# the record
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Inversion:
    """The result of :func:`invert`: everything :func:`reconstruct` and :func:`edit` need.

    Args:
        method (`str`): ``"ddim"``, ``"bdia"``, ``"edict"`` or ``"polaris"``.
        latents (`torch.Tensor`): the noise latent (``z_N``; EDICT's ``x_T``), in ``settings["dtype"]``.
        pair_latents (`torch.Tensor` or `None`): the second latent of the exact methods: BDIA's ``z_{N-1}``,
            EDICT's ``y_T`` (``None`` for DDIM and POLARIS-DDIM).
        timesteps (`torch.Tensor`): the timesteps the regeneration walks, in denoising (descending) order: the
            whole grid, or its last ``int(N * strength)`` entries.
        guidance_scales (`dict[float, torch.Tensor]`): the scale used at each timestep, keyed by timestep value,
            one entry per image (POLARIS's omega; the constant ``guidance_scale`` otherwise).
        source_latents (`torch.Tensor`): the clean latents that were inverted.
        condition (`dict`): the condition as given (``class_labels``, ``prompt``, ``prompt_embeds``, ...).
        settings (`dict`): ``num_inference_steps``, ``strength``, ``begin_index``, ``guidance_scale``, ``gamma``,
            ``edict_mix``,
            ``polaris_backend``, ``per_sample``, ``timestep_spacing``, ``dtype``, ``mu``, the pipeline class and
            ``uncond_pass`` (whether the unconditional output was computed: not at a constant scale of 1).
        model_calls (`int`): denoiser passes per image during inversion (a CFG evaluation counts 2).
        seconds (`float`): wall-clock time of the inversion (encoding included).
    """

    method: str
    latents: torch.Tensor
    pair_latents: torch.Tensor | None
    timesteps: torch.Tensor
    guidance_scales: dict[float, torch.Tensor]
    source_latents: torch.Tensor
    condition: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model_calls: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------------
# argument checks and the shared grid
# ---------------------------------------------------------------------------------------------------------------


def _scheduler_config(pipe: Any) -> dict[str, Any]:
    config = {"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
    family = config_family(config)
    if family == "ve":
        raise ValueError(
            f"pipe.scheduler: {config['_class_name']} is an EDM/VE schedule; inversion supports VP (DDIM, DDPM, "
            "DPMSolver, Euler, ...) and flow-matching (FlowMatchEulerDiscrete) schedulers"
        )
    if family == "vp" and config.get("prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"pipe.scheduler: prediction_type {config.get('prediction_type')!r} is not supported")
    return config


def _spacing(config: dict[str, Any]) -> str:
    spacing = config.get("timestep_spacing", "leading")
    return spacing if spacing in ("leading", "trailing") else "trailing"


def _grid(config: dict[str, Any], num_inference_steps: int, gamma: float, mu: float | None) -> BDIAScheduler:
    """The grid every method walks, as a :class:`BDIAScheduler` (its float64 level tables; BDIA steps with it)."""
    if config_family(config) == "flow":
        grid = BDIAScheduler.from_config(config, gamma=gamma)
    else:
        grid = BDIAScheduler.from_config(
            config, gamma=gamma, timestep_spacing=_spacing(config), use_karras_sigmas=False,
            clip_sample=bool(config.get("clip_sample", False)),
        )
    grid.set_timesteps(num_inference_steps, mu=mu)
    return grid


def _ddim_config(config: dict[str, Any]) -> dict[str, Any]:
    # diffusers' DDIM classes default to clip_sample=True, which would clamp latents: keep the pipeline's choice
    return dict(
        config, timestep_spacing=_spacing(config), clip_sample=bool(config.get("clip_sample", False)),
        set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
    )


def _check_number(value: Any, name: str, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"{name} must be a number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return float(value)


def _uses_bdia(method: str, backend: str) -> bool:
    return method == "bdia" or (method == "polaris" and backend == "bdia")


def _check_steps(num_inference_steps: Any, method: str, backend: str) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    least = 2 if _uses_bdia(method, backend) else 1  # BDIA's first inversion step is DDIM's
    if num_inference_steps < least:
        raise ValueError(f"num_inference_steps must be >= {least} for {method}, got {num_inference_steps}")
    return num_inference_steps


def _begin_index(num_inference_steps: int, strength: Any, method: str, backend: str) -> int:
    """The grid index partial inversion stops at (0 for a full inversion), as the official BDIA editing code's
    ``t_limit = N - int(N * strength)``."""
    strength = _check_number(strength, "strength")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    inverted = int(num_inference_steps * strength)
    least = 2 if _uses_bdia(method, backend) else 1
    if inverted < least:
        raise ValueError(
            f"strength {strength} inverts {inverted} of {num_inference_steps} steps; {method} needs at least {least}"
        )
    return num_inference_steps - inverted


def _prepare_latents(adapter: _Adapter, images_or_latents: Any, input_type: str, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(images_or_latents, torch.Tensor):
        raise TypeError(
            f"images_or_latents must be a torch.Tensor (B, C, H, W), got {type(images_or_latents).__name__}"
        )
    x = images_or_latents
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images_or_latents must have shape (B, C, H, W) with B >= 1, got {tuple(x.shape)}")
    if input_type not in ("auto", "image", "latent"):
        raise ValueError(f"input_type must be 'auto', 'image' or 'latent', got {input_type!r}")
    image_c, latent_c = adapter.image_channels, adapter.latent_channels
    if input_type == "auto":
        if image_c == latent_c:
            raise ValueError(f"input_type: images and latents both have {image_c} channels here; say which")
        input_type = "image" if x.shape[1] == image_c else "latent" if x.shape[1] == latent_c else "unknown"
    expected = image_c if input_type == "image" else latent_c
    if x.shape[1] != expected:
        raise ValueError(
            f"images_or_latents must have {image_c} channels (images) or {latent_c} (latents), got {x.shape[1]}"
        )
    if not x.is_floating_point():
        raise TypeError(f"images_or_latents must be a floating-point tensor, got {x.dtype}")
    if input_type == "image":
        adapter.check_image_size(x.shape[2], x.shape[3])
        lo, hi = float(x.min()), float(x.max())
        if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"images must be in [-1, 1] (the VAE's input range), got values in [{lo:.3g}, {hi:.3g}]")
        x = adapter.encode(x)
    else:
        adapter.check_latent_size(x.shape[2], x.shape[3])
    return x.to(adapter.denoiser.device, dtype)


# ---------------------------------------------------------------------------------------------------------------
# the loops
# ---------------------------------------------------------------------------------------------------------------


def _denoiser(adapter: _Adapter, condition: _Condition, guidance: Any):
    def denoise(latents: torch.Tensor, timestep: Any, record: bool = True) -> torch.Tensor:
        uncond, cond = adapter.forward(latents, timestep, condition, guidance.needs_uncond)
        return guidance(timestep, uncond, cond, record=record)

    return denoise


def _ddim_invert(config, grid, denoise, latents, begin):
    """Clean ``latents`` up to the level of ``grid.timesteps[begin]``."""
    if grid.is_flow:
        # plain Euler inversion, the model at the destination label as DDIMInverseScheduler's loops call it
        z = latents
        for index in range(len(grid.timesteps) - 1, begin - 1, -1):
            t = grid.timesteps[index]
            a_src, s_src = grid.alpha_next[index], grid.sigma_next[index]
            x0, eps = to_x0_eps(denoise(z, t), z, a_src, s_src, grid.config.prediction_type)
            z = ddim_step(x0, eps, a_src, s_src, grid.alpha_t[index], grid.sigma_t[index])
        return z
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(_ddim_config(config))
    inverse.set_timesteps(len(grid.timesteps))
    if not torch.equal(inverse.timesteps.flip(0).cpu(), grid.timesteps.cpu().long()):
        raise RuntimeError("DDIMInverseScheduler's grid differs from DDIM's")  # would misalign the recorded scales
    z = latents
    for t in inverse.timesteps[: len(grid.timesteps) - begin]:
        z = inverse.step(denoise(z, t), t, z).prev_sample
    return z


def _ddim_generate(config, grid, denoise, latents, begin):
    """Denoise ``latents`` from the level of ``grid.timesteps[begin]`` to clean."""
    z = latents
    if grid.is_flow:
        for index in range(begin, len(grid.timesteps)):
            t = grid.timesteps[index]
            a, s = grid.alpha_t[index], grid.sigma_t[index]
            x0, eps = to_x0_eps(denoise(z, t), z, a, s, grid.config.prediction_type)
            z = ddim_step(x0, eps, a, s, grid.alpha_next[index], grid.sigma_next[index])  # the Euler step
        return z
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(_ddim_config(config))
    scheduler.set_timesteps(len(grid.timesteps))
    for t in scheduler.timesteps[begin:]:
        z = scheduler.step(denoise(z, t), t, z, eta=0.0).prev_sample
    return z


def _bdia_invert(grid, denoise, latents, begin):
    """``z_0 ->`` the pair at ``grid.timesteps[begin]`` and ``[begin + 1]`` (``(z_N, z_{N-1})`` for ``begin = 0``):
    one DDIM inversion step with the output at ``(z_0, t_1)`` (the official code's start, at a label in the
    training range), then BDIA's exact inverse steps."""
    last = len(grid.timesteps) - 1
    t = grid.timesteps[last]
    a0, s0 = grid.alpha_next[last], grid.sigma_next[last]
    x0, eps = to_x0_eps(denoise(latents, t, record=False).double(), latents, a0, s0, grid.config.prediction_type)
    upper = ddim_step(x0, eps, a0, s0, grid.alpha_t[last], grid.sigma_t[last]).to(latents.dtype)
    lower = latents
    for index in range(last, begin, -1):
        t = grid.timesteps[index]
        upper, lower = grid.inverse_step(denoise(upper, t), t, upper, lower).upper_sample, upper
    return upper, lower


def _bdia_generate(grid, denoise, upper, lower, begin):
    grid.set_inversion_pair(upper, lower)
    grid.set_begin_index(begin + 1)  # start at the pair's lower state: no wasted model call
    z = lower
    for t in grid.timesteps[begin + 1 :]:
        z = grid.step(denoise(z, t), t, z).prev_sample
    return z


def _guidance_policy(method: str, guidance_scale: float, options: dict[str, Any]):
    if method != "polaris":
        return ConstantGuidance(guidance_scale)
    omega_init = options["omega_init"]
    return PolarisGuidance(
        omega_init=guidance_scale if omega_init is None else omega_init, omega_min=options["omega_min"],
        omega_max=options["omega_max"], den_eps=options["den_eps"], per_sample=options["per_sample"],
    )


def invert(
    pipe: Any,
    images_or_latents: torch.Tensor,
    *,
    method: Literal["ddim", "bdia", "edict", "polaris"] = "bdia",
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    input_type: Literal["auto", "image", "latent"] = "auto",
    gamma: float = 1.0,
    edict_mix: float = EDICT_MIX,
    polaris_backend: Literal["ddim", "bdia"] = "ddim",
    per_sample: bool = False,
    omega_init: float | None = None,
    omega_min: float = OMEGA_MIN,
    omega_max: float = OMEGA_MAX,
    den_eps: float = DEN_EPS,
    strength: float = 1.0,
    eta: float = 0.0,
    dtype: torch.dtype = torch.float64,
    mu: float | None = None,
    **condition: Any,
) -> Inversion:
    """Invert images (or clean latents) to noise with ``method``; see the module docstring for the methods.

    Args:
        pipe: a ``DiTPipeline``, a Stable Diffusion-, SDXL- or SD3-style pipeline (see the module docstring).
        images_or_latents (`torch.Tensor`): `(B, C, H, W)` images in ``[-1, 1]`` (encoded with the VAE's posterior
            mean) or clean latents (already scaled as the denoiser sees them).
        method (`str`, defaults to ``"bdia"``): ``"ddim"``, ``"bdia"``, ``"edict"`` or ``"polaris"``.
        num_inference_steps (`int`, defaults to 50): steps of the grid (BDIA needs at least 2).
        guidance_scale (`float`, defaults to 1.0): CFG scale at every step (1: conditional only); for POLARIS the
            scale of its first step and its fallback (``omega_init`` overrides it).
        input_type (`str`, defaults to ``"auto"``): ``"image"``, ``"latent"``, or decide by the channel count.
        gamma (`float`, defaults to 1.0): BDIA's weight (exact inversion wants it near 1; > 0).
        edict_mix (`float`, defaults to 0.93): EDICT's mixing weight ``p``.
        polaris_backend (`str`, defaults to ``"ddim"``): the inversion POLARIS guides, ``"ddim"`` or ``"bdia"``.
        per_sample (`bool`, defaults to `False`): POLARIS: one omega per image instead of one per batch.
        omega_init (`float`, *optional*): POLARIS's first-step and fallback scale (default: ``guidance_scale``;
            the official scripts use 1.0).
        omega_min (`float`, defaults to 0.0), omega_max (`float`, defaults to 15.0), den_eps (`float`, defaults to
            1e-6): POLARIS's clamp and denominator guard.
        strength (`float`, defaults to 1.0): the share of the grid to invert, from the clean end: the inversion
            stops at ``timesteps[N - int(N * strength)]`` and the regeneration starts there (partial inversion for
            editing, as the official BDIA editing code's ``init_image_strength``, 0.8 there). BDIA needs at least
            two of the steps.
        eta (`float`, defaults to 0.0): must be 0: a stochastic step cannot be inverted.
        dtype (`torch.dtype`, defaults to `torch.float64`): the dtype of the latents and of the denoiser during
            the run (exactness needs float64).
        mu (`float`, *optional*): the dynamic-shifting parameter of flow configs that use it.
        **condition: the pipeline's condition: ``class_labels`` (DiT), ``prompt`` / ``negative_prompt`` /
            ``prompt_embeds`` / ``negative_prompt_embeds`` (Stable Diffusion; SDXL and SD3 also
            ``pooled_prompt_embeds`` / ``negative_pooled_prompt_embeds``, SDXL ``prompt_2``), one per image or one
            for all.

    Returns:
        :class:`Inversion`.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if polaris_backend not in POLARIS_BACKENDS:
        raise ValueError(f"polaris_backend must be one of {POLARIS_BACKENDS}, got {polaris_backend!r}")
    if _check_number(eta, "eta") != 0.0:
        raise ValueError(f"eta must be 0: a stochastic step cannot be inverted, got eta={eta!r}")
    guidance_scale = _check_number(guidance_scale, "guidance_scale", low=0.0)
    num_inference_steps = _check_steps(num_inference_steps, method, polaris_backend)
    begin = _begin_index(num_inference_steps, strength, method, polaris_backend)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    uses_bdia = _uses_bdia(method, polaris_backend)
    if uses_bdia and not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma <= 1):
        raise ValueError(f"gamma must be a number in (0, 1] for BDIA inversion (it divides by gamma), got {gamma!r}")
    adapter = _adapter(pipe)
    config = _scheduler_config(pipe)
    options = dict(omega_init=omega_init, omega_min=omega_min, omega_max=omega_max, den_eps=den_eps,
                   per_sample=per_sample)
    guidance = _guidance_policy(method, guidance_scale, options)  # checks the POLARIS options
    latents = _prepare_latents(adapter, images_or_latents, input_type, dtype)
    batch = latents.shape[0]
    prepared = adapter.condition(condition, latents, dtype)
    grid = _grid(config, num_inference_steps, float(gamma) if uses_bdia else 1.0, mu)

    pair = None
    with _denoiser_in(adapter.denoiser, dtype):
        denoise = _denoiser(adapter, prepared, guidance)
        if uses_bdia:
            noise, pair = _bdia_invert(grid, denoise, latents, begin)
        elif method == "edict":
            noise, pair = edict_invert(denoise, grid, latents, edict_mix, begin)
        else:
            noise = _ddim_invert(config, grid, denoise, latents, begin)

    timesteps = grid.timesteps[begin:].clone()
    scales = guidance.scales if method == "polaris" else guidance.scales(timesteps, batch)
    settings = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, gamma=float(gamma),
        edict_mix=float(edict_mix), polaris_backend=polaris_backend,
        timestep_spacing=None if grid.is_flow else grid.config.timestep_spacing,
        strength=float(strength), begin_index=begin, dtype=dtype, mu=mu, pipeline=type(pipe).__name__,
        uncond_pass=guidance.needs_uncond, **options,
    )
    return Inversion(
        method=method, latents=noise, pair_latents=pair, timesteps=timesteps,
        guidance_scales=dict(scales), source_latents=latents, condition=prepared.given, settings=settings,
        model_calls=adapter.model_calls, seconds=time.perf_counter() - start,
    )


def _regenerate(pipe: Any, inversion: Inversion, condition: dict[str, Any], guidance: Any,
                output_type: str) -> torch.Tensor:
    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion must be an Inversion (from invert), got {type(inversion).__name__}")
    if output_type not in ("pt", "latent"):
        raise ValueError(f"output_type must be 'pt' (images in [-1, 1]) or 'latent', got {output_type!r}")
    adapter = _adapter(pipe)
    settings = inversion.settings
    if settings.get("pipeline") != type(pipe).__name__:
        raise ValueError(f"inversion was made with a {settings.get('pipeline')}, not this {type(pipe).__name__}")
    if inversion.latents.shape[1] != adapter.latent_channels:
        raise ValueError(f"inversion latents have {inversion.latents.shape[1]} channels; the denoiser takes "
                         f"{adapter.latent_channels}")
    adapter.check_latent_size(*inversion.latents.shape[2:])
    config = _scheduler_config(pipe)
    method, dtype = inversion.method, settings["dtype"]
    uses_bdia = _uses_bdia(method, settings["polaris_backend"])
    grid = _grid(config, settings["num_inference_steps"], settings["gamma"] if uses_bdia else 1.0, settings["mu"])
    begin = settings["begin_index"]
    if not torch.equal(grid.timesteps[begin:].cpu(), inversion.timesteps.cpu()):
        raise ValueError("pipe.scheduler's grid differs from the one the inversion was made on")
    latents = inversion.latents.to(adapter.denoiser.device, dtype)
    prepared = adapter.condition(condition, latents, dtype)
    pair = None if inversion.pair_latents is None else inversion.pair_latents.to(latents.device, dtype)
    with _denoiser_in(adapter.denoiser, dtype):
        denoise = _denoiser(adapter, prepared, guidance)
        if uses_bdia:
            out = _bdia_generate(grid, denoise, latents, pair, begin)
        elif method == "edict":
            out = edict_generate(denoise, grid, latents, pair, settings["edict_mix"], begin)[0]
        else:
            out = _ddim_generate(config, grid, denoise, latents, begin)
    return out if output_type == "latent" else adapter.decode(out)


def reconstruct(pipe: Any, inversion: Inversion, output_type: Literal["pt", "latent"] = "pt") -> torch.Tensor:
    """Regenerate the inverted images: the inversion's condition and per-step guidance (replayed by timestep).

    Args:
        pipe: the pipeline the inversion was made with.
        inversion (:class:`Inversion`): from :func:`invert`.
        output_type (`str`, defaults to ``"pt"``): ``"pt"`` for decoded images in ``[-1, 1]`` (unclamped),
            ``"latent"`` for the clean latents (in the inversion's dtype).
    """
    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion must be an Inversion (from invert), got {type(inversion).__name__}")
    guidance = ReplayGuidance(inversion.guidance_scales, inversion.settings.get("uncond_pass", True))
    return _regenerate(pipe, inversion, inversion.condition, guidance, output_type)


def edit(
    pipe: Any,
    inversion: Inversion,
    *,
    guidance_scale: float | None = None,
    output_type: Literal["pt", "latent"] = "pt",
    **condition: Any,
) -> torch.Tensor:
    """Regenerate from an inversion with a new condition (a class swap, another prompt).

    Args:
        pipe: the pipeline the inversion was made with.
        inversion (:class:`Inversion`): from :func:`invert`.
        guidance_scale (`float`, *optional*): a constant CFG scale for the edit; by default the inversion's
            per-step scales are replayed (POLARIS's omega, or the constant it was inverted with).
        output_type (`str`, defaults to ``"pt"``): ``"pt"`` (images in ``[-1, 1]``) or ``"latent"``.
        **condition: the new condition, in the pipeline's terms (``class_labels=[...]``, ``prompt=...``, ...).
    """
    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion must be an Inversion (from invert), got {type(inversion).__name__}")
    if not condition:
        raise ValueError("edit needs a new condition (class_labels, prompt, prompt_embeds, ...)")
    if guidance_scale is None:
        guidance = ReplayGuidance(inversion.guidance_scales, inversion.settings.get("uncond_pass", True))
    else:
        guidance = ConstantGuidance(_check_number(guidance_scale, "guidance_scale", low=0.0))
    return _regenerate(pipe, inversion, condition, guidance, output_type)


def encode_images(pipe: Any, images: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` to the float64 latents :func:`invert` starts from (the VAE's posterior mean, scaled
    and shifted as the pipeline's ``decode`` expects)."""
    return _prepare_latents(_adapter(pipe), images, "image", torch.float64)


def decode_images(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents (as :func:`invert` and :func:`reconstruct` give them) to images in ``[-1, 1]`` (unclamped)."""
    return _adapter(pipe).decode(latents)
