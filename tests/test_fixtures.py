"""The tiny offline pipelines run end to end, deterministically, with diffusers' own schedulers."""

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from diffsamplers.testing import (
    tiny_flow_embeddings,
    tiny_flow_pipeline,
    tiny_stable_diffusion_pipeline,
    tiny_unet_pipeline,
)


def test_tiny_unet_pipeline_is_deterministic():
    run = lambda: tiny_unet_pipeline()(  # noqa: E731
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    a, b = run(), run()
    assert a.shape == (2, 8, 8, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_tiny_stable_diffusion_with_prompt_and_cfg():
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe(
        ["a cat", "a dog"], num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()
    # the two prompts condition the model differently
    assert not np.allclose(out[0], out[1])


def test_tiny_flow_pipeline():
    pipe = tiny_flow_pipeline()
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    out = pipe(**tiny_flow_embeddings(2), num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()
