# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The second bundled model: a class-conditional latent diffusion model of scikit-learn's digits, with CFG.

Bundled as ``diffsamplers/models/bundled/digits-latent/``, a diffusers ``DiTPipeline`` folder (safetensors):

- ``vae/``: an ``AutoencoderKL`` (2 levels, f = 2, 4 latent channels, 0.66M parameters) trained on the digits
  upsampled (bilinear) from 8x8 to 16x16: a 16x16x1 image <-> an 8x8x4 latent. Why 16x16 and f = 2 rather than
  32x32 and f = 4 (which gives the same 8x8x4 latent): the digits hold only 8x8 pixels of information, and at 32x32
  a VAE step costs 3x as much on the CPU (0.74 s vs 0.24 s per batch of 64, one thread) for interpolated pixels.
  Four latent channels as in Stable Diffusion. ``scaling_factor`` is ``1 / std`` of the posterior means of the
  training images, as diffusers does for its VAEs (Rombach et al. 2022, arXiv 2112.10752, Sec. 4.3.2 and G).
- ``transformer/``: a ``DiTTransformer2DModel`` (Peebles & Xie 2023, arXiv 2212.09748; adaLN-Zero, patch 2, so
  16 tokens; 4 blocks of width 128, 1.9M parameters) predicting epsilon, class-conditional. Classifier-free
  guidance (Ho & Salimans 2022, arXiv 2207.12598): during training the label is replaced by the null class with
  probability 0.1. The null class is label 1000, not 10, because ``DiTPipeline`` hard-codes 1000 as its
  unconditional label (it was written for ImageNet); so the label table has 1001 rows of which 0..9 and 1000 are
  trained. The saved weights are the EMA of the training weights.
- ``scheduler/``: ``DPMSolverMultistepScheduler`` (DPM-Solver++(2M)) over the training schedule: 1000 steps, linear
  betas 1e-4 .. 0.02 (the DiT schedule), epsilon prediction, no sample clipping (latents are unbounded).

Use: ``pipe = load_digits_latent_pipeline(); pipe(class_labels=[3, 7], guidance_scale=DEFAULT_GUIDANCE_SCALE,
num_inference_steps=20, output_type="pt").images`` gives `(2, 1, 16, 16)` images in [0, 1].

Reproduce (CPU; writes to ``./digits-latent`` or ``--out``; ``--bundled`` overwrites the shipped weights on purpose):

    python -m diffsamplers.models.digits_latent train --threads 1
    python -m diffsamplers.models.digits_latent evaluate
    python -m diffsamplers.models.digits_latent samples --out docs/digits_latent_samples.png

Both stages train on the train split of :func:`~diffsamplers.models.digits.digits_split` (1347 images); the 450
held-out images measure the VAE round trip. An interrupted ``train`` continues with ``--resume`` from the stage's
checkpoint (safetensors, no pickle), as ``python -m diffsamplers.models.digits train`` does.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any

import torch
import torch.nn.functional as F

from .._io import atomic_write, read_json
from .digits import (
    BUNDLED_DIR,
    _require_out,
    _with_scheduler,
    classifier_accuracy,
    digits_split,
    fit_with_ema,
    image_grid,
    load_digits_classifier,
    load_digits_images,
)

LATENT_DIR = os.path.join(BUNDLED_DIR, "digits-latent")

IMAGE_SIZE = 16
LATENT_SIZE = 8
LATENT_CHANNELS = 4
NUM_CLASSES = 10
# DiTPipeline builds its unconditional batch with label 1000 whatever the model, so that is the null class
NULL_CLASS = 1000
CLASS_DROPOUT = 0.1
DEFAULT_GUIDANCE_SCALE = 3.0

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
}

# 4 blocks of width 128 cost 0.15 s per batch of 128 on one thread; 6 blocks cost 0.21 s
DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "num_layers": 4,
    "sample_size": LATENT_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NULL_CLASS,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
}

_STAGE_FILE = "vae-stage.json"


def training_noise_scheduler():
    """The forward process the denoiser is trained on: ``DDPMScheduler.add_noise`` over :data:`SCHEDULER_CONFIG`'s
    schedule. Not the pipeline's ``DPMSolverMultistepScheduler``: its ``add_noise`` before ``set_timesteps`` looks
    timesteps up in a descending grid but reads ``sigmas`` in ascending order, so it noises ``t`` at the level of
    ``999 - t`` (diffusers 0.42; the first attempt at this model trained on that and could not be guided)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("algorithm_type",
                                                                                              "solver_order")})


# ---------------------------------------------------------------------------------------------------------------
# data and models


def upsample_digits(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Bilinear upsampling of `(B, 1, 8, 8)` digits in [-1, 1] to `(B, 1, size, size)` (the VAE's input)."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)


def build_vae(seed: int = 0):
    """A freshly initialised ``AutoencoderKL`` with the bundled architecture (:data:`VAE_CONFIG`)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**VAE_CONFIG)


def build_transformer(seed: int = 0):
    """A freshly initialised ``DiTTransformer2DModel`` with the bundled architecture (:data:`DIT_CONFIG`)."""
    from diffusers import DiTTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiTTransformer2DModel(**DIT_CONFIG)


def downsample_digits(images: torch.Tensor) -> torch.Tensor:
    """`(B, 1, 16, 16)` images back to `(B, 1, 8, 8)` for the bundled classifier: the least-squares inverse of
    :func:`upsample_digits` (its pseudo-inverse), so an upsampled digit comes back exactly and a decoded one is
    projected onto the upsampled digits. The classifier's own antialiased resize loses 3 points of accuracy on the
    upsampled held-out digits (96.2% vs 99.1%), 2x2 averaging 1.3 points."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must have shape (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
    x = images.double().flatten(1) @ _upsampling_pinv().to(images.device)
    return x.view(-1, 1, 8, 8).to(images.dtype)


@functools.lru_cache(maxsize=1)
def _upsampling_pinv() -> torch.Tensor:
    basis = torch.eye(64).view(64, 1, 8, 8)
    up = upsample_digits(basis).double().flatten(1)  # (64, 256): row i = upsampled basis image i
    return torch.linalg.pinv(up)  # (256, 64)


@torch.no_grad()
def encode_digits(vae: Any, images: torch.Tensor, sample: bool = False, seed: int = 0,
                  batch_size: int = 256) -> torch.Tensor:
    """Scaled latents (``scaling_factor * z``) of 8x8 digits in [-1, 1], the space the denoiser works in.

    Args:
        vae (`AutoencoderKL`): the pipeline's VAE.
        images (`torch.Tensor`): `(B, 1, 8, 8)` digits (upsampled here) or `(B, 1, 16, 16)` VAE inputs.
        sample (`bool`, defaults to `False`): draw from the posterior (seeded) instead of taking its mean.
        seed (`int`, defaults to 0): seed of the posterior draw.
        batch_size (`int`, defaults to 256): images per encoder call.
    """
    if images.shape[-1] != vae.config.sample_size:
        images = upsample_digits(images, vae.config.sample_size)
    gen = torch.Generator().manual_seed(seed)
    device, dtype = vae.device, vae.dtype
    out = []
    for chunk in images.split(batch_size):
        post = vae.encode(chunk.to(device, dtype)).latent_dist
        z = post.mean
        if sample:
            z = z + post.std * torch.randn(z.shape, generator=gen).to(device, dtype)
        out.append(z.float().cpu())
    return torch.cat(out) * vae.config.scaling_factor


def latent_training_set(vae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's training data: the scaled posterior mean of each train-split digit's latent `(1347, 4, 8, 8)`,
    and the labels `(1347,)` (for teleportation statistics)."""
    images, labels = load_digits_images()
    train_idx, _ = digits_split()
    return encode_digits(vae, images[train_idx]), labels[train_idx]


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images in [-1, 1] (unclamped) from scaled latents, as ``DiTPipeline`` decodes them."""
    out = []
    for chunk in latents.split(batch_size):
        z = chunk.to(vae.device, vae.dtype) / vae.config.scaling_factor
        out.append(vae.decode(z).sample.float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# training


def _tail_mean(losses: list[float], k: int = 500) -> float:
    tail = losses[-k:]
    return sum(tail) / max(1, len(tail))


def train_digits_latent(
    out: str | os.PathLike | None = None,
    vae_steps: int = 1500,
    dit_steps: int = 6000,
    seed: int = 0,
    *,
    vae_batch_size: int = 64,
    dit_batch_size: int = 128,
    vae_lr: float = 1e-3,
    dit_lr: float = 1e-3,
    kl_weight: float = 1e-3,
    warmup: int = 200,
    ema_decay: float = 0.999,
    checkpoint_every: int = 250,
    resume: bool = False,
    num_threads: int | None = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the VAE, then the class-conditional DiT on its latents, and save a ``DiTPipeline`` folder.

    Args:
        out (`str` or `os.PathLike`): output folder (required); pass :data:`LATENT_DIR` to overwrite the bundled
            weights on purpose.
        vae_steps (`int`, defaults to 1500): VAE optimiser steps (loss: pixel MSE + ``kl_weight`` * KL per latent
            element, so the posterior stays close to a unit Gaussian without blurring the strokes).
        dit_steps (`int`, defaults to 6000): denoiser optimiser steps (epsilon MSE on the posterior means of the
            scaled latents, labels dropped to :data:`NULL_CLASS` with probability :data:`CLASS_DROPOUT`).
        seed (`int`, defaults to 0): seeds initialisation, batch order, noise and label dropout.
        vae_batch_size (`int`, defaults to 64), dit_batch_size (`int`, defaults to 128): images per step.
        vae_lr (`float`, defaults to 1e-3), dit_lr (`float`, defaults to 1e-3): peak AdamW learning rates.
        kl_weight (`float`, defaults to 1e-3): weight of the KL term (per element, against per-pixel MSE).
        warmup (`int`, defaults to 200): linear warm-up steps of each stage.
        ema_decay (`float`, defaults to 0.999): decay of the saved weight EMA.
        checkpoint_every (`int`, defaults to 250): steps between checkpoints (``out/checkpoint-vae.safetensors``,
            then ``out/checkpoint-dit.safetensors``; removed once the stage's weights are written).
        resume (`bool`, defaults to `False`): continue an interrupted run (a finished VAE stage is reused).
        num_threads (`int`, *optional*, defaults to 2): ``torch.set_num_threads``; ``None`` leaves it alone.
        progress (`bool`, defaults to `True`): show tqdm bars.

    Returns:
        `dict`: what is also written to ``out/training.json``: per stage the final loss (mean of the last 500
        steps), wall time and parameter count, the ``scaling_factor``, the settings.
    """
    from diffusers import AutoencoderKL, DiTPipeline, DPMSolverMultistepScheduler

    for name, value in (("vae_steps", vae_steps), ("dit_steps", dit_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    out = _require_out(out, LATENT_DIR, "--bundled")
    os.makedirs(out, exist_ok=True)
    if num_threads:
        torch.set_num_threads(num_threads)
    images, labels = load_digits_images()
    train_idx, _ = digits_split()
    x_train, y_train = upsample_digits(images[train_idx]), labels[train_idx]
    n = x_train.shape[0]
    vae_dir, stage_path = os.path.join(out, "vae"), os.path.join(out, _STAGE_FILE)
    common = dict(warmup=warmup, ema_decay=ema_decay, resume=resume, checkpoint_every=checkpoint_every,
                  progress=progress)

    # stage 1: the autoencoder
    if resume and os.path.exists(stage_path):
        vae_info = read_json(stage_path)
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    else:
        vae = build_vae(seed)
        vae.train()

        def vae_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            x = x_train[idx]
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
            return F.mse_loss(vae.decode(z).sample, x) + kl_weight * kl

        ckpt = os.path.join(out, "checkpoint-vae.safetensors")
        losses, wall = fit_with_ema(vae, vae_loss, n, vae_steps, batch_size=vae_batch_size, lr=vae_lr,
                            gen=torch.Generator().manual_seed(seed), ckpt_path=ckpt,
                            tag={"stage": "vae", "seed": seed}, **common)
        vae.eval()
        # diffusers' convention (arXiv 2112.10752, Sec. G): unit-variance latents for the denoiser, here the
        # posterior means it is trained on; encode_digits applies the config's scaling_factor (diffusers' default
        # 0.18215 until it is set here)
        std = float(encode_digits(vae, x_train).std()) / vae.config.scaling_factor
        vae.register_to_config(scaling_factor=1.0 / std)
        vae.save_pretrained(vae_dir, safe_serialization=True)
        vae_info = {"steps": vae_steps, "final_loss": _tail_mean(losses), "wall_time_s": round(wall, 1),
                    "num_parameters": sum(p.numel() for p in vae.parameters()), "batch_size": vae_batch_size,
                    "lr": vae_lr, "kl_weight": kl_weight, "scaling_factor": 1.0 / std}
        atomic_write(stage_path, (json.dumps(vae_info, indent=2) + "\n").encode())
        if os.path.exists(ckpt):
            os.remove(ckpt)
    vae.eval().requires_grad_(False)

    # stage 2: the class-conditional denoiser on the posterior means of the scaled latents. Not on posterior
    # samples: at this KL weight most latent channels keep a posterior close to the unit prior (the decoder ignores
    # them), so samples are mostly noise the denoiser would have to model, and class guidance drowns in it (CFG
    # class accuracy 12-32% when trained on samples, see benchmarks/RESULTS.md).
    z_mean = encode_digits(vae, x_train)
    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    noising = training_noise_scheduler()
    transformer = build_transformer(seed)
    # eval mode: the transformer has no dropout, and the label dropout is drawn below from the run's generator
    # (the model's own token_drop uses the global RNG, which a resumed run would not reproduce)
    transformer.eval()

    def dit_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        z0 = z_mean[idx]
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=gen)
        drop = torch.rand(z0.shape[0], generator=gen) < CLASS_DROPOUT
        y = torch.where(drop, torch.full_like(y_train[idx], NULL_CLASS), y_train[idx])
        pred = transformer(noising.add_noise(z0, eps, t), timestep=t, class_labels=y).sample
        return F.mse_loss(pred, eps)

    ckpt = os.path.join(out, "checkpoint-dit.safetensors")
    losses, wall = fit_with_ema(transformer, dit_loss, n, dit_steps, batch_size=dit_batch_size, lr=dit_lr,
                        gen=torch.Generator().manual_seed(seed + 1), ckpt_path=ckpt,
                        tag={"stage": "dit", "seed": seed}, **common)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    info = {
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "latent_shape": [LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE],
        "vae": vae_info,
        "dit": {"steps": dit_steps, "final_loss": _tail_mean(losses), "wall_time_s": round(wall, 1),
                "num_parameters": sum(p.numel() for p in transformer.parameters()), "batch_size": dit_batch_size,
                "lr": dit_lr, "class_dropout": CLASS_DROPOUT, "null_class": NULL_CLASS},
        "ema_decay": ema_decay,
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    info["wall_time_s"] = round(info["vae"]["wall_time_s"] + info["dit"]["wall_time_s"], 1)
    atomic_write(os.path.join(out, "training.json"), (json.dumps(info, indent=2) + "\n").encode())
    for path in (ckpt, stage_path):
        if os.path.exists(path):
            os.remove(path)
    return info


# ---------------------------------------------------------------------------------------------------------------
# loading, sampling, evaluation


def load_digits_latent_pipeline(scheduler: Any = None, device: str | torch.device = "cpu", path: str | None = None):
    """The bundled class-conditional latent digits model as a ``DiTPipeline``, loaded offline.

    Args:
        scheduler (`SchedulerMixin` instance or class, *optional*): replaces the saved DPM-Solver++ scheduler; a
            class is built with ``from_config`` of the saved config (so it carries the training schedule).
        device (`str` or `torch.device`, defaults to `"cpu"`): where the pipeline is moved.
        path (`str`, *optional*): another pipeline folder (e.g. one written by :func:`train_digits_latent`).

    Returns:
        `DiTPipeline`: ``pipe(class_labels=[...], guidance_scale=DEFAULT_GUIDANCE_SCALE, output_type="pt")``.
    """
    from diffusers import DiTPipeline

    path = path or LATENT_DIR
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"path {path!r} is not a diffusers pipeline folder (no model_index.json)")
    pipe = DiTPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return _with_scheduler(pipe, scheduler).to(device)


def check_class_labels(class_labels: Any) -> list[int]:
    """``class_labels`` as a list of ints in ``0 .. NUM_CLASSES - 1``, or a ``ValueError`` naming it."""
    if isinstance(class_labels, torch.Tensor):
        class_labels = class_labels.tolist()
    labels = list(class_labels) if isinstance(class_labels, (list, tuple)) else None
    if not labels or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < NUM_CLASSES for c in labels):
        raise ValueError(
            f"class_labels must be a non-empty list of ints in 0..{NUM_CLASSES - 1}, got {class_labels!r}"
        )
    return labels


@torch.no_grad()
def sample_digits_latent(
    pipe: Any,
    class_labels: list[int],
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    num_inference_steps: int = 20,
    seed: int = 0,
    scheduler: Any = None,
) -> torch.Tensor:
    """Class-conditional samples in [-1, 1] of shape `(B, 1, 16, 16)`; sample ``i`` uses seed ``seed + i`` (one
    generator per sample, so a sample does not depend on the batch).

    Args:
        pipe (`DiTPipeline`): see :func:`load_digits_latent_pipeline`.
        class_labels (`list[int]`): one digit class per sample.
        guidance_scale (`float`, defaults to :data:`DEFAULT_GUIDANCE_SCALE`): CFG scale (1 = conditional only).
        num_inference_steps (`int`, defaults to 20): sampler steps.
        seed (`int`, defaults to 0): first seed.
        scheduler (`SchedulerMixin` class or instance, *optional*): sampler to use instead of the pipeline's.
    """
    from diffusers import DiTPipeline

    labels = check_class_labels(class_labels)
    if isinstance(scheduler, type):
        scheduler = scheduler.from_config(pipe.scheduler.config)
    run = DiTPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=scheduler or pipe.scheduler)
    run.set_progress_bar_config(disable=True)
    gens = [torch.Generator(device=pipe.device).manual_seed(seed + i) for i in range(len(labels))]
    images = run(class_labels=labels, guidance_scale=guidance_scale, generator=gens,
                 num_inference_steps=num_inference_steps, output_type="pt").images
    return images.float().cpu() * 2 - 1


@torch.no_grad()
def evaluate_digits_latent(
    pipe: Any = None, per_class: int = 20, guidance_scales: tuple[float, ...] = (1.0, 2.0, DEFAULT_GUIDANCE_SCALE),
    num_inference_steps: int = 20, seed: int = 0,
) -> dict[str, Any]:
    """The acceptance numbers: VAE round trip on the held-out digits (PSNR against the 16x16 input, in [-1, 1]
    with peak-to-peak 2, and the bundled classifier's accuracy on the reconstructions), and the classifier's
    accuracy on CFG samples (``per_class`` per class, the pipeline's scheduler) for each guidance scale."""
    pipe = pipe or load_digits_latent_pipeline()
    classifier = load_digits_classifier()
    images, labels = load_digits_images()
    _, test_idx = digits_split()
    x = upsample_digits(images[test_idx])
    recon = decode_latents(pipe.vae, encode_digits(pipe.vae, x))
    recon = recon.clamp(-1, 1)
    mse = (recon - x).pow(2).flatten(1).mean(1)
    result: dict[str, Any] = {
        "vae_psnr_db": round(float((10 * torch.log10(4.0 / mse)).mean()), 2),
        "vae_recon_accuracy": classifier_accuracy(classifier, downsample_digits(recon), labels[test_idx]),
        "data_accuracy": classifier_accuracy(classifier, images[test_idx], labels[test_idx]),
        "sample_accuracy": {},
        "num_inference_steps": num_inference_steps,
        "scheduler": type(pipe.scheduler).__name__,
    }
    wanted = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    for scale in guidance_scales:
        samples = sample_digits_latent(pipe, wanted, scale, num_inference_steps, seed)
        result["sample_accuracy"][str(scale)] = classifier_accuracy(
            classifier, downsample_digits(samples), torch.tensor(wanted)
        )
    return result


def write_class_grid(out: str, per_class: int = 10, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                     num_inference_steps: int = 20, seed: int = 0, scale: int = 3) -> dict[str, Any]:
    """Write a PNG with one row per class (0 at the top) of CFG samples, and return the classifier's accuracy."""
    pipe = load_digits_latent_pipeline()
    wanted = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    samples = sample_digits_latent(pipe, wanted, guidance_scale, num_inference_steps, seed)
    accuracy = classifier_accuracy(load_digits_classifier(), downsample_digits(samples), torch.tensor(wanted))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    image_grid(samples, ncol=per_class, scale=scale).save(out)
    return {"guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps, "accuracy": accuracy,
            "scheduler": type(pipe.scheduler).__name__}


# ---------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    """``python -m diffsamplers.models.digits_latent {train, evaluate, samples}``."""
    parser = argparse.ArgumentParser(prog="python -m diffsamplers.models.digits_latent",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the VAE and the class-conditional DiT")
    p.add_argument("--out", default=None, help="output folder (default: ./digits-latent)")
    p.add_argument("--bundled", action="store_true", help="write into the bundled folder inside the package")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--dit-steps", type=int, default=6000)
    p.add_argument("--kl-weight", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in OUT")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("evaluate", help="VAE round trip and CFG class accuracy (JSON)")
    p.add_argument("--path", default=None, help="pipeline folder (default: the bundled one)")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("samples", help="write a PNG grid, one row per class")
    p.add_argument("--out", default="docs/digits_latent_samples.png")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        if args.bundled and args.out is not None:
            parser.error("give either --out or --bundled, not both")
        out = LATENT_DIR if args.bundled else args.out or "digits-latent"
        print(f"writing to {os.path.abspath(out)}", flush=True)
        info = train_digits_latent(out, args.vae_steps, args.dit_steps, args.seed, kl_weight=args.kl_weight,
                                   checkpoint_every=args.checkpoint_every, resume=args.resume,
                                   num_threads=args.threads, progress=not args.no_progress)
    elif args.command == "evaluate":
        pipe = load_digits_latent_pipeline(path=args.path)
        info = evaluate_digits_latent(pipe, per_class=args.per_class, num_inference_steps=args.steps)
    else:
        info = write_class_grid(args.out, args.per_class, args.guidance_scale, args.steps, args.seed)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
