"""POLARIS: the closed form is the least-squares argmin, its fallbacks and clamp, bit-identity with DDIM inversion
when the condition is the unconditional one, replay by timestep (a reversed replay must fail), batch semantics."""

from types import SimpleNamespace

import pytest
import torch
from scipy.optimize import minimize_scalar

from diffsamplers.eval.invert_bench import heldout_digits
from diffsamplers.pipelines.inversion import encode_images, invert, reconstruct
from diffsamplers.pipelines.polaris import PolarisGuidance, polaris_omega
from diffsamplers.testing import tiny_stable_diffusion_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return heldout_digits(3)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# the closed form
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_is_the_numerical_argmin(seed):
    du, dc = randn(2, 4, 8, 8, seed=seed), randn(2, 4, 8, 8, seed=seed + 10) + 0.3 * randn(2, 4, 8, 8, seed=seed)

    def objective(w, a=du, b=dc):
        return float((a + w * (b - a)).pow(2).sum())

    expected = minimize_scalar(objective, bracket=(-5.0, 5.0), tol=1e-12).x
    omega = polaris_omega(du, dc, omega_min=-100.0, omega_max=100.0)
    assert omega.shape == (2,) and omega[0] == omega[1]
    assert abs(float(omega[0]) - expected) < 1e-6
    # the residual is orthogonal to dc - du (the "projection-orthogonal" of the name)
    residual = du + omega[0] * (dc - du)
    assert abs(float((residual * (dc - du)).sum())) < 1e-10 * float((dc - du).norm() * residual.norm())
    # per sample: each sample's own argmin
    per = polaris_omega(du, dc, per_sample=True, omega_min=-100.0, omega_max=100.0)
    for b in range(2):
        own = minimize_scalar(lambda w, b=b: objective(w, du[b], dc[b]), bracket=(-5.0, 5.0), tol=1e-12).x
        assert abs(float(per[b]) - own) < 1e-6


def test_fallbacks_and_clamp():
    du = randn(2, 4, 8, 8)
    # c == u: the denominator is 0, omega falls back to omega_init, with no NaN
    assert torch.equal(polaris_omega(du, du, omega_init=3.0), torch.full((2,), 3.0, dtype=torch.float64))
    zero = torch.zeros(2, 4)
    assert torch.equal(polaris_omega(zero, zero), torch.ones(2, dtype=torch.float64))
    # a denominator at the official absolute guard of 1e-6 falls back too
    assert float(polaris_omega(du, du + 1e-5, omega_init=2.0)[0]) == 2.0  # ||du - dc||^2 = 2.56e-7
    # omega* = 21 for dc = du - du / 21 ... clamped to [0, 15]; omega* < 0 clamped to 0
    assert float(polaris_omega(du, du - du / 21)[0]) == 15.0
    assert float(polaris_omega(du, du + du / 2)[0]) == 0.0
    assert abs(float(polaris_omega(du, du + du / 2, omega_min=-5.0)[0]) + 2.0) < 1e-12
    with pytest.raises(ValueError, match="omega_init"):
        PolarisGuidance(omega_init=20.0)
    with pytest.raises(ValueError, match="delta_uncond"):
        polaris_omega(du, du[:1])


def test_first_step_uses_omega_init_and_records_by_timestep():
    guidance = PolarisGuidance(omega_init=2.5)
    u, c = randn(1, 4, 2, 2), randn(1, 4, 2, 2, seed=1)
    out = guidance(torch.tensor(999), u, c)
    assert torch.equal(out, u + 2.5 * (c - u)) and list(guidance.scales) == [999.0]
    guidance(899, u + randn(1, 4, 2, 2, seed=2), c)
    assert list(guidance.scales) == [999.0, 899.0] and float(guidance.scales[899.0][0]) != 2.5


# ---------------------------------------------------------------------------------------------------------------
# through invert / reconstruct
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ddim", "bdia"])
def test_identical_cond_and_uncond_gives_plain_inversion_bit_for_bit(backend):
    sd = tiny_stable_diffusion_pipeline()
    g = torch.Generator().manual_seed(0)
    images, embeds = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 77, 16, generator=g)
    condition = {"prompt_embeds": embeds, "negative_prompt_embeds": embeds.clone()}
    polaris = invert(sd, images, method="polaris", polaris_backend=backend, num_inference_steps=6,
                     guidance_scale=3.0, **condition)
    plain = invert(sd, images, method=backend, num_inference_steps=6, guidance_scale=3.0, **condition)
    assert torch.equal(polaris.latents, plain.latents)
    assert all(torch.equal(w, torch.full((2,), 3.0, dtype=torch.float64)) for w in polaris.guidance_scales.values())


def _timestep_only_model(hidden_states, timestep, class_labels, **_):
    """A denoiser whose output depends only on the timestep and the class, not on the latent: DDIM inversion and
    sampling are then exact inverses for any guidance schedule replayed at the right timesteps."""
    t = timestep.double().reshape(-1, 1, 1, 1) / 1000
    patterns = randn(1001, 2, 4, 8, 8, seed=7)[class_labels]
    out = torch.sin(6 * t + 1) * patterns[:, 0] + torch.cos(9 * t) * t * patterns[:, 1]
    return SimpleNamespace(sample=out.to(hidden_states.dtype))


@pytest.mark.parametrize("backend", ["ddim", "bdia"])
def test_replay_by_timestep_round_trips_and_the_reversed_order_does_not(dit, backend, monkeypatch):
    monkeypatch.setattr(dit.transformer, "forward", _timestep_only_model)
    latents = randn(2, 4, 8, 8, seed=3)
    inv = invert(dit, latents, method="polaris", polaris_backend=backend, num_inference_steps=10,
                 guidance_scale=3.0, class_labels=[3, 5])
    omegas = torch.stack([inv.guidance_scales[float(t)] for t in inv.timesteps if float(t) in inv.guidance_scales])
    assert float(omegas.max() - omegas.min()) > 0.5  # a schedule that actually varies
    assert float((reconstruct(dit, inv, output_type="latent") - latents).abs().max()) < 1e-10
    # the official scripts' bug: the list replayed in denoising order puts the first inversion step's omega at the
    # noisiest generation step
    keys = list(inv.guidance_scales)
    reversed_scales = dict(zip(keys, [inv.guidance_scales[k] for k in reversed(keys)]))
    inv.guidance_scales = reversed_scales
    assert float((reconstruct(dit, inv, output_type="latent") - latents).abs().max()) > 1e-2


def test_polaris_bdia_is_exact_on_the_bundled_model(dit, digits):
    images, labels = digits
    inv = invert(dit, images, method="polaris", polaris_backend="bdia", num_inference_steps=10,
                 guidance_scale=3.0, class_labels=labels)
    assert float((reconstruct(dit, inv, output_type="latent") - inv.source_latents).abs().max()) < 1e-8
    # POLARIS-DDIM is approximate
    ddim = invert(dit, images, method="polaris", num_inference_steps=10, guidance_scale=3.0, class_labels=labels)
    assert float((reconstruct(dit, ddim, output_type="latent") - ddim.source_latents).abs().max()) > 1e-3


def test_per_sample_mode_is_batch_invariant(dit, digits):
    images, labels = digits
    latents = encode_images(dit, images)  # once: the float32 encoder's round-off depends on the batch

    def omegas(batch, per_sample):
        inv = invert(dit, latents[:batch], method="polaris", num_inference_steps=6, guidance_scale=3.0,
                     per_sample=per_sample, class_labels=labels[:batch])
        return torch.stack([inv.guidance_scales[float(t)][0] for t in inv.timesteps])

    alone, together = omegas(1, True), omegas(3, True)
    assert float((alone - together).abs().max()) < 1e-9
    # one omega per batch (the official reduction) does depend on the other images
    assert float((omegas(1, False) - omegas(3, False)).abs().max()) > 1e-4
