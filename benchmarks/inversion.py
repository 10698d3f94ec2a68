# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Inversion and editing on the bundled class-conditional latent digits model: the full table and the edit grid.

Runs :func:`diffsamplers.eval.invert_bench.run_invert_bench` (DDIM inversion through diffusers'
``DDIMInverseScheduler``, POLARIS on DDIM, BDIA, POLARIS on BDIA, EDICT; guidance 1, 3 and 7.5; 10, 20 and 50
steps; held-out digits with their own labels, float64) and prints it as a markdown table, then POLARIS-DDIM against
DDIM inversion at guidance >= 3 (PSNR gain and latent RMSE ratio at the same steps), and writes the class-swap grid
(:func:`~diffsamplers.eval.invert_bench.write_edit_grid`: BDIA at guidance 3, 20 steps) to
``docs/inversion_edit_grid.png``. One thread by default (``--threads``)::

    python benchmarks/inversion.py [--num-images 100] [--out bench-out/inversion.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from diffsamplers.eval.invert_bench import (
    GUIDANCE_SCALES,
    STEPS,
    markdown_table,
    polaris_vs_ddim,
    run_invert_bench,
    write_edit_grid,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=100, help="held-out digits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench-out", "inversion.json"), help="JSON records")
    parser.add_argument("--grid", default=os.path.join(ROOT, "docs", "inversion_edit_grid.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    records = run_invert_bench(
        guidance_scales=GUIDANCE_SCALES, steps=STEPS, num_images=args.num_images,
        progress=lambda r: print(f"  {r['method']:>12} w={r['guidance_scale']:<4g} N={r['steps']:<3} "
                                 f"PSNR {r['psnr_db']:.2f} dB, latent RMSE {r['latent_rmse']:.3g}", flush=True),
    )
    print()
    print(markdown_table(records))
    print(f"\nVAE round trip (the ceiling): {records[0]['vae_psnr_db']:.2f} dB over {args.num_images} held-out digits")
    print("\nPOLARIS-DDIM vs DDIM inversion (same guidance and steps):")
    print("| guidance | steps | DDIM PSNR dB | POLARIS PSNR dB | gain dB | latent RMSE DDIM / POLARIS | mean omega |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    comparison = polaris_vs_ddim(records)
    for row in comparison:
        print(f"| {row['guidance_scale']:g} | {row['steps']} | {row['ddim_psnr_db']:.2f} | "
              f"{row['polaris_psnr_db']:.2f} | {row['psnr_gain_db']:+.2f} | {row['latent_rmse_ratio']:.2f} | "
              f"{row['polaris_omega_mean']:.2f} |")
    grid = write_edit_grid(args.grid)
    print(f"\nedit grid: {grid}")
    print(f"total {time.perf_counter() - start:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"records": records, "polaris_vs_ddim": comparison, "edit_grid": grid}, f, indent=1)


if __name__ == "__main__":
    main()
