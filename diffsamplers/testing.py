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
