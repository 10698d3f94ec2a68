# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The bundled digits models: they load offline, sample, and their training script runs end to end."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from diffsamplers.models import digits

# Measured 0.991 (446 / 450) for the bundled classifier on digits_split(); the margin absorbs platform noise only.
MIN_TEST_ACCURACY = 0.97


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def _unet_weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_bundled_pipeline_loads_offline_and_samples():
    path = digits.bundled_model_path()
    pipe = DDPMPipeline.from_pretrained(path, local_files_only=True)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.beta_schedule == "linear"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 1
    ddim = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    out = ddim(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np")
    assert out.images.shape == (4, 8, 8, 1)
    assert torch.isfinite(torch.as_tensor(out.images)).all()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    assert total < 10 * 2**20


def test_load_digits_pipeline_swaps_scheduler():
    pipe = digits.load_digits_pipeline(scheduler=DDIMScheduler)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_end == pytest.approx(0.02)
    x = digits.sample_digits(pipe, num_samples=4, num_inference_steps=3, seed=1)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1


def test_bundled_flow_pipeline():
    pipe = digits.load_digits_flow_pipeline()
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 1.0
    x = digits.sample_digits(pipe, num_samples=4, num_inference_steps=3)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_classifier_features_and_accuracy():
    model = digits.load_digits_classifier()
    images, labels = digits.load_digits_images()
    assert images.shape == (1797, 1, 8, 8) and images.min() == -1 and images.max() == 1
    feats = model(images[:5])
    assert feats.shape == (5, 128) and model.feature_dim == 128
    assert model.classify(images[:5]).shape == (5, 10)
    # other sizes and RGB are resized / averaged to grey 8x8
    big = torch.nn.functional.interpolate(images[:3], size=32, mode="nearest").expand(-1, 3, -1, -1)
    assert model(big).shape == (3, 128)
    train_idx, test_idx = digits.digits_split()
    assert len(test_idx) == 450 and len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    acc = digits.classifier_accuracy(model, images[test_idx], labels[test_idx])
    assert acc >= MIN_TEST_ACCURACY
    with open(os.path.join(digits.CLASSIFIER_DIR, "config.json")) as f:
        assert json.load(f)["test_accuracy"] == pytest.approx(acc, abs=0.005)


def test_digits_split_is_deterministic_and_stratified():
    a_train, a_test = digits.digits_split()
    b_train, b_test = digits.digits_split()
    assert torch.equal(a_train, b_train) and torch.equal(a_test, b_test)
    _, labels = digits.load_digits_images()
    counts = torch.bincount(labels[a_test], minlength=10)
    assert counts.min() >= 40 and counts.max() <= 50


def test_train_digits_model_runs_and_loads(tmp_path):
    out = str(tmp_path / "ddpm")
    info = digits.train_digits_model(out, steps=2, batch_size=16, progress=False, num_threads=None)
    assert info["steps"] == 2 and torch.isfinite(torch.tensor(info["final_loss"]))
    assert not os.path.exists(os.path.join(out, digits.CHECKPOINT_NAME))
    pipe = digits.load_digits_pipeline(path=out)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    x = digits.sample_digits(pipe, num_samples=2, num_inference_steps=2)
    assert x.shape == (2, 1, 8, 8)


def test_resume_continues_exactly(tmp_path):
    kw = dict(batch_size=16, progress=False, num_threads=None)
    split, straight = str(tmp_path / "split"), str(tmp_path / "straight")
    digits.train_digits_model(split, steps=1, keep_checkpoint=True, **kw)
    assert os.path.exists(os.path.join(split, digits.CHECKPOINT_NAME))
    digits.train_digits_model(split, steps=2, resume=True, **kw)
    digits.train_digits_model(straight, steps=2, **kw)
    a, b = _unet_weights(split), _unet_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_flow_model_runs_and_loads(tmp_path):
    out = str(tmp_path / "flow")
    digits.train_digits_model(out, steps=1, objective="flow", batch_size=16, progress=False, num_threads=None)
    pipe = digits.load_digits_flow_pipeline(path=out)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)


def test_train_classifier_runs(tmp_path):
    out = str(tmp_path / "clf")
    info = digits.train_digits_classifier(out, epochs=1, batch_size=256, progress=False, num_threads=None)
    assert 0 <= info["test_accuracy"] <= 1
    assert digits.load_digits_classifier(out)(torch.zeros(2, 1, 8, 8)).shape == (2, 128)


def test_sample_grid_cli(tmp_path):
    png = str(tmp_path / "grid.png")
    digits.main(["samples", "--out", png, "--num", "8", "--steps", "2", "--threads", str(torch.get_num_threads())])
    from PIL import Image

    with Image.open(png) as im:
        assert im.mode == "L" and im.width > im.height


def test_bad_objective():
    with pytest.raises(ValueError, match="objective"):
        digits.bundled_model_path("edm")


class _RunsCode:
    """A pickle that creates a file when unpickled: what a crafted checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.safetensors"])
def test_resume_never_unpickles_a_checkpoint(tmp_path, name):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    # torch.save's format, which torch.load(weights_only=False) unpickles: loading it would create `marker`
    torch.save({"objective": "ddpm", "seed": 0, "payload": _RunsCode(str(marker))}, out / name)
    with pytest.raises(ValueError, match=re.escape(str(out / name))):
        digits.train_digits_model(str(out), steps=1, batch_size=16, resume=True, progress=False, num_threads=None)
    assert not marker.exists()


def test_checkpoint_is_safetensors_and_checked(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "run"
    kw = dict(batch_size=16, progress=False, num_threads=None)
    digits.train_digits_model(str(out), steps=1, keep_checkpoint=True, **kw)
    path = out / digits.CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "diffsamplers.digits-training-checkpoint" and json.loads(meta["state"])["step"] == 1
    # a checkpoint of another architecture: its tensors do not fit the model
    weights = {f"model.{k}": v for k, v in torch.nn.Linear(2, 2).state_dict().items()}
    save_file(weights, str(path), metadata={**meta})
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": the model tensors do not match"):
        digits.train_digits_model(str(out), steps=2, resume=True, **kw)


def test_training_never_writes_into_the_package_by_default(tmp_path, monkeypatch):
    fake_bundled = tmp_path / "package" / "digits-ddpm"
    monkeypatch.setattr(digits, "DDPM_DIR", str(fake_bundled))
    monkeypatch.setattr(digits, "CLASSIFIER_DIR", str(tmp_path / "package" / "digits-classifier"))
    with pytest.raises(ValueError, match="`out` is required"):
        digits.train_digits_model(steps=1, batch_size=16, progress=False, num_threads=None)
    with pytest.raises(ValueError, match="`out` is required"):
        digits.train_digits_classifier(epochs=1, batch_size=256, progress=False, num_threads=None)
    assert not (tmp_path / "package").exists()
    monkeypatch.chdir(tmp_path)
    threads = str(torch.get_num_threads())
    digits.main(["train", "--steps", "1", "--batch-size", "16", "--threads", threads])
    assert (tmp_path / "digits-ddpm" / "model_index.json").is_file()
    assert not (tmp_path / "package").exists()
    digits.main(["train", "--steps", "1", "--batch-size", "16", "--threads", threads, "--bundled"])
    assert (fake_bundled / "model_index.json").is_file()  # only when asked


def test_a_kill_during_the_final_save_keeps_the_checkpoint(tmp_path, monkeypatch):
    kw = dict(batch_size=16, progress=False, num_threads=None, checkpoint_every=1)
    out, straight = tmp_path / "run", tmp_path / "straight"

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        digits.train_digits_model(str(out), steps=2, **kw)
    monkeypatch.undo()
    assert (out / digits.CHECKPOINT_NAME).is_file()  # the checkpoint of step 1 survives
    digits.train_digits_model(str(out), steps=2, resume=True, **kw)
    assert not (out / digits.CHECKPOINT_NAME).exists()
    digits.train_digits_model(str(straight), steps=2, **kw)
    a, b = _unet_weights(str(out)), _unet_weights(str(straight))
    assert all(torch.equal(a[k], b[k]) for k in a)
