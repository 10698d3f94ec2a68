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
        default="testbed",
        help="'testbed' (exact Gaussian mixture, default), 'digits' (the bundled DDPM), or a diffusers folder/repo id",
    )
    bench.add_argument("--samplers", type=_name_list, default=None, help="comma-separated sampler names")
    bench.add_argument("--nfe", type=_int_list, default=None, help="comma-separated model-call budgets")
    bench.add_argument("--num-samples", type=int, default=None, help="samples per (sampler, NFE)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", default="bench-out", help="output folder (results.json, plots)")
    bench.add_argument("--list", action="store_true", help="list the known samplers and exit")
    return parser


def run_bench(args: argparse.Namespace) -> list[dict]:
    from . import report
    from .samplers import sampler_registry

    registry = sampler_registry()
    if args.list:
        for name in registry:
            print(name)
        return []
    names = args.samplers or list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"diffsamplers bench: unknown sampler(s) {unknown}; known: {sorted(registry)}")
    if args.num_samples is not None and args.num_samples < 1:
        raise SystemExit("diffsamplers bench: --num-samples must be positive")
    start = time.perf_counter()
    if args.model != "testbed":
        raise SystemExit(f"diffsamplers bench: --model {args.model!r} is not available in this version")
    from .testbed import exact_testbed_errors

    nfes = args.nfe or [5, 10, 20, 50]
    records = exact_testbed_errors(
        {n: registry[n] for n in names}, nfes, num_samples=args.num_samples or 64, seed=args.seed, progress=True
    )
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
