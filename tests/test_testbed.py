"""The exact Gaussian-mixture testbed and its reference solutions."""

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from diffsamplers.models import GaussianMixtureModel, exact_solution
from diffsamplers.schedule import to_x0_eps

VP = DDIMScheduler(clip_sample=False, timestep_spacing="trailing").config


def dense_posterior_mean(model, x, a, s):
    """The posterior mean by dense linear algebra: an independent reference for the Woodbury path."""
    covs = model.covariances()
    out = []
    for xi in x:
        logp, means = [], []
        for k in range(covs.shape[0]):
            M = a**2 * covs[k] + s**2 * torch.eye(covs.shape[1], dtype=torch.float64)
            r = xi - a * model.means[k]
            dist = torch.distributions.MultivariateNormal(a * model.means[k], covariance_matrix=M)
            logp.append(dist.log_prob(xi) + model.log_weights[k])
            means.append(model.means[k] + a * covs[k] @ torch.linalg.solve(M, r))
        w = torch.softmax(torch.stack(logp), 0)
        out.append((w[:, None] * torch.stack(means)).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("builder", ["toy", "digits"])
def test_posterior_mean_matches_dense_reference(builder):
    model = GaussianMixtureModel.toy_2d(VP) if builder == "toy" else GaussianMixtureModel.digits(scheduler_config=VP)
    g = torch.Generator().manual_seed(0)
    for a, s in [(0.99, 0.14), (0.6, 0.8), (0.05, 0.9987)]:
        x = torch.randn(3, model.means.shape[1], generator=g, dtype=torch.float64)
        a_, s_ = torch.full((3,), a, dtype=torch.float64), torch.full((3,), s, dtype=torch.float64)
        got = model.posterior_mean(x, a_, s_)
        torch.testing.assert_close(got, dense_posterior_mean(model, x, a, s), rtol=1e-9, atol=1e-9)


def test_outputs_are_mutually_consistent():
    base = GaussianMixtureModel.digits(scheduler_config=VP)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 300, 700, 999])
    a, s = base.schedule.alpha_sigma(t)
    decoded = []
    for p in ["epsilon", "sample", "v_prediction"]:
        m = GaussianMixtureModel.for_pipeline(base, VP, prediction_type=p)
        decoded.append(to_x0_eps(m(x, t).sample, x, a, s, p)[0])
    for d in decoded[1:]:
        torch.testing.assert_close(d, decoded[0], rtol=1e-9, atol=1e-9)
    # flow: the same mixture under a flow schedule, at the same (alpha, sigma) up to the frame scaling
    flow_cfg = FlowMatchEulerDiscreteScheduler().config
    fm = GaussianMixtureModel.for_pipeline(base, flow_cfg)
    assert fm.prediction_type == "flow_prediction"
    sf = s / (a + s)  # flow sigma with the same noise level sigma/alpha
    xf = x * (1 - sf)[:, None, None, None] / a[:, None, None, None]
    x0_flow = to_x0_eps(fm(xf, sf * 1000).sample, xf, 1 - sf, sf, "flow_prediction")[0]
    torch.testing.assert_close(x0_flow, decoded[0], rtol=1e-9, atol=1e-9)


def test_class_conditional_and_cfg():
    model = GaussianMixtureModel.digits(scheduler_config=VP)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor(500)
    c3 = model(x, t, class_labels=torch.tensor([3, 3])).sample
    emb3 = model(x, t, encoder_hidden_states=model.class_embeddings([3, 3])).sample
    torch.testing.assert_close(c3, emb3)
    uncond = model(x, t).sample
    null = model(x, t, class_labels=torch.tensor([10, 10])).sample
    torch.testing.assert_close(uncond, null)
    # a class-3-only mixture is the conditional model
    only3 = GaussianMixtureModel(
        model.means[3:4].reshape(1, 1, 8, 8), scheduler_config=VP, factors=model.factors[3:4], diag=model.diag[3:4]
    )
    torch.testing.assert_close(only3(x, t).sample, c3, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(c3, uncond)


def test_runs_in_ddim_pipeline():
    model = GaussianMixtureModel.digits(scheduler_config=VP)
    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(VP))
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 8, 8, 1) and model.num_calls == 5


@pytest.mark.parametrize("frame", ["vp", "flow"])
def test_closed_form_agrees_with_ode_for_one_gaussian(frame):
    cfg = VP if frame == "vp" else FlowMatchEulerDiscreteScheduler().config
    g = torch.Generator().manual_seed(0)
    means = torch.randn(1, 1, 3, 4, generator=g, dtype=torch.float64) * 0.5
    factors = torch.randn(1, 12, 4, generator=g, dtype=torch.float64) * 0.4
    model = GaussianMixtureModel(means, torch.tensor([0.2]), scheduler_config=cfg, factors=factors)
    x = torch.randn(5, 1, 3, 4, generator=g, dtype=torch.float64)
    # the flow case starts at pure noise (alpha = 0), which the angle parameterisation takes as an ordinary point
    for t0, t1 in [(999, None), (500, 20)] if frame == "vp" else [(1000.0, None), (990.0, 100.0)]:
        ode = exact_solution(model, x, t0, t1)
        closed = exact_solution(model, x, t0, t1, method="closed_form")
        assert (ode - closed).abs().max() < 1e-8, (t0, t1)


def test_exact_solution_from_zero_terminal_snr():
    cfg = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False).config
    g = torch.Generator().manual_seed(1)
    model = GaussianMixtureModel(
        torch.randn(1, 1, 2, 3, generator=g, dtype=torch.float64), torch.tensor([0.3]), scheduler_config=cfg,
        factors=torch.randn(1, 6, 2, generator=g, dtype=torch.float64) * 0.3,
    )
    assert float(model.schedule.alpha_sigma(999)[0]) == 0.0
    x = torch.randn(3, 1, 2, 3, generator=g, dtype=torch.float64)
    ode = exact_solution(model, x, 999)
    assert (ode - exact_solution(model, x, 999, method="closed_form")).abs().max() < 1e-8


def test_dpm_solver_1000_steps_lands_on_exact_solution():
    # A well-conditioned mixture (component std 0.3): DPM-Solver++(2M)'s last first-order jump to sigma = 0 costs
    # O(sigma_min^2 / std^2), so stiffer mixtures need more steps for the same error.
    g = torch.Generator().manual_seed(0)
    model = GaussianMixtureModel(
        torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64) * 0.7, torch.full((4,), 0.3), scheduler_config=VP
    )
    x = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    sched = DPMSolverMultistepScheduler.from_config(VP)
    sched.set_timesteps(1000)
    y = x.clone()
    for t in sched.timesteps:
        y = sched.step(model(y, t).sample, t, y).prev_sample
    ref = exact_solution(model, x, sched.timesteps[0])
    rmse = (y - ref).pow(2).mean().sqrt()
    assert rmse < 1e-4, rmse


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="means"):
        GaussianMixtureModel(torch.zeros(2, 4), torch.ones(2), scheduler_config=VP)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureModel(torch.zeros(2, 1, 2, 2), torch.ones(2), torch.tensor([0.7, 0.7]), scheduler_config=VP)
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianMixtureModel(torch.zeros(2, 1, 2, 2), torch.ones(2), scheduler_config=VP, prediction_type="x")
    model = GaussianMixtureModel.toy_2d(VP)
    with pytest.raises(ValueError, match="method"):
        exact_solution(model, torch.zeros(1, 1, 1, 2), 999, method="rk4")
    with pytest.raises(ValueError, match="single-Gaussian"):
        exact_solution(model, torch.zeros(1, 1, 1, 2), 999, method="closed_form")
