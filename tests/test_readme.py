"""Every Python snippet of README.md runs as written, with tiny offline pipelines standing in for downloads.

The snippets are read from README.md itself, so an edit that breaks one fails here; a new snippet fails
``test_every_snippet_is_run`` until it gets a test below.
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)
# each snippet is found by a line only it holds
MARKERS = {
    "bdia": "BDIAScheduler.from_config(pipe.scheduler.config",
    "teleport_adaptive": "TeleportScheduler(pipe.scheduler, stats",
    "testbed": "exact_solution(model, x_T",
    "inversion": "invert(pipe, images, method=\"bdia\"",
    "inverse_problems": "solver.stsl(op, y, num_inference_steps=25",
}


def snippet(key: str) -> str:
    found = [code for code in SNIPPETS if MARKERS[key] in code]
    assert len(found) == 1, f"README.md must hold one python snippet with {MARKERS[key]!r}, found {len(found)}"
    return found[0]


def run(code: str) -> dict:
    namespace = {"__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_every_snippet_is_run():
    assert sorted(snippet(key) for key in MARKERS) == sorted(SNIPPETS)


@pytest.fixture
def offline_stable_diffusion(monkeypatch):
    """``StableDiffusionPipeline.from_pretrained`` returns the tiny random-weight SD pipeline (no download)."""
    from diffusers import StableDiffusionPipeline

    from diffsamplers.testing import tiny_stable_diffusion_pipeline

    asked = []

    def from_pretrained(repo_id, **kwargs):
        asked.append(repo_id)
        return tiny_stable_diffusion_pipeline()

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", from_pretrained)
    return asked


def test_bdia_snippet(offline_stable_diffusion):
    from diffsamplers import BDIAScheduler

    ns = run(snippet("bdia"))
    assert offline_stable_diffusion == ["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    assert isinstance(ns["pipe"].scheduler, BDIAScheduler) and ns["pipe"].scheduler.config.gamma == 0.5
    assert ns["image"].size == (32, 32)


def test_teleport_adaptive_snippet(offline_stable_diffusion, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from diffsamplers import GaussianStats, TeleportScheduler

    # a folder of training-like images where the snippet looks for it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_images").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "train_images" / f"{i}.png")
    ns = run(snippet("teleport_adaptive"))
    stats, pipe = ns["stats"], ns["pipe"]
    # statistics of the VAE's latents at the UNet's latent shape, with the rank asked for
    assert stats.space == "latent" and stats.scaling_factor == pipe.vae.config.scaling_factor
    assert stats.shape == (pipe.unet.config.in_channels, 16, 16) and stats.rank == 64
    assert GaussianStats.load(tmp_path / "latent_stats.safetensors").rank == 64
    assert isinstance(pipe.scheduler, TeleportScheduler)
    # the teleport skips 20% of the 25 steps; AdaptiveDiffusion may reuse outputs on top of that
    calls = int(capsys.readouterr().out.split()[0])
    assert 1 <= calls <= 25 - 5
    assert ns["image"].size == (32, 32)


def test_testbed_snippet(capsys):
    run(snippet("testbed"))
    out = capsys.readouterr().out
    rmse = float(re.search(r"RMSE vs exact: tensor\(([0-9.e-]+)", out).group(1))
    assert 0 < rmse < 0.1


def test_the_test_command_is_what_ci_runs():
    command = re.search(r"Run the tests:\n\n```bash\n(.*?)\n```", README).group(1)
    ci_last_line = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command == ci_last_line
    # -m "not slow" deselects something: the long end-to-end runs are marked
    if '-m "not slow"' in command:
        assert "@pytest.mark.slow" in (ROOT / "tests" / "test_bench.py").read_text()


def test_inversion_snippet():
    from diffsamplers import Inversion
    from diffsamplers.models.digits_latent import decode_latents, encode_digits

    torch.set_num_threads(1)
    ns = run(snippet("inversion"))
    assert isinstance(ns["inv"], Inversion) and ns["same"].shape == ns["images"].shape == ns["sevens"].shape
    # BDIA is exact: the reconstruction is the VAE's own round trip of the input
    vae_round_trip = decode_latents(ns["pipe"].vae, encode_digits(ns["pipe"].vae, ns["images"]))
    assert float((ns["same"] - vae_round_trip.to(ns["same"].dtype)).abs().max()) < 1e-4



def test_inverse_problems_snippet(capsys):
    torch.set_num_threads(1)
    ns = run(snippet("inverse_problems"))
    assert capsys.readouterr().out.split()[:2] == ["100", "50"]
    op, y = ns["op"], ns["y"]
    for out in (ns["psld"], ns["stsl"]):
        assert out.images.shape == ns["images"].shape
        # both fit the measurement: the truth's own residual is sigma_y = 0.05 per measured pixel
        residual = (op(out.images) - y).flatten(1).norm(dim=1) / y[0].numel() ** 0.5
        assert float(residual.mean()) < 0.15
