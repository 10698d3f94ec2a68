# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The ``diffsamplers`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsamplers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="compare samplers against full-step / exact ground truth")
    bench.add_argument(
        "--model",
        default="digits",
        help="'digits' (the bundled DDPM, default), 'testbed' (the exact Gaussian mixture), or a diffusers "
        "pipeline folder / repo id",
    )
    bench.add_argument("--samplers", type=_name_list, default=None, help="comma-separated sampler names")
    bench.add_argument("--nfe", type=_int_list, default=None, help="comma-separated model-call budgets")
    bench.add_argument("--num-samples", type=int, default=None, help="samples per (sampler, NFE)")
    bench.add_argument("--prompts", default=None, help="text file, one prompt per line (text-to-image models)")
    bench.add_argument("--features", choices=["auto", "inception", "digits"], default="auto",
                       help="FID feature network: auto = digit classifier for the bundled model, else Inception")
    bench.add_argument("--inception", default=None, help="path of a TorchScript Inception network (optional)")
    bench.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale with --prompts")
    bench.add_argument("--gt-steps", type=int, default=200, help="steps of the DPM-Solver++(2M) ground truth")
    bench.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", default="bench-out", help="output folder (results.json, plots)")
    bench.add_argument("--list", action="store_true", help="list the known samplers and exit")
    return parser


def run_bench(args: argparse.Namespace) -> list[dict]:
    from . import report
    from .samplers import digits_stats, sampler_registry

    # the testbed and the bundled model share their data (scikit-learn's digits): teleportation has its statistics
    registry = sampler_registry(digits_stats() if args.model in ("digits", "testbed") else None)
    if args.list:
        for name, spec in registry.items():
            print(name if spec.default else f"{name} (on request)")
        return []
    names = args.samplers or [name for name, spec in registry.items() if spec.default]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"diffsamplers bench: unknown sampler(s) {unknown}; known: {sorted(registry)}")
    if args.num_samples is not None and args.num_samples < 1:
        raise SystemExit("diffsamplers bench: --num-samples must be positive")
    start = time.perf_counter()
    selected = {n: registry[n] for n in names}
    if args.model == "testbed":
        return _bench_testbed(args, selected, start)
    import torch

    from .bench import bench_model, digits_bench_model, pipeline_bench_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.model == "digits":
        model, feature_net = digits_bench_model(device)
        if args.features == "inception":
            feature_net = _inception(args, device)
    else:
        prompts = None
        if args.prompts:
            with open(args.prompts) as f:
                prompts = [line.strip() for line in f if line.strip()]
            if not prompts:
                raise SystemExit(f"diffsamplers bench: {args.prompts} holds no prompt")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        model = pipeline_bench_model(args.model, prompts, device, dtype, args.guidance_scale)
        if args.features == "digits":
            raise SystemExit("diffsamplers bench: --features digits only applies to the bundled digits model")
        feature_net = _inception(args, device)
    records = bench_model(
        model, selected, args.nfe or [4, 6, 8, 10, 20], num_samples=args.num_samples or 256, feature_net=feature_net,
        out_dir=args.out, seed=args.seed, gt_steps=args.gt_steps,
    )
    print(f"{model.name}: {args.num_samples or 256} samples, ground truth = DPM-Solver++(2M) {args.gt_steps} steps")
    print(report.format_table(records, ["sampler", "nfe", "fid_vs_gt", "psnr_vs_gt", "rmse_vs_gt",
                                        "seconds_per_image"]))
    print(f"\nwrote {args.out}/results.json, fid_vs_nfe.png and grid_*.png in {time.perf_counter() - start:.1f} s")
    return records


def _inception(args: argparse.Namespace, device: str):
    from .features import load_inception

    return load_inception(args.inception, device=device, resize="fast" if device != "cpu" else "clean")


def _bench_testbed(args: argparse.Namespace, selected: dict, start: float) -> list[dict]:
    from . import report
    from .testbed import exact_testbed_errors

    nfes = args.nfe or [5, 10, 20, 50]
    records = exact_testbed_errors(selected, nfes, num_samples=args.num_samples or 64, seed=args.seed, progress=True)
    columns = ["sampler", "nfe", "rmse_vs_gt", "seconds_per_image"]
    title = "exact Gaussian-mixture testbed (digits, 8x8): RMSE vs exact ODE solution"
    report.write_json(records, os.path.join(args.out, "results.json"))
    report.plot_metric_vs_nfe(records, "rmse_vs_gt", os.path.join(args.out, "rmse_vs_nfe.png"), title=title,
                              ylabel="RMSE vs exact solution")
    print(title)
    print(report.format_table(records, columns))
    print(f"\nwrote {args.out}/results.json and {args.out}/rmse_vs_nfe.png in {time.perf_counter() - start:.1f} s")
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
