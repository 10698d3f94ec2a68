# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Inverse problems on the bundled latent digits model: DPS, PSLD and STSL at several model-call budgets.

Runs :func:`diffsamplers.eval.inverse_bench.run_inverse_bench` (box inpainting, x4 super-resolution and Gaussian
deblurring of held-out digits at sigma_y = 0.05; budgets of 24, 50, 100 and 200 model calls per image; each
method's weights tuned per task and budget on 8 validation digits, scored on 32 other test digits), prints the
table and the answer to the STSL paper's claim (PSLD's PSNR with 4x fewer model calls: STSL at <= B/4 calls against
PSLD at B, paired over the test images), STSL against PSLD at equal steps, the second-order term with an exact
multi-probe estimator (is the one-probe estimate the limit?), and draws examples with the tuned weights at 100 calls to
``docs/inverse_problems.png``. Finished settings are checkpointed to ``--out``, so an interrupted run resumes.
About 30 minutes on one CPU thread (the default, ``--threads``)::

    python benchmarks/inverse_problems.py [--out bench-out/inverse_problems.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from diffsamplers.eval.inverse_bench import (
    BUDGETS,
    TASKS,
    claim_table,
    equal_steps_table,
    markdown_table,
    run_inverse_bench,
    trace_term_ablation,
    write_examples,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="model calls per image")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench-out", "inverse_problems.json"),
                        help="JSON records (also the resume checkpoint)")
    parser.add_argument("--figure", default=os.path.join(ROOT, "docs", "inverse_problems.png"))
    parser.add_argument("--figure-calls", type=int, default=100, help="model calls per image in the figure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = tuple(int(b) for b in args.budgets.split(","))

    start = time.perf_counter()
    records = run_inverse_bench(
        budgets=budgets, checkpoint=args.out,
        progress=lambda r: print(f"  {r['task']:>4} {r['method']:>4} {r['model_calls_per_image']:>3} calls: "
                                 f"c={r['weight']:g} rho={r['rho']:g}  PSNR {r['psnr_db']:.2f} dB, SSIM "
                                 f"{r['ssim']:.3f}, residual {r['residual']:.3f}  (tuning {r['tune_seconds']:.0f} s)",
                                 flush=True),
    )
    print()
    print(markdown_table(records))
    first = records[0]
    print(f"\nVAE round trip (the ceiling): {first['vae_psnr_db']:.2f} dB over {first['num_test']} test digits")
    print("\nSTSL at <= B/4 model calls vs PSLD at B (paired over the test digits):")
    print("| task | PSLD calls | PSLD PSNR | STSL calls | STSL PSNR | STSL - PSLD dB (+- s.e.) | matches | "
          "PSLD at STSL's calls | STSL gain there dB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    claims = claim_table(records)
    for row in claims:
        print(f"| {row['task']} | {row['psld_calls']} | {row['psld_psnr_db']:.2f} | {row['stsl_calls']} | "
              f"{row['stsl_psnr_db']:.2f} | {row['difference_db']:+.2f} (+- {row['standard_error_db']:.2f}) | "
              f"{'yes' if row['matches'] else 'no'} | {row.get('psld_at_stsl_calls_psnr_db', float('nan')):.2f} | "
              f"{row.get('stsl_gain_at_equal_calls_db', float('nan')):+.2f} "
              f"(+- {row.get('stsl_gain_standard_error_db', float('nan')):.2f}) |")
    print("\nSTSL vs PSLD at the same number of steps (what the second-order term buys; STSL makes 2x the calls):")
    print("| task | steps STSL / PSLD | rho | STSL PSNR | PSLD PSNR | gain dB (+- s.e.) |")
    print("| --- | --- | --- | --- | --- | --- |")
    same_steps = equal_steps_table(records)
    for row in same_steps:
        print(f"| {row['task']} | {row['stsl_steps']} / {row['psld_steps']} | {row['stsl_rho']:g} | "
              f"{row['stsl_psnr_db']:.2f} | {row['psld_psnr_db']:.2f} | {row['gain_db']:+.2f} "
              f"(+- {row['standard_error_db']:.2f}) |")
    print("\nThe second-order term with a better estimator (STSL at PSLD's tuned weight, 50 steps, test digits):")
    print("| task | estimator | probes | rho | calls / image | PSNR dB | gain over PSLD dB (+- s.e.) | s / image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ablation = []
    for task in ("sr4", "box"):
        if 50 not in budgets:
            break
        for row in trace_term_ablation(records, task=task, calls=50):
            ablation.append(row)
            print(f"| {row['task']} | {row['estimator']} | {row['probes']} | {row['rho']:g} | "
                  f"{row['model_calls_per_image']} | {row['psnr_db']:.2f} | {row['gain_db']:+.2f} "
                  f"(+- {row['standard_error_db']:.2f}) | {row['seconds_per_image']:.3f} |", flush=True)
    calls = args.figure_calls if args.figure_calls in budgets else max(budgets)
    settings = {task: {r["method"]: (r["weight"], r["rho"]) for r in records
                       if r["task"] == task and r["calls"] == calls} for task in TASKS}
    figure = write_examples(args.figure, settings=settings, calls=calls)
    print(f"\nexamples: {figure}\ntotal {time.perf_counter() - start:.0f} s")
    with open(args.out, "w") as f:
        json.dump({"records": records, "claim": claims, "equal_steps": same_steps, "trace_ablation": ablation,
                   "figure": figure}, f, indent=1)


if __name__ == "__main__":
    main()
