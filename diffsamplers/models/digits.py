# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The realistic testbed: small diffusion models trained on scikit-learn's digits, shipped with the package.

Data: ``sklearn.datasets.load_digits`` (1797 grey 8x8 images, integer values 0..16), scaled to [-1, 1] as
``x / 8 - 1``. It ships inside scikit-learn, so everything here trains and runs offline.

Bundled under ``diffsamplers/models/bundled/``:

- ``digits-ddpm/``: a ``DDPMPipeline`` folder (safetensors). ``UNet2DModel`` at 8x8, 1 channel, 1.06M parameters,
  unconditional, epsilon prediction, ``DDPMScheduler`` with linear betas (1e-4 .. 0.02) over 1000 steps; the saved
  weights are the EMA of the training weights. The scheduler is saved with the diffusers defaults the model was
  trained with (``clip_sample=True``): clipping the x0 estimate is a sampler choice, not part of the model.
- ``digits-flow/``: the same UNet trained with the rectified-flow objective (``x_t = (1 - s) x0 + s eps``,
  ``timestep = 1000 s``, ``s ~ U(0, 1)``, velocity target ``eps - x0``), saved as a ``DDPMPipeline`` folder whose
  scheduler is a ``FlowMatchEulerDiscreteScheduler`` (``shift=1``), so ``DDPMPipeline`` samples it with Euler steps.
- ``digits-classifier/``: a small convolutional classifier (``model.safetensors`` + ``config.json``). Its
  penultimate layer (128 features) is the default feature network for FID on these models: a *domain* FID, in
  the feature space of a digit classifier, not the Inception FID of the literature; numbers are comparable
  between samplers on this model only.

Reproduce (CPU only; each command writes to ``./digits-ddpm``, ``./digits-flow`` or ``./digits-classifier`` in the
current folder, or to ``--out``; ``--bundled`` overwrites the weights inside the installed package, on purpose only):

    python -m diffsamplers.models.digits train --threads 1                   # digits-ddpm
    python -m diffsamplers.models.digits train --objective flow --threads 1  # digits-flow
    python -m diffsamplers.models.digits train-classifier --threads 1        # digits-classifier
    python -m diffsamplers.models.digits samples --out docs/digits_samples.png

The bundled weights were made with exactly these commands (6000 steps, batch 128, seed 0, torch 2.14.1 CPU) on a
2-core machine shared with other jobs (load average 3-8), hence one thread: oversubscribed cores made two threads
~7x slower there. On two idle cores a step costs ~0.1 s with ``--threads 2``, i.e. ~10 minutes per model.

- digits-ddpm: wall time 1354 s (22.6 min, shared machine), final loss 0.0679 (epsilon MSE, mean of the last 500
  steps). DDIM 50 steps, 256 samples: the classifier's mean confidence is 0.980 and 94.9% of samples are
  classified with confidence > 0.9 (training data: 0.998 and 99.5%). Not memorised: the median L2 distance from
  a sample to its nearest training image is 2.01, as from a training image to its nearest other one (2.06).
- digits-flow: wall time 1105 s (18.4 min, shared machine), final loss 0.390 (velocity MSE, mean of the last 500
  steps; it includes the irreducible variance of ``eps - x0`` given ``x_t``). Euler 50 steps, 256 samples: mean
  confidence 0.985, 95.3% above 0.9; median nearest-training-image distance 1.88.
- With 10 steps (256 samples): DDIM on digits-ddpm 0.973 / 91.8%, Euler on digits-flow 0.976 / 93.8%.
- digits-classifier: 40 epochs on the train split in 12.5 s; held-out accuracy 0.991 (446 / 450) on the
  deterministic split of :func:`digits_split`; train accuracy 1.0.

An interrupted ``train`` resumes from its periodic checkpoint with ``--resume`` and ends with the same weights as an
uninterrupted run. The checkpoint (``checkpoint.safetensors``: tensors plus JSON state, no pickle) lives in the output
folder while training and is removed only after the final weights are written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write, check_tensors, load_safetensors, load_tagged_safetensors, read_json

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")
DDPM_DIR = os.path.join(BUNDLED_DIR, "digits-ddpm")
FLOW_DIR = os.path.join(BUNDLED_DIR, "digits-flow")
CLASSIFIER_DIR = os.path.join(BUNDLED_DIR, "digits-classifier")

IMAGE_SIZE = 8
CHECKPOINT_NAME = "checkpoint.safetensors"
# written by earlier versions with torch.save (a pickle): never loaded, since unpickling a crafted file runs code
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = "diffsamplers.digits-training-checkpoint"
_CHECKPOINT_VERSION = "1"

# Measured on 2 idle CPU threads: a 3-level UNet (8 -> 4 -> 2) with one ResNet layer per level takes ~0.1 s per
# step at batch 128, so 6000 steps fit the ~15 minute budget; two layers per level or (64, 128, 128) channels
# cost 2-3x per step, for digits that are already well formed at this size. GroupNorm groups of 8 rather than the
# default 32, which would leave one channel per group in the 32-channel level.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}

DDPM_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}

FLOW_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# data


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as images in [-1, 1].

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: images of shape `(1797, 1, 8, 8)` (float32) and labels `(1797,)`.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return images, torch.as_tensor(data.target, dtype=torch.long)


def digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic train/test split used for the classifier (stratified by label).

    Args:
        test_fraction (`float`, defaults to 0.25): share of images held out (450 of 1797 at the default).
        seed (`int`, defaults to 0): permutation seed; the default is the split the bundled accuracy refers to.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: sorted train indices and sorted test indices.
    """
    # A per-class torch permutation rather than sklearn's train_test_split: the split must not move with the
    # scikit-learn version, since the tests compare against an accuracy measured on it.
    _, labels = load_digits_images()
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = round(idx.numel() * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels, filling with the background value -1 (no flips: a
    mirrored digit is another symbol)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


# ---------------------------------------------------------------------------------------------------------------
# diffusion models


def bundled_model_path(objective: str = "ddpm") -> str:
    """Folder of the bundled pipeline.

    Args:
        objective (`str`, defaults to `"ddpm"`): ``"ddpm"`` (epsilon prediction) or ``"flow"`` (rectified flow).

    Returns:
        `str`: absolute path of a diffusers ``DDPMPipeline`` folder.
    """
    if objective not in ("ddpm", "flow"):
        raise ValueError(f"objective must be 'ddpm' or 'flow', got {objective!r}")
    return DDPM_DIR if objective == "ddpm" else FLOW_DIR


def _with_scheduler(pipe: Any, scheduler: Any) -> Any:
    if scheduler is None:
        return pipe
    if isinstance(scheduler, type):
        scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = scheduler
    return pipe


def load_digits_pipeline(scheduler: Any = None, device: str | torch.device = "cpu", path: str | None = None):
    """The bundled epsilon-prediction digits model as a ``DDPMPipeline``, loaded offline.

    Args:
        scheduler (`SchedulerMixin` instance or class, *optional*): replaces the saved ``DDPMScheduler``; a class is
            built with ``from_config`` of the saved scheduler config (so it carries the training schedule).
        device (`str` or `torch.device`, defaults to `"cpu"`): where the pipeline is moved.
        path (`str`, *optional*): another pipeline folder (e.g. one written by :func:`train_digits_model`).

    Returns:
        `DDPMPipeline`: ``pipe(batch_size=..., num_inference_steps=..., output_type="pt")`` samples digits.
    """
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(path or DDPM_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return _with_scheduler(pipe, scheduler).to(device)


def load_digits_flow_pipeline(scheduler: Any = None, device: str | torch.device = "cpu", path: str | None = None):
    """The bundled rectified-flow twin (velocity ``eps - x0``) as a ``DDPMPipeline`` with a flow scheduler.

    Args:
        scheduler (`SchedulerMixin` instance or class, *optional*): replaces the saved
            ``FlowMatchEulerDiscreteScheduler``; a class is built with ``from_config`` of the saved config.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the pipeline is moved.
        path (`str`, *optional*): another pipeline folder.

    Returns:
        `DDPMPipeline`: its loop (``unet(x, t)`` then ``scheduler.step(out, t, x)``) is exactly a flow Euler loop.
    """
    return load_digits_pipeline(scheduler=scheduler, device=device, path=path or FLOW_DIR)


def build_digits_unet(seed: int = 0):
    """A freshly initialised ``UNet2DModel`` with the bundled architecture (:data:`UNET_CONFIG`).

    Args:
        seed (`int`, defaults to 0): initialisation seed.
    """
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**UNET_CONFIG)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    # Linear warm-up then cosine decay to 10%: the decay lets the last few thousand steps (and the EMA) settle.
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _noisy_batch(x0: torch.Tensor, objective: str, scheduler: Any, gen: torch.Generator):
    """Noised inputs, model timesteps and regression targets for one batch."""
    eps = torch.randn(x0.shape, generator=gen)
    if objective == "ddpm":
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        return scheduler.add_noise(x0, eps, t), t, eps
    s = torch.rand(x0.shape[0], generator=gen)
    s_ = s[:, None, None, None]
    return (1 - s_) * x0 + s_ * eps, s * scheduler.config.num_train_timesteps, eps - x0


def _require_out(out: str | os.PathLike | None, bundled: str, flag: str) -> str:
    # never write into the installed package by default: reproducing the weights must not overwrite the shipped ones
    if out is None:
        raise ValueError(
            f"`out` is required: the folder to write the trained model to. To overwrite the bundled weights on "
            f"purpose, pass out={bundled!r} (on the command line: {flag})"
        )
    return os.fspath(out)


def _save_checkpoint(path: str, unet: nn.Module, ema: list[torch.Tensor], opt: torch.optim.Optimizer,
                     gen: torch.Generator, perm: torch.Tensor, state: dict[str, Any]) -> None:
    """Everything a resumed run needs, as one safetensors file: tensors, plus the scalars as JSON in its header."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{i}": e for i, e in enumerate(ema)})
    opt_state = opt.state_dict()
    opt_scalars = {}
    for index, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                opt_scalars[f"{index}.{key}"] = value
    tensors["generator"] = gen.get_state()
    tensors["perm"] = perm
    header = {**state, "param_groups": opt_state["param_groups"], "optimizer_scalars": opt_scalars}
    metadata = {"format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, "state": json.dumps(header)}
    # one file, replaced atomically, so an interrupt never leaves a torn checkpoint or a mismatched pair
    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def _load_checkpoint(path: str, unet: nn.Module, ema: list[torch.Tensor], opt: torch.optim.Optimizer,
                     gen: torch.Generator, n: int) -> dict[str, Any]:
    """Restore what :func:`_save_checkpoint` wrote into the given objects; returns the JSON state (step, losses...).

    Every tensor's name, shape and dtype is checked against the freshly built model and optimizer, so a checkpoint
    of another architecture or a foreign file raises a ``ValueError`` naming ``path``.
    """
    tensors, metadata, _ = load_tagged_safetensors(
        path, _CHECKPOINT_FORMAT, _CHECKPOINT_VERSION, what="digits training checkpoint"
    )
    try:
        state = json.loads(metadata["state"])
        step, pos, elapsed = int(state["step"]), int(state["pos"]), float(state["elapsed"])
        losses = [float(v) for v in state["losses"]]
        param_groups, opt_scalars = state["param_groups"], state["optimizer_scalars"]
        state.update(step=step, pos=pos, elapsed=elapsed, losses=losses)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} has a malformed training state in its header ({err!r})") from err

    def take(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    def spec(reference: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in reference.items()}

    model = take("model.")
    check_tensors(path, model, spec(unet.state_dict()), "model")
    saved_ema = take("ema.")
    check_tensors(path, saved_ema, spec({str(i): e for i, e in enumerate(ema)}), "EMA")
    perm = tensors.get("perm")
    if perm is None or perm.dtype != torch.int64 or tuple(perm.shape) != (n,) or not 0 <= pos <= n:
        raise ValueError(f"{path}: the batch order ('perm', 'pos') does not fit the {n} training images")
    opt_tensors: dict[int, dict[str, Any]] = {}
    for key, value in take("optimizer.").items():
        index, _, name = key.partition(".")
        opt_tensors.setdefault(int(index), {})[name] = value
    for key, value in opt_scalars.items():
        index, _, name = key.partition(".")
        opt_tensors.setdefault(int(index), {})[name] = value
    for group in param_groups:
        if isinstance(group.get("betas"), list):  # JSON has no tuples
            group["betas"] = tuple(group["betas"])
    try:
        opt.load_state_dict({"state": opt_tensors, "param_groups": param_groups})
        gen.set_state(tensors["generator"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: the optimizer or generator state does not fit ({err})") from err
    unet.load_state_dict(model)
    for i, e in enumerate(ema):
        e.copy_(saved_ema[str(i)])
    state["perm"] = perm
    return state


def fit_with_ema(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    n: int,
    steps: int,
    *,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    gen: torch.Generator,
    ckpt_path: str,
    tag: dict[str, Any],
    resume: bool,
    checkpoint_every: int,
    progress: bool,
    keep_checkpoint: bool = False,
    desc: str | None = None,
) -> tuple[list[float], float]:
    """The training loop of the bundled digits models: AdamW with warm-up and cosine decay, gradient clipping at 1,
    a weight EMA with warm-up, and resumable safetensors checkpoints at ``ckpt_path`` (see :func:`_save_checkpoint`).

    Batches are drawn without replacement epoch by epoch from ``n`` examples with ``gen``, which ``loss_fn(batch
    indices, gen)`` also draws its noise from, so a resumed run equals an uninterrupted one. ``tag`` (e.g. the seed)
    is stored in each checkpoint and must match on ``resume``. ``keep_checkpoint`` writes a last checkpoint after the
    final step (before the EMA replaces the weights). On return the model holds the EMA weights; returns the step
    losses and the wall time (including earlier, resumed parts)."""
    from tqdm.auto import tqdm

    batch_size = min(batch_size, n)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    step, losses, elapsed = 0, [], 0.0
    perm, pos = torch.randperm(n, generator=gen), 0
    if resume and os.path.exists(ckpt_path):
        ckpt = _load_checkpoint(ckpt_path, model, ema, opt, gen, n)
        if any(ckpt.get(k) != v for k, v in tag.items()):
            raise ValueError(f"{ckpt_path} is from another run ({ {k: ckpt.get(k) for k in tag} }, not {tag})")
        step, losses, elapsed, perm, pos = ckpt["step"], ckpt["losses"], ckpt["elapsed"], ckpt["perm"], ckpt["pos"]

    def save_checkpoint() -> None:
        state = {**tag, "step": step, "losses": losses, "pos": pos, "elapsed": elapsed + time.perf_counter() - start}
        _save_checkpoint(ckpt_path, model, ema, opt, gen, perm, state)

    start = time.perf_counter()
    bar = tqdm(total=steps, initial=step, disable=not progress, desc=desc or tag.get("stage"))
    while step < steps:
        if pos + batch_size > n:  # a new epoch: fresh permutation, the tail of the old one is dropped
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        loss = loss_fn(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA with a warm-up (decay grows from 0.1 to ema_decay), so early steps do not pin it to random weights
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
        if checkpoint_every and step % checkpoint_every == 0 and step < steps:
            save_checkpoint()
    bar.close()
    wall = elapsed + time.perf_counter() - start
    if keep_checkpoint:
        save_checkpoint()
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    return losses, wall


def train_digits_model(
    out: str | os.PathLike | None = None,
    steps: int = 6000,
    seed: int = 0,
    *,
    objective: str = "ddpm",
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup: int = 200,
    ema_decay: float = 0.999,
    max_shift: int = 0,
    checkpoint_every: int = 500,
    resume: bool = False,
    keep_checkpoint: bool = False,
    num_threads: int | None = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the digits diffusion model and save it as a ``DDPMPipeline`` folder.

    Args:
        out (`str` or `os.PathLike`): output folder (required). Nothing is written into the installed package
            unless asked: pass ``bundled_model_path(objective)`` to overwrite the bundled weights on purpose.
        steps (`int`, defaults to 6000): optimiser steps.
        seed (`int`, defaults to 0): seeds initialisation, batch order and noise.
        objective (`str`, defaults to `"ddpm"`): ``"ddpm"`` (epsilon prediction, ``DDPMScheduler``) or ``"flow"``
            (rectified flow, velocity ``eps - x0``, ``FlowMatchEulerDiscreteScheduler``).
        batch_size (`int`, defaults to 128): images per step, drawn without replacement epoch by epoch.
        lr (`float`, defaults to 1e-3): peak AdamW learning rate.
        warmup (`int`, defaults to 200): linear warm-up steps.
        ema_decay (`float`, defaults to 0.999): decay of the weight EMA that is saved (0 saves raw weights).
        max_shift (`int`, defaults to 0): random shift augmentation in pixels. Off by default: the digits are
            centred and fill the 8x8 frame, so shifted copies would move the model away from the data.
        checkpoint_every (`int`, defaults to 500): steps between checkpoints (``out/checkpoint.safetensors``:
            weights, EMA, optimizer and generator state as tensors, the step, losses and optimizer settings as JSON
            in its header; no pickle).
        resume (`bool`, defaults to `False`): continue from ``out/checkpoint.safetensors`` if present; the result
            is the same as that of an uninterrupted run.
        keep_checkpoint (`bool`, defaults to `False`): keep the checkpoint after the final save (it is removed by
            default, once the final weights are written, so it never ships with the bundled weights).
        num_threads (`int`, *optional*, defaults to 2): ``torch.set_num_threads``; ``None`` leaves it alone.
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        `dict`: training statistics (also written to ``out/training.json``): ``final_loss`` (mean of the last
        500 step losses), ``wall_time_s``, ``steps``, ``seed``, ``num_parameters``.
    """
    from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if objective not in ("ddpm", "flow"):
        raise ValueError(f"objective must be 'ddpm' or 'flow', got {objective!r}")
    out = _require_out(out, bundled_model_path(objective), "--bundled")
    os.makedirs(out, exist_ok=True)
    if num_threads:
        torch.set_num_threads(num_threads)
    scheduler = (
        DDPMScheduler(**DDPM_SCHEDULER_CONFIG)
        if objective == "ddpm"
        else FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)
    )
    images, _ = load_digits_images()
    n = images.shape[0]
    batch_size = min(batch_size, n)

    unet = build_digits_unet(seed)
    unet.train()
    gen = torch.Generator().manual_seed(seed)
    ckpt_path = os.path.join(out, CHECKPOINT_NAME)
    legacy_path = os.path.join(out, LEGACY_CHECKPOINT_NAME)
    if resume and not os.path.exists(ckpt_path) and os.path.exists(legacy_path):
        raise ValueError(
            f"{legacy_path} is a pickle checkpoint of an older version; it is not loaded, since unpickling a file can "
            "run code. Delete it and train again (checkpoints are now safetensors)"
        )

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x0 = _random_shift(images[idx], max_shift, gen)
        x_t, t, target = _noisy_batch(x0, objective, scheduler, gen)
        return F.mse_loss(unet(x_t, t).sample, target)

    losses, wall = fit_with_ema(unet, loss_fn, n, steps, batch_size=batch_size, lr=lr, warmup=warmup,
                                ema_decay=ema_decay, gen=gen, ckpt_path=ckpt_path,
                                tag={"objective": objective, "seed": seed}, resume=resume,
                                checkpoint_every=checkpoint_every, keep_checkpoint=keep_checkpoint,
                                progress=progress, desc=f"digits-{objective}")
    unet.eval()
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    tail = losses[-500:]
    info = {
        "objective": objective,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "max_shift": max_shift,
        "num_parameters": sum(p.numel() for p in unet.parameters()),
        "final_loss": sum(tail) / max(1, len(tail)),
        "wall_time_s": round(wall, 1),
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    atomic_write(os.path.join(out, "training.json"), (json.dumps(info, indent=2) + "\n").encode())
    # only now: a kill during the final save must leave something to resume from
    if not keep_checkpoint and os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    return info


# ---------------------------------------------------------------------------------------------------------------
# the classifier (feature network for domain FID)


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 digits; ``forward`` returns penultimate features, :meth:`classify` returns logits.

    Inputs are images in [-1, 1] of shape `(B, C, H, W)`: several channels are averaged to grey and other sizes are
    resized to 8x8 (antialiased bilinear), so samples of any resolution can be scored.

    Args:
        width (`int`, defaults to 32): channels of the first conv layer (then 2x, 4x).
        feature_dim (`int`, defaults to 128): size of the feature layer used for FID.
        num_classes (`int`, defaults to 10): number of logits.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(16 * width, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Bring `(B, C, H, W)` images in [-1, 1] to `(B, 1, 8, 8)`."""
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of shape `(B, feature_dim)` (post-ReLU penultimate layer)."""
        return self.body(self.prepare(images))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of shape `(B, num_classes)`."""
        return self.head(self.forward(images))


def load_digits_classifier(path: str | None = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    """The bundled digit classifier in eval mode (the default FID feature network for the digits models).

    Args:
        path (`str`, *optional*): folder with ``config.json`` and ``model.safetensors``; defaults to the bundled one.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the network is moved.

    Returns:
        `DigitsClassifier`: ``model(images)`` gives `(B, 128)` features, ``model.classify(images)`` logits.
    """
    path = path or CLASSIFIER_DIR
    config_path, weights_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    cfg = read_json(config_path)
    try:
        model = DigitsClassifier(width=cfg["width"], feature_dim=cfg["feature_dim"], num_classes=cfg["num_classes"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{config_path} is not a digits classifier config ({err!r})") from err
    weights, _, _ = load_safetensors(weights_path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{weights_path} does not hold the classifier of {config_path}: {err}") from err
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` that ``model`` labels correctly."""
    was_training = model.training
    model.eval()
    pred = torch.cat([model.classify(b).argmax(-1) for b in images.split(512)])
    model.train(was_training)
    return float((pred == labels.to(pred.device)).float().mean())


def train_digits_classifier(
    out: str | os.PathLike | None = None,
    epochs: int = 40,
    seed: int = 0,
    *,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int = 1,
    num_threads: int | None = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the digit classifier on the train split and save it (``model.safetensors`` + ``config.json``).

    Args:
        out (`str` or `os.PathLike`): output folder (required); pass :data:`CLASSIFIER_DIR` to overwrite the
            bundled classifier on purpose.
        epochs (`int`, defaults to 40): passes over the train split.
        seed (`int`, defaults to 0): seeds initialisation, batch order and augmentation.
        batch_size (`int`, defaults to 64): images per step.
        lr (`float`, defaults to 2e-3): peak Adam learning rate (cosine decay to 0).
        max_shift (`int`, defaults to 1): random shift augmentation in pixels; unlike for the generator, it only
            makes the classifier less sensitive to small misplacements in generated samples.
        num_threads (`int`, *optional*, defaults to 2): ``torch.set_num_threads``; ``None`` leaves it alone.
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        `dict`: the saved config, including ``test_accuracy`` on the held-out split of :func:`digits_split`.
    """
    from safetensors.torch import save
    from tqdm.auto import tqdm

    out = _require_out(out, CLASSIFIER_DIR, "train-classifier --bundled")
    os.makedirs(out, exist_ok=True)
    if num_threads:
        torch.set_num_threads(num_threads)
    images, labels = load_digits_images()
    train_idx, test_idx = digits_split()
    x_train, y_train = images[train_idx], labels[train_idx]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
        start = time.perf_counter()
        model.train()
        for _ in tqdm(range(epochs), disable=not progress, desc="digits-classifier"):
            perm = torch.randperm(x_train.shape[0], generator=gen)
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                x = _random_shift(x_train[idx], max_shift, gen)
                loss = F.cross_entropy(model.classify(x), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        wall = time.perf_counter() - start
    model.eval()
    info = dict(model.config)
    info.update(
        {
            "input_size": IMAGE_SIZE,
            "input_range": [-1.0, 1.0],
            "features": "post-ReLU penultimate layer (forward); logits via classify()",
            "split": "digits_split(test_fraction=0.25, seed=0)",
            "train_accuracy": classifier_accuracy(model, x_train, y_train),
            "test_accuracy": classifier_accuracy(model, images[test_idx], labels[test_idx]),
            "epochs": epochs,
            "seed": seed,
            "wall_time_s": round(wall, 1),
        }
    )
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    atomic_write(os.path.join(out, "model.safetensors"), weights)
    atomic_write(os.path.join(out, "config.json"), (json.dumps(info, indent=2) + "\n").encode())
    return info


# ---------------------------------------------------------------------------------------------------------------
# samples


@torch.no_grad()
def sample_digits(
    pipe: Any, num_samples: int = 64, num_inference_steps: int = 50, seed: int = 0, scheduler: Any = None
) -> torch.Tensor:
    """Samples in [-1, 1] of shape `(num_samples, 1, 8, 8)` from a digits pipeline.

    Args:
        pipe (`DDPMPipeline`): a digits pipeline (see :func:`load_digits_pipeline`).
        num_samples (`int`, defaults to 64): number of images.
        num_inference_steps (`int`, defaults to 50): sampler steps.
        seed (`int`, defaults to 0): seed of the initial noise.
        scheduler (`SchedulerMixin` class or instance, *optional*): sampler to use instead of the pipeline's; by
            default DDIM (eta 0) for epsilon models and the saved Euler scheduler for flow models.
    """
    from diffusers import DDIMScheduler, DDPMPipeline

    if scheduler is None and "Flow" not in type(pipe.scheduler).__name__:
        scheduler = DDIMScheduler
    if isinstance(scheduler, type):
        scheduler = scheduler.from_config(pipe.scheduler.config)
    run = DDPMPipeline(unet=pipe.unet, scheduler=scheduler or pipe.scheduler)
    run.set_progress_bar_config(disable=True)
    gen = torch.Generator(device=pipe.unet.device).manual_seed(seed)
    images = run(batch_size=num_samples, generator=gen, num_inference_steps=num_inference_steps, output_type="pt")
    return images.images.float() * 2 - 1  # "pt" output is (B, C, H, W) in [0, 1]


def image_grid(images: torch.Tensor, ncol: int = 8, scale: int = 4, pad: int = 1):
    """A PIL grid of `(B, 1, H, W)` images in [-1, 1], ``ncol`` per row, each upscaled ``scale`` times (nearest,
    so the 64 pixels stay visible) on a grey border ``pad`` pixels wide."""
    from PIL import Image

    b, _, h, w = images.shape
    nrow = math.ceil(b / ncol)
    ch, cw = h * scale, w * scale
    canvas = torch.full((nrow * (ch + pad) + pad, ncol * (cw + pad) + pad), 0.5)
    up = images[:, 0].clamp(-1, 1).add(1).div(2).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    for i in range(b):
        top, left = pad + (i // ncol) * (ch + pad), pad + (i % ncol) * (cw + pad)
        canvas[top : top + ch, left : left + cw] = up[i]
    return Image.fromarray((canvas * 255).round().byte().numpy())


def write_sample_grid(
    out: str, num_samples: int = 64, num_inference_steps: int = 50, seed: int = 0, scale: int = 5
) -> dict[str, Any]:
    """Write one PNG with panels (training data | DDPM model, DDIM | flow model, Euler) and score each panel.

    Args:
        out (`str`): PNG path.
        num_samples (`int`, defaults to 64): images per panel (a multiple of 8 keeps the panels square).
        num_inference_steps (`int`, defaults to 50): sampler steps.
        seed (`int`, defaults to 0): noise seed.
        scale (`int`, defaults to 5): pixel upscaling in the PNG.

    Returns:
        `dict`: per panel, the classifier's mean max-probability, share of predictions above 0.9 confidence and
        the predicted-class histogram.
    """
    from PIL import Image, ImageDraw

    classifier = load_digits_classifier()
    images, _ = load_digits_images()
    gen = torch.Generator().manual_seed(seed)
    panels = {"data": images[torch.randperm(images.shape[0], generator=gen)[:num_samples]]}
    panels[f"ddpm, DDIM {num_inference_steps}"] = sample_digits(
        load_digits_pipeline(), num_samples, num_inference_steps, seed
    )
    if os.path.exists(os.path.join(FLOW_DIR, "model_index.json")):
        panels[f"flow, Euler {num_inference_steps}"] = sample_digits(
            load_digits_flow_pipeline(), num_samples, num_inference_steps, seed
        )
    stats, grids = {}, []
    for name, x in panels.items():
        with torch.no_grad():
            prob = classifier.classify(x).softmax(-1)
        conf, pred = prob.max(-1)
        stats[name] = {
            "mean_confidence": round(float(conf.mean()), 4),
            "share_confident_0.9": round(float((conf > 0.9).float().mean()), 4),
            "class_counts": torch.bincount(pred, minlength=10).tolist(),
        }
        grids.append((name, image_grid(x, scale=scale)))
    label_h, gap = 14, 8
    width = sum(g.width for _, g in grids) + gap * (len(grids) - 1)
    sheet = Image.new("L", (width, grids[0][1].height + label_h), 255)
    draw = ImageDraw.Draw(sheet)
    x = 0
    for name, g in grids:
        sheet.paste(g, (x, label_h))
        draw.text((x + 1, 1), name, fill=0)
        x += g.width + gap
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sheet.save(out)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    """``python -m diffsamplers.models.digits {train, train-classifier, samples}``."""
    parser = argparse.ArgumentParser(prog="python -m diffsamplers.models.digits", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the digits diffusion model (DDPM or rectified flow)")
    p.add_argument("--out", default=None, help="output folder (default: ./digits-OBJECTIVE)")
    p.add_argument("--bundled", action="store_true", help="write into the bundled folder inside the package")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", choices=("ddpm", "flow"), default="ddpm")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-shift", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT_NAME}")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("train-classifier", help="train the digit classifier (FID feature network)")
    p.add_argument("--out", default=None, help="output folder (default: ./digits-classifier)")
    p.add_argument("--bundled", action="store_true", help="write into the bundled folder inside the package")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("samples", help="write a PNG grid of data and model samples")
    p.add_argument("--out", default="docs/digits_samples.png")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command in ("train", "train-classifier"):
        name = "classifier" if args.command == "train-classifier" else args.objective
        bundled = CLASSIFIER_DIR if args.command == "train-classifier" else bundled_model_path(args.objective)
        if args.bundled and args.out is not None:
            parser.error("give either --out or --bundled, not both")
        args.out = bundled if args.bundled else args.out or f"digits-{name}"
        print(f"writing to {os.path.abspath(args.out)}")
    if args.command == "train":
        info = train_digits_model(
            args.out,
            args.steps,
            args.seed,
            objective=args.objective,
            batch_size=args.batch_size,
            lr=args.lr,
            max_shift=args.max_shift,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            num_threads=args.threads,
        )
    elif args.command == "train-classifier":
        info = train_digits_classifier(args.out, args.epochs, args.seed, num_threads=args.threads)
    else:
        info = write_sample_grid(args.out, args.num, args.steps, args.seed)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
