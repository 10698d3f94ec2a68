"""AdaptiveDiffusion on unchanged diffusers pipelines (research notes, sections 1.2 and 1.8)."""

import importlib.util
import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from diffsamplers.models import GaussianMixtureModel
from diffsamplers.pipelines.adaptive import AdaptiveSkipController, enable_adaptive_diffusion
from diffsamplers.testing import tiny_flow_embeddings, tiny_flow_pipeline, tiny_stable_diffusion_pipeline

GMM_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_stable_diffusion_pipeline()


def sd_run(pipe, steps=10, guidance_scale=7.5, seed=0, prompts=("a cat", "a dog"), **kwargs):
    return pipe(
        list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    ).images


def gmm_pipe(model=None):
    model = model or GaussianMixtureModel.digits(scheduler_config=GMM_CONFIG)
    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(GMM_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gmm_run(pipe, seeds, steps=20):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(batch_size=len(seeds), generator=gens, num_inference_steps=steps, eta=0.0, output_type="np").images


def official_pattern(n, c_max):
    """The cadence table of section 1.2 (criterion always true): first reuse run of 5, then C_max."""
    return ("CCCC....." + ("C" + "." * c_max) * n)[:n]


def clean_pattern(n, c_max):
    return ("CCCC" + ("." * c_max + "C") * n)[:n]


# -- delta = 0 is the base sampler, bit for bit ---------------------------------------------------------------------

SD_SCHEDULERS = {
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "euler_ancestral": lambda c: EulerAncestralDiscreteScheduler.from_config(c),
    "dpmpp2m": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++", solver_order=2),
    "unipc": lambda c: UniPCMultistepScheduler.from_config(c),
}


@pytest.mark.parametrize("name", list(SD_SCHEDULERS))
def test_delta_zero_is_bit_identical_on_stable_diffusion(sd_pipe, name):
    sd_pipe.scheduler = SD_SCHEDULERS[name](sd_pipe.scheduler.config)
    plain = sd_run(sd_pipe)
    handle = enable_adaptive_diffusion(sd_pipe, delta=0.0)
    try:
        out = sd_run(sd_pipe)
        assert handle.nfe == 10 and handle.pattern == "C" * 10
        # the criterion was evaluated, it just never skips
        assert handle.log[-1].reason == ("disabled",) and handle.log[-1].score is not None
        # delta = inf on the same scheduler follows the cadence (a reuse path that runs, with finite output)
        handle.disable()
        handle = enable_adaptive_diffusion(sd_pipe, delta=math.inf, max_skips=2)
        skipped = sd_run(sd_pipe)
        assert handle.pattern == clean_pattern(10, 2) and handle.nfe == 6 and torch.isfinite(skipped).all()
    finally:
        handle.disable()
    assert torch.equal(out, plain)


def test_delta_zero_is_bit_identical_on_flow_pipeline():
    pipe = tiny_flow_pipeline()
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)

    def run():
        return pipe(
            **tiny_flow_embeddings(2),
            num_inference_steps=8,
            guidance_scale=5.0,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    plain = run()
    with enable_adaptive_diffusion(pipe, delta=0.0) as handle:
        assert torch.equal(run(), plain) and handle.nfe == 8
    with enable_adaptive_diffusion(pipe, delta=math.inf, max_skips=3) as handle:
        out = run()
        assert handle.pattern == clean_pattern(8, 3) and handle.nfe == 5 and torch.isfinite(out).all()
    assert torch.equal(run(), plain)


# -- cadence, criterion, state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("official", [True, False])
def test_delta_inf_follows_the_cadence_table(official):
    pipe = gmm_pipe(GaussianMixtureModel.toy_2d(scheduler_config=GMM_CONFIG))
    table = {(50, 1): 25, (50, 2): 18, (50, 4): 13, (50, 6): 10, (20, 4): 7}
    for n in (10, 20, 50):
        for c_max in (1, 2, 4, 6):
            with enable_adaptive_diffusion(pipe, delta=math.inf, max_skips=c_max, official_compat=official) as h:
                calls = pipe.unet.num_calls
                gmm_run(pipe, [0], steps=n)
                expected = official_pattern(n, c_max) if official else clean_pattern(n, c_max)
                assert h.pattern == expected, (n, c_max)
                assert h.nfe == expected.count("C") == pipe.unet.num_calls - calls
                if official and (n, c_max) in table:
                    assert h.nfe == table[n, c_max]
    assert official_pattern(20, 4) == "CCCC.....C....C....C"


def synthetic_run(controller, deltas):
    """Drive the controller with latents whose first differences have the given magnitudes."""
    controller.reset()
    x = torch.zeros(1, 4)
    for d in deltas:
        controller.model_call(lambda s: s * 0, (x,), {})
        x_next = x + d
        controller.after_step(x, x_next)
        x = x_next
    return "".join("C" if r.computed[0] else "." for r in controller.log)


def reference_pattern(deltas, delta, c_max, warmup=4):
    """The rule of section 1.2 in plain float64 (clean cap)."""
    pattern, run = [], 0
    for i in range(len(deltas)):
        skip = False
        if i >= warmup:
            d_prev, d_cur, d_next = deltas[i - 3], deltas[i - 2], deltas[i - 1]  # Delta_{i-2}, Delta_{i-1}, Delta_i
            skip = abs(d_next - 2 * d_cur + d_prev) <= 2 * delta * d_cur and run < c_max
        run = run + 1 if skip else 0
        pattern.append("." if skip else "C")
    return "".join(pattern)


def test_criterion_on_synthetic_latents():
    linear = [1.0 + 0.25 * j for j in range(16)]
    ctrl = AdaptiveSkipController(delta=1e-3, max_skips=3)
    assert synthetic_run(ctrl, linear) == clean_pattern(16, 3)  # second difference 0: reuse up to the cap
    quadratic = [1.0 + 0.05 * j * j for j in range(16)]
    # second difference 0.1; the step after step i is a candidate iff delta >= 0.1 / (2 Delta_i)
    for delta in (0.0, 0.005, 0.01, 0.02, 0.03, 0.05):
        ctrl = AdaptiveSkipController(delta=delta, max_skips=2)
        got = synthetic_run(ctrl, quadratic)
        assert got == reference_pattern(quadratic, delta, 2), delta
    assert "." in reference_pattern(quadratic, 0.02, 2) and "C" in reference_pattern(quadratic, 0.02, 2)[5:]
    # the logged score is the smallest delta that would have skipped
    ctrl = AdaptiveSkipController(delta=0.01, max_skips=2)
    synthetic_run(ctrl, quadratic)
    assert ctrl.log[4].score[0] == pytest.approx(0.1 / (2 * quadratic[2]), rel=1e-5)


def test_statistics_are_float32_under_fp16_latents():
    ctrl = AdaptiveSkipController(decision="per_sample")
    ctrl.reset()
    x = torch.full((2, 4, 8, 8), -40000.0, dtype=torch.float16)
    y = torch.full((2, 4, 8, 8), 40000.0, dtype=torch.float16)
    y[1] = -39008.0  # exactly representable in fp16
    assert torch.isinf(y - x).any()  # the difference overflows fp16
    ctrl.after_step(x, y)
    d = ctrl._deltas[-1]
    assert d.dtype == torch.float32 and torch.equal(d, torch.tensor([80000.0, 992.0]))


def test_two_runs_give_identical_images_and_logs(sd_pipe):
    sd_pipe.scheduler = DPMSolverMultistepScheduler.from_config(sd_pipe.scheduler.config)
    with enable_adaptive_diffusion(sd_pipe, delta=0.05) as handle:
        a, log_a, nfe_a = sd_run(sd_pipe, steps=16), handle.log, handle.nfe
        sd_run(sd_pipe, steps=12, seed=3)  # an unrelated run in between must leave no state behind
        b, log_b = sd_run(sd_pipe, steps=16), handle.log
    assert torch.equal(a, b) and log_a == log_b and handle.nfe == nfe_a
    assert len(log_a) == 16 and 4 < nfe_a < 16


# -- reuse semantics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale, guidance_rescale", [(1.0, 0.0), (7.5, 0.0), (7.5, 0.7)])
def test_skipped_steps_reuse_the_raw_output_and_recompute_guidance(guidance_scale, guidance_rescale):
    pipe = tiny_stable_diffusion_pipeline()
    pattern = torch.linspace(-1, 1, 4 * 16 * 16).reshape(1, 4, 16, 16)
    real_calls = []

    def mock_forward(sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        k = len(real_calls) + 1  # a distinct output per real call; the CFG halves differ too
        out = k + pattern.expand(sample.shape[0], -1, -1, -1).clone()
        if sample.shape[0] == 4:
            out[2:] = out[2:] * 2 + 0.5
        real_calls.append(out.clone())
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    pipe.unet.forward = mock_forward  # a pre-existing instance attribute, which disable() must restore
    received = []
    base_step = pipe.scheduler.step

    def spy_step(model_output, timestep, sample, **kwargs):
        received.append(model_output.clone())
        return base_step(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = spy_step
    handle = enable_adaptive_diffusion(pipe, delta=math.inf, max_skips=2)
    sd_run(pipe, steps=10, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
    handle.disable()
    assert pipe.unet.forward is mock_forward and pipe.scheduler.step is spy_step
    assert handle.pattern == "CCCC..C..C" and handle.nfe == len(real_calls) == 6
    k = 0
    for i, c in enumerate(handle.pattern):
        k += c == "C"
        raw = real_calls[k - 1]
        if guidance_scale > 1:
            uncond, text = raw.chunk(2)
            expected = uncond + guidance_scale * (text - uncond)
            if guidance_rescale > 0:
                expected = rescale_noise_cfg(expected, text, guidance_rescale=guidance_rescale)
        else:
            expected = raw
        assert torch.equal(received[i], expected), i


def test_reused_outputs_keep_their_structure():
    from collections import namedtuple
    from types import SimpleNamespace

    from diffsamplers.pipelines.adaptive import _tree_map

    t = torch.arange(4.0)
    pair = namedtuple("Pair", "a b")
    for out in (UNet2DConditionOutput(sample=t), (t,), SimpleNamespace(sample=t), {"sample": t}, pair(t, None)):
        copy = _tree_map(lambda x: x.clone(), out)
        assert type(copy) is type(out)
        leaf = copy[0] if isinstance(copy, tuple) else copy["sample"] if isinstance(copy, dict) else copy.sample
        assert torch.equal(leaf, t) and leaf is not t


class TwoCallPipe:
    """A pipeline that calls its model twice per step (true-CFG style), with different inputs per call."""

    def __init__(self, model, scheduler):
        self.unet, self.scheduler = model, scheduler

    def __call__(self, x, steps):
        self.scheduler.set_timesteps(steps)
        outs = []
        for t in self.scheduler.timesteps:
            cond = self.unet(x, t).sample
            uncond = self.unet(x * 0.5, t).sample
            outs.append((cond, uncond))
            x = self.scheduler.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
        return x, outs


def test_one_cache_per_call_slot():
    model = GaussianMixtureModel.toy_2d(scheduler_config=GMM_CONFIG)
    pipe = TwoCallPipe(model, DDIMScheduler.from_config(GMM_CONFIG))
    x = torch.randn(3, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    with enable_adaptive_diffusion(pipe, delta=math.inf, max_skips=2) as handle:
        _, outs = pipe(x, 10)
    assert handle.pattern == "CCCC..C..C" and handle.nfe == 2 * 6
    for i, c in enumerate(handle.pattern):
        if c == ".":
            # each slot reuses its own output, not the other slot's
            assert torch.equal(outs[i][0], outs[i - 1][0]) and torch.equal(outs[i][1], outs[i - 1][1])
            assert not torch.equal(outs[i][0], outs[i][1])


# -- batch vs per-sample decisions ----------------------------------------------------------------------------------


def test_per_sample_decisions_are_batch_invariant():
    pipe = gmm_pipe()
    alone, others = [7], [7, 1, 2, 3]
    with enable_adaptive_diffusion(pipe, delta=0.02, max_skips=4, decision="per_sample") as handle:
        img_alone = gmm_run(pipe, alone)
        pat_alone = handle.patterns
        img_batch = gmm_run(pipe, others)
        pat_batch = handle.patterns
        batch_nfe = handle.nfe
    assert pat_batch[0] == pat_alone[0]
    assert len(set(pat_batch)) > 1  # the samples took different paths, so the batch mixed fresh and cached rows
    assert batch_nfe == sum(any(p[i] == "C" for p in pat_batch) for i in range(20))
    torch.testing.assert_close(torch.as_tensor(img_batch[0]), torch.as_tensor(img_alone[0]), rtol=0, atol=1e-6)
    # batch mode (the official behaviour) couples the samples: the same sample takes another path in the batch
    with enable_adaptive_diffusion(pipe, delta=0.02, max_skips=4) as handle:
        img_alone_b = gmm_run(pipe, alone)
        pat_alone_b = handle.pattern
        img_batch_b = gmm_run(pipe, others)
        pat_batch_b = handle.pattern
    assert pat_alone_b == pat_alone[0]
    assert pat_batch_b != pat_alone_b and not torch.allclose(
        torch.as_tensor(img_batch_b[0]), torch.as_tensor(img_alone_b[0]), atol=1e-6
    )


def test_per_sample_on_stable_diffusion_with_cfg(sd_pipe):
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    plain = sd_run(sd_pipe, steps=12)
    with enable_adaptive_diffusion(sd_pipe, delta=0.0, decision="per_sample") as handle:
        assert torch.equal(sd_run(sd_pipe, steps=12), plain) and handle.patterns == ["C" * 12] * 2
    with enable_adaptive_diffusion(sd_pipe, delta=math.inf, max_skips=3, decision="per_sample") as handle:
        out = sd_run(sd_pipe, steps=12)
    assert handle.patterns == [clean_pattern(12, 3)] * 2 and handle.sample_nfe == [6, 6]
    assert torch.isfinite(out).all()


# -- plumbing -------------------------------------------------------------------------------------------------------


def test_signatures_and_custom_sigmas_reach_the_base(sd_pipe):
    sd_pipe.scheduler = EulerDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    sigmas = [14.0, 9.0, 6.0, 4.0, 2.5, 1.5, 0.8, 0.3]
    plain = sd_run(sd_pipe, steps=None, sigmas=sigmas)
    with enable_adaptive_diffusion(sd_pipe, delta=0.0) as handle:
        assert "generator" in inspect.signature(sd_pipe.scheduler.step).parameters
        assert {"timesteps", "sigmas"} <= set(inspect.signature(sd_pipe.scheduler.set_timesteps).parameters)
        out = sd_run(sd_pipe, steps=None, sigmas=sigmas)
        # the custom sigmas reached the base (Euler treats the last one as the end level)
        assert sd_pipe.scheduler.sigmas[0] == 14.0 and len(handle.log) == len(sd_pipe.scheduler.timesteps)
        assert handle.nfe == len(handle.log) >= len(sigmas) - 1
    assert torch.equal(out, plain)
    ddim = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    sd_pipe.scheduler = ddim
    with enable_adaptive_diffusion(sd_pipe):
        assert {"eta", "generator"} <= set(inspect.signature(sd_pipe.scheduler.step).parameters)


def test_disable_restores_the_original_objects(sd_pipe):
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    unet, scheduler, config = sd_pipe.unet, sd_pipe.scheduler, dict(sd_pipe.config)
    handle = enable_adaptive_diffusion(sd_pipe)
    # the pipeline still sees the same components
    assert sd_pipe.unet is unet and sd_pipe.scheduler is scheduler and dict(sd_pipe.config) == config
    assert sd_pipe.unet.config.in_channels == 4 and sd_pipe.unet.dtype == torch.float32
    with pytest.raises(ValueError, match="already wrapped"):
        enable_adaptive_diffusion(sd_pipe)
    handle.disable()
    handle.disable()  # idempotent
    assert "forward" not in unet.__dict__ and not {"step", "set_timesteps"} & set(scheduler.__dict__)
    assert sd_pipe.unet is unet and sd_pipe.scheduler is scheduler


def test_replacing_the_scheduler_afterwards_is_an_error(sd_pipe):
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    with enable_adaptive_diffusion(sd_pipe):
        sd_run(sd_pipe, steps=6)
        old = sd_pipe.scheduler
        sd_pipe.scheduler = EulerDiscreteScheduler.from_config(old.config)
        with pytest.raises(RuntimeError, match="scheduler was replaced"):
            sd_run(sd_pipe, steps=6)
        sd_pipe.scheduler = old


@pytest.mark.parametrize(
    "cls", [HeunDiscreteScheduler, KDPM2DiscreteScheduler, DPMSolverSinglestepScheduler, PNDMScheduler]
)
def test_multi_call_schedulers_are_refused(sd_pipe, cls):
    plain = sd_pipe.scheduler
    sd_pipe.scheduler = cls.from_config(plain.config)
    try:
        with pytest.raises(ValueError, match="pipe.scheduler"):
            enable_adaptive_diffusion(sd_pipe)
        assert "forward" not in sd_pipe.unet.__dict__
    finally:
        sd_pipe.scheduler = plain


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"delta": -0.1}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"max_skips": 0}, "max_skips"),
        ({"warmup": 2}, "warmup"),
        ({"decision": "rows"}, "decision"),
        ({"official_compat": "yes"}, "official_compat"),
        ({"model_name": "vae_decoder"}, "model_name"),
    ],
)
def test_bad_arguments(sd_pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        enable_adaptive_diffusion(sd_pipe, **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("diffsamplers.samplers.bdia") is None, reason="BDIA not written yet")
def test_with_bdia_scheduler(sd_pipe):
    from diffsamplers.samplers.bdia import BDIAScheduler

    sd_pipe.scheduler = BDIAScheduler.from_config(sd_pipe.scheduler.config)
    plain = sd_run(sd_pipe, steps=10)
    with enable_adaptive_diffusion(sd_pipe, delta=0.0) as handle:
        assert torch.equal(sd_run(sd_pipe, steps=10), plain) and handle.nfe == 10
    with enable_adaptive_diffusion(sd_pipe, delta=math.inf, max_skips=2) as handle:
        out = sd_run(sd_pipe, steps=10)
    assert handle.pattern == clean_pattern(10, 2) and torch.isfinite(out).all()
