"""invert / reconstruct / edit: exact BDIA and EDICT round trips on the bundled latent model, the tiny SD, SDXL-style
and flow pipelines; the DDIM and Euler baselines against diffusers' own schedulers and pipelines; argument checks."""

import dataclasses

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, EDMEulerScheduler

from diffsamplers.eval.invert_bench import heldout_digits
from diffsamplers.pipelines.inversion import Inversion, decode_images, edit, encode_images, invert, reconstruct
from diffsamplers.testing import (
    tiny_flow_embeddings,
    tiny_flow_pipeline,
    tiny_stable_diffusion_pipeline,
    tiny_unet_pipeline,
)

# round-trip latent errors measured on these tests (float64; DiT 10 steps at guidance 1 / 3 / 7.5, tiny SD 8 steps at
# 1 / 7.5): BDIA 1.6e-14 / 6.9e-14 / 1.3e-12 and 2.2e-13 / 1.2e-12; EDICT 7.8e-12 / 2.3e-11 / 3.4e-10 and
# 3.5e-13 / 3.6e-12; decoded images within 7e-7 (DiT) and 5e-6 (tiny SD) of the VAE's reconstruction
EXACT = 1e-8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return heldout_digits(3)


@pytest.fixture(scope="module")
def sd():
    return tiny_stable_diffusion_pipeline()


@pytest.fixture(scope="module")
def sd_inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    embeds = torch.randn(2, 77, 16, generator=g)
    return images, {"prompt_embeds": embeds, "negative_prompt_embeds": torch.zeros_like(embeds)}


@pytest.fixture(scope="module")
def flow():
    return tiny_flow_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    """A tiny SDXL-style pipeline (a "text_time" UNet, no text encoders: conditions come as embeddings)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_stable_diffusion_pipeline().vae, text_encoder=None,
                                     text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
                                     scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    condition = dict(
        prompt_embeds=torch.randn(2, 77, 16, generator=g), pooled_prompt_embeds=torch.randn(2, 8, generator=g),
        negative_prompt_embeds=torch.randn(2, 77, 16, generator=g),
        negative_pooled_prompt_embeds=torch.randn(2, 8, generator=g),
    )
    return pipe, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, condition


def max_error(a, b):
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------------------------------------------
# exact round trips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bdia", "edict"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0, 7.5])
def test_exact_round_trip_on_the_bundled_latent_model(dit, digits, method, guidance_scale):
    images, labels = digits
    inv = invert(dit, images, method=method, num_inference_steps=10, guidance_scale=guidance_scale,
                 class_labels=labels)
    assert inv.latents.dtype == torch.float64 and inv.pair_latents is not None
    assert dit.transformer.dtype == torch.float32  # the denoiser is cast back after the run
    latents = reconstruct(dit, inv, output_type="latent")
    assert max_error(latents, inv.source_latents) < EXACT
    # the reconstruction is the VAE's reconstruction of the input, to the decoder's precision
    vae_recon = decode_images(dit, encode_images(dit, images))
    assert max_error(reconstruct(dit, inv), vae_recon) < 1e-5
    # while the inverted latent is not the input's (it is noise-like)
    assert max_error(inv.latents, inv.source_latents) > 0.5


@pytest.mark.parametrize("method", ["bdia", "edict"])
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_exact_round_trip_on_the_tiny_stable_diffusion_pipeline(sd, sd_inputs, method, guidance_scale):
    images, condition = sd_inputs
    inv = invert(sd, images, method=method, num_inference_steps=8, guidance_scale=guidance_scale, **condition)
    assert max_error(reconstruct(sd, inv, output_type="latent"), inv.source_latents) < EXACT
    assert max_error(reconstruct(sd, inv), decode_images(sd, encode_images(sd, images))) < 1e-5


@pytest.mark.parametrize("method", ["bdia", "edict"])
def test_exact_round_trip_on_an_sdxl_style_pipeline(sdxl, method):
    pipe, images, condition = sdxl
    inv = invert(pipe, images, method=method, num_inference_steps=5, guidance_scale=5.0, **condition)
    assert max_error(reconstruct(pipe, inv, output_type="latent"), inv.source_latents) < EXACT


def test_sdxl_ddim_reconstruction_is_the_stock_pipeline(sdxl):
    pipe, images, condition = sdxl
    inv = invert(pipe, images, method="ddim", num_inference_steps=5, guidance_scale=5.0, dtype=torch.float32,
                 **condition)
    ours = reconstruct(pipe, inv, output_type="latent")
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(original.config, clip_sample=False)
        stock = pipe(latents=inv.latents, num_inference_steps=5, guidance_scale=5.0, height=32, width=32,
                     output_type="latent", **condition).images
    finally:
        pipe.scheduler = original
    assert max_error(ours, stock) < 1e-4
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        invert(pipe, images, prompt_embeds=condition["prompt_embeds"])


def test_prompts_are_encoded_with_the_pipelines_text_encoder(sd, sd_inputs):
    images, _ = sd_inputs
    inv = invert(sd, images, method="bdia", num_inference_steps=4, guidance_scale=3.0, prompt="a digit")
    assert inv.condition == {"prompt": "a digit"}
    assert max_error(reconstruct(sd, inv, output_type="latent"), inv.source_latents) < EXACT
    # another prompt gives another (guided) output, so the reconstruction is not exact
    other = edit(sd, inv, prompt="zebra", output_type="latent")
    assert max_error(other, inv.source_latents) > 1e-4


@pytest.mark.parametrize("method", ["bdia", "edict", "polaris"])
def test_flow_round_trip_is_exact_and_euler_inversion_is_not(flow, method):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    condition = tiny_flow_embeddings(1)
    inv = invert(flow, images, method=method, num_inference_steps=4, guidance_scale=5.0, polaris_backend="bdia",
                 **condition)
    assert max_error(reconstruct(flow, inv, output_type="latent"), inv.source_latents) < EXACT
    euler = invert(flow, images, method="ddim", num_inference_steps=4, guidance_scale=5.0, **condition)
    assert max_error(reconstruct(flow, euler, output_type="latent"), euler.source_latents) > 1e-3


def test_the_denoiser_gets_its_own_weights_and_dtype_back(sd_inputs, monkeypatch):
    pipe = tiny_stable_diffusion_pipeline()
    pipe.unet.half()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    images, condition = sd_inputs
    inv = invert(pipe, images, method="bdia", num_inference_steps=3, guidance_scale=3.0, **condition)
    assert inv.latents.dtype == torch.float64  # the run was in float64
    after = pipe.unet.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    # also when the run fails half-way, with the denoiser in float64
    def failing(*args, **kwargs):
        assert pipe.unet.dtype == torch.float64
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipe.unet, "forward", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        invert(pipe, images, method="bdia", num_inference_steps=3, **condition)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())


def test_exactness_needs_the_same_guidance_in_both_directions(dit, digits):
    images, labels = digits
    inv = invert(dit, images, method="bdia", num_inference_steps=10, guidance_scale=3.0, class_labels=labels)
    same = edit(dit, inv, class_labels=labels, output_type="latent")
    assert torch.equal(same, reconstruct(dit, inv, output_type="latent"))
    # a scale 1e-3 off breaks the round trip far above round-off
    assert max_error(edit(dit, inv, class_labels=labels, guidance_scale=3.001, output_type="latent"),
                     inv.source_latents) > 1e-6


@pytest.mark.parametrize("method", ["ddim", "bdia", "edict", "polaris"])
def test_partial_inversion_stops_part_way_and_regenerates_from_there(dit, digits, method):
    images, labels = digits
    full = invert(dit, images, method=method, num_inference_steps=10, guidance_scale=3.0, class_labels=labels)
    part = invert(dit, images, method=method, num_inference_steps=10, guidance_scale=3.0, strength=0.6,
                  class_labels=labels)
    assert torch.equal(part.timesteps, full.timesteps[4:]) and part.settings["begin_index"] == 4
    assert sorted(part.guidance_scales) == sorted(float(t) for t in part.timesteps)
    assert part.model_calls < full.model_calls
    # a partly inverted latent is still close to the image
    assert (part.latents - part.source_latents).abs().mean() < (full.latents - full.source_latents).abs().mean()
    error = max_error(reconstruct(dit, part, output_type="latent"), part.source_latents)
    if method in ("bdia", "edict"):
        assert error < EXACT
    else:
        assert error < max_error(reconstruct(dit, full, output_type="latent"), full.source_latents)
    # an edit from part way keeps more of the source than one from noise
    swapped = [(c + 1) % 10 for c in labels]
    source = decode_images(dit, part.source_latents)
    assert (edit(dit, part, class_labels=swapped) - source).abs().mean() < (
        edit(dit, full, class_labels=swapped) - source).abs().mean()


def test_strength_is_checked(dit, digits):
    images, labels = digits
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            invert(dit, images, strength=strength, class_labels=labels)
    with pytest.raises(ValueError, match="strength"):  # one step of ten: BDIA needs two
        invert(dit, images, method="bdia", num_inference_steps=10, strength=0.1, class_labels=labels)


def test_class_swap_edit_changes_the_image(dit, digits):
    images, labels = digits
    inv = invert(dit, images, method="bdia", num_inference_steps=10, guidance_scale=3.0, class_labels=labels)
    swapped = [(c + 1) % 10 for c in labels]
    edited = edit(dit, inv, class_labels=swapped)
    assert edited.shape == images.shape
    assert max_error(edited, decode_images(dit, inv.source_latents)) > 0.3


# ---------------------------------------------------------------------------------------------------------------
# the baselines are diffusers' own
# ---------------------------------------------------------------------------------------------------------------


def test_ddim_inversion_is_diffusers_ddim_inverse_scheduler(sd, sd_inputs):
    images, condition = sd_inputs
    inv = invert(sd, images, method="ddim", num_inference_steps=5, guidance_scale=7.5, **condition)
    # the loop diffusers users write: the model at the destination label t on the latent at t - T // N
    scheduler = DDIMInverseScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(5)
    z = encode_images(sd, images)
    unet = sd.unet.double()
    cond = torch.cat([condition["negative_prompt_embeds"], condition["prompt_embeds"]]).double()
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond_eps, cond_eps = unet(torch.cat([z, z]), t, encoder_hidden_states=cond).sample.chunk(2)
            z = scheduler.step(uncond_eps + 7.5 * (cond_eps - uncond_eps), t, z).prev_sample
    sd.unet.float()
    assert max_error(inv.latents, z) < 1e-12
    assert torch.equal(inv.timesteps, scheduler.timesteps.flip(0))


def test_ddim_reconstruction_is_the_stock_pipeline_from_the_inverted_latent(sd, sd_inputs):
    images, condition = sd_inputs
    inv = invert(sd, images, method="ddim", num_inference_steps=5, guidance_scale=7.5, dtype=torch.float32,
                 **condition)
    ours = reconstruct(sd, inv, output_type="latent")
    assert isinstance(sd.scheduler, DDIMScheduler)
    stock = sd(latents=inv.latents, num_inference_steps=5, guidance_scale=7.5, height=32, width=32,
               output_type="latent", **condition).images
    assert max_error(ours, stock) < 1e-4


def test_bdia_inversion_regenerates_in_the_stock_pipeline(sd, sd_inputs):
    from diffsamplers.samplers.bdia import BDIAScheduler

    images, condition = sd_inputs
    inv = invert(sd, images, method="bdia", num_inference_steps=5, guidance_scale=7.5, dtype=torch.float32,
                 **condition)
    assert inv.latents.dtype == inv.pair_latents.dtype == torch.float32  # the dtype asked for
    ours = reconstruct(sd, inv, output_type="latent")
    original = sd.scheduler
    try:
        sd.scheduler = BDIAScheduler.from_config(sd.scheduler.config)
        sd.scheduler.set_inversion_pair(inv.latents, inv.pair_latents)
        stock = sd(latents=inv.latents, num_inference_steps=5, guidance_scale=7.5, height=32, width=32,
                   output_type="latent", **condition).images
    finally:
        sd.scheduler = original
    assert max_error(ours, stock) < 1e-4 and max_error(stock, inv.source_latents) < 1e-3


def test_euler_reconstruction_is_the_stock_flow_pipeline(flow):
    condition = tiny_flow_embeddings(1)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    inv = invert(flow, latents, method="ddim", num_inference_steps=4, guidance_scale=5.0, dtype=torch.float32,
                 **condition)
    ours = reconstruct(flow, inv, output_type="latent")
    stock = flow(latents=inv.latents, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                 output_type="latent", **condition).images
    assert max_error(ours, stock) < 1e-4


def test_ddim_round_trip_drifts_more_with_guidance(dit, digits):
    images, labels = digits
    errors = []
    for scale in (1.0, 7.5):
        inv = invert(dit, images, method="ddim", num_inference_steps=10, guidance_scale=scale, class_labels=labels)
        errors.append(max_error(reconstruct(dit, inv, output_type="latent"), inv.source_latents))
    assert errors[0] > 1e-3 and errors[1] > errors[0]


def test_inversion_records_the_constant_scale_by_timestep(dit, digits):
    images, labels = digits
    inv = invert(dit, images, method="ddim", num_inference_steps=4, guidance_scale=3.0, class_labels=labels)
    assert isinstance(inv, Inversion) and inv.model_calls == 8  # 4 steps x (conditional + unconditional)
    assert sorted(inv.guidance_scales) == sorted(float(t) for t in inv.timesteps)
    assert all(torch.equal(v, torch.full((3,), 3.0, dtype=torch.float64)) for v in inv.guidance_scales.values())
    # the bundled config's "linspace" spacing becomes "trailing" (DDIMInverseScheduler has no "linspace")
    assert inv.settings["timestep_spacing"] == "trailing" and int(inv.timesteps[0]) == 999


# ---------------------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------------------


def test_refusals_name_the_argument(dit, digits, sd, sd_inputs):
    images, labels = digits
    with pytest.raises(ValueError, match="eta"):
        invert(dit, images, method="bdia", eta=0.5, class_labels=labels)
    with pytest.raises(ValueError, match="method"):
        invert(dit, images, method="nti", class_labels=labels)
    with pytest.raises(ValueError, match="gamma"):
        invert(dit, images, method="bdia", gamma=0.0, class_labels=labels)
    with pytest.raises(ValueError, match="num_inference_steps"):
        invert(dit, images, method="bdia", num_inference_steps=1, class_labels=labels)
    # a condition the pipeline cannot take
    with pytest.raises(TypeError, match="prompt"):
        invert(dit, images, prompt="a seven")
    with pytest.raises(TypeError, match="class_labels"):
        invert(sd, sd_inputs[0], class_labels=[1, 2])
    with pytest.raises(ValueError, match="class_labels"):
        invert(dit, images, class_labels=[1, 2])  # 3 images
    with pytest.raises(ValueError, match="class_labels"):
        invert(dit, images, class_labels=[1000, 1, 2])  # the null class is not a condition
    with pytest.raises(ValueError, match="class_labels"):
        invert(dit, images)
    # mismatched image sizes
    with pytest.raises(ValueError, match="8x8"):
        invert(dit, torch.zeros(1, 1, 8, 8), class_labels=[1])
    with pytest.raises(ValueError, match="divisible"):
        invert(sd, torch.zeros(2, 3, 31, 31), **sd_inputs[1])
    with pytest.raises(ValueError, match="latents"):
        invert(sd, torch.zeros(2, 4, 15, 15), **sd_inputs[1])  # the UNet halves the latents once
    with pytest.raises(ValueError, match="channels"):
        invert(dit, torch.zeros(1, 2, 16, 16), class_labels=[1])
    with pytest.raises(TypeError, match="images_or_latents"):
        invert(dit, images.numpy(), class_labels=labels)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        invert(dit, images * 255, class_labels=labels)


def test_unsupported_pipelines_and_schedulers_are_refused(dit, digits):
    images, labels = digits
    with pytest.raises(TypeError, match="pipe"):
        invert(tiny_unet_pipeline(), torch.zeros(1, 3, 8, 8))
    original = dit.scheduler
    try:
        dit.scheduler = EDMEulerScheduler()
        with pytest.raises(ValueError, match="pipe.scheduler"):
            invert(dit, images, class_labels=labels)
    finally:
        dit.scheduler = original


def test_reconstruct_checks_its_inputs(dit, digits, sd):
    images, labels = digits
    inv = invert(dit, images, method="ddim", num_inference_steps=3, class_labels=labels)
    with pytest.raises(TypeError, match="inversion"):
        reconstruct(dit, inv.latents)
    with pytest.raises(ValueError, match="inversion"):
        reconstruct(sd, inv)
    with pytest.raises(ValueError, match="output_type"):
        reconstruct(dit, inv, output_type="pil")
    with pytest.raises(ValueError, match="condition"):
        edit(dit, inv)
    with pytest.raises(ValueError, match="grid"):
        reconstruct(dit, dataclasses.replace(inv, timesteps=inv.timesteps + 1))


# ---------------------------------------------------------------------------------------------------------------
# the bench and its command
# ---------------------------------------------------------------------------------------------------------------


def test_invert_bench_scores_and_counts(dit):
    from diffsamplers.eval.invert_bench import markdown_table, polaris_vs_ddim, run_invert_bench

    records = run_invert_bench(dit, methods=("ddim", "polaris-ddim", "bdia", "edict"), guidance_scales=(1.0, 3.0),
                               steps=(3,), num_images=2)
    by = {(r["method"], r["guidance_scale"]): r for r in records}
    # exact methods reach the VAE's own round trip; DDIM does not
    assert by[("bdia", 3.0)]["psnr_db"] == pytest.approx(by[("bdia", 3.0)]["vae_psnr_db"], abs=1e-3)
    assert by[("bdia", 3.0)]["latent_max_error"] < EXACT and by[("edict", 3.0)]["latent_max_error"] < EXACT
    assert by[("ddim", 3.0)]["psnr_db"] < by[("ddim", 3.0)]["vae_psnr_db"] - 1
    # denoiser passes per image, inversion + reconstruction: DDIM 3 + 3 (x2 with CFG); BDIA 3 + 2 (it regenerates
    # from the pair); EDICT 6 + 6; POLARIS always evaluates both halves
    assert by[("ddim", 1.0)]["model_calls_per_image"] == 6 and by[("ddim", 3.0)]["model_calls_per_image"] == 12
    assert by[("bdia", 1.0)]["model_calls_per_image"] == 5 and by[("edict", 3.0)]["model_calls_per_image"] == 24
    assert by[("polaris-ddim", 1.0)]["model_calls_per_image"] == 12
    assert len(markdown_table(records).splitlines()) == 2 + len(records)
    assert [row["guidance_scale"] for row in polaris_vs_ddim(records)] == [3.0]


def test_invert_bench_command_and_edit_grid(tmp_path, dit):
    from diffsamplers.eval.cli import main
    from diffsamplers.eval.invert_bench import write_edit_grid

    out = tmp_path / "bench"
    assert main(["invert-bench", "--methods", "bdia", "--guidance", "3", "--steps", "2", "--num-images", "2",
                 "--no-grid", "--out", str(out)]) == 0
    assert (out / "results.json").exists() and "| bdia | 3 | 2 |" in (out / "table.md").read_text()
    assert main(["invert-bench", "--methods", "nti"]) == 2
    info = write_edit_grid(str(tmp_path / "grid.png"), dit, num_images=2, num_inference_steps=2)
    assert (tmp_path / "grid.png").exists() and 0.0 <= info["edit_accuracy"] <= 1.0
