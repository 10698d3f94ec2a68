"""EDICT: the paper's coefficients, each step solved backwards exactly, the mixing weight, the leapfrog swap."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffsamplers.pipelines.edict import (
    EDICT_MIX,
    edict_coefficients,
    edict_generate,
    edict_inverse_step,
    edict_invert,
    edict_step,
)
from diffsamplers.samplers.bdia import BDIAScheduler

SD_VP = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
         "set_alpha_to_one": False}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


W = randn(16, 16, seed=5) / 4


def model(z, t):
    """A nonlinear function model (the output depends on the latent and the timestep)."""
    return torch.tanh(z.reshape(z.shape[0], -1) @ W + float(t) / 1000).reshape(z.shape)


def grid(config, n=8):
    g = BDIAScheduler.from_config(config)
    g.set_timesteps(n)
    return g


def test_mixing_weight_is_the_papers():
    assert EDICT_MIX == 0.93


def test_epsilon_coefficients_are_the_papers_a_and_b():
    ddim = DDIMScheduler(**SD_VP)
    ddim.set_timesteps(8)
    g = grid(SD_VP)
    for k, t in enumerate(ddim.timesteps):
        prev = int(t) - 1000 // 8
        ab_t = float(ddim.alphas_cumprod[t])
        ab_prev = float(ddim.alphas_cumprod[prev]) if prev >= 0 else float(ddim.final_alpha_cumprod)
        a = (ab_prev / ab_t) ** 0.5
        b = (1 - ab_prev) ** 0.5 - a * (1 - ab_t) ** 0.5
        got = edict_coefficients("epsilon", g.alpha_t[k], g.sigma_t[k], g.alpha_next[k], g.sigma_next[k])
        assert got == pytest.approx((a, b), rel=1e-6)


def test_flow_coefficients_are_an_euler_step():
    got = edict_coefficients("flow_prediction", 0.0, 1.0, 0.25, 0.75)  # defined at sigma = 1 (alpha = 0)
    assert got == pytest.approx((1.0, -0.25), abs=1e-15)


@pytest.mark.parametrize("config", [SD_VP, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}])
@pytest.mark.parametrize("mix", [EDICT_MIX, 0.5])
def test_each_step_and_the_whole_run_invert_exactly(config, mix):
    g = grid(config)
    x, y = randn(3, 1, 4, 4), randn(3, 1, 4, 4, seed=1)
    for k in (0, 1, len(g.timesteps) - 1):  # even and odd steps (the leapfrog swap) and the last one
        nx, ny = edict_step(model, g, k, x, y, mix)
        bx, by = edict_inverse_step(model, g, k, nx, ny, mix)
        assert float((bx - x).abs().max()) < 1e-12 and float((by - y).abs().max()) < 1e-12
    z0 = randn(3, 1, 4, 4, seed=2)
    xt, yt = edict_invert(model, g, z0, mix)
    assert float((xt - z0).abs().max()) > 0.1
    out_x, out_y = edict_generate(model, g, xt, yt, mix)
    assert float((out_x - z0).abs().max()) < 1e-10 and float((out_y - z0).abs().max()) < 1e-10


def test_sequences_swap_roles_every_other_step():
    g = grid(SD_VP)
    x, y = randn(2, 1, 4, 4), randn(2, 1, 4, 4, seed=1)
    a, b = edict_coefficients("epsilon", g.alpha_t[1], g.sigma_t[1], g.alpha_next[1], g.sigma_next[1])
    # at an odd step y is updated first, from the model at x
    y_inter = a * y + b * model(x, g.timesteps[1])
    x_inter = a * x + b * model(y_inter, g.timesteps[1])
    y_new = EDICT_MIX * y_inter + (1 - EDICT_MIX) * x_inter
    x_new = EDICT_MIX * x_inter + (1 - EDICT_MIX) * y_new
    got_x, got_y = edict_step(model, g, 1, x, y)
    assert torch.equal(got_x, x_new) and torch.equal(got_y, y_new)


def test_mix_is_checked():
    g = grid(SD_VP)
    x = randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="edict_mix"):
        edict_step(model, g, 0, x, x, mix=0.0)
