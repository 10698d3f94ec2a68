# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Analytical Gaussian teleportation (Wang & Vastola, arXiv 2412.09726): closed form, frames, statistics, the
scheduler wrapper and the pipeline helper."""

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffsamplers.eval.testbed import TESTBED_CONFIG, run_scheduler
from diffsamplers.models import GaussianMixtureModel, exact_solution
from diffsamplers.pipelines import GaussianStats, teleport_pipeline
from diffsamplers.samplers import TeleportScheduler, frame_coeffs, latent_frame, teleport
from diffsamplers.schedule import frame_level, gaussian_flow_map

CFG = dict(TESTBED_CONFIG)
VP = DDIMScheduler(timestep_spacing="trailing").config
FLOW = FlowMatchEulerDiscreteScheduler().config
EDM = EDMEulerScheduler().config
SOLVERS = {
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "dpmpp2m": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++"),
    "unipc": lambda c: UniPCMultistepScheduler.from_config(c),
}


def gaussian_model(config, full_rank: bool, seed: int = 0):
    """One Gaussian on 1x3x4 'images': rank-5 factors plus (full rank) an isotropic 0.05 or (deficient) nothing."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, 1, 3, 4, generator=g, dtype=torch.float64)
    factors = 0.7 * torch.randn(1, 12, 5, generator=g, dtype=torch.float64)
    diag = torch.full((1, 12), 0.05 if full_rank else 0.0, dtype=torch.float64)
    return GaussianMixtureModel(mean, scheduler_config=config, factors=factors, diag=diag)


def model_stats(model, **kwargs):
    return GaussianStats.from_moments(model.means[0].reshape(model.shape), model.covariances()[0], **kwargs)


def level(model, t):
    return tuple(float(v) for v in model.schedule.alpha_sigma(t))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def single_gaussian():
    """The digits data as one Gaussian (rank-8 factors plus an isotropic residual), D = 64, on the testbed
    schedule; its statistics are exact, so teleporting it makes no approximation."""
    digits = GaussianMixtureModel.digits(scheduler_config=CFG)
    data = digits.sample_data(2000, generator=torch.Generator().manual_seed(0))
    model = GaussianMixtureModel.from_data(data, torch.zeros(len(data)), rank=8, scheduler_config=CFG)
    return model, model_stats(model)


# ----------------------------------------------------------------------------------------------------------------
# The closed form
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame, full_rank",
    [("vp", True), ("vp", False), ("flow", True), ("flow", False), ("ve", True), ("ve", False)],
)
def test_closed_form_matches_ode(frame, full_rank):
    config, t0, t1 = {
        "vp": (VP, 700, 200),
        "flow": (FLOW, 900, 300),
        "ve": (EDM, math.log(20.0) / 4, math.log(0.3) / 4),  # EDM timesteps are c_noise = log(sigma) / 4
    }[frame]
    model = gaussian_model(config, full_rank)
    lv0, lv1 = level(model, t0), level(model, t1)
    g = torch.Generator().manual_seed(1)
    x = lv0[0] * model.means.reshape(1, 1, 3, 4) + lv0[1] * 2 * torch.randn(
        2, 1, 3, 4, generator=g, dtype=torch.float64
    )
    stats = model_stats(model)
    assert stats.rank == 12 and (full_rank or stats.eigvals[5:].max() < 1e-12)
    got = teleport(x, stats, lv0, lv1)
    reference = exact_solution(model, x, t0, t1)  # torchdiffeq dopri5, float64, rtol = atol = 1e-10
    assert (got - reference).abs().max() <= 1e-8
    torch.testing.assert_close(got, exact_solution(model, x, t0, t1, method="closed_form"), rtol=0, atol=1e-12)


def test_ve_frame_of_euler_equals_vp_frame():
    """Teleporting Euler-style VE latents x / a agrees with the VP frame and the flow frame."""
    model = gaussian_model(VP, full_rank=False)
    stats = model_stats(model)
    g = torch.Generator().manual_seed(2)
    x_vp = torch.randn(3, 1, 3, 4, generator=g, dtype=torch.float64)
    (a0, s0), (a1, s1) = level(model, 999), level(model, 300)
    vp = teleport(x_vp, stats, (a0, s0), (a1, s1))
    ve = teleport(x_vp / a0, stats, frame_level("ve", s0 / a0), frame_level("ve", s1 / a1))
    torch.testing.assert_close(ve * a1, vp, rtol=0, atol=1e-12)
    assert frame_level("vp", s0 / a0) == pytest.approx((a0, s0), rel=1e-12)
    # the flow frame at the same noise-to-signal ratio: flow sigma f = s / (a + s), latents scaled by (1 - f) / a
    f0, f1 = s0 / (a0 + s0), s1 / (a1 + s1)
    flow = teleport(x_vp * (1 - f0) / a0, stats, frame_level("flow", f0), frame_level("flow", f1))
    torch.testing.assert_close(flow * a1 / (1 - f1), vp, rtol=0, atol=1e-12)


def test_semigroup_and_residual_variance():
    # covariance 0.05 I + F F^T: rank-5 statistics plus an isotropic residual describe it exactly
    model = gaussian_model(VP, full_rank=True)
    full, low = model_stats(model), model_stats(model, rank=5)
    assert low.rank == 5 and low.residual_variance == pytest.approx(0.05, rel=1e-10)
    torch.testing.assert_close(low.covariance(), full.covariance(), rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 3, 4, generator=g, dtype=torch.float64)
    levels = [level(model, t) for t in (999, 600, 250)]
    for stats in (full, low):
        direct = teleport(x, stats, levels[0], levels[2])
        two_hops = teleport(teleport(x, stats, levels[0], levels[1]), stats, levels[1], levels[2])
        torch.testing.assert_close(two_hops, direct, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        teleport(x, low, levels[0], levels[2]), teleport(x, full, levels[0], levels[2]), rtol=0, atol=1e-12
    )
    # per-sample levels act sample by sample
    alphas = torch.tensor([levels[1][0], levels[2][0]] * 2, dtype=torch.float64)
    sigmas = torch.tensor([levels[1][1], levels[2][1]] * 2, dtype=torch.float64)
    mixed = teleport(x, full, levels[0], (alphas, sigmas))
    torch.testing.assert_close(mixed[1], teleport(x[1:2], full, levels[0], levels[2])[0], rtol=0, atol=1e-14)


def test_float32_latents_and_clipping():
    model = gaussian_model(VP, full_rank=False)
    stats = model_stats(model)
    x = torch.randn(2, 1, 3, 4, generator=torch.Generator().manual_seed(4))
    lv0, lv1 = level(model, 999), level(model, 500)
    out = teleport(x, stats, lv0, lv1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    reference = teleport(x.double(), stats, lv0, lv1)
    assert ((out.double() - reference).abs().max() / reference.abs().max()) < 1e-6
    # slightly negative eigenvalues (eigh round-off on rank-deficient covariances) are clipped to 0
    clipped = GaussianStats(stats.mean, stats.eigvecs, stats.eigvals - 1e-13)
    assert (clipped.eigvals >= 0).all()
    flat = gaussian_flow_map(x.double().reshape(2, -1), stats.mean, stats.eigvecs, stats.eigvals - 1e-13, lv0, lv1)
    assert torch.isfinite(flat).all()


def test_teleport_rejects_bad_input():
    stats = GaussianStats.from_samples(torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="stats"):
        teleport(torch.randn(2, 3), object(), (1.0, 1.0), (1.0, 0.5))
    with pytest.raises(TypeError, match="x_T"):
        teleport(np.zeros((2, 3)), stats, (1.0, 1.0), (1.0, 0.5))
    with pytest.raises(ValueError, match="values per sample"):
        teleport(torch.randn(2, 4), stats, (1.0, 1.0), (1.0, 0.5))
    with pytest.raises(ValueError, match="from_level"):
        teleport(torch.randn(2, 3), stats, (1.0, 0.0), (1.0, 0.5))
    with pytest.raises(TypeError, match="to_level"):
        teleport(torch.randn(2, 3), stats, (1.0, 1.0), 0.5)
    with pytest.raises(ValueError, match="frame"):
        frame_level("edm", 1.0)
    with pytest.raises(ValueError, match="rank"):
        GaussianStats.from_samples(torch.randn(10, 3), rank=4)
    with pytest.raises(ValueError, match="eigvecs"):
        GaussianStats(torch.zeros(3), torch.zeros(4, 1), torch.ones(1))


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


def test_streaming_stats_equal_batch_stats(tmp_path):
    g = torch.Generator().manual_seed(5)
    data = 3.0 + torch.randn(203, 2, 3, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 3, generator=g).double()
    batch = GaussianStats.from_samples(data)
    # an iterable of uneven float32 batches, a tensor split by batch_size, and a Dataset of (image, label) pairs
    chunks = [data[i : i + 37] for i in range(0, len(data), 37)]
    dataset = torch.utils.data.TensorDataset(data, torch.zeros(len(data)))
    for source in (chunks, data, dataset):
        streamed = GaussianStats.from_dataset(source, batch_size=50)
        assert streamed.shape == (2, 3, 3) and streamed.num_samples == 203
        torch.testing.assert_close(streamed.mean, batch.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(streamed.covariance(), batch.covariance(), rtol=0, atol=1e-11)
    # one-shot generators work for the dense method
    once = GaussianStats.from_dataset(iter(chunks))
    torch.testing.assert_close(once.covariance(), batch.covariance(), rtol=0, atol=1e-11)


def test_randomized_low_rank_stats():
    g = torch.Generator().manual_seed(6)
    # centred rank 6 in D = 40: the streamed subspace iteration is exact once rank + oversample >= 6
    data = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 40, generator=g, dtype=torch.float64)
    data = data * torch.linspace(0.5, 2.0, 40, dtype=torch.float64) + 1.0
    dense = GaussianStats.from_samples(data, rank=4)
    fast = GaussianStats.from_dataset(data, rank=4, method="randomized", oversample=4, batch_size=64, generator=g)
    torch.testing.assert_close(fast.mean, dense.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.eigvals, dense.eigvals, rtol=1e-9, atol=0)
    torch.testing.assert_close(fast.covariance(), dense.covariance(), rtol=0, atol=1e-9)
    assert fast.residual_variance == pytest.approx(dense.residual_variance, rel=1e-9)
    with pytest.raises(TypeError, match="re-iterable"):
        GaussianStats.from_dataset(iter(data.split(50)), rank=4, method="randomized")


def test_safetensors_round_trip(tmp_path):
    stats = GaussianStats.from_samples(torch.randn(50, 1, 2, 4, dtype=torch.float64), rank=3).to_range()
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle stream
    loaded = GaussianStats.load(path)
    for name in ("mean", "eigvecs", "eigvals"):
        assert torch.equal(getattr(loaded, name), getattr(stats, name))
    for name in ("residual_variance", "shape", "space", "num_samples", "value_range", "scaling_factor"):
        assert getattr(loaded, name) == getattr(stats, name)
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a GaussianStats"):
        GaussianStats.load(tmp_path / "other.safetensors")


def test_unit_range_conversion():
    g = torch.Generator().manual_seed(7)
    unit = torch.rand(80, 3, 2, 2, generator=g, dtype=torch.float64)
    stored = GaussianStats.from_samples(unit, rank=5, value_range=(0.0, 1.0))
    converted = stored.to_range((0, 1), (-1, 1))
    direct = GaussianStats.from_samples(2 * unit - 1, rank=5)
    torch.testing.assert_close(converted.mean, 2 * stored.mean - 1, rtol=0, atol=0)
    torch.testing.assert_close(converted.eigvals, 4 * stored.eigvals, rtol=0, atol=0)
    torch.testing.assert_close(converted.mean, direct.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(converted.covariance(), direct.covariance(), rtol=0, atol=1e-12)
    assert converted.value_range == (-1.0, 1.0)
    # input_range maps [0, 1] data to [-1, 1] while streaming
    streamed = GaussianStats.from_dataset(unit, input_range=(0, 1), rank=5)
    torch.testing.assert_close(streamed.covariance(), direct.covariance(), rtol=0, atol=1e-12)


def test_image_folder_and_vae_latents(tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 127.5 - 1.0
    stats = GaussianStats.from_image_folder(tmp_path, batch_size=5)
    direct = GaussianStats.from_samples(expected)
    assert stats.shape == (3, 8, 8) and stats.space == "pixel" and stats.value_range == (-1.0, 1.0)
    torch.testing.assert_close(stats.covariance(), direct.covariance(), rtol=0, atol=1e-12)

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4,),
        norm_num_groups=1,
        latent_channels=2,
        scaling_factor=1.5,
        shift_factor=0.1,
        sample_size=8,
    )
    latents = GaussianStats.from_image_folder(tmp_path, vae=vae, latent_sample="mode", batch_size=5)
    with torch.no_grad():
        z = vae.encode(expected.float()).latent_dist.mode().double()
    reference = GaussianStats.from_samples((z - 0.1) * 1.5)
    assert latents.space == "latent" and latents.scaling_factor == 1.5 and latents.shift_factor == 0.1
    torch.testing.assert_close(latents.mean, reference.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(latents.covariance(), reference.covariance(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# TeleportScheduler
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOLVERS))
def test_skip_zero_is_bit_identical(name, single_gaussian):
    model, stats = single_gaussian
    x_T = torch.randn(4, *model.shape, generator=torch.Generator().manual_seed(8))
    plain, calls = run_scheduler(SOLVERS[name](CFG), model, x_T, 10)
    wrapped = TeleportScheduler(SOLVERS[name](CFG), stats, skip_fraction=0.0)
    out, wrapped_calls = run_scheduler(wrapped, model, x_T, 10)
    assert wrapped.skip == 0 and wrapped_calls == calls == 10
    assert torch.equal(out, plain)


@pytest.mark.parametrize("name", ["euler", "dpmpp2m", "unipc", "heun", "flow"])
def test_teleported_run_equals_manual_hand_off(name, single_gaussian):
    """The wrapper = teleport to grid point k, then the base with its full arrays and begin index k * order."""
    model, stats = single_gaussian
    config = FLOW if name == "flow" else CFG
    build = {
        "heun": lambda c: HeunDiscreteScheduler.from_config(c),
        "flow": lambda c: FlowMatchEulerDiscreteScheduler.from_config(c),
    }.get(name, SOLVERS.get(name))
    if name == "flow":
        model = GaussianMixtureModel.for_pipeline(model, FLOW)
    x_T = torch.randn(3, *model.shape, generator=torch.Generator().manual_seed(9))
    wrapped = TeleportScheduler(build(config), stats, skip_steps=3)
    out, calls = run_scheduler(wrapped, model, x_T, 10)
    base = build(config)
    base.set_timesteps(10)
    order = base.order
    assert wrapped.skip == 3 and calls == len(base.timesteps) - 3 * order
    assert torch.equal(wrapped.timesteps, base.timesteps[3 * order :])
    expected_frame = {"euler": "ve", "heun": "ve", "flow": "flow"}.get(name, "vp")
    assert latent_frame(base) == expected_frame == wrapped.frame
    sample = teleport(
        x_T * getattr(base, "init_noise_sigma", 1.0), stats, frame_coeffs(base, 0), frame_coeffs(base, 3 * order)
    )
    base.set_begin_index(3 * order)
    for t in base.timesteps[3 * order :]:
        model_input = base.scale_model_input(sample, t) if hasattr(base, "scale_model_input") else sample
        sample = base.step(model(model_input, t).sample, t, sample).prev_sample
    assert torch.equal(out, sample)
    # the base kept its full arrays
    assert len(wrapped.base.timesteps) == len(base.timesteps)


@pytest.mark.parametrize("name", ["dpmpp2m", "unipc"])
def test_teleport_is_at_least_as_accurate_at_equal_budget(name, single_gaussian):
    """Single Gaussian: the first k steps become exact, the rest of the budget runs on a finer tail grid."""
    model, stats = single_gaussian
    x_T = torch.randn(8, *model.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    reference = exact_solution(model, x_T, 999, method="closed_form")  # trailing spacing starts at 999
    rmse = lambda s: float((s.double() - reference).pow(2).mean().sqrt())
    for nfe in (6, 10):
        plain, calls = run_scheduler(SOLVERS[name](CFG), model, x_T.float(), nfe)
        skip = nfe // 4
        teleported, tele_calls = run_scheduler(
            TeleportScheduler(SOLVERS[name](CFG), stats, skip_steps=skip), model, x_T.float(), nfe + skip
        )
        assert tele_calls == calls == nfe
        assert rmse(teleported) <= rmse(plain)


@pytest.fixture(scope="module")
def mixture():
    """Digits mixture (10 classes) with statistics = its overall mean and covariance, and exact ODE references."""
    model = GaussianMixtureModel.digits(scheduler_config=CFG)
    w, m = model.weights, model.means
    mean = (w[:, None] * m).sum(0)
    cov = (w[:, None, None] * (model.covariances() + m[:, :, None] * m[:, None, :])).sum(0) - torch.outer(mean, mean)
    stats = GaussianStats.from_moments(mean.reshape(model.shape), cov)
    x_T = torch.randn(4, *model.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return model, stats, x_T, exact_solution(model, x_T, 999)


@pytest.mark.parametrize("name", ["dpmpp2m", "unipc"])
def test_mixture_testbed_skips_a_fifth_at_equal_error(name, mixture):
    """Skipping 20% of the steps keeps the error vs the exact ODE solution within 0.1% (measured: UniPC no worse,
    DPM-Solver++(2M) 0.01% worse at 10 steps)."""
    model, stats, x_T, reference = mixture
    rmse = lambda s: float((s.double() - reference).pow(2).mean().sqrt())
    plain, calls = run_scheduler(SOLVERS[name](CFG), model, x_T.float(), 10)
    teleported, tele_calls = run_scheduler(
        TeleportScheduler(SOLVERS[name](CFG), stats, skip_fraction=0.2), model, x_T.float(), 10
    )
    assert (calls, tele_calls) == (10, 8)
    assert rmse(teleported) <= rmse(plain) * 1.001


def test_sigma_skip_and_views(single_gaussian):
    stats = single_gaussian[1]
    base = DPMSolverMultistepScheduler.from_config(CFG)
    wrapped = TeleportScheduler(base, stats, sigma_skip=5.0)
    wrapped.set_timesteps(10)
    k = wrapped.skip
    assert float(base.sigmas[k]) <= 5.0 < float(base.sigmas[k - 1])
    assert wrapped.from_level == pytest.approx(frame_level("vp", float(base.sigmas[0])))
    assert torch.equal(wrapped.sigmas, base.sigmas[k:]) and wrapped.begin_index == 0 and base.begin_index == k
    wrapped.set_begin_index(1)
    assert base.begin_index == k + 1
    # the diffusers-facing surface
    assert wrapped.config is base.config and len(wrapped) == 1000 and wrapped.order == 1
    assert "generator" in inspect.signature(wrapped.step).parameters
    assert "timesteps" in inspect.signature(wrapped.set_timesteps).parameters
    assert type(DPMSolverMultistepScheduler.from_config(wrapped.config)) is DPMSolverMultistepScheduler
    assert TeleportScheduler(DDIMScheduler.from_config(CFG), stats).skip_fraction == 0.2  # the default
    with pytest.raises(ValueError, match="below the last model level"):
        TeleportScheduler(DPMSolverMultistepScheduler.from_config(CFG), stats, sigma_skip=1e-6).set_timesteps(10)
    with pytest.raises(ValueError, match="only one of"):
        TeleportScheduler(base, stats, skip_fraction=0.2, sigma_skip=1.0)
    with pytest.raises(ValueError, match="skip_fraction"):
        TeleportScheduler(base, stats, skip_fraction=1.0)
    with pytest.raises(TypeError, match="stats"):
        TeleportScheduler(base, {"mean": 0})
    with pytest.raises(TypeError, match="already a TeleportScheduler"):
        TeleportScheduler(wrapped, stats)
    # a pipeline that sets a different schedule from the one the latents were teleported for is stopped
    wrapped._expect_levels()
    with pytest.raises(ValueError, match="different schedule"):
        wrapped.set_timesteps(12)


def test_in_ddim_pipeline(single_gaussian):
    """DDIMPipeline: skip 0 is bit-identical; with a skip it never calls scale_model_input, so the wrapper refuses
    instead of producing a wrong image."""
    from diffusers import DDIMPipeline

    model, stats = single_gaussian
    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(CFG))
    pipe.set_progress_bar_config(disable=True)
    run = lambda: (
        pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    )
    plain = run()
    pipe.scheduler = TeleportScheduler(pipe.scheduler, stats, skip_fraction=0)
    assert np.array_equal(run(), plain)
    pipe.scheduler = TeleportScheduler(pipe.scheduler.base, stats, skip_fraction=0.4)
    with pytest.raises(RuntimeError, match="scale_model_input"):
        run()


def test_in_stable_diffusion_pipeline():
    """A pipeline that calls scale_model_input: skip 0 bit-identical (Euler: VE frame with init_noise_sigma; DPM++),
    a skip makes N - k UNet calls with the teleported latents."""
    from diffsamplers.testing import tiny_stable_diffusion_pipeline

    pipe = tiny_stable_diffusion_pipeline()
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].clone()))
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 77, 16, generator=g)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    stats = GaussianStats.from_samples(0.5 * torch.randn(64, 4, 16, 16, generator=g, dtype=torch.float64), rank=8)
    run = lambda: (
        pipe(
            prompt_embeds=embeds, latents=noise, num_inference_steps=5, guidance_scale=1.0, output_type="latent"
        ).images
    )
    for build in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        base = build.from_config(pipe.scheduler.config)
        pipe.scheduler = base
        plain = run()
        pipe.scheduler = TeleportScheduler(base, stats, skip_fraction=0.0)
        assert torch.equal(run(), plain)
        calls.clear()
        pipe.scheduler = TeleportScheduler(base, stats, skip_fraction=0.4)
        out = run()
        assert len(calls) == 3 and torch.isfinite(out).all() and not torch.equal(out, plain)
        start = teleport(noise * base.init_noise_sigma, stats, frame_coeffs(base, 0), frame_coeffs(base, 2))
        if build is EulerDiscreteScheduler:  # VE frame: the model sees x / sqrt(sigma^2 + 1)
            start = start / (base.sigmas[2] ** 2 + 1) ** 0.5
        torch.testing.assert_close(calls[0], start)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline helper (flow pipelines never call scale_model_input)
# ----------------------------------------------------------------------------------------------------------------


def test_teleport_pipeline_in_flow_pipeline():
    from diffsamplers.testing import tiny_flow_embeddings, tiny_flow_pipeline

    pipe = tiny_flow_pipeline()
    inputs = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(kwargs["hidden_states"].clone()), with_kwargs=True
    )
    # the tiny VAE does not downsample: 32x32 images have 4x32x32 latents (D = 4096); rank-6 statistics
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(4096, 6, generator=g, dtype=torch.float64)).Q
    stats = GaussianStats(
        0.1 * torch.randn(4096, generator=g, dtype=torch.float64),
        basis,
        torch.linspace(3.0, 0.5, 6, dtype=torch.float64),
        0.3,
        shape=(4, 32, 32),
        space="latent",
    )
    kwargs = dict(**tiny_flow_embeddings(1), height=32, width=32, guidance_scale=1.0, output_type="latent")
    seed = lambda: torch.Generator().manual_seed(3)
    plain = pipe(num_inference_steps=6, generator=seed(), **kwargs).images
    same = teleport_pipeline(pipe, stats, skip_steps=0, num_inference_steps=6, generator=seed(), **kwargs).images
    assert torch.equal(same, plain)  # the helper draws the pipeline's own noise
    inputs.clear()
    out = teleport_pipeline(pipe, stats, skip_fraction=0.34, num_inference_steps=6, generator=seed(), **kwargs)
    assert len(inputs) == 4 and torch.isfinite(out.images).all()
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)  # restored
    reference = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(6)
    noise = torch.randn(1, 4, 32, 32, generator=seed())
    expected = teleport(noise, stats, frame_coeffs(reference, 0), frame_coeffs(reference, 2))
    assert frame_coeffs(reference, 0)[0] == 0.0  # flow sigma 1 is pure noise, which the closed form handles
    torch.testing.assert_close(inputs[0], expected)
    with pytest.raises(ValueError, match="latent shape"):
        teleport_pipeline(pipe, stats, num_inference_steps=6, **{**kwargs, "height": 16, "width": 16})
    with pytest.raises(TypeError, match="latents"):
        from diffusers import DDIMPipeline

        teleport_pipeline(DDIMPipeline(unet=pipe.transformer, scheduler=DDIMScheduler()), stats)
