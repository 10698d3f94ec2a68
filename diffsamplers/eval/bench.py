# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The bench protocol on a real model: few-step samplers against full-step ground truth from the same seeds.

For every (sampler, NFE) the same per-seed initial noise goes through the sampler; the result is compared with the
ground truth (the same seeds through a full-step DPM-Solver++(2M) solve, cached on disk and resumable) by

* FID between the two sets, in the feature space of ``feature_net`` (the bundled digit classifier by default: a
  *domain* FID; Inception for image models with ``--features inception``),
* PSNR of the decoded images in [0, 1], averaged over pairs,
* RMSE of the final latents (pixels for pixel-space models),

and the wall time per image. Every sampler starts from the ground truth's first level (``timestep_spacing`` is set to
``"trailing"`` for all of them, so no sampler starts below pure noise as ``"leading"`` spacing would) and x0 clipping
is off, so differences come from the solvers alone.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import report
from .fid import fid_from_stats
from .ground_truth import generate_ground_truth, load_ground_truth
from .metrics import psnr, rmse
from .testbed import SamplerSpec, fit_seconds

GT_STEPS = 200


@dataclass
class BenchModel:
    """What the bench needs from a model: the denoiser and how to turn final latents into images.

    Args:
        name (`str`): identifies the model in manifests (a path or repo id).
        denoiser (`torch.nn.Module`): called as ``denoiser(x, t, **call_kwargs).sample``.
        sample_shape (`tuple`): shape of one latent ``(C, H, W)``.
        scheduler_config (`dict`): the model's diffusers scheduler config (shared by every sampler).
        decode (`Callable`): final latents -> images in [0, 1], ``(N, C, H, W)``.
        call_kwargs (`Callable[[list[int]], dict]`, *optional*): per-seed model inputs (class labels, prompts).
        device (`str` or `torch.device`): where sampling runs.
        labels (`Callable[[list[int]], list[int]]`, *optional*): class-conditional models: the class of each seed
            (samplers built per class, e.g. teleported with the class's statistics, run each class's seeds).
        score (`Callable[[torch.Tensor, list[int]], dict]`, *optional*): extra columns from the decoded images and
            their seeds (e.g. the class accuracy of a class-conditional model).
    """

    name: str
    denoiser: Any
    sample_shape: tuple
    scheduler_config: dict
    decode: Callable[[torch.Tensor], torch.Tensor]
    call_kwargs: Callable[[list[int]], dict] | None = None
    device: str | torch.device = "cpu"
    labels: Callable[[list[int]], list[int]] | None = None
    score: Callable[[torch.Tensor, list[int]], dict] | None = None


def initial_noise(seeds: list[int], shape: tuple, device: Any = "cpu") -> torch.Tensor:
    """One CPU generator per seed, so a sample never depends on its batch (float32, then moved to ``device``)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def _bench_config(config: dict) -> dict:
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    config.update(timestep_spacing="trailing", clip_sample=False)
    return config


def sample_with(
    model: BenchModel, scheduler: Any, seeds: list[int], steps: int, batch_size: int = 256,
    adaptive: dict | None = None,
) -> tuple[torch.Tensor, float]:
    """Run ``scheduler`` for ``steps`` from the seeds' noise; returns final latents (CPU) and model calls per batch
    (the mean over batches: with ``adaptive`` each batch may make a different number). A
    :class:`~diffsamplers.eval.samplers.PerClassSchedulers` runs the seeds of each class with its own scheduler."""
    from .samplers import PerClassSchedulers
    from .testbed import run_scheduler

    if isinstance(scheduler, PerClassSchedulers):
        if model.labels is None:
            raise ValueError(f"{model.name} is not class-conditional: a per-class sampler needs the seeds' classes")
        labels = model.labels(seeds)
        out = torch.empty((len(seeds),) + tuple(model.sample_shape))
        group_calls = []
        for label in sorted(set(labels)):
            members = [i for i, c in enumerate(labels) if c == label]
            latents, n = sample_with(model, scheduler.build(label), [seeds[i] for i in members], steps, batch_size,
                                     adaptive)
            out[torch.tensor(members)] = latents
            group_calls.append(n)
        mean = sum(group_calls) / len(group_calls)
        return out, int(mean) if mean == int(mean) else round(mean, 2)

    outs, calls = [], []
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i : i + batch_size]
        x_T = initial_noise(chunk, model.sample_shape, model.device)
        kwargs = model.call_kwargs(chunk) if model.call_kwargs else {}
        with torch.no_grad():
            out, n = run_scheduler(scheduler, model.denoiser, x_T, steps, adaptive=adaptive, **kwargs)
        outs.append(out.float().cpu())
        calls.append(n)
    mean = sum(calls) / len(calls)
    return torch.cat(outs), int(mean) if mean == int(mean) else round(mean, 2)


def ground_truth(model: BenchModel, seeds: list[int], out_dir: str, steps: int = GT_STEPS) -> torch.Tensor:
    """Full-step DPM-Solver++(2M) samples for ``seeds``, cached in ``out_dir`` (resumable, refused if stale)."""
    from diffusers import DPMSolverMultistepScheduler

    config = _bench_config(model.scheduler_config)
    manifest = dict(model=model.name, scheduler="DPMSolverMultistepScheduler", config=config, steps=steps,
                    shape=list(model.sample_shape))

    def sample_fn(chunk: list[int]) -> torch.Tensor:
        scheduler = DPMSolverMultistepScheduler.from_config(config)
        return sample_with(model, scheduler, list(chunk), steps)[0]

    generate_ground_truth(sample_fn, seeds, out_dir, manifest=manifest, progress=True)
    return load_ground_truth(out_dir, config=manifest, seeds=seeds)


def _features(images: torch.Tensor, feature_net: Any, device: Any):
    from .features import extract_features

    return extract_features(images, feature_net, batch_size=256, device=device, progress=False)


def bench_model(
    model: BenchModel,
    samplers: dict[str, SamplerSpec],
    nfes: list[int],
    *,
    num_samples: int,
    feature_net: Any,
    out_dir: str,
    seed: int = 0,
    gt_steps: int = GT_STEPS,
    progress: bool = True,
) -> list[dict]:
    """Run the protocol; writes ``results.json``, ``fid_vs_nfe.png`` and one ``grid_<sampler>.png`` per sampler.

    Each record holds the ``budget`` asked for (an entry of ``nfes``) and ``nfe``, the model calls really made
    (they differ for Heun's last Euler step and for AdaptiveDiffusion, which reports the mean over batches).
    ``results.json`` is written when every entry is done (``results.partial.json`` holds the entries so far).
    """
    seeds = list(range(seed, seed + num_samples))
    gt = ground_truth(model, seeds, os.path.join(out_dir, "ground_truth"), gt_steps)
    gt_images = model.decode(gt)
    gt_stats = _features(gt_images, feature_net, model.device)
    config = _bench_config(model.scheduler_config)
    items = [(name, spec, nfe) for name, spec in samplers.items() for nfe in nfes]
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="bench")
    records, grids = [], {}
    partial = os.path.join(out_dir, "results.partial.json")
    for name, spec, nfe in items:
        run_model = model
        if spec.denoiser is not None:
            run_model = dataclasses.replace(model, denoiser=spec.denoiser(model.device))
        scheduler = spec.fit(model, nfe, seeds) if spec.fit is not None else spec.build(config)
        steps = spec.steps_for_nfe(nfe)
        # stochastic samplers (fresh re-noising) draw from the global generator: the same draws on every run
        torch.manual_seed(seed)
        start = time.perf_counter()
        latents, calls = sample_with(run_model, scheduler, seeds, steps, adaptive=spec.adaptive)
        seconds = time.perf_counter() - start
        images = model.decode(latents)
        stats = _features(images, feature_net, model.device)
        records.append(
            dict(
                sampler=name,
                budget=nfe,
                nfe=calls,
                steps=steps,
                fid_vs_gt=fid_from_stats(stats, gt_stats),
                psnr_vs_gt=float(psnr(images, gt_images).mean()),
                rmse_vs_gt=float(rmse(latents, gt).mean()),
                seconds_per_image=seconds / num_samples,
                **(model.score(images, seeds) if model.score else {}),
                **({"fit_seconds": fit_seconds(scheduler)} if spec.fit is not None else {}),
            )
        )
        grids.setdefault(name, []).append((report.budget_label(nfe, calls), images[:8]))
        # an interrupted run keeps what it did, without replacing the results.json of an earlier complete run
        report.write_json(records, partial)
    for name, rows in grids.items():
        report.save_grid([images for _, images in rows] + [gt_images[:8]],
                         [label for label, _ in rows] + [f"GT ({gt_steps} steps)"],
                         os.path.join(out_dir, f"grid_{name}.png"), title=name)
    report.plot_metric_vs_nfe(records, "fid_vs_gt", os.path.join(out_dir, "fid_vs_nfe.png"),
                              title=f"{model.name}: FID vs full-step ground truth", ylabel="FID vs GT")
    report.write_json(records, os.path.join(out_dir, "results.json"))
    if os.path.exists(partial):
        os.remove(partial)
    return records


# ------------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------------


def digits_bench_model(device: Any = "cpu") -> tuple[BenchModel, Any]:
    """The bundled digits DDPM and its domain feature network (the digit classifier's penultimate layer)."""
    from ..models.digits import load_digits_classifier, load_digits_pipeline

    pipe = load_digits_pipeline(device=device)
    unet = pipe.unet.eval()
    classifier = load_digits_classifier(device=device).eval()
    model = BenchModel(
        name="diffsamplers/digits-ddpm",
        denoiser=unet,
        sample_shape=(unet.config.in_channels, unet.config.sample_size, unet.config.sample_size),
        scheduler_config=dict(pipe.scheduler.config),
        decode=lambda x: ((x.float() + 1) / 2).clamp(0, 1),
        device=device,
    )
    return model, _ClassifierFeatures(classifier)


class _ClassifierFeatures(torch.nn.Module):
    """uint8 images (what ``extract_features`` hands over) -> the classifier's features, with its [-1, 1] input;
    ``resize`` (e.g. the latent model's 16x16 -> 8x8 map) is applied first."""

    def __init__(self, classifier: torch.nn.Module, resize: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.classifier, self.resize = classifier, resize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        return self.classifier(self.resize(x) if self.resize else x)


def digits_latent_bench_model(device: Any = "cpu", guidance_scale: float | None = None) -> tuple[BenchModel, Any]:
    """The bundled class-conditional latent digits model with classifier-free guidance, and the digit classifier's
    features (on the decoded 16x16 images mapped back to 8x8). Seed ``s`` samples class ``s % 10``; the records get
    a ``class_accuracy`` column (the classifier's agreement with the requested class)."""
    from ..models.digits import load_digits_classifier
    from ..models.digits_latent import (
        DEFAULT_GUIDANCE_SCALE,
        NULL_CLASS,
        NUM_CLASSES,
        decode_latents,
        downsample_digits,
        load_digits_latent_pipeline,
    )

    pipe = load_digits_latent_pipeline(device=device)
    net, vae = pipe.transformer.eval(), pipe.vae.eval()
    classifier = load_digits_classifier(device=device).eval()
    scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale

    def labels(seeds: list[int]) -> list[int]:
        return [int(s) % NUM_CLASSES for s in seeds]

    def call_kwargs(seeds: list[int]) -> dict:
        wanted = torch.tensor(labels(seeds), device=device)
        # unconditional half first, as _GuidedDenoiser orders the batch; scale <= 1 runs the conditional model only
        both = torch.cat([torch.full_like(wanted, NULL_CLASS), wanted])
        return dict(class_labels=both if scale > 1 else wanted)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return ((decode_latents(vae, latents) + 1) / 2).clamp(0, 1)

    def score(images: torch.Tensor, seeds: list[int]) -> dict:
        with torch.no_grad():
            pred = classifier.classify(downsample_digits(images.to(device) * 2 - 1)).argmax(-1).cpu()
        return dict(class_accuracy=float((pred == torch.tensor(labels(seeds))).float().mean()))

    model = BenchModel(
        name="diffsamplers/digits-latent",
        denoiser=_GuidedDenoiser(net, scale if scale > 1 else None),
        sample_shape=(net.config.in_channels, net.config.sample_size, net.config.sample_size),
        scheduler_config=dict(pipe.scheduler.config),
        decode=decode,
        call_kwargs=call_kwargs,
        device=device,
        labels=labels,
        score=score,
    )
    return model, _ClassifierFeatures(classifier, downsample_digits)


def pipeline_bench_model(model_id: str, prompts: list[str] | None, device: Any, dtype: torch.dtype,
                         guidance_scale: float = 7.5) -> BenchModel:
    """A diffusers pipeline folder or repo id (loaded with ``from_pretrained``): its UNet or transformer is the
    denoiser; latent models decode through their VAE. Text-to-image needs ``prompts`` (cycled over the seeds); CFG is
    applied by a small wrapper so the same sampler loop serves every pipeline."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype).to(device)
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise ValueError(f"--model {model_id!r}: the pipeline has neither a unet nor a transformer")
    if getattr(pipe, "transformer", None) is not None and net is pipe.transformer:
        raise ValueError(f"--model {model_id!r}: transformer pipelines are not supported by the bench loop yet")
    size = net.config.sample_size
    size = size if isinstance(size, int) else size[0]
    shape = (net.config.in_channels, size, size)
    vae = getattr(pipe, "vae", None)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if vae is None:
            return ((latents.float() + 1) / 2).clamp(0, 1)
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out = []
        with torch.no_grad():
            for chunk in latents.split(16):
                z = chunk.to(device, dtype) / scale + shift
                out.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)

    denoiser, call_kwargs = _GuidedDenoiser(net, None), None
    if not prompts and getattr(net.config, "cross_attention_dim", None) is not None:
        raise ValueError(f"--model {model_id!r}: {type(pipe).__name__} is conditioned on text; give --prompts")
    if prompts:
        if not hasattr(pipe, "encode_prompt"):
            raise ValueError(f"--prompts given but {type(pipe).__name__} has no encode_prompt")
        denoiser = _GuidedDenoiser(net, guidance_scale)

        def call_kwargs(seeds: list[int]) -> dict:
            batch = [prompts[s % len(prompts)] for s in seeds]
            with torch.no_grad():
                cond, uncond = pipe.encode_prompt(batch, device, 1, True, [""] * len(batch))[:2]
            return dict(encoder_hidden_states=torch.cat([uncond, cond]))

    return BenchModel(model_id, denoiser, shape, dict(pipe.scheduler.config), decode, call_kwargs, device)


class _GuidedDenoiser(torch.nn.Module):
    """Runs the network in its own dtype; with a ``guidance_scale``, classifier-free guidance
    ``eps_u + w (eps_c - eps_u)`` from one batched call (the unconditional half first, as diffusers orders it)."""

    def __init__(self, net: torch.nn.Module, guidance_scale: float | None):
        super().__init__()
        self.net, self.guidance_scale = net, guidance_scale

    def forward(self, sample: torch.Tensor, timestep: Any, **condition: Any):
        if self.guidance_scale is None:
            return _Output(self._eps(sample, timestep, **condition))
        uncond, cond = self._eps(torch.cat([sample, sample]), timestep, **condition).chunk(2)
        return _Output(uncond + self.guidance_scale * (cond - uncond))

    def _eps(self, x: torch.Tensor, timestep: Any, **condition: Any) -> torch.Tensor:
        # transformers (DiT) embed a timestep per sample; UNets broadcast a scalar one
        t = torch.as_tensor(timestep, device=x.device)
        t = t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t
        out = self.net(x.to(self.net.dtype), t, **condition).sample.to(x.dtype)
        # DiT-style models with a learned variance return (eps, variance) along the channels
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


@dataclass
class _Output:
    sample: torch.Tensor
