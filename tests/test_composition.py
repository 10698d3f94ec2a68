"""Teleportation + AdaptiveDiffusion + our schedulers compose, and each switched off changes nothing."""

import pytest
import torch

from diffsamplers import (
    BDIAScheduler,
    DualFastScheduler,
    GaussianStats,
    LMLScheduler,
    TeleportScheduler,
    enable_adaptive_diffusion,
)
from diffsamplers.testing import tiny_stable_diffusion_pipeline

SCHEDULERS = {
    "bdia": lambda c: BDIAScheduler.from_config(c, gamma=0.5),
    "dualfast": lambda c: DualFastScheduler.from_config(c),
    "lml": lambda c: LMLScheduler.from_config(c, lm_lambda=10.0, lm_kappa=0.5),
}


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion_pipeline()


def _run(pipe, scheduler, **adaptive):
    pipe.scheduler = scheduler
    handle = enable_adaptive_diffusion(pipe, **adaptive) if adaptive else None
    try:
        out = pipe("a cat", num_inference_steps=8, guidance_scale=7.5, height=32, width=32,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
    finally:
        if handle is not None:
            handle.disable()
    return out, handle


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_all_switched_off_is_bit_identical(pipe, name):
    config = pipe.scheduler.config
    stats = GaussianStats.from_samples(0.5 * torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(1),
                                                         dtype=torch.float64), rank=8)
    plain, _ = _run(pipe, SCHEDULERS[name](config))
    composed, handle = _run(pipe, TeleportScheduler(SCHEDULERS[name](config), stats, skip_fraction=0), delta=0.0)
    assert torch.equal(plain, composed)
    assert handle.nfe == 8
    # switched on together: fewer model calls, a finite image, and the teleported run starts later
    on, handle = _run(pipe, TeleportScheduler(SCHEDULERS[name](config), stats, skip_fraction=0.25),
                      delta=float("inf"), warmup=3, max_skips=1)
    assert torch.isfinite(on).all()
    assert handle.nfe < 6  # 8 grid steps, 2 teleported, then adaptive reuse
    pipe.scheduler = SCHEDULERS[name](config)
