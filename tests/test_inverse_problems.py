# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""DPS, PSLD and STSL: closed-form linear-Gaussian posteriors, Tweedie identities and the trace estimator on the
Gaussian-mixture testbed, per-sample independence, and smoke tests on the tiny SD / bundled pipelines."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffsamplers.models.gmm import GaussianMixtureModel
from diffsamplers.pipelines.inverse_problems import IdentityAutoencoder, InverseProblemSolver
from diffsamplers.pipelines.operators import BoxInpainting, GaussianBlur, RandomInpainting, SuperResolution
from diffsamplers.pipelines.stsl import divergence, tweedie_variance
from diffsamplers.schedule import NoiseSchedule

DDPM_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
               "prediction_type": "epsilon", "timestep_spacing": "trailing"}
SHAPE = (1, 4, 4)
DIM = 16
SIGMA_Y = 0.1

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# a Gaussian prior with an exact, differentiable denoiser


class GaussianDenoiser(nn.Module):
    """``eps_hat(x_t) = s M^{-1} (x_t - a m)`` with ``M = a^2 Sigma + s^2 I``: the exact noise prediction of
    ``x0 ~ N(m, Sigma)``, linear in ``x_t`` and differentiable; called like a ``UNet2DModel``."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, config: dict):
        super().__init__()
        self.register_buffer("mean", mean.double())
        self.register_buffer("cov", cov.double())
        self.schedule = NoiseSchedule.from_config(config)
        self.config = SimpleNamespace(sample_size=SHAPE[1], in_channels=SHAPE[0])
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, sample, timestep, **unused):
        t = int(torch.as_tensor(timestep).reshape(-1)[0])
        a, s = (float(v) for v in self.schedule.alpha_sigma(t))
        m = a * a * self.cov + s * s * torch.eye(DIM, dtype=torch.float64)
        r = sample.double().flatten(1) - a * self.mean
        eps = s * torch.linalg.solve(m, r.T).T
        return SimpleNamespace(sample=eps.view_as(sample).to(sample.dtype))


def gaussian_prior(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) * 0.35
    return torch.zeros(DIM, dtype=torch.float64), f @ f.T / DIM * 4 + 0.05 * torch.eye(DIM, dtype=torch.float64)


def operator_matrix(op) -> torch.Tensor:
    basis = torch.eye(DIM, dtype=torch.float64).view(DIM, *SHAPE)
    return op(basis).flatten(1).T  # (m, D)


LINEAR_OPERATORS = {
    "mask": lambda: RandomInpainting(4, 0.5, seed=0, noise_sigma=SIGMA_Y),
    "pool": lambda: SuperResolution(2, noise_sigma=SIGMA_Y),
    "blur": lambda: GaussianBlur(3, 0.8, noise_sigma=SIGMA_Y),
}


def linear_problem(name: str, seed: int = 0):
    mean, cov = gaussian_prior()
    op = LINEAR_OPERATORS[name]()
    a = operator_matrix(op)
    gen = torch.Generator().manual_seed(seed)
    x0 = (mean + torch.linalg.cholesky(cov) @ torch.randn(DIM, generator=gen, dtype=torch.float64)).view(1, *SHAPE)
    y = op.measure(x0.float(), gen).double()
    yv = y.flatten()
    # closed-form posterior: C = (Sigma^-1 + A^T A / s_y^2)^-1, m = C A^T y / s_y^2 (hidden mask rows are zero)
    post_cov = torch.linalg.inv(torch.linalg.inv(cov) + a.T @ a / SIGMA_Y**2)
    post_mean = post_cov @ a.T @ yv / SIGMA_Y**2
    rank = int(torch.linalg.matrix_rank(a))
    return SimpleNamespace(op=op, a=a, y=y.float(), mean=mean, cov=cov, post_mean=post_mean, post_cov=post_cov,
                           rank=rank)


def gaussian_solver(prob, vae=None) -> InverseProblemSolver:
    return InverseProblemSolver(GaussianDenoiser(prob.mean, prob.cov, DDPM_CONFIG), DDPM_CONFIG, vae=vae,
                                progress_bar=False)


def oracle_loss(prob):
    """``-log p(y | x_t)`` of the linear-Gaussian problem: ``(y - A x0_hat)`` is Gaussian with covariance
    ``s_y^2 I + A C_{0|t} A^T``, ``C_{0|t} = (Sigma^-1 + a^2 / s^2 I)^-1`` (no dependence on ``x_t``)."""
    inv_cov = torch.linalg.inv(prob.cov)
    rows = prob.a.abs().sum(1) > 0  # zero rows of a mask carry no measurement
    a = prob.a[rows]

    def loss(zt, z0, eps, step):
        c = torch.linalg.inv(inv_cov + (step.alpha / step.sigma) ** 2 * torch.eye(DIM, dtype=torch.float64))
        s = SIGMA_Y**2 * torch.eye(a.shape[0], dtype=torch.float64) + a @ c @ a.T
        r = prob.y.double().flatten(1)[:, rows] - z0.double().flatten(1) @ a.T
        return 0.5 * (r * torch.linalg.solve(s, r.T).T).sum(1)

    return loss


@pytest.mark.parametrize("name", sorted(LINEAR_OPERATORS))
def test_oracle_guidance_samples_the_closed_form_posterior(name):
    prob = linear_problem(name)
    n = 4000
    out = gaussian_solver(prob).guided_sample(oracle_loss(prob), n, 1000, eta=1.0, rule="score",
                                              generator=torch.Generator().manual_seed(1))
    x = out.latents.double().flatten(1)  # pixel space: the samples before clamping
    se = (prob.post_cov.diagonal().sum() / n).sqrt()
    mean_err = (x.mean(0) - prob.post_mean).norm()
    assert mean_err < 4 * se, (mean_err, se)
    cov_err = (torch.cov(x.T) - prob.post_cov).norm() / prob.post_cov.norm()
    assert cov_err < 0.12, cov_err



APPROXIMATE = {
    "dps": dict(scale=0.3),
    "psld": dict(omega=0.1, gamma=0.1),
    "stsl": dict(omega=0.1, gamma=0.1, rho=0.1),
}


@pytest.mark.parametrize("name", sorted(LINEAR_OPERATORS))
@pytest.mark.parametrize("method", sorted(APPROXIMATE))
def test_approximate_methods_on_the_linear_gaussian_problem(name, method):
    # DPS, PSLD and STSL are biased; assert only what the spec asks: the posterior mean is approached and the
    # reconstructions explain the measurement to about the noise level sigma_y sqrt(m)
    prob = linear_problem(name)
    solver = gaussian_solver(prob, vae=IdentityAutoencoder())
    y = prob.y.expand(400, -1, -1, -1)
    out = getattr(solver, method)(prob.op, y, num_inference_steps=200, generator=torch.Generator().manual_seed(1),
                                  **APPROXIMATE[method])
    x = out.latents.double().flatten(1)
    prior_err = prob.post_mean.norm()  # the prior mean is 0
    assert (x.mean(0) - prob.post_mean).norm() < 0.25 * prior_err
    residual = (prob.y.double().flatten(1) - x @ prob.a.T).norm(dim=1).mean()
    target = SIGMA_Y * prob.rank**0.5
    assert 0.15 * target < residual < 2.5 * target, (residual, target)
    # without guidance the samples come from the prior and miss the measurement by far more
    free = solver.dps(prob.op, y[:100], num_inference_steps=50, scale=0.0, generator=torch.Generator().manual_seed(1))
    assert (prob.y.double().flatten(1) - free.latents.double().flatten(1) @ prob.a.T).norm(dim=1).mean() > 4 * target


@pytest.mark.parametrize("scheme", ["forward", "central", "vjp"])
def test_stsl_reduces_to_its_base_on_a_gaussian_prior(scheme):
    # rho = 0 is PSLD exactly (no extra model calls); with a Gaussian prior div eps_hat is constant, so the trace
    # drift vanishes and STSL equals PSLD up to rounding, even with a weight large enough to dominate at high noise
    prob = linear_problem("mask")
    solver = gaussian_solver(prob, vae=IdentityAutoencoder())
    y = prob.y.expand(8, -1, -1, -1)
    kw = dict(num_inference_steps=20, omega=0.1, gamma=0.1)
    base = solver.psld(prob.op, y, generator=torch.Generator().manual_seed(3), **kw)
    zero = solver.stsl(prob.op, y, rho=0.0, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(zero.latents, base.latents) and zero.nfe == base.nfe == 20
    on = solver.stsl(prob.op, y, rho=1.0, scheme=scheme, generator=torch.Generator().manual_seed(3), **kw)
    assert on.nfe == {"forward": 40, "central": 60, "vjp": 20}[scheme]
    assert torch.allclose(on.latents, base.latents, atol=1e-5)
    dps = solver.dps(prob.op, y, scale=0.1, eta=0.0, generator=torch.Generator().manual_seed(3),
                     num_inference_steps=20)
    latent_dps = solver.stsl(prob.op, y, omega=0.1, gamma=0.0, rho=0.0, generator=torch.Generator().manual_seed(3),
                             num_inference_steps=20)
    assert torch.equal(dps.latents, latent_dps.latents)


def test_gluing_target_with_identity_autoencoder():
    # spec check: with E = D = I and a mask, PSLD's gluing target is x0_hat with the observed pixels replaced by y
    op = BoxInpainting(4, 2)
    x0, y = torch.randn(3, *SHAPE), op.measure(torch.randn(3, *SHAPE), torch.Generator().manual_seed(0))
    ident = IdentityAutoencoder()
    glued = ident.encode(op.project(ident.decode(x0), y))
    assert torch.allclose(glued, torch.where(op.mask.bool(), y, x0), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Tweedie identities and the trace estimator on the Gaussian-mixture testbed


def small_mixture_model() -> GaussianMixtureModel:
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 1, 1, 6, generator=gen, dtype=torch.float64)
    factors = torch.randn(3, 6, 2, generator=gen, dtype=torch.float64) * 0.4
    return GaussianMixtureModel(means, torch.tensor([0.3, 0.5, 0.4]), torch.tensor([0.5, 0.3, 0.2]),
                                scheduler_config=DDPM_CONFIG, factors=factors)


def exact_posterior(gmm: GaussianMixtureModel, x: torch.Tensor, a: float, s: float):
    """Mean and covariance of x0 | x_t for the mixture, component by component (a reference independent of the
    model's Woodbury code): per component N(m_k + a C_k M_k^-1 (x - a m_k), C_k - a^2 C_k M_k^-1 C_k)."""
    covs, d = gmm.covariances(), x.shape[-1]
    m_k = a * a * covs + s * s * torch.eye(d, dtype=torch.float64)
    diff = x[None] - a * gmm.means
    sol = torch.linalg.solve(m_k, diff[..., None])[..., 0]
    log_r = gmm.log_weights - 0.5 * ((diff * sol).sum(-1) + torch.logdet(m_k))
    r = torch.softmax(log_r, 0)
    mu = gmm.means + a * (covs @ sol[..., None])[..., 0]
    cov_k = covs - a * a * covs @ torch.linalg.solve(m_k, covs)
    mean = (r[:, None] * mu).sum(0)
    second = (r[:, None, None] * (cov_k + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def mixture_eps(gmm: GaussianMixtureModel, a: float, s: float):
    """The testbed's noise prediction as a differentiable function of flat float64 inputs (its ``forward``
    detaches, as a denoiser may)."""

    def eps(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return gmm.posterior(x, torch.full((b,), a, dtype=torch.float64), torch.full((b,), s, dtype=torch.float64))[1]

    return eps


@pytest.mark.parametrize("t", [100, 500, 900])
def test_tweedie_identities_against_exact_jacobians(t):
    gmm = small_mixture_model()
    a, s = (float(v) for v in gmm.schedule.alpha_sigma(t))
    x = a * gmm.sample_data(1, torch.Generator().manual_seed(1)).flatten() + s * torch.randn(
        6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mean, cov = exact_posterior(gmm, x, a, s)
    eps = mixture_eps(gmm, a, s)
    x0 = (x - s * eps(x[None])[0]) / a
    assert torch.allclose(x0, mean, atol=1e-10)  # first-order Tweedie
    jac = torch.autograd.functional.jacobian(lambda v: eps(v[None])[0], x)
    # second-order Tweedie: Cov = (s^2 / a^2) (I - s d eps / dx); its trace through the divergence
    assert torch.allclose((s / a) ** 2 * (torch.eye(6, dtype=torch.float64) - s * jac), cov, atol=1e-10)
    var = tweedie_variance(jac.trace()[None], a, s, 6)
    assert torch.allclose(var, cov.trace()[None] / 6, atol=1e-10)


def test_hutchinson_estimators_are_unbiased_with_the_stated_bias_order():
    gmm = small_mixture_model()
    a, s = (float(v) for v in gmm.schedule.alpha_sigma(400))
    eps = mixture_eps(gmm, a, s)
    x = (a * gmm.sample_data(1, torch.Generator().manual_seed(1)).flatten(1) + 0.3 * s)
    exact = torch.autograd.functional.jacobian(lambda v: eps(v[None])[0], x[0]).trace()
    n = 4000
    xs = x.expand(n, -1).clone().requires_grad_(True)
    est = {}
    for scheme in ("forward", "central", "vjp"):
        out = eps(xs)
        est[scheme], calls = divergence(eps, xs, out=out, fd_step=1e-3, scheme=scheme,
                                        generator=torch.Generator().manual_seed(5))
        assert calls == {"forward": 1, "central": 2, "vjp": 0}[scheme]
        se = est[scheme].std() / n**0.5
        assert (est[scheme].mean() - exact).abs() < 4 * se, (scheme, est[scheme].mean(), exact, se)
    # same probes: finite differences approach the exact per-probe v^T J v at order 1 (forward) and 2 (central)
    errs = {}
    for scheme in ("forward", "central"):
        errs[scheme] = [
            (divergence(eps, xs[:64], fd_step=h, scheme=scheme, generator=torch.Generator().manual_seed(5))[0]
             - est["vjp"][:64]).abs().max().item()
            for h in (1e-2, 5e-3)
        ]
    assert 1.6 < errs["forward"][0] / errs["forward"][1] < 2.4
    assert 3.2 < errs["central"][0] / errs["central"][1] < 4.8


def test_gradient_of_the_trace_estimate_matches_the_exact_gradient():
    # grad_x tr Cov[x0 | x_t] from the closed form vs autograd through the Hutchinson estimate, averaged over probes
    gmm = small_mixture_model()
    t = 300
    a, s = (float(v) for v in gmm.schedule.alpha_sigma(t))
    x = a * gmm.means[0] + 0.5 * s * torch.ones(6, dtype=torch.float64)
    xe = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(exact_posterior(gmm, xe, a, s)[1].trace(), xe)
    assert exact.norm() > 1e-2  # a mixture has a non-zero trace drift (a Gaussian's is zero)
    eps = mixture_eps(gmm, a, s)
    n = 2000
    for scheme in ("forward", "vjp"):
        xs = x.expand(n, -1).clone().requires_grad_(True)
        div, _ = divergence(eps, xs, out=eps(xs), scheme=scheme, generator=torch.Generator().manual_seed(7))
        (grads,) = torch.autograd.grad(tweedie_variance(div, a, s, 6).sum() * 6, xs)
        se = grads.std(0) / n**0.5
        assert ((grads.mean(0) - exact).abs() < 4 * se + 1e-6).all(), (scheme, grads.mean(0), exact)


# ---------------------------------------------------------------------------------------------------------------
# diffusers pipelines


@pytest.fixture(scope="module")
def tiny_sd():
    from diffsamplers.testing import tiny_stable_diffusion_pipeline

    return tiny_stable_diffusion_pipeline()


def sd_problem(batch: int = 2):
    op = BoxInpainting(32, 12)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return op, op.measure(x, torch.Generator().manual_seed(1))


METHOD_WEIGHTS = {"dps": dict(scale=1.0), "psld": dict(omega=1.0, gamma=0.1), "stsl": dict(rho=0.1)}


@pytest.mark.parametrize("method", sorted(METHOD_WEIGHTS))
def test_one_step_on_tiny_sd_inside_no_grad(tiny_sd, method):
    solver = InverseProblemSolver.from_pipeline(tiny_sd, prompt_embeds=torch.randn(1, 77, 16))
    op, y = sd_problem()
    flags = [p.requires_grad for p in tiny_sd.unet.parameters()]
    assert any(flags)  # the tiny pipeline's parameters require grad: the solver must not train them
    with torch.no_grad():
        out = getattr(solver, method)(op, y, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                                      **METHOD_WEIGHTS[method])
    norms = out.guidance_norms
    assert norms.shape == (1, 2) and torch.isfinite(norms).all() and (norms > 0).all()
    assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.images).all()
    assert out.nfe == (2 if method == "stsl" else 1)
    modules = (tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder)
    assert all(p.grad is None for m in modules for p in m.parameters())
    assert [p.requires_grad for p in tiny_sd.unet.parameters()] == flags


def test_prompt_is_encoded_and_checkpointing_gives_the_same_result(tiny_sd):
    op, y = sd_problem(1)
    plain = InverseProblemSolver.from_pipeline(tiny_sd, prompt="a digit", progress_bar=False)
    ref = plain.psld(op, y, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    ckpt = InverseProblemSolver.from_pipeline(tiny_sd, prompt="a digit", gradient_checkpointing=True)
    out = ckpt.psld(op, y, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.latents, ref.latents, atol=1e-5)
    assert not tiny_sd.unet.is_gradient_checkpointing and not tiny_sd.vae.is_gradient_checkpointing


def test_step_sizes_are_per_sample(tiny_sd):
    # a sample's reconstruction does not depend on the other samples in the batch (the official DPS / PSLD code
    # normalise by a norm over the whole batch, which would fail this)
    solver = InverseProblemSolver.from_pipeline(tiny_sd, prompt_embeds=torch.randn(1, 77, 16), progress_bar=False)
    op, y = sd_problem(3)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = solver.psld(op, y, num_inference_steps=2, omega=5.0, generator=gens)
    alone = solver.psld(op, y[1:2], num_inference_steps=2, omega=5.0, generator=[torch.Generator().manual_seed(11)])
    assert torch.allclose(batch.latents[1:2], alone.latents, atol=1e-5)
    # STSL's Hutchinson probes too are drawn from each sample's own generator
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = solver.stsl(op, y, num_inference_steps=2, omega=5.0, rho=0.1, generator=gens)
    alone = solver.stsl(op, y[1:2], num_inference_steps=2, omega=5.0, rho=0.1,
                        generator=[torch.Generator().manual_seed(11)])
    assert torch.allclose(batch.latents[1:2], alone.latents, atol=1e-5)


def test_bundled_latent_dit_and_pixel_ddpm():
    from diffsamplers.models.digits import digits_split, load_digits_images, load_digits_pipeline
    from diffsamplers.models.digits_latent import load_digits_latent_pipeline

    pipe = load_digits_latent_pipeline()
    solver = InverseProblemSolver.from_pipeline(pipe)
    assert solver.image_shape == (1, 16, 16) and solver.sample_shape == (4, 8, 8)
    assert solver.conditioning["class_labels"].tolist() == [1000]  # the unconditional model
    op = SuperResolution(4)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = solver.stsl(op, op.measure(x), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 1, 16, 16) and out.nfe == 4 and torch.isfinite(out.images).all()
    # the exact VJP trace differentiates the DiT twice: the fused attention kernel has no double backward
    exact = solver.stsl(op, op.measure(x), num_inference_steps=2, scheme="vjp",
                        generator=torch.Generator().manual_seed(0))
    assert exact.nfe == 2 and torch.isfinite(exact.images).all() and exact.guidance_norms.gt(0).all()
    # DPS in pixel space on the bundled DDPM: guidance brings the samples to the measurement
    ddpm = InverseProblemSolver.from_pipeline(load_digits_pipeline())
    box = BoxInpainting(8, 4, noise_sigma=0.05)
    images, _ = load_digits_images()
    y = box.measure(images[digits_split()[1][:4]], torch.Generator().manual_seed(0))  # held-out digits
    kw = dict(num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    guided, free = ddpm.dps(box, y, scale=1.0, **kw), ddpm.dps(box, y, scale=0.0, **kw)

    def residual(o):
        return (box(o.images) - y).flatten(1).norm(dim=1).mean()

    assert residual(guided) < 0.25 * residual(free)
    with pytest.raises(ValueError, match="vae"):
        ddpm.psld(box, y)


def test_bad_input_is_refused(tiny_sd):
    solver = InverseProblemSolver.from_pipeline(tiny_sd, prompt_embeds=torch.randn(1, 77, 16), progress_bar=False)
    op, y = sd_problem()
    with pytest.raises(ValueError, match="measurement"):
        solver.dps(op, y[:, :, :16])
    with pytest.raises(ValueError, match="measurement"):
        solver.psld(SuperResolution(4), y)
    with pytest.raises(TypeError, match="operator"):
        solver.dps(lambda x: x, y)
    for method, kw, name in [("dps", {"scale": -1.0}, "scale"), ("psld", {"omega": -0.1}, "omega"),
                             ("psld", {"gamma": -0.1}, "gamma"), ("stsl", {"rho": -1e-3}, "rho"),
                             ("stsl", {"probes": 0}, "probes"), ("stsl", {"scheme": "jvp2"}, "scheme"),
                             ("stsl", {"fd_step": 0.0}, "fd_step"), ("stsl", {"inner_steps": 0}, "inner_steps"),
                             ("psld", {"num_inference_steps": 0}, "num_inference_steps"),
                             ("dps", {"eta": 2.0}, "eta")]:
        with pytest.raises(ValueError, match=name):
            getattr(solver, method)(op, y, **kw)
    with pytest.raises(ValueError, match="generator"):
        solver.dps(op, y, generator=[torch.Generator()])
    no_vae = InverseProblemSolver(tiny_sd.unet, tiny_sd.scheduler, conditioning={
        "encoder_hidden_states": torch.randn(1, 77, 16)})
    with pytest.raises(ValueError, match="vae"):
        no_vae.stsl(SuperResolution(2), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="scheduler"):
        InverseProblemSolver(tiny_sd.unet, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
