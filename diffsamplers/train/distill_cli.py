# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""``diffsamplers distill``: SLAM / LCD distillation of a diffusers teacher into a few-step student.

The bundled student ``diffsamplers/models/bundled/digits-slam`` was made with::

    diffsamplers distill --teacher digits --data digits --out digits-slam --threads 1

(``--gamma-sampling fixed:1.0 --out digits-lcd`` for the LCD baseline). ``--teacher`` is a pipeline folder (or Hub
repo id) with ``unet/`` (or ``transformer/``) and ``scheduler/``, or ``digits`` for the bundled digits DDPM;
``--data`` is ``digits`` (scikit-learn's digits in [-1, 1]) or a safetensors file with a ``latents`` tensor
(N, C, H, W) and optionally ``conditions`` (N, ...) and ``unconditional`` (1, ...) for classifier-free guidance,
so no VAE or text encoder is needed at training time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

DIGITS = "digits"


def add_distill_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``distill`` sub-command to an ``argparse`` sub-parser collection; returns its parser."""
    p = subparsers.add_parser(
        "distill", help="distil a teacher into a 1-4 step SLAM (or LCD) student",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--teacher", required=True, help="pipeline folder / repo id with unet/ and scheduler/, or 'digits'")
    p.add_argument("--data", required=True, help="'digits' or a safetensors file with 'latents' (+ 'conditions')")
    p.add_argument("--out", required=True, help="output folder: the student (unet/, scheduler/) and checkpoints")
    p.add_argument("--max-train-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--loss-type", choices=("l2", "huber"), default="huber")
    p.add_argument("--huber-c", type=float, default=1e-3)
    p.add_argument("--gamma-sampling", default="uniform", help="'uniform', 'fixed:1.0' (LCD) or 'beta:A,B'")
    p.add_argument("--gamma-cond", choices=("auto", "time_cond_proj", "effective_timestep"), default="auto")
    p.add_argument("--sigma-rule", choices=("variance", "linear"), default="variance")
    p.add_argument("--num-ddim-timesteps", type=int, default=50)
    p.add_argument("--guidance-w", type=float, default=None, help="CFG of conditional teachers (LCM form)")
    p.add_argument("--ema-decay", type=float, default=0.95)
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--checkpointing-steps", type=int, default=500)
    p.add_argument("--checkpoints-total-limit", type=int, default=2)
    p.add_argument("--resume", default=None, help="a checkpoint folder or 'latest' (in --out)")
    p.add_argument("--save", choices=("online", "target"), default="online", help="which network becomes unet/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_distill)
    return p


def _load_teacher(spec: str) -> tuple[Any, dict]:
    if spec == DIGITS:
        from ..models.digits import load_digits_pipeline

        pipe = load_digits_pipeline()
        return pipe.unet, dict(pipe.scheduler.config)
    from diffusers import DDPMScheduler
    from diffusers.models import AutoModel

    if os.path.isdir(spec) and not any(os.path.isdir(os.path.join(spec, f)) for f in ("unet", "transformer")):
        raise ValueError(f"--teacher {spec!r}: no unet/ or transformer/ folder inside")
    sub = "transformer" if os.path.isdir(os.path.join(spec, "transformer")) else "unet"
    net = AutoModel.from_pretrained(spec, subfolder=sub, use_safetensors=True)
    config = dict(DDPMScheduler.load_config(spec, subfolder="scheduler"))
    return net, config


def _load_data(spec: str, batch_size: int, seed: int) -> tuple[Any, Any]:
    import torch

    from .._io import load_safetensors

    if spec == DIGITS:
        from ..models.digits import load_digits_images

        latents, _ = load_digits_images()
        conds, uncond = None, None
    else:
        if not os.path.isfile(spec):
            raise ValueError(f"--data {spec!r}: no such file (give 'digits' or a safetensors file)")
        tensors, _, _ = load_safetensors(spec)
        if "latents" not in tensors:
            raise ValueError(f"--data {spec}: no 'latents' tensor (found {sorted(tensors)})")
        latents, conds, uncond = tensors["latents"], tensors.get("conditions"), tensors.get("unconditional")
        if conds is not None and conds.shape[0] != latents.shape[0]:
            raise ValueError(f"--data {spec}: 'conditions' has {conds.shape[0]} rows, 'latents' {latents.shape[0]}")
    if latents.ndim != 4 or latents.shape[0] < batch_size:
        raise ValueError(f"--data {spec}: need latents (N >= batch size {batch_size}, C, H, W), got "
                         f"{tuple(latents.shape)}")
    # one fixed permutation instead of per-epoch shuffling: the order is then a function of the step alone, which
    # keeps --resume exact
    perm = torch.randperm(latents.shape[0], generator=torch.Generator().manual_seed(seed))
    items = latents[perm] if conds is None else torch.utils.data.TensorDataset(latents[perm], conds[perm])
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False, drop_last=True)
    return loader, uncond


def run_distill(args: argparse.Namespace) -> int:
    """Run ``diffsamplers distill`` from parsed arguments; returns the exit status (0 on success)."""
    import torch

    from .slam import SLAMConfig, SLAMDistiller

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # the data first: its mistakes are found without loading a network
    loader, uncond = _load_data(args.data, args.batch_size, args.seed)
    teacher, sched_config = _load_teacher(args.teacher)
    config = SLAMConfig(
        num_ddim_timesteps=args.num_ddim_timesteps, gamma_sampling=args.gamma_sampling, sigma_rule=args.sigma_rule,
        gamma_cond=args.gamma_cond, guidance_w=args.guidance_w if uncond is not None else None,
        loss_type=args.loss_type, huber_c=args.huber_c, ema_decay=args.ema_decay, mode=args.mode,
        lora_rank=args.lora_rank, lora_alpha=args.lora_rank, learning_rate=args.learning_rate,
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_train_steps=args.max_train_steps, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, seed=args.seed,
    )
    distiller = SLAMDistiller(teacher, sched_config, loader, config, output_dir=args.out,
                              unconditional_condition=uncond)
    if args.resume:
        distiller.load_checkpoint(args.resume)
    start = time.perf_counter()
    losses = distiller.train(progress=not args.no_progress)
    wall = time.perf_counter() - start
    tail = losses[-500:] if losses else distiller.history[-500:]
    info = dict(teacher=args.teacher, data=args.data, batch_size=args.batch_size, threads=args.threads,
                wall_time_s=round(wall, 1), final_loss=(sum(tail) / len(tail)) if tail else None,
                torch=torch.__version__)
    distiller.save_student(args.out, which=args.save, info=info)
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m diffsamplers.train.distill_cli distill ...`` (the same as ``diffsamplers distill ...``)."""
    parser = argparse.ArgumentParser(prog="diffsamplers")
    add_distill_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
