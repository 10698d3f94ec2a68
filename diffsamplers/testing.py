# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Tiny diffusers pipelines built from configs with random weights: plumbing tests with no download.

Each builder seeds torch before creating weights, so two calls give identical pipelines. Sizes follow diffusers'
own fast tests (tests/pipelines/*), cut down further so an end-to-end run takes well under a second on a CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from .schedule import edm_preconditioning


def tiny_unet_pipeline(scheduler: Any = None, sample_size: int = 8, channels: int = 3):
    """A ``DDIMPipeline`` over a random ``UNet2DModel`` (epsilon prediction). Pass ``scheduler`` to swap it in after
    construction (``DDIMPipeline`` itself converts whatever it is given to DDIM)."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_tiny_clip_tokenizer(directory: str) -> str:
    """Write a CLIP BPE tokenizer with a 40-token vocabulary (letters, the special tokens) to ``directory``."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return directory


def tiny_clip_tokenizer():
    """A ``CLIPTokenizer`` built from a tiny local vocabulary (no download)."""
    from transformers import CLIPTokenizer

    directory = write_tiny_clip_tokenizer(tempfile.mkdtemp(prefix="tiny-clip-"))
    return CLIPTokenizer(
        os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"), model_max_length=77
    )


def tiny_stable_diffusion_pipeline(scheduler: Any = None, prediction_type: str = "epsilon"):
    """A ``StableDiffusionPipeline`` of random tiny components (UNet2DConditionModel, AutoencoderKL, CLIP text
    encoder, tiny local tokenizer); 16x16 latents give 32x32 images at ``height=width=32``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=16,
            intermediate_size=24,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=64,
            max_position_embeddings=77,
        )
    )
    base = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        scheduler=scheduler if scheduler is not None else base,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_tiny_stable_diffusion(pipe, num_inference_steps: int = 4, guidance_scale: float = 7.5, seed: int = 0):
    """One 32x32 image from :func:`tiny_stable_diffusion_pipeline` with classifier-free guidance, from random
    ``prompt_embeds`` (zero negative embeddings) and a seeded generator; returns the numpy image batch."""
    embeds = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(seed))
    return pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


def tiny_flow_pipeline(scheduler: Any = None, shift: float = 3.0):
    """A flow-matching ``StableDiffusion3Pipeline`` with a tiny ``SD3Transformer2DModel`` and VAE and no text
    encoders: call it with ``prompt_embeds`` and ``pooled_prompt_embeds`` (see :func:`tiny_flow_embeddings`)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flow_embeddings(batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``prompt_embeds``/``pooled_prompt_embeds`` (and negatives) for :func:`tiny_flow_pipeline`."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, 4, 16, generator=g),
        pooled_prompt_embeds=torch.randn(batch, 16, generator=g),
        negative_prompt_embeds=torch.randn(batch, 4, 16, generator=g),
        negative_pooled_prompt_embeds=torch.randn(batch, 16, generator=g),
    )


class EDMPreconditionedGMM(torch.nn.Module):
    """An exact EDM network for tests: the raw output ``F`` of a :class:`~diffsamplers.models.GaussianMixtureModel`
    behind EDM's preconditioning (Karras et al. 2022, Table 1), as ``EDMEulerScheduler``-style schedulers expect.

    Called like a diffusers UNet, ``model(c_in * x, c_noise).sample``, it reads ``sigma = exp(4 c_noise)`` from the
    timestep, undoes ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` and returns the ``F`` for which ``c_skip x + c_out F``
    is the mixture's exact posterior mean ``E[x0 | x0 + sigma eps = x]``. A scheduler that forms ``c_in`` and
    ``c_out`` from its own float32 sigma (as diffusers' EDM schedulers do) then sees the exact denoiser up to that
    sigma's rounding (relative ~1e-7).

    Args:
        mixture (`GaussianMixtureModel`): the testbed (any scheduler config: only ``posterior`` is used).
        sigma_data (`float`, defaults to 0.5): EDM's data standard deviation.
        prediction_type (`str`, defaults to `"epsilon"`): ``"epsilon"`` or ``"v_prediction"`` (the sign of ``c_out``).
    """

    def __init__(self, mixture: Any, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.mixture, self.sigma_data, self.prediction_type = mixture, float(sigma_data), prediction_type
        self.config, self.shape = mixture.config, mixture.shape
        self.num_calls = 0  # model evaluations since construction

    @property
    def dtype(self) -> torch.dtype:
        return self.mixture.dtype

    @property
    def device(self) -> torch.device:
        return self.mixture.device

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """The exact ``D(x; sigma)`` for unscaled samples ``x`` (B, ...) and per-sample float64 ``sigma`` (B,)."""
        flat = x.detach().to(torch.float64).reshape(x.shape[0], -1)
        x0 = self.mixture.posterior_mean(flat, torch.ones_like(sigma), sigma, classes)
        return x0.reshape(x.shape)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: Any = None,
        class_labels: Any = None,
        return_dict: bool = True,
        **unused: Any,
    ):
        from types import SimpleNamespace

        self.num_calls += 1
        batch = sample.shape[0]
        t = torch.as_tensor(timestep).detach().to(torch.float64).cpu().reshape(-1).expand(batch)
        sigma = torch.exp(4.0 * t)  # EDM's c_noise = log(sigma) / 4
        shape = (-1,) + (1,) * (sample.ndim - 1)
        levels = edm_preconditioning(sigma, self.sigma_data, self.prediction_type)
        c_in, c_skip, c_out = (c.reshape(shape) for c in levels)
        x = sample.detach().to(torch.float64).cpu() / c_in  # undo c_in
        classes = self.mixture._classes(batch, encoder_hidden_states, class_labels)
        out = ((self.denoise(x, sigma, classes) - c_skip * x) / c_out).to(sample.device, sample.dtype)
        return SimpleNamespace(sample=out) if return_dict else (out,)


def small_mixture(config: dict | None = None, prediction_type: str = "epsilon"):
    """A Gaussian-mixture testbed of six separated isotropic components in 16 dimensions (1 x 4 x 4): exact ODE
    references solve in milliseconds, for tests of fitted solvers (``config`` defaults to the testbed's)."""
    from .eval.testbed import TESTBED_CONFIG
    from .models import GaussianMixtureModel

    g = torch.Generator().manual_seed(0)
    means = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    stds = 0.05 + 0.25 * torch.rand(6, generator=g, dtype=torch.float64)
    return GaussianMixtureModel(means, stds, scheduler_config=config or TESTBED_CONFIG,
                                prediction_type=prediction_type)


def small_fit_model(name: str = "testbed:small"):
    """:func:`small_mixture` as the fitting core's ``FitModel``, with its exact references (float64)."""
    from .eval.testbed import TESTBED_CONFIG
    from .train.bank import FitModel

    gmm = small_mixture()
    return FitModel(gmm, dict(TESTBED_CONFIG), gmm.shape, name, exact=gmm, dtype=torch.float64)


def float64_ddim(config: dict, steps: int):
    """``DDIMScheduler`` on ``config`` at ``steps`` with float64 tables: an exact reference for the DDIM reductions
    of the fitted solvers (diffusers keeps ``alphas_cumprod`` in float32)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(steps)
    ddim.alphas_cumprod = ddim.alphas_cumprod.double()
    ddim.final_alpha_cumprod = ddim.final_alpha_cumprod.double()
    return ddim


def ddim_reference(config: dict, model: Any, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The float64 DDIM (``eta = 0``) solve from ``x_T`` with ``model(x, t) -> output``."""
    ddim = float64_ddim(config, steps)
    x = x_T.clone()
    for t in ddim.timesteps:
        x = ddim.step(model(x, t), t, x).prev_sample
    return x

