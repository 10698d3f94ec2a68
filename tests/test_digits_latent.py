"""The bundled class-conditional latent digits model (VAE + DiT + CFG) and per-class teleport statistics."""

import json
import os

import pytest
import torch

from diffsamplers.models.digits_latent import (
    DEFAULT_GUIDANCE_SCALE,
    LATENT_DIR,
    NULL_CLASS,
    decode_latents,
    downsample_digits,
    encode_digits,
    evaluate_digits_latent,
    latent_training_set,
    load_digits_latent_pipeline,
    main,
    sample_digits_latent,
    train_digits_latent,
    upsample_digits,
)
from diffsamplers.pipelines.class_stats import ClassConditionalStats, teleport_class_conditional
from diffsamplers.pipelines.gaussian_stats import GaussianStats

LABELS = [3, 7, 3, 0]


@pytest.fixture(scope="module")
def pipe():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_digits_latent_pipeline()
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def latents(pipe):
    return latent_training_set(pipe.vae)


def run(pipe, scheduler=None, labels=LABELS, steps=8, scale=DEFAULT_GUIDANCE_SCALE, seed=0):
    return sample_digits_latent(pipe, labels, scale, steps, seed, scheduler=scheduler)


def test_bundle_loads_offline_and_is_a_small_safetensors_dit_pipeline(pipe, monkeypatch):
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(pipe, DiTPipeline)
    assert isinstance(pipe.transformer, DiTTransformer2DModel) and isinstance(pipe.vae, AutoencoderKL)
    # DiTPipeline's unconditional label is 1000: the label table must have that row
    assert pipe.transformer.config.num_embeds_ada_norm == NULL_CLASS
    assert pipe.vae.config.scaling_factor != 1.0
    assert pipe.scheduler.config.prediction_type == "epsilon"
    files = [os.path.join(d, f) for d, _, names in os.walk(LATENT_DIR) for f in names]
    assert sum(os.path.getsize(f) for f in files) < 15e6
    weights = [f for f in files if not f.endswith((".json", ".safetensors"))]
    assert weights == [], f"only JSON and safetensors ship: {weights}"
    info = json.load(open(os.path.join(LATENT_DIR, "training.json")))
    assert info["dit"]["steps"] >= 1000 and info["vae"]["steps"] >= 500
    with pytest.raises(ValueError, match="path"):
        load_digits_latent_pipeline(path=os.path.dirname(LATENT_DIR))


def test_scaling_factor_gives_unit_variance_latents(pipe, latents):
    z, labels = latents
    assert z.shape == (1347, 4, 8, 8) and labels.shape == (1347,)
    assert abs(float(z.std()) - 1.0) < 0.02


def test_downsampling_inverts_the_upsampling():
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert torch.allclose(downsample_digits(upsample_digits(x)), x, atol=1e-5)
    with pytest.raises(ValueError, match="images"):
        downsample_digits(torch.zeros(2, 1, 8, 8))


def test_acceptance_accuracy_and_round_trip(pipe):
    """CFG samples (DPM-Solver++ 20 steps, default scale) are the requested digits; the VAE keeps them readable."""
    result = evaluate_digits_latent(pipe, per_class=10, guidance_scales=(DEFAULT_GUIDANCE_SCALE,))
    assert result["scheduler"] == "DPMSolverMultistepScheduler"
    assert result["sample_accuracy"][str(DEFAULT_GUIDANCE_SCALE)] >= 0.9
    assert result["vae_recon_accuracy"] >= 0.95
    assert result["vae_psnr_db"] > 20


def test_guidance_changes_samples_and_a_sample_does_not_depend_on_its_batch(pipe):
    guided = run(pipe)
    assert guided.shape == (4, 1, 16, 16) and guided.min() >= -1 and guided.max() <= 1
    assert not torch.allclose(guided, run(pipe, scale=1.0), atol=1e-3)
    alone = run(pipe, labels=[3], seed=2)  # sample 2 of the batch: class 3, seed 2
    assert torch.allclose(alone[0], guided[2], atol=1e-5)
    with pytest.raises(ValueError, match="class_labels"):
        run(pipe, labels=[10])


def _scheduler_cases():
    from diffsamplers.samplers.bdia import BDIAScheduler
    from diffsamplers.samplers.dualfast import DualFastScheduler
    from diffsamplers.samplers.lml import LMLScheduler

    return {
        "bdia": lambda c, stats: BDIAScheduler.from_config(c, gamma=0.5),
        "dualfast": lambda c, stats: DualFastScheduler.from_config(c),
        # a damping that still changes the run (by ~0.006 from plain DPM-Solver++ 10 steps) but keeps it on the ODE
        # solution; at lm_lambda 10 the rank-one solve dominates and 10 steps end 0.17 from the reference
        "lml": lambda c, stats: LMLScheduler.from_config(c, lm_lambda=100.0, lm_kappa=0.5),
        "teleport": None,  # built below with the VAE-latent statistics
    }


@pytest.mark.parametrize("name", ["bdia", "dualfast", "lml", "teleport"])
def test_cfg_run_with_every_scheduler_class(pipe, latents, name):
    """One CFG run through DiTPipeline with each scheduler of the package. BDIA-EDM is not here: it wraps
    diffusers' EDM schedulers only, and this model is a discrete VP (DDPM-schedule) model."""
    from diffusers import DPMSolverMultistepScheduler

    from diffsamplers.samplers.teleport_scheduler import TeleportScheduler

    config = pipe.scheduler.config
    if name == "teleport":
        stats = GaussianStats.from_samples(latents[0], space="latent")
        scheduler = TeleportScheduler(DPMSolverMultistepScheduler.from_config(config), stats, skip_fraction=0.2)
    else:
        scheduler = _scheduler_cases()[name](config, None)
    images = run(pipe, scheduler, steps=10)
    reference = run(pipe, DPMSolverMultistepScheduler.from_config(config), steps=50)
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    # every sampler lands near a 50-step DPM-Solver++ solve of the same seeds (random images are ~0.5 apart)
    assert (images - reference).abs().mean() < 0.1, name


def test_adaptive_diffusion_on_the_pipeline(pipe):
    from diffusers import DDIMScheduler, DiTPipeline

    from diffsamplers.pipelines.adaptive import enable_adaptive_diffusion

    run_pipe = DiTPipeline(transformer=pipe.transformer, vae=pipe.vae,
                           scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    run_pipe.set_progress_bar_config(disable=True)
    full = run(run_pipe, steps=20)
    # a tight delta: some calls skipped, the images stay near the full run (delta 0.05 lands 0.12 away)
    with enable_adaptive_diffusion(run_pipe, delta=0.01, max_skips=4) as handle:
        skipped = run(run_pipe, steps=20)
        assert 0 < handle.nfe < 20
    assert (skipped - full).abs().mean() < 0.1
    assert torch.equal(run(run_pipe, steps=20), full)  # disabled again


def test_class_stats_from_samples_save_load(latents, tmp_path):
    z, labels = latents
    stats = ClassConditionalStats.from_samples(z, labels, space="latent", scaling_factor=1.5)
    assert stats.classes == list(range(10)) and stats.shape == (4, 8, 8)
    for c in (0, 7):
        assert torch.allclose(stats[c].mean, z[labels == c].double().flatten(1).mean(0))
        assert stats[c].num_samples == int((labels == c).sum())
    stats.save(tmp_path / "stats")
    loaded = ClassConditionalStats.load(tmp_path / "stats")
    assert loaded.classes == stats.classes
    for c in stats.classes:
        for field in ("mean", "eigvecs", "eigvals"):
            assert torch.equal(getattr(loaded[c], field), getattr(stats[c], field))
        assert loaded[c].scaling_factor == 1.5 and loaded[c].space == "latent"
    with pytest.raises(KeyError, match="class 11"):
        stats[11]


def test_class_stats_bad_input(latents, tmp_path):
    z, labels = latents
    with pytest.raises(ValueError, match="labels"):
        ClassConditionalStats.from_samples(z, labels[:-1])
    with pytest.raises(ValueError, match="labels: class 5"):
        ClassConditionalStats.from_samples(z[:3], torch.tensor([5, 6, 6]))
    with pytest.raises(ValueError, match="index.json"):
        ClassConditionalStats.load(tmp_path)
    ClassConditionalStats.from_samples(z[:4], torch.tensor([1, 1, 2, 2])).save(tmp_path / "s")
    os.remove(tmp_path / "s" / "class_2.safetensors")
    with pytest.raises(ValueError, match="class_2.safetensors"):
        ClassConditionalStats.load(tmp_path / "s")
    (tmp_path / "s" / "class_2.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="class_2.safetensors"):
        ClassConditionalStats.load(tmp_path / "s")


def test_class_conditional_teleport_uses_each_class_statistics(pipe, latents):
    """Each sample is the same as a TeleportScheduler run of its class alone, with that class's statistics."""
    from diffusers import DPMSolverMultistepScheduler

    from diffsamplers.samplers.teleport_scheduler import TeleportScheduler

    z, labels = latents
    stats = ClassConditionalStats.from_samples(z, labels, space="latent")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(i) for i in range(len(LABELS))]
    out = teleport_class_conditional(pipe, stats, LABELS, generator=gens, skip_fraction=0.2,
                                     guidance_scale=DEFAULT_GUIDANCE_SCALE, num_inference_steps=10, output_type="pt")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)  # restored
    for i in (1, 3):
        one = TeleportScheduler(pipe.scheduler, stats[LABELS[i]], skip_fraction=0.2)
        expected = run(pipe, one, labels=[LABELS[i]], steps=10, seed=i)
        assert torch.allclose(out.images[i] * 2 - 1, expected[0], atol=1e-5)
    # with another class's statistics the start, and so the sample, differs
    wrong = TeleportScheduler(pipe.scheduler, stats[5], skip_fraction=0.2)
    assert not torch.allclose(out.images[1] * 2 - 1, run(pipe, wrong, labels=[7], steps=10, seed=1)[0], atol=1e-3)
    with pytest.raises(ValueError, match="class_labels"):
        teleport_class_conditional(pipe, ClassConditionalStats({3: stats[3]}), [3, 4])
    with pytest.raises(ValueError, match="generator"):
        teleport_class_conditional(pipe, stats, [3, 4], generator=gens)


def test_encode_decode_round_trip_and_training_command(tmp_path, pipe, capsys):
    """The training command runs a few steps of both stages and writes a loadable pipeline; out is required."""
    previous = torch.get_num_threads()
    out = tmp_path / "model"
    main(["train", "--out", str(out), "--vae-steps", "3", "--dit-steps", "3", "--checkpoint-every", "2",
          "--threads", "1", "--no-progress"])
    torch.set_num_threads(previous)
    info = json.loads((out / "training.json").read_text())
    assert info["vae"]["steps"] == 3 and info["dit"]["steps"] == 3
    assert not list(out.glob("checkpoint-*")) and not (out / "vae-stage.json").exists()
    small = load_digits_latent_pipeline(path=str(out))
    assert small.vae.config.scaling_factor == pytest.approx(info["vae"]["scaling_factor"])
    assert run(small, labels=[1], steps=2).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="out"):
        train_digits_latent(None)
    with pytest.raises(ValueError, match="dit_steps"):
        train_digits_latent(str(tmp_path / "x"), 1, 0)
    # the bundled VAE: decode(encode(x)) is close to x on digits it never saw
    from diffsamplers.models.digits import digits_split, load_digits_images

    images, _ = load_digits_images()
    x = upsample_digits(images[digits_split()[1][:16]])
    assert (decode_latents(pipe.vae, encode_digits(pipe.vae, x)) - x).abs().mean() < 0.1
