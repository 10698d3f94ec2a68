"""LMLScheduler: the operator's algebra and numerics, exact reduction to the wrapped solvers, diffusers contract."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffsamplers.eval.testbed import TESTBED_CONFIG, run_scheduler
from diffsamplers.models import GaussianMixtureModel
from diffsamplers.samplers.lml import LMLScheduler, lm_correct
from diffsamplers.testing import (
    run_tiny_stable_diffusion,
    tiny_flow_embeddings,
    tiny_flow_pipeline,
    tiny_stable_diffusion_pipeline,
    tiny_unet_pipeline,
)

CONFIG = DDIMScheduler(**TESTBED_CONFIG).config
FLOW_CONFIG = FlowMatchEulerDiscreteScheduler(shift=3.0).config


def dense_lm(g, u, lam):
    """``lambda (lambda I + u u^T)^{-1} g`` by a dense solve, renormalised to ``|g|``."""
    out = []
    for gi, ui in zip(g, u):
        H = lam * torch.eye(len(gi), dtype=torch.float64) + torch.outer(ui, ui)
        d = torch.linalg.solve(H, gi)
        out.append(d * gi.norm() / d.norm())
    return torch.stack(out)


# -- the operator ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("formula", ["stable", "reference"])
def test_operator_matches_a_dense_levenberg_marquardt_solve(formula):
    g_ = torch.Generator().manual_seed(0)
    for dim, lam, kappa in [(8, 1.0, 0.5), (64, 1e-3, 0.9), (33, 50.0, 0.1), (16, 0.2, 1.0), (64, 1e4, 0.3)]:
        g = torch.randn(4, dim, generator=g_, dtype=torch.float64) * 3
        g_prev = torch.randn(4, dim, generator=g_, dtype=torch.float64) * 3
        if formula == "reference" and lam < 0.1:
            continue  # the released float32 formula cancels: pinned in the stability test below
        u = kappa * g_prev + (1 - kappa) * g
        expected = dense_lm(g, u, lam)
        if formula == "stable":
            torch.testing.assert_close(lm_correct(g, g_prev, lam, kappa), expected, rtol=1e-10, atol=1e-10)
        else:  # the released formula, evaluated in float32
            got = lm_correct(g, g_prev, lam, kappa, formula="reference")
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_kappa_zero_is_the_identity_and_other_limits():
    g_ = torch.Generator().manual_seed(1)
    g = torch.randn(3, 4, 5, 5, generator=g_)
    g_prev = torch.randn(3, 4, 5, 5, generator=g_)
    for lam in (1e-8, 1e-3, 1.0, 1e6):
        assert torch.equal(lm_correct(g, g_prev, lam, 0.0), g)  # u = g: LM(g) = g exactly
    assert torch.equal(lm_correct(g, None, 1e-3, 0.7), g)  # first step: u = g
    # lambda -> infinity leaves g alone; u orthogonal to g leaves g alone
    torch.testing.assert_close(lm_correct(g.double(), g_prev.double(), 1e14, 0.5), g.double(), rtol=1e-9, atol=1e-9)
    gd = torch.zeros(1, 6, dtype=torch.float64)
    gd[0, 0] = 2.0
    prev = torch.zeros(1, 6, dtype=torch.float64)
    prev[0, 1] = 5.0
    # kappa = 1: u = g_prev, orthogonal to g
    torch.testing.assert_close(lm_correct(gd, prev, 1e-3, 1.0), gd, rtol=1e-12, atol=1e-12)


def test_norm_is_preserved_and_samples_are_independent():
    g_ = torch.Generator().manual_seed(2)
    g = torch.randn(4, 3, 6, 6, generator=g_, dtype=torch.float64)
    g_prev = torch.randn(4, 3, 6, 6, generator=g_, dtype=torch.float64)
    out = lm_correct(g, g_prev, 0.5, 0.6)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    assert not torch.allclose(out, g)
    g2, prev2 = g.clone(), g_prev.clone()
    g2[1:] += 10 * torch.randn(3, 3, 6, 6, generator=g_, dtype=torch.float64)
    prev2[2] *= -4
    assert torch.equal(lm_correct(g2, prev2, 0.5, 0.6)[0], out[0])


def test_stable_formula_is_accurate_in_float32_where_the_released_one_cancels():
    g_ = torch.Generator().manual_seed(3)
    g = torch.randn(2, 16384, generator=g_, dtype=torch.float64)  # |g|^2 ~ 1.6e4, a latent-sized direction
    g_prev = g + 0.3 * torch.randn(2, 16384, generator=g_, dtype=torch.float64)
    for lam in (1e-6, 1e-3, 1.0, 1e3, 1e8):
        for kappa in (1e-6, 0.1, 0.9):
            exact = lm_correct(g, g_prev, lam, kappa)
            got = lm_correct(g.float(), g_prev.float(), lam, kappa).double()
            assert float((got - exact).norm() / exact.norm()) < 1e-5
    # the released order of operations in float32 is not the identity at kappa = 0 (catastrophic cancellation)
    released = lm_correct(g.float(), None, 1e-3, 0.0, formula="reference").double()
    assert float((released - g).norm() / g.norm()) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_nan_in_half_precision(dtype):
    g_ = torch.Generator().manual_seed(4)
    g = (20 * torch.randn(2, 4, 64, 64, generator=g_)).to(dtype)  # |g|^2 ~ 6e6 overflows float16
    g_prev = (20 * torch.randn(2, 4, 64, 64, generator=g_)).to(dtype)
    for formula in ("stable", "reference"):
        out = lm_correct(g, g_prev, 1e-3, 0.5, formula=formula)
        assert out.dtype == dtype and torch.isfinite(out).all()
    exact = lm_correct(g.double(), g_prev.double(), 1e-3, 0.5)
    torch.testing.assert_close(lm_correct(g, g_prev, 1e-3, 0.5).double(), exact, rtol=2e-2, atol=2e-1)


def test_operator_is_differentiable_and_float32_steps_track_float64(model, x_T):
    g_ = torch.Generator().manual_seed(6)
    g = torch.randn(3, 40, generator=g_, dtype=torch.float64)
    g_prev = g + 0.1 * torch.randn(3, 40, generator=g_, dtype=torch.float64)
    plain = lm_correct(g, g_prev, 0.7, 0.4)
    tracked = lm_correct(g.clone().requires_grad_(), g_prev, 0.7, 0.4)
    assert tracked.requires_grad
    torch.testing.assert_close(tracked.detach(), plain, rtol=1e-13, atol=1e-13)
    for base in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        build = lambda: LMLScheduler.from_config(CONFIG, base_scheduler=base, lm_lambda=30.0, lm_kappa=0.5)  # noqa: E731
        exact, _ = run_scheduler(build(), model, x_T, 5)
        single, _ = run_scheduler(build(), model, x_T.float(), 5)
        assert single.dtype == torch.float32
        torch.testing.assert_close(single.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


# -- the scheduler ---------------------------------------------------------------------------------------------

DPM = "DPMSolverMultistepScheduler"
PARITY = {
    "ddim": (DDIMScheduler, "DDIMScheduler", {}),
    "dpm1": (DPMSolverMultistepScheduler, DPM, dict(algorithm_type="dpmsolver", solver_order=1)),
    "dpm2": (DPMSolverMultistepScheduler, DPM, dict(algorithm_type="dpmsolver", solver_order=2)),
    "dpm3": (DPMSolverMultistepScheduler, DPM, dict(algorithm_type="dpmsolver", solver_order=3)),
    "dpmpp1": (DPMSolverMultistepScheduler, DPM, dict(solver_order=1)),
    "dpmpp2": (DPMSolverMultistepScheduler, DPM, dict(solver_order=2)),
    "dpmpp3": (DPMSolverMultistepScheduler, DPM, dict(solver_order=3)),
}


@pytest.mark.parametrize("key", list(PARITY))
def test_disabled_or_kappa_zero_is_the_base_scheduler_exactly(model, x_T, key):
    cls, name, extra = PARITY[key]
    plain = dict(extra, final_sigmas_type="sigma_min") if extra.get("algorithm_type") == "dpmsolver" else extra
    expected, _ = run_scheduler(cls.from_config(CONFIG, **plain), model, x_T, 6)
    for kwargs in (dict(use_lm=False, lm_kappa=0.5), dict(lm_lambda=1e-3, lm_kappa=0.0)):
        sched = LMLScheduler.from_config(CONFIG, base_scheduler=name, **kwargs, **extra)
        got, calls = run_scheduler(sched, model, x_T, 6)
        assert torch.equal(got, expected) and calls == 6


def test_flow_euler_parity_and_velocity_placement(model):
    flow_model = GaussianMixtureModel.for_pipeline(model, FLOW_CONFIG)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = FlowMatchEulerDiscreteScheduler.from_config(FLOW_CONFIG)
    base.set_timesteps(5)
    expected = x
    for t in base.timesteps:  # FlowMatchEuler has neither init_noise_sigma nor scale_model_input
        expected = base.step(flow_model(expected, t).sample, t, expected).prev_sample
    sched = LMLScheduler.from_config(FLOW_CONFIG)
    assert sched.config.base_scheduler == "FlowMatchEulerDiscreteScheduler" and sched.lm_placement == "velocity"
    assert torch.equal(run_scheduler(sched, flow_model, x, 5)[0], expected)
    # velocity placement: x_next = x + dt * LM(v), with the raw v of the previous step as g_prev
    sched = LMLScheduler.from_config(FLOW_CONFIG, lm_lambda=2.0, lm_kappa=0.5)
    sched.set_timesteps(4)
    sample, v_prev = x, None
    for i, t in enumerate(sched.timesteps):
        v = flow_model(sample, t).sample
        dt = float(sched.sigmas[i + 1] - sched.sigmas[i])
        expected_next = sample + dt * lm_correct(v, v_prev, 2.0, 0.5)
        sample = sched.step(v, t, sample).prev_sample
        torch.testing.assert_close(sample, expected_next, rtol=1e-6, atol=1e-6)
        v_prev = v
        torch.testing.assert_close(sched.previous_direction, v)


def test_increment_and_noise_direction_placements(model, x_T):
    # DPM-Solver++ increment: x_next = (s_next / s) x + LM(x_next_base - (s_next / s) x)
    sched = LMLScheduler.from_config(CONFIG, lm_lambda=30.0, lm_kappa=0.5)
    ref = DPMSolverMultistepScheduler.from_config(CONFIG)
    sched.set_timesteps(5)
    ref.set_timesteps(5)
    x, g_prev = x_T, None
    for i, t in enumerate(sched.timesteps):
        out = model(x, t).sample
        a, s, a_n, s_n = sched._levels[i]
        base_next = ref.step(out, t, x).prev_sample  # the base fed the same (LML) trajectory
        g = base_next - (s_n / s) * x
        expected = (s_n / s) * x + lm_correct(g, g_prev, 30.0, 0.5)
        x = sched.step(out, t, x).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9)
        g_prev = g
    # DDIM noise direction: only sqrt(1 - a_prev) * eps changes; x0 stays raw
    sched = LMLScheduler.from_config(CONFIG, base_scheduler="DDIMScheduler", lm_lambda=30.0, lm_kappa=0.5)
    assert sched.lm_placement == "noise_direction"
    sched.set_timesteps(4)
    x, g_prev = x_T, None
    for i, t in enumerate(sched.timesteps):
        eps = model(x, t).sample
        a, s, a_n, s_n = sched._levels[i]
        expected = a_n * (x - s * eps) / a + s_n * lm_correct(eps, g_prev, 30.0, 0.5)
        x = sched.step(eps, t, x).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)  # DDIM's float32 alphas_cumprod
        g_prev = eps


def test_freeze_state_reset_and_batch_change(model, x_T):
    base, _ = run_scheduler(DPMSolverMultistepScheduler.from_config(CONFIG), model, x_T, 6)
    sched = LMLScheduler.from_config(CONFIG, lm_lambda=30.0, lm_kappa=0.5)
    first, _ = run_scheduler(sched, model, x_T, 6)
    second, _ = run_scheduler(sched, model, x_T, 6)
    assert torch.equal(first, second) and not torch.allclose(first, base)
    torch.testing.assert_close(run_scheduler(sched, model, x_T[:1], 6)[0], first[:1])
    frozen = LMLScheduler.from_config(CONFIG, lm_lambda=30.0, lm_kappa=0.5, freeze_fraction=0.5)
    frozen.set_timesteps(6)  # trailing timesteps 999, 832, 666, 499, 332, 166: the first three lie above 500
    assert frozen._apply_at == [False] * 3 + [True] * 3
    assert not torch.equal(run_scheduler(frozen, model, x_T, 6)[0], first)


def test_half_precision_schedulers_run_without_nan(model, x_T):
    for kwargs in (dict(), dict(base_scheduler="DDIMScheduler"), dict(formula="reference", lm_lambda=1e-3)):
        sched = LMLScheduler.from_config(CONFIG, lm_lambda=kwargs.pop("lm_lambda", 30.0), lm_kappa=0.5, **kwargs)
        for dtype in (torch.float16, torch.bfloat16):
            out, _ = run_scheduler(sched, model, x_T.to(dtype), 5)
            assert out.dtype == dtype and torch.isfinite(out).all()


def test_from_config_round_trip_and_refusals(tmp_path, model, x_T):
    for source in (DDIMScheduler(**TESTBED_CONFIG), DPMSolverMultistepScheduler(), EulerDiscreteScheduler()):
        assert LMLScheduler.from_config(source.config).config.base_scheduler == "DPMSolverMultistepScheduler"
    sched = LMLScheduler.from_config(CONFIG, base_scheduler="DDIMScheduler", lm_lambda=5.0, lm_kappa=0.2)
    sched.save_pretrained(tmp_path)
    loaded = LMLScheduler.from_pretrained(tmp_path)
    # diffusers does not save `_use_default_values`: every saved key is explicit after loading
    assert {k: v for k, v in loaded.config.items() if k != "_use_default_values"} == {
        k: v for k, v in sched.config.items() if k != "_use_default_values"
    }
    assert torch.equal(run_scheduler(loaded, model, x_T, 4)[0], run_scheduler(sched, model, x_T, 4)[0])
    flow = LMLScheduler.from_config(FLOW_CONFIG)
    flow.save_pretrained(tmp_path / "flow")
    assert LMLScheduler.from_pretrained(tmp_path / "flow").config.base_scheduler == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ValueError, match="base_scheduler"):
        LMLScheduler.from_config(CONFIG, base_scheduler="UniPCMultistepScheduler")
    with pytest.raises(ValueError, match="flow-matching"):
        LMLScheduler.from_config(FLOW_CONFIG, base_scheduler="DDIMScheduler")
    with pytest.raises(ValueError, match="VP"):
        LMLScheduler.from_config(CONFIG, base_scheduler="FlowMatchEulerDiscreteScheduler")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lm_lambda=0.0), "lm_lambda"),
        (dict(lm_lambda=-1.0), "lm_lambda"),
        (dict(lm_lambda=float("inf")), "lm_lambda"),
        (dict(lm_kappa=-0.1), "lm_kappa"),
        (dict(lm_kappa=1.5), "lm_kappa"),
        (dict(freeze_fraction=1.0), "freeze_fraction"),
        (dict(placement="everywhere"), "placement"),
        (dict(placement="velocity"), "placement"),
        (dict(base_scheduler="DDIMScheduler", placement="increment", prediction_type="flow_prediction"), "prediction"),
        (dict(formula="fast"), "formula"),
        (dict(prediction_type="noise"), "prediction_type"),
        (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LMLScheduler.from_config(CONFIG, **kwargs)


def test_negative_steps_raise():
    with pytest.raises(ValueError, match="num_inference_steps"):
        LMLScheduler.from_config(CONFIG).set_timesteps(-1)


def test_pipelines_end_to_end():
    pipe = tiny_unet_pipeline()
    for base in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        pipe.scheduler = LMLScheduler.from_config(pipe.scheduler.config, base_scheduler=base, lm_kappa=0.5)
        image = pipe(
            batch_size=2, num_inference_steps=4, eta=0.0, output_type="np", generator=torch.Generator().manual_seed(0)
        ).images
        assert image.shape == (2, 8, 8, 3) and torch.isfinite(torch.as_tensor(image)).all()
    pipe.unet.half()  # float16 end to end
    image = pipe(batch_size=1, num_inference_steps=4, output_type="np").images
    assert torch.isfinite(torch.as_tensor(image)).all()
    sd = tiny_stable_diffusion_pipeline()
    sd.scheduler = LMLScheduler.from_config(sd.scheduler.config, lm_lambda=5.0, lm_kappa=0.5)
    image = run_tiny_stable_diffusion(sd)
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.as_tensor(image)).all()
    flow = tiny_flow_pipeline()
    flow.scheduler = LMLScheduler.from_config(flow.scheduler.config, lm_lambda=0.01, lm_kappa=0.5)
    image = flow(
        **tiny_flow_embeddings(),
        num_inference_steps=3,
        height=32,
        width=32,
        guidance_scale=2.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.as_tensor(image)).all()


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_prediction_types_agree(model, x_T, prediction_type):
    other = GaussianMixtureModel.for_pipeline(model, TESTBED_CONFIG, prediction_type=prediction_type)
    for base in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        build = lambda p: LMLScheduler.from_config(  # noqa: E731
            CONFIG, base_scheduler=base, prediction_type=p, lm_lambda=30.0, lm_kappa=0.5
        )
        expected, _ = run_scheduler(build("epsilon"), model, x_T, 5)
        got, _ = run_scheduler(build(prediction_type), other, x_T, 5)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
