# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The inversion bench: invert held-out digits, reconstruct them, and score each method against the input.

For each method (DDIM inversion, POLARIS on DDIM, BDIA, POLARIS on BDIA, EDICT), guidance scale and step count,
the held-out digits of :func:`~diffsamplers.models.digits.digits_split` go through the bundled class-conditional
latent model (:func:`~diffsamplers.models.digits_latent.load_digits_latent_pipeline`) with their own labels:
``invert`` then ``reconstruct``. Scores per image, averaged: PSNR and SSIM of the decoded reconstruction against
the 16x16 input (images mapped to [0, 1]; the VAE's own round trip is the ceiling, ``vae_psnr_db``), the latent
RMSE against the encoded input and its largest error, the denoiser passes per image (inversion plus
reconstruction; a CFG evaluation counts 2) and the seconds per image. :func:`write_edit_grid` draws class swaps
(each held-out digit regenerated as every class) and scores them with the bundled digit classifier.

``diffsamplers invert-bench`` runs it (see ``--help``); ``benchmarks/inversion.py`` runs the full table. This module
imports only the standard library at the top, so the command line's ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Any

# bench name -> invert() arguments
METHODS: dict[str, dict[str, Any]] = {
    "ddim": {"method": "ddim"},
    "polaris-ddim": {"method": "polaris", "polaris_backend": "ddim"},
    "bdia": {"method": "bdia"},
    "polaris-bdia": {"method": "polaris", "polaris_backend": "bdia"},
    "edict": {"method": "edict"},
}
GUIDANCE_SCALES = (1.0, 3.0, 7.5)
STEPS = (10, 20, 50)
NUM_IMAGES = 64
CLI_DESCRIPTION = (
    "Invert held-out digits with each method through the bundled class-conditional latent model, reconstruct "
    "them, and score the reconstructions against the input (PSNR, SSIM, latent RMSE, model calls and seconds per "
    "image); draw a class-swap editing grid. Writes OUT/results.json, OUT/table.md and OUT/edit_grid.png."
)
# PSNR of bit-identical images is infinite; exact round trips are shown at this cap
PSNR_CAP_DB = 100.0


def heldout_digits(num_images: int = NUM_IMAGES) -> tuple[Any, list[int]]:
    """The first ``num_images`` held-out digits, upsampled to the VAE's 16x16 in [-1, 1], and their labels."""
    from ..models.digits import digits_split, load_digits_images
    from ..models.digits_latent import upsample_digits

    images, labels = load_digits_images()
    _, test_idx = digits_split()
    if not 1 <= num_images <= len(test_idx):
        raise ValueError(f"num_images must be in 1..{len(test_idx)} (the held-out digits), got {num_images}")
    idx = test_idx[:num_images]
    return upsample_digits(images[idx]), labels[idx].tolist()


def _to_unit(images: Any) -> Any:
    return images.float().clamp(-1, 1).add(1).div(2)


def _mean_psnr(pred: Any, target: Any) -> float:
    from .metrics import psnr

    return float(psnr(pred, target).clamp(max=PSNR_CAP_DB).mean())


@contextlib.contextmanager
def _counting_rows(module: Any):
    """Count the batch rows ``module`` is called on (denoiser passes times images) while the block runs."""
    rows = [0]
    forward = module.forward

    def counted(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        rows[0] += hidden_states.shape[0]
        return forward(hidden_states, *args, **kwargs)

    module.forward = counted
    try:
        yield rows
    finally:
        del module.forward  # the class's forward again


def run_invert_bench(
    pipe: Any = None,
    methods: tuple[str, ...] = tuple(METHODS),
    guidance_scales: tuple[float, ...] = GUIDANCE_SCALES,
    steps: tuple[int, ...] = STEPS,
    num_images: int = NUM_IMAGES,
    gamma: float = 1.0,
    dtype: str = "float64",
    progress: Any = None,
) -> list[dict[str, Any]]:
    """One record per (method, guidance scale, steps); see the module docstring for the columns.

    Args:
        pipe (`DiTPipeline`, *optional*): defaults to the bundled digits-latent pipeline.
        methods (`tuple[str]`): names from :data:`METHODS`.
        guidance_scales (`tuple[float]`), steps (`tuple[int]`): the grid of settings.
        num_images (`int`, defaults to 64): held-out digits, inverted as one batch.
        gamma (`float`, defaults to 1.0): BDIA's weight.
        dtype (`str`, defaults to ``"float64"``): the denoiser's and the latents' dtype.
        progress (`callable`, *optional*): called with each record as it is made.
    """
    import torch

    from ..models.digits_latent import load_digits_latent_pipeline
    from ..pipelines.inversion import decode_images, encode_images, invert, reconstruct
    from .metrics import rmse, ssim

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    pipe = pipe or load_digits_latent_pipeline()
    images, labels = heldout_digits(num_images)
    target = _to_unit(images)
    latents = encode_images(pipe, images)
    vae_recon = _to_unit(decode_images(pipe, latents))
    vae_psnr = _mean_psnr(vae_recon, target)
    records = []
    for steps_n in steps:
        for scale in guidance_scales:
            for name in methods:
                start = time.perf_counter()
                inv = invert(pipe, latents, num_inference_steps=steps_n, guidance_scale=scale, gamma=gamma,
                             dtype=torch_dtype, class_labels=labels, **METHODS[name])
                with _counting_rows(pipe.transformer) as rows:
                    out = reconstruct(pipe, inv, output_type="latent")
                seconds = time.perf_counter() - start
                recon = _to_unit(decode_images(pipe, out))
                omegas = torch.stack(list(inv.guidance_scales.values()))
                record = {
                    "method": name,
                    "guidance_scale": scale,
                    "steps": steps_n,
                    "psnr_db": round(_mean_psnr(recon, target), 3),
                    "psnr_vs_vae_db": round(_mean_psnr(recon, vae_recon), 3),
                    "ssim": round(float(ssim(recon, target).mean()), 4),
                    "latent_rmse": float(rmse(out, latents).mean()),
                    "latent_max_error": float((out.double() - latents.double()).abs().max()),
                    "model_calls_per_image": inv.model_calls + rows[0] // num_images,
                    "seconds_per_image": round(seconds / num_images, 5),
                    "omega_mean": round(float(omegas.mean()), 4),
                    "omega_min": round(float(omegas.min()), 4),
                    "omega_max": round(float(omegas.max()), 4),
                    "noise_std": round(float(inv.latents.std()), 4),
                    "vae_psnr_db": round(vae_psnr, 3),
                    "num_images": num_images,
                    "dtype": dtype,
                }
                records.append(record)
                if progress is not None:
                    progress(record)
    return records


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The records as a markdown table (one row per method, guidance scale and steps)."""
    header = ("| method | guidance | steps | PSNR dB (vs input) | PSNR dB (vs VAE recon) | SSIM | latent RMSE | "
              "latent max err | model calls / image | s / image |")
    lines = [header, "|" + " --- |" * 10]
    for r in records:
        lines.append(
            f"| {r['method']} | {r['guidance_scale']:g} | {r['steps']} | {r['psnr_db']:.2f} | "
            f"{r['psnr_vs_vae_db']:.2f} | {r['ssim']:.4f} | {r['latent_rmse']:.3g} | {r['latent_max_error']:.2g} | "
            f"{r['model_calls_per_image']} | {r['seconds_per_image']:.4f} |"
        )
    return "\n".join(lines)


def polaris_vs_ddim(records: list[dict[str, Any]], min_guidance: float = 3.0) -> list[dict[str, Any]]:
    """POLARIS-DDIM against DDIM inversion at the same guidance (>= ``min_guidance``) and steps: the PSNR gain (dB)
    and the latent RMSE ratio (DDIM / POLARIS; > 1 means POLARIS is closer)."""
    by_key = {(r["method"], r["guidance_scale"], r["steps"]): r for r in records}
    rows = []
    for (method, scale, steps_n), polaris in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        ddim = by_key.get(("ddim", scale, steps_n))
        if method != "polaris-ddim" or ddim is None or scale < min_guidance:
            continue
        rows.append({
            "guidance_scale": scale, "steps": steps_n, "ddim_psnr_db": ddim["psnr_db"],
            "polaris_psnr_db": polaris["psnr_db"], "psnr_gain_db": round(polaris["psnr_db"] - ddim["psnr_db"], 3),
            "latent_rmse_ratio": round(ddim["latent_rmse"] / polaris["latent_rmse"], 3),
            "polaris_omega_mean": polaris["omega_mean"],
        })
    return rows


def write_edit_grid(
    out: str,
    pipe: Any = None,
    num_images: int = 8,
    method: str = "bdia",
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    scale: int = 3,
) -> dict[str, Any]:
    """A PNG of class swaps: one row per held-out digit (input, VAE reconstruction, the method's reconstruction,
    then the inversion regenerated as each class 0..9), and the bundled classifier's accuracy on the edits (the
    target class) and on the reconstructions (the true class)."""
    import torch

    from ..models.digits import classifier_accuracy, image_grid, load_digits_classifier
    from ..models.digits_latent import NUM_CLASSES, downsample_digits, load_digits_latent_pipeline
    from ..pipelines.inversion import decode_images, edit, encode_images, invert, reconstruct

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    pipe = pipe or load_digits_latent_pipeline()
    images, labels = heldout_digits(num_images)
    latents = encode_images(pipe, images)
    inv = invert(pipe, latents, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 class_labels=labels, **METHODS[method])
    recon = reconstruct(pipe, inv).float()
    edits = [edit(pipe, inv, class_labels=[c] * num_images).float() for c in range(NUM_CLASSES)]
    columns = [images, decode_images(pipe, latents).float(), recon, *edits]
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: one digit per row
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    image_grid(grid, ncol=len(columns), scale=scale).save(out)
    classifier = load_digits_classifier()
    edited = torch.cat(edits)
    targets = torch.arange(NUM_CLASSES).repeat_interleave(num_images)
    return {
        "path": out, "method": method, "guidance_scale": guidance_scale, "steps": num_inference_steps,
        "num_images": num_images,
        "edit_accuracy": classifier_accuracy(classifier, downsample_digits(edited.clamp(-1, 1)), targets),
        "reconstruction_accuracy": classifier_accuracy(classifier, downsample_digits(recon.clamp(-1, 1)),
                                                       torch.tensor(labels)),
    }


# ---------------------------------------------------------------------------------------------------------------
# command line (``diffsamplers invert-bench``)
# ---------------------------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 or v != v for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 2, got {text!r}")
    return values


def _methods(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in METHODS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown or text!r}; choose from {','.join(METHODS)}")
    return values


def add_invert_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``invert-bench`` sub-command to an ``argparse`` sub-parser collection; returns its parser."""
    p = subparsers.add_parser(
        "invert-bench", help="inversion bench: DDIM, POLARIS, BDIA, EDICT round trips on held-out digits",
        description=CLI_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--methods", type=_methods, default=",".join(METHODS), metavar="A,B,...",
                   help=f"methods, from {','.join(METHODS)}")
    p.add_argument("--guidance", type=_floats, default=",".join(f"{w:g}" for w in GUIDANCE_SCALES), metavar="W,...",
                   help="guidance scales")
    p.add_argument("--steps", type=_ints, default=",".join(map(str, STEPS)), metavar="N,...", help="step counts")
    p.add_argument("--num-images", type=int, default=NUM_IMAGES, help="held-out digits (one batch)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="denoiser and latent dtype (exactness needs float64)")
    p.add_argument("--out", default="invert-bench-out",
                   help="output folder: results.json, table.md, edit_grid.png")
    p.add_argument("--no-grid", action="store_true", help="skip the class-swap grid")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.set_defaults(func=run_invert_bench_cli)
    return p


def run_invert_bench_cli(args: argparse.Namespace) -> int:
    """Run the bench with the parsed arguments; writes ``--out`` and prints the table."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    records = run_invert_bench(methods=tuple(args.methods), guidance_scales=tuple(args.guidance),
                               steps=tuple(args.steps), num_images=args.num_images, dtype=args.dtype)
    result: dict[str, Any] = {"records": records, "polaris_vs_ddim": polaris_vs_ddim(records)}
    if not args.no_grid:
        result["edit_grid"] = write_edit_grid(os.path.join(args.out, "edit_grid.png"))
    table = markdown_table(records)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0
