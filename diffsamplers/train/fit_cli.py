# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""``diffsamplers fit``: fit a solver to one model and save it as a diffusers scheduler folder.

    diffsamplers fit olss --model digits --nfe 5 --out digits-olss-5
    diffsamplers fit bespoke --model digits --nfe 6 --solver-type rk2 --out digits-bespoke-6
    diffsamplers fit bns --model digits --nfe 5 --out digits-bns-5
    diffsamplers fit timesteps --model digits --nfe 5 --base dpmpp2m --out digits-grid-5

``--model`` is ``testbed`` (the Gaussian-mixture digits, exact references), ``digits`` (the bundled DDPM) or a
diffusers pipeline folder of an unconditional UNet (``unet/`` and ``scheduler/``). The reference trajectories
(DPM-Solver++(2M) at ``--reference-steps``, exact finals on the testbed) of ``--num-train`` training and
``--num-val`` validation seeds are cached in ``OUT/banks`` (an interrupted build resumes); the fitted scheduler is
saved in ``OUT`` and loads with ``<Class>.from_pretrained(OUT)`` (``OLSSScheduler``, ``BespokeScheduler``,
``BNSScheduler``, ``LearnedTimestepsScheduler``). Every scheduler runs from pure noise on trailing spacing, as the
bench does. Searches checkpoint into ``OUT/banks``: an interrupted fit resumes.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

METHODS = ("olss", "bespoke", "bns", "timesteps")
FIT_CLASSES = {"olss": "OLSSScheduler", "bespoke": "BespokeScheduler", "bns": "BNSScheduler",
               "timesteps": "LearnedTimestepsScheduler"}


def add_fit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``fit`` sub-command to an ``argparse`` sub-parser collection; returns its parser."""
    p = subparsers.add_parser(
        "fit", help="fit a solver (OLSS, Bespoke, BNS, a learned time grid) to a model; saves a diffusers scheduler "
        "folder",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("method", choices=METHODS, help="'olss' (OLSSScheduler), 'bespoke' (BespokeScheduler), 'bns' "
                   "(BNSScheduler) or 'timesteps' (a learned grid for DPM-Solver++(2M) or DDIM: "
                   "LearnedTimestepsScheduler)")
    p.add_argument("--model", default="digits", help="'testbed', 'digits' or an unconditional pipeline folder")
    p.add_argument("--nfe", type=int, required=True, help="model calls of the fitted solver")
    p.add_argument("--base", choices=("dpmpp2m", "ddim"), default="dpmpp2m", help="solver of a learned grid")
    p.add_argument("--num-train", type=int, default=128, help="training seeds")
    p.add_argument("--num-val", type=int, default=64, help="validation seeds (the best validated fit is kept)")
    p.add_argument("--reference-steps", type=int, default=200, help="DPM-Solver++(2M) steps of the references")
    p.add_argument("--iterations", type=int, default=150, help="search iterations (learned grid, Bespoke, BNS times)")
    p.add_argument("--solver-type", choices=("rk1", "rk2"), default="rk2", help="Bespoke's base method")
    p.add_argument("--loss", choices=("rmse", "bound"), default="rmse", help="Bespoke's training loss")
    p.add_argument("--refine-iterations", type=int, default=200, help="BNS: joint refinement iterations")
    p.add_argument("--out", required=True, help="output folder: the scheduler, and banks/ (the reference cache)")
    p.add_argument("--overwrite", action="store_true", help="replace a scheduler saved in --out before")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_fit)
    return p


def load_fit_model(model: str, device: Any = "cpu") -> Any:
    """``testbed``, ``digits`` or an unconditional pipeline folder as a :class:`~diffsamplers.train.bank.FitModel`
    on the bench's sampling config (trailing spacing, no x0 clipping)."""
    import torch

    from .bank import FitModel

    if model == "testbed":
        from ..eval.testbed import TESTBED_CONFIG
        from ..models import GaussianMixtureModel

        gmm = GaussianMixtureModel.digits(scheduler_config=dict(TESTBED_CONFIG))
        return FitModel(gmm, dict(TESTBED_CONFIG), tuple(gmm.shape), "testbed:digits", exact=gmm, dtype=torch.float64)
    if model == "digits":
        from ..models.digits import load_digits_pipeline

        pipe = load_digits_pipeline(device=device)
        unet, config, name = pipe.unet, pipe.scheduler.config, "diffsamplers/digits-ddpm"
    else:
        from diffusers import DDPMScheduler, UNet2DModel

        if not os.path.isdir(os.path.join(model, "unet")) or not os.path.isdir(os.path.join(model, "scheduler")):
            raise ValueError(f"--model {model!r}: not 'testbed', 'digits' or a pipeline folder with unet/ and "
                             "scheduler/")
        if json.loads(open(os.path.join(model, "unet", "config.json")).read()).get("_class_name") != "UNet2DModel":
            raise ValueError(f"--model {model!r}: the command line fits unconditional UNet2DModel pipelines; fit "
                             "conditional ones from Python with a FitModel that holds the condition (call_kwargs)")
        unet = UNet2DModel.from_pretrained(model, subfolder="unet", use_safetensors=True).to(device)
        config, name = DDPMScheduler.load_config(model, subfolder="scheduler"), os.path.abspath(model)
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    config.update(timestep_spacing="trailing", clip_sample=False)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return FitModel(unet.eval(), config, shape, name, device=device)


def fit_solver(
    method: str,
    model: Any,
    nfe: int,
    *,
    base: str = "dpmpp2m",
    num_train: int = 128,
    num_val: int = 64,
    reference_steps: int = 200,
    iterations: int = 150,
    solver_type: str = "rk2",
    loss: str = "rmse",
    refine_iterations: int = 200,
    cache_dir: str | os.PathLike | None = None,
    avoid_seeds: list[int] | None = None,
    progress: bool = True,
) -> Any:
    """Build (or reuse from ``cache_dir``) the training and validation banks and fit ``method`` for ``nfe`` calls;
    returns the fitted scheduler (``OLSSScheduler``, ``BespokeScheduler``, ``BNSScheduler`` or
    ``LearnedTimestepsScheduler``) with its provenance in ``config.fit_info``; ``solver_type`` and ``loss`` are
    Bespoke's, ``refine_iterations`` BNS's. ``avoid_seeds`` (e.g. a bench's) must not meet the fitting seeds."""
    from .bank import build_bank, check_disjoint, split_seeds

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    seeds = split_seeds(num_train, num_val)
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if avoid_seeds is not None:
        check_disjoint(seeds["train"] + seeds["val"], avoid_seeds, "fitting seeds")
    banks = {split: build_bank(model, seeds[split], reference_steps=reference_steps, cache_dir=cache_dir,
                               progress=progress) for split in ("train", "val")}
    if method == "olss":
        from .olss import fit_olss

        return fit_olss(model, banks["train"], nfe, val_bank=banks["val"])

    def checkpoint(name: str) -> str | None:
        return None if cache_dir is None else os.path.join(cache_dir, name)

    if method == "bespoke":
        from .bespoke import train_bespoke

        return train_bespoke(model, banks["train"], nfe, solver_type=solver_type, loss=loss, val_bank=banks["val"],
                             iterations=iterations, checkpoint=checkpoint(f"bespoke-{solver_type}-{loss}-{nfe}.json"),
                             progress=progress)
    if method == "bns":
        from .bns import train_bns

        return train_bns(model, banks["train"], nfe, val_bank=banks["val"], iterations=iterations,
                         refine_iterations=refine_iterations, checkpoint=checkpoint(f"bns-{nfe}"), progress=progress)
    from .timegrid import fit_timesteps

    return fit_timesteps(model, banks["train"], nfe, base=base, val_bank=banks["val"], iterations=iterations,
                         checkpoint=checkpoint(f"timesteps-{base}-{nfe}.json"), progress=progress).scheduler


def run_fit(args: argparse.Namespace) -> int:
    """Run ``diffsamplers fit`` from parsed arguments; returns the exit status (0 on success)."""
    for name in ("nfe", "num_train", "num_val", "reference_steps", "iterations"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.refine_iterations < 0:
        raise ValueError(f"--refine-iterations must be >= 0, got {args.refine_iterations}")
    if args.method == "bespoke" and args.solver_type == "rk2" and args.nfe % 2:
        raise ValueError(f"--nfe must be even for --solver-type rk2 (two model calls per step), got {args.nfe}")
    saved = os.path.join(args.out, "scheduler_config.json")
    if os.path.exists(saved) and not args.overwrite:
        raise ValueError(f"--out {args.out}: holds a fitted scheduler already; give --overwrite to replace it")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_fit_model(args.model, args.device)
    scheduler = fit_solver(args.method, model, args.nfe, base=args.base, num_train=args.num_train,
                           num_val=args.num_val, reference_steps=args.reference_steps, iterations=args.iterations,
                           solver_type=args.solver_type, loss=args.loss, refine_iterations=args.refine_iterations,
                           cache_dir=os.path.join(args.out, "banks"), progress=not args.no_progress)
    scheduler.save_pretrained(args.out)
    info = scheduler.config.fit_info
    print(f"fitted {FIT_CLASSES[args.method]} for {args.nfe} model calls in {info['fit_seconds']:.1f} s "
          f"(validation RMSE {info['val_rmse']:.4g}); load it with "
          f"diffsamplers.{FIT_CLASSES[args.method]}.from_pretrained({args.out!r})")
    return 0
