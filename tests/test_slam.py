"""SLAMScheduler (exact and analytic checks) and the SLAM/LCD distillation trainer on tiny local models."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)

from diffsamplers.eval.samplers import digits_distilled_specs
from diffsamplers.samplers.slam import SLAMScheduler
from diffsamplers.train.slam import (
    SLAMConfig,
    SLAMDistiller,
    distillation_loss,
    list_checkpoints,
    load_lora_student,
    load_student,
    parse_gamma_sampling,
)

SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


# -- scheduler: grid, scalings, boundary --------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "expected"), [
    (1, [999]), (2, [999, 499]), (4, [999, 759, 499, 259]), (8, [999, 879, 759, 639, 499, 379, 259, 139]),
])
def test_timesteps_are_lcms(steps, expected):
    ours, lcm = SLAMScheduler(**SD_CONFIG), LCMScheduler(**SD_CONFIG)
    ours.set_timesteps(steps)
    lcm.set_timesteps(steps)
    assert ours.timesteps.tolist() == expected == lcm.timesteps.tolist()


def test_grid_refusals_and_custom_timesteps():
    s = SLAMScheduler(**SD_CONFIG)
    with pytest.raises(ValueError, match="original"):
        s.set_timesteps(51)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    s.set_timesteps(timesteps=[999, 499, 19])
    assert s.timesteps.tolist() == [999, 499, 19]
    with pytest.raises(ValueError, match="timesteps"):
        s.set_timesteps(timesteps=[19, 499, 999])
    with pytest.raises(ValueError, match="renoise"):
        SLAMScheduler(renoise="lcm")
    with pytest.raises(ValueError, match="tcd_eta"):
        SLAMScheduler(renoise="tcd", tcd_eta=1.5)
    with pytest.raises(ValueError, match="VP"):
        SLAMScheduler.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def test_scalings():
    c_skip, c_out = SLAMScheduler.scalings(0)
    assert (c_skip, c_out) == (1.0, 0.0)
    t = torch.arange(0, 1000, dtype=torch.float64)
    c_skip, c_out = SLAMScheduler.scalings(t)
    torch.testing.assert_close(c_skip + c_out**2, torch.ones_like(t), rtol=0, atol=1e-12)
    assert float(SLAMScheduler.scalings(1)[0]) == pytest.approx(2.49e-3, rel=2e-3)
    s = SLAMScheduler(sigma_data=0.25)
    assert s.get_scalings_for_boundary_condition_discrete(1)[0] == pytest.approx(0.0625 / (100 + 0.0625))
    assert LCMScheduler().get_scalings_for_boundary_condition_discrete(7) == \
        SLAMScheduler().get_scalings_for_boundary_condition_discrete(7)


@pytest.mark.parametrize("renoise", ["fresh", "deterministic", "tcd"])
def test_boundary_at_timestep_zero_returns_the_sample(renoise):
    s = SLAMScheduler(**SD_CONFIG, renoise=renoise)
    s.set_timesteps(timesteps=[999, 0])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    s.step(torch.randn_like(x), 999, x)
    out = s.step(torch.randn_like(x) * 7, 0, x)
    assert torch.equal(out.denoised, x) and torch.equal(out.prev_sample, x)


@pytest.mark.parametrize("renoise", ["fresh", "deterministic", "tcd"])
def test_one_step_adds_no_noise(renoise):
    s = SLAMScheduler(**SD_CONFIG, renoise=renoise)
    s.set_timesteps(1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = s.step(torch.randn_like(x), s.timesteps[0], x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out.prev_sample, out.denoised)


def _model(x, t):
    return 0.3 * x + 0.1 * torch.sin(x * float(t) / 100.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_fresh_renoise_is_lcm_bit_for_bit(prediction_type, steps):
    results = []
    for cls in (SLAMScheduler, LCMScheduler):
        s = cls(**SD_CONFIG, prediction_type=prediction_type)
        s.set_timesteps(steps)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        for t in s.timesteps:
            out = s.step(_model(x, t), t, x, generator=g)
            x = out.prev_sample
        results.append((x, out.denoised))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_deterministic_renoise_ignores_the_generator_and_tcd_eta_zero_equals_it():
    def run(renoise, seed, **kw):
        s = SLAMScheduler(**SD_CONFIG, renoise=renoise, **kw)
        s.set_timesteps(4)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(seed)
        for t in s.timesteps:
            x = s.step(_model(x, t), t, x, generator=g).prev_sample
        return x

    assert torch.equal(run("deterministic", 0), run("deterministic", 1))
    assert torch.equal(run("tcd", 0, tcd_eta=0.0), run("deterministic", 9))
    assert not torch.equal(run("tcd", 0, tcd_eta=0.5), run("tcd", 1, tcd_eta=0.5))
    assert not torch.equal(run("fresh", 0), run("fresh", 1))


# -- the analytic single-Gaussian consistency oracle -------------------------------------------------------------


def _oracle_eps(scheduler, x, t, mu, s):
    """The epsilon that makes the scheduler's parametrisation output the exact PF-ODE endpoint of N(mu, s^2 I)."""
    ac = scheduler.alphas_cumprod[int(t)]
    # the scheduler's own float32 coefficients, so that only the maths is compared
    a, sig = ac.sqrt().double(), (1 - ac).sqrt().double()
    f = mu + s * (x - a * mu) / torch.sqrt(a**2 * s**2 + sig**2)
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(int(t))
    x0 = (f - c_skip * x) / c_out
    return (x - a * x0) / sig, f


def test_single_gaussian_oracle():
    mu, s = 0.7, 0.2
    n = 20000
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched = SLAMScheduler(**LINEAR)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    eps, f = _oracle_eps(sched, x_T, t, mu, s)
    one = sched.step(eps, t, x_T).prev_sample
    torch.testing.assert_close(one, f, rtol=0, atol=1e-5)
    sched.set_timesteps(4)
    x = x_T.clone()
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        x = sched.step(_oracle_eps(sched, x, t, mu, s)[0], t, x, generator=g).prev_sample
    assert abs(float(x.mean()) - mu) < 0.01 and abs(float(x.std()) - s) < 0.01
    # one DDIM step with the true epsilon returns the posterior mean: far too narrow
    ddim = DDIMScheduler(**LINEAR, timestep_spacing="trailing", clip_sample=False)
    ddim.set_timesteps(1)
    t = ddim.timesteps[0]
    ac = ddim.alphas_cumprod[int(t)].double()
    a, sig = ac.sqrt(), (1 - ac).sqrt()
    post_x0 = mu + a * s**2 * (x_T - a * mu) / (a**2 * s**2 + sig**2)
    ddim_out = ddim.step((x_T - a * post_x0) / sig, t, x_T).prev_sample
    assert float(ddim_out.std()) < 0.5 * s


# -- sub-path helpers -----------------------------------------------------------------------------------------


def test_subpath_helpers():
    ac = DDPMScheduler(**SD_CONFIG).alphas_cumprod.double()
    t_hi, t_lo = 519, 499
    a_hi, s_hi, a_lo, s_lo = ac[t_hi].sqrt(), (1 - ac[t_hi]).sqrt(), ac[t_lo].sqrt(), (1 - ac[t_lo]).sqrt()
    g = torch.Generator().manual_seed(0)
    z, y, eps = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    assert torch.equal(SLAMScheduler.subpath_point(z, y, a_hi, a_lo, 1.0), z)
    torch.testing.assert_close(SLAMScheduler.subpath_point(z, y, a_hi, a_lo, 0.0), a_hi / a_lo * y)
    for rule in ("variance", "linear"):
        sig = SLAMScheduler.subpath_sigma(a_hi, s_hi, a_lo, s_lo, torch.linspace(0, 1, 101, dtype=torch.float64), rule)
        torch.testing.assert_close(sig[-1], s_hi)
        torch.testing.assert_close(sig[0], a_hi / a_lo * s_lo)
        assert bool((sig.diff() > 0).all())
    # gamma = 1: the usual epsilon -> x0; gamma = 0 with the teacher's epsilon at (y, t_lo): the teacher's x0 there
    torch.testing.assert_close(SLAMScheduler.subpath_x0(eps, z, a_hi, s_hi), (z - s_hi * eps) / a_hi)
    x_0 = SLAMScheduler.subpath_point(z, y, a_hi, a_lo, 0.0)
    s_0 = SLAMScheduler.subpath_sigma(a_hi, s_hi, a_lo, s_lo, 0.0)
    torch.testing.assert_close(SLAMScheduler.subpath_x0(eps, x_0, a_hi, s_0), (y - s_lo * eps) / a_lo)
    with pytest.raises(ValueError, match="rule"):
        SLAMScheduler.subpath_sigma(a_hi, s_hi, a_lo, s_lo, 0.5, "cubic")


def test_gamma_mapping_and_embedding_match_diffusers():
    assert SLAMScheduler.guidance_scale_for_gamma(1.0) == 1.0
    assert SLAMScheduler.gamma_to_cond_scalar(1.0) == 0.0
    gammas = torch.tensor([1.0, 0.65, 0.0])
    w = SLAMScheduler.guidance_scale_for_gamma(gammas) - 1
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    torch.testing.assert_close(SLAMScheduler.gamma_embedding(gammas, 32), ref, rtol=0, atol=0)


def test_ddpm_pipeline_smoke():
    unet = _tiny_unet()
    pipe = DDPMPipeline(unet=unet, scheduler=SLAMScheduler(**LINEAR, renoise="deterministic"))
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        a = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
        b = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
        assert a.shape == (2, 8, 8, 1) and (a == b).all()


# -- trainer ------------------------------------------------------------------------------------------------------


def _tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def _tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def _data(n=64, c=1, seed=0):
    x = torch.randn(n, c, 8, 8, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    return torch.utils.data.DataLoader(x, batch_size=16, shuffle=False, drop_last=True)


def _cond_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 2, 8, 8, generator=g), torch.randn(n, 3, 8, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False, drop_last=True)


def _distiller(teacher=None, loader=None, **kw):
    kw.setdefault("learning_rate", 1e-3)
    kw.setdefault("loss_type", "l2")
    out = kw.pop("output_dir", None)
    uncond = kw.pop("unconditional_condition", None)
    return SLAMDistiller(teacher if teacher is not None else _tiny_unet(), DDPMScheduler(**LINEAR).config,
                         loader if loader is not None else _data(), SLAMConfig(**kw), output_dir=out,
                         unconditional_condition=uncond, accelerator_kwargs=dict(cpu=True))


def test_config_refusals():
    with pytest.raises(ValueError, match="gamma_sampling"):
        parse_gamma_sampling("fixed:2")
    with pytest.raises(ValueError, match="loss_type"):
        SLAMConfig(loss_type="l1")
    with pytest.raises(ValueError, match="ema_decay"):
        SLAMConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="time_cond_proj"):
        _distiller(gamma_cond="time_cond_proj")
    with pytest.raises(ValueError, match="prediction_type"):
        SLAMDistiller(_tiny_unet(), DDPMScheduler(**LINEAR, prediction_type="v_prediction").config, _data())
    assert parse_gamma_sampling("beta:2,1") == ("beta", (2.0, 1.0))
    x = torch.tensor([0.0, 3.0])
    assert float(distillation_loss(x, torch.zeros(2), "huber", 1e-3)) == pytest.approx(
        ((1e-6) ** 0.5 - 1e-3 + (9 + 1e-6) ** 0.5 - 1e-3) / 2)


def test_loss_decreases_on_a_tiny_model():
    d = _distiller(teacher=_tiny_unet(), loader=_data(n=16), learning_rate=3e-3, gamma_sampling="uniform")
    losses = d.train(200, progress=False)
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.5 * first, (first, last)


def test_only_the_student_learns_and_the_target_follows_the_ema_rule():
    teacher = _tiny_unet()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = _distiller(teacher=teacher, ema_decay=0.9)
    target0 = {k: v.clone() for k, v in d.target.named_parameters()}
    d.train(1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in d.target.parameters())
    student = dict(d.accelerator.unwrap_model(d.student).named_parameters())
    changed = 0
    for name, p in d.target.named_parameters():
        torch.testing.assert_close(p, 0.9 * target0[name] + 0.1 * student[name].detach(), rtol=0, atol=1e-6)
        changed += not torch.equal(student[name], target0[name])
    assert changed > 0


def test_lcd_baseline_equals_an_independent_lcd_loss():
    teacher = _tiny_unet(1)
    d = _distiller(teacher=teacher, gamma_sampling="fixed:1.0", seed=3)
    batch = next(iter(_data()))
    loss = d.compute_loss(batch)
    # LCD from scratch (Luo et al. 2023, Algorithm 1): DDIM step of the teacher, target network at the lower end
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50, (16,), generator=g)
    noise = torch.randn(batch.shape, generator=g)
    t_hi = (idx + 1) * 20 - 1
    t_lo = (t_hi - 20).clamp(min=0)
    ac = DDPMScheduler(**LINEAR).alphas_cumprod.double()

    def coef(t):
        return ac[t].sqrt().float().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().float().view(-1, 1, 1, 1)

    def f(model, x, t):
        a, s = coef(t)
        c_skip, c_out = SLAMScheduler.scalings(t.float().view(-1, 1, 1, 1))
        return c_skip * x + c_out * (x - s * model(x, t).sample) / a

    a_hi, s_hi = coef(t_hi)
    a_lo, s_lo = coef(t_lo)
    with torch.no_grad():
        z = a_hi * batch + s_hi * noise
        eps = teacher(z, t_hi).sample
        y = a_lo * (z - s_hi * eps) / a_hi + s_lo * eps
        target = f(d.target, y, t_lo)
        pred = f(d.accelerator.unwrap_model(d.student), z, t_hi)
    expected = (pred - target).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("gamma_sampling", ["uniform", "fixed:1.0"])
def test_save_resume_gives_the_identical_next_loss(tmp_path, gamma_sampling):
    d = _distiller(output_dir=str(tmp_path), gamma_sampling=gamma_sampling, checkpointing_steps=100)
    d.train(2, progress=False)
    d.save_checkpoint()
    next_loss = d.train(3, progress=False)
    resumed = _distiller(output_dir=str(tmp_path), gamma_sampling=gamma_sampling, checkpointing_steps=100)
    resumed.load_checkpoint("latest")
    assert resumed.global_step == 2
    assert resumed.train(3, progress=False) == next_loss


def test_checkpoints_total_limit(tmp_path):
    d = _distiller(output_dir=str(tmp_path), checkpointing_steps=1, checkpoints_total_limit=2)
    d.train(4, progress=False)
    assert sorted(os.path.basename(p) for p in list_checkpoints(str(tmp_path))) == ["checkpoint-3", "checkpoint-4"]
    with pytest.raises(ValueError, match="checkpoint"):
        _distiller(output_dir=str(tmp_path / "empty")).load_checkpoint("latest")


def test_time_cond_proj_student_and_target_have_the_gamma_projection():
    d = _distiller(teacher=_tiny_cond_unet(), loader=_cond_data(), gamma_cond="auto", time_cond_proj_dim=16,
                   cond_proj_init="zeros")
    assert d.gamma_cond == "time_cond_proj"
    student = d.accelerator.unwrap_model(d.student)
    for net in (student, d.target):
        assert net.config.time_cond_proj_dim == 16
        assert "time_embedding.cond_proj.weight" in net.state_dict()
    # zero-initialised projection: the student starts as the teacher
    x, t, c = torch.randn(2, 2, 8, 8), torch.tensor([999, 499]), torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, c, timestep_cond=SLAMScheduler.gamma_embedding(torch.rand(2), 16))
                                   .sample, d.teacher(x, t, c).sample)
    losses = d.train(2, progress=False)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_lora_adapters_reload_to_identical_outputs(tmp_path):
    pytest.importorskip("peft")
    teacher = _tiny_cond_unet()
    d = _distiller(teacher=teacher, loader=_cond_data(), mode="lora", lora_rank=4, lora_alpha=4,
                   time_cond_proj_dim=16, learning_rate=1e-2)
    student = d.accelerator.unwrap_model(d.student)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "cond_proj" in n for n in trainable)
    assert any("cond_proj" in n for n in trainable) and d.target is None
    d.train(3, progress=False)
    d.save_student(str(tmp_path / "student"))
    reloaded = load_lora_student(teacher, str(tmp_path / "student" / "unet_lora"))
    x, t, c = torch.randn(2, 2, 8, 8), torch.tensor([999, 259]), torch.randn(2, 3, 8)
    e = SLAMScheduler.gamma_embedding(torch.ones(2), 16)
    student.eval()
    with torch.no_grad():
        ours, back = student(x, t, c, timestep_cond=e).sample, reloaded(x, t, c, timestep_cond=e).sample
        plain = teacher(x, t, c).sample
    assert torch.equal(ours, back)
    assert not torch.allclose(ours, plain)


def test_cfg_teacher_uses_the_unconditional_condition():
    d = _distiller(teacher=_tiny_cond_unet(), loader=_cond_data(), guidance_w=2.0, time_cond_proj_dim=16,
                   unconditional_condition=torch.zeros(1, 3, 8))
    x, t, c = torch.randn(2, 2, 8, 8), torch.tensor([999, 499]), torch.randn(2, 3, 8)
    with torch.no_grad():
        eps_c, eps_u = d.teacher(x, t, c).sample, d.teacher(x, t, torch.zeros(2, 3, 8)).sample
    torch.testing.assert_close(d._teacher_eps(x, t, c), eps_c + 2.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unconditional_condition"):
        _distiller(teacher=_tiny_cond_unet(), loader=_cond_data(), guidance_w=2.0)


# -- CLI and the saved student -------------------------------------------------------------------------------------


def _parser():
    from diffsamplers.train.distill_cli import add_distill_parser

    parser = argparse.ArgumentParser(prog="diffsamplers")
    add_distill_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_distill_cli_writes_a_loadable_student(tmp_path):
    from safetensors.torch import save_file

    from diffsamplers.train.distill_cli import run_distill

    teacher_dir = tmp_path / "teacher"
    _tiny_unet().save_pretrained(str(teacher_dir / "unet"))
    DDPMScheduler(**LINEAR).save_pretrained(str(teacher_dir / "scheduler"))
    data = tmp_path / "latents.safetensors"
    save_file({"latents": torch.randn(32, 1, 8, 8)}, str(data))
    out = tmp_path / "student"
    args = _parser().parse_args(["distill", "--teacher", str(teacher_dir), "--data", str(data), "--out", str(out),
                                 "--max-train-steps", "2", "--batch-size", "8", "--no-progress"])
    assert run_distill(args) == 0
    net, sched = load_student(str(out))
    assert isinstance(net, UNet2DModel) and isinstance(sched, SLAMScheduler)
    assert sched.config.original_inference_steps == 50
    pipe = DDPMPipeline(unet=net, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)
    bad = _parser().parse_args(["distill", "--teacher", str(teacher_dir), "--data", str(teacher_dir / "x.bin"),
                                "--out", str(out)])
    with pytest.raises(ValueError):
        run_distill(bad)


def test_bundled_students_load_and_sample():
    specs = digits_distilled_specs()
    for name in ("slam", "lcd"):
        spec = specs[name]
        net = spec.denoiser("cpu")
        sched = spec.build({"clip_sample": False})
        assert isinstance(sched, SLAMScheduler) and sched.config.original_inference_steps == 50
        sched.set_timesteps(2)
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(net(x, t).sample, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        assert x.shape == (4, 1, 8, 8) and bool(torch.isfinite(x).all())
        # samples are images in [-1, 1], far from the Gaussian noise they started as
        assert float(x.abs().max()) < 2.5 and float((x < -0.9).float().mean()) > 0.3


@pytest.mark.parametrize("steps", [1, 4])
def test_stable_diffusion_pipelines_with_slam_equal_them_with_lcm(steps):
    """LCM-LoRA style: ``pipe.scheduler = SLAMScheduler.from_config(pipe.scheduler.config)`` in a
    StableDiffusionPipeline (guidance_scale=1.0, as for LCM students) and in diffusers' LatentConsistencyModelPipeline
    gives exactly what LCMScheduler gives there (fresh re-noising, the pipeline's generator)."""
    from diffsamplers.testing import run_tiny_stable_diffusion, tiny_stable_diffusion_pipeline

    pipe = tiny_stable_diffusion_pipeline()
    config = pipe.scheduler.config
    images = {}
    for name, cls in (("lcm", LCMScheduler), ("slam", SLAMScheduler)):
        pipe.scheduler = cls.from_config(config)
        images[name] = run_tiny_stable_diffusion(pipe, num_inference_steps=steps, guidance_scale=1.0)
    assert np.array_equal(images["lcm"], images["slam"]) and np.isfinite(images["slam"]).all()
    # an LCM student's UNet takes the guidance embedding (time_cond_proj_dim)
    torch.manual_seed(0)
    student = UNet2DConditionModel.from_config(pipe.unet.config, time_cond_proj_dim=8)
    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    lcm_pipe = LatentConsistencyModelPipeline(**{**components, "unet": student})
    lcm_pipe.set_progress_bar_config(disable=True)
    outs = []
    for cls in (LCMScheduler, SLAMScheduler):
        lcm_pipe.scheduler = cls.from_config(config)
        embeds = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(0))
        outs.append(lcm_pipe(prompt_embeds=embeds, num_inference_steps=steps, guidance_scale=4.0, height=32,
                             width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images)
    assert np.array_equal(outs[0], outs[1])
