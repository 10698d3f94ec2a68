# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Gaussian statistics of a dataset, for analytical teleportation (Wang & Vastola, arXiv 2412.09726).

The paper teleports with the empirical mean and covariance of the training set in the model's space (pixels in
[-1, 1] for pixel models; the official code, ``Animadversio/GaussianTeleportationDiffusion``, eigendecomposes it with
``torch.linalg.eigh``). :class:`GaussianStats` holds the mean, the top-``r`` eigenpairs and an isotropic residual
variance for the other directions (our extension for latent spaces too large for a dense covariance), streamed from a
tensor, a dataset, a folder of images or a VAE's scaled latent space, accumulated in float64, saved as safetensors.

It lives in ``pipelines/`` because it reads files and runs VAEs; the map itself (:func:`diffsamplers.teleport`) and
:class:`~diffsamplers.TeleportScheduler` are in :mod:`diffsamplers.samplers` and accept any object with these
statistics' attributes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._io import atomic_write, load_tagged_safetensors

_FORMAT = "diffsamplers.GaussianStats"
_FORMAT_VERSION = "1"
# largest dimension for which a dense float64 covariance is accumulated by default (8192^2 * 8 B = 512 MiB)
_MAX_DENSE_DIM = 8192

@dataclass(eq=False)
class GaussianStats:
    """Gaussian statistics of a dataset: ``N(mean, U diag(eigvals) U^T + residual_variance (I - U U^T))``.

    Everything is float64 on the CPU. Build them with :meth:`from_dataset`, :meth:`from_image_folder`,
    :meth:`from_samples` or :meth:`from_moments`; store them with :meth:`save` / :meth:`load` (safetensors).

    Args:
        mean (`torch.Tensor` of shape `(D,)`): the mean of the flattened samples.
        eigvecs (`torch.Tensor` of shape `(D, r)`): orthonormal top-``r`` eigenvectors of the covariance.
        eigvals (`torch.Tensor` of shape `(r,)`): their eigenvalues, descending (negative values are clipped to 0).
        residual_variance (`float`, defaults to 0.0): isotropic variance of the ``D - r`` remaining directions,
            ``(tr Sigma - sum(eigvals)) / (D - r)``; 0 when ``r = D``.
        shape (`tuple[int, ...]`, *optional*): the per-sample shape (e.g. ``(C, H, W)``); defaults to ``(D,)``.
        space (`str`, defaults to `"pixel"`): ``"pixel"`` or ``"latent"`` (a VAE's scaled latents).
        num_samples (`int`, defaults to 0): how many samples the statistics were computed from.
        value_range (`tuple[float, float]`, *optional*): the pixel range the samples were in, e.g. ``(-1, 1)``.
        scaling_factor (`float`, *optional*): latents only: the VAE ``scaling_factor`` applied.
        shift_factor (`float`, *optional*): latents only: the VAE ``shift_factor`` subtracted before scaling.
    """

    mean: torch.Tensor
    eigvecs: torch.Tensor
    eigvals: torch.Tensor
    residual_variance: float = 0.0
    shape: tuple[int, ...] | None = None
    space: str = "pixel"
    num_samples: int = 0
    value_range: tuple[float, float] | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "eigvecs", "eigvals"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        self.mean = self.mean.detach().to("cpu", torch.float64).reshape(-1).contiguous()
        dim = self.mean.numel()
        if dim == 0:
            raise ValueError("mean must not be empty")
        self.eigvecs = self.eigvecs.detach().to("cpu", torch.float64).contiguous()
        if self.eigvecs.ndim != 2 or self.eigvecs.shape[0] != dim or self.eigvecs.shape[1] > dim:
            raise ValueError(f"eigvecs must have shape (D, r) with D = {dim}, r <= D, got {tuple(self.eigvecs.shape)}")
        self.eigvals = self.eigvals.detach().to("cpu", torch.float64).reshape(-1).clamp(min=0).contiguous()
        if self.eigvals.numel() != self.eigvecs.shape[1]:
            raise ValueError(f"eigvals must have r = {self.eigvecs.shape[1]} entries, got {self.eigvals.numel()}")
        if not bool(torch.isfinite(self.mean).all() and torch.isfinite(self.eigvals).all()):
            raise ValueError("mean and eigvals must be finite")
        self.residual_variance = float(self.residual_variance)
        if not math.isfinite(self.residual_variance) or self.residual_variance < 0:
            raise ValueError(f"residual_variance must be finite and >= 0, got {self.residual_variance}")
        if self.rank == dim:
            self.residual_variance = 0.0  # there is no complement
        self.shape = (dim,) if self.shape is None else tuple(int(s) for s in self.shape)
        if math.prod(self.shape) != dim:
            raise ValueError(f"shape {self.shape} does not hold D = {dim} values")
        if self.space not in ("pixel", "latent"):
            raise ValueError(f"space must be 'pixel' or 'latent', got {self.space!r}")
        if self.value_range is not None:
            self.value_range = (float(self.value_range[0]), float(self.value_range[1]))
        self.num_samples = int(self.num_samples)

    # -- properties ---------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """``D``, the number of values per sample."""
        return self.mean.numel()

    @property
    def rank(self) -> int:
        """``r``, the number of explicit eigen-directions."""
        return self.eigvecs.shape[1]

    def covariance(self) -> torch.Tensor:
        """The dense ``(D, D)`` covariance these statistics describe (float64; for small ``D``)."""
        U, lam = self.eigvecs, self.eigvals
        cov = (U * lam) @ U.T
        if self.rank < self.dim and self.residual_variance > 0:
            cov = cov + self.residual_variance * (torch.eye(self.dim, dtype=torch.float64) - U @ U.T)
        return cov

    # -- conversions --------------------------------------------------------------------------------------------

    def affine(self, scale: float, shift: float = 0.0) -> GaussianStats:
        """The statistics of ``scale * x + shift``: mean ``scale mu + shift``, variances times ``scale^2``.

        Args:
            scale (`float`): non-zero multiplier.
            shift (`float`, defaults to 0.0): added after scaling.
        """
        scale, shift = float(scale), float(shift)
        if scale == 0 or not math.isfinite(scale) or not math.isfinite(shift):
            raise ValueError(f"scale must be finite and non-zero and shift finite, got scale={scale}, shift={shift}")
        value_range = None
        if self.value_range is not None:
            lo, hi = sorted((scale * self.value_range[0] + shift, scale * self.value_range[1] + shift))
            value_range = (lo, hi)
        return GaussianStats(
            mean=scale * self.mean + shift,
            eigvecs=self.eigvecs,  # a sign flip of the data leaves the eigenvectors' span unchanged
            eigvals=scale**2 * self.eigvals,
            residual_variance=scale**2 * self.residual_variance,
            shape=self.shape,
            space=self.space,
            num_samples=self.num_samples,
            value_range=value_range,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
        )

    def to_range(
        self, source: tuple[float, float] = (0.0, 1.0), target: tuple[float, float] = (-1.0, 1.0)
    ) -> GaussianStats:
        """Re-express pixel statistics from value range ``source`` in ``target``.

        The default converts statistics stored in [0, 1] (as the official FFHQ/AFHQ files are) to the [-1, 1] range
        that pixel diffusion models use: ``mu -> 2 mu - 1``, ``lam -> 4 lam`` (what the official sampling scripts
        do with their FFHQ/AFHQ statistics).

        Args:
            source (`tuple[float, float]`, defaults to `(0, 1)`): the range the statistics are in.
            target (`tuple[float, float]`, defaults to `(-1, 1)`): the range to convert to.
        """
        for name, rng in (("source", source), ("target", target)):
            if len(rng) != 2 or not float(rng[1]) > float(rng[0]):
                raise ValueError(f"{name} must be a (low, high) pair with low < high, got {rng!r}")
        scale = (float(target[1]) - float(target[0])) / (float(source[1]) - float(source[0]))
        return self.affine(scale, float(target[0]) - scale * float(source[0]))

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_moments(
        cls, mean: torch.Tensor, covariance: torch.Tensor, *, rank: int | None = None, **kwargs: Any
    ) -> GaussianStats:
        """Statistics from a mean and a dense covariance (eigendecomposed in float64).

        Args:
            mean (`torch.Tensor`): the mean, any shape with ``D`` values (its shape becomes ``shape`` unless given).
            covariance (`torch.Tensor` of shape `(D, D)`): a symmetric covariance.
            rank (`int`, *optional*): keep the top ``rank`` eigenpairs and fold the rest into ``residual_variance``.
            **kwargs: the other :class:`GaussianStats` fields (``shape``, ``space``, ``num_samples``, ...).
        """
        mean = torch.as_tensor(mean, dtype=torch.float64)
        covariance = torch.as_tensor(covariance, dtype=torch.float64)
        dim = mean.numel()
        if covariance.shape != (dim, dim):
            raise ValueError(f"covariance must have shape ({dim}, {dim}), got {tuple(covariance.shape)}")
        kwargs.setdefault("shape", tuple(mean.shape) if mean.ndim > 1 else None)
        evals, evecs = torch.linalg.eigh(0.5 * (covariance + covariance.T))
        evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)  # descending
        rank = _check_rank(rank, dim)
        total = float(covariance.diagonal().sum())
        resid = (total - float(evals[:rank].sum())) / (dim - rank) if rank < dim else 0.0
        return cls(mean.reshape(-1), evecs[:, :rank], evals[:rank], max(resid, 0.0), **kwargs)

    @classmethod
    def from_samples(cls, samples: torch.Tensor, *, rank: int | None = None, **kwargs: Any) -> GaussianStats:
        """Statistics of one in-memory batch of samples ``(N, ...)``: mean and unbiased covariance.

        Args:
            samples (`torch.Tensor` of shape `(N, ...)`): at least two samples.
            rank (`int`, *optional*): as in :meth:`from_moments`.
            **kwargs: the other :class:`GaussianStats` fields.
        """
        if not isinstance(samples, torch.Tensor):
            raise TypeError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
        if samples.ndim < 2 or samples.shape[0] < 2:
            raise ValueError(f"samples must have shape (N, ...) with N >= 2, got {tuple(samples.shape)}")
        x = samples.detach().to("cpu", torch.float64).reshape(samples.shape[0], -1)
        mean = x.mean(0)
        centred = x - mean
        kwargs.setdefault("shape", tuple(samples.shape[1:]))
        kwargs.setdefault("num_samples", samples.shape[0])
        return cls.from_moments(mean, centred.T @ centred / (x.shape[0] - 1), rank=rank, **kwargs)

    @classmethod
    def from_dataset(
        cls,
        data: Any,
        *,
        rank: int | None = None,
        method: str = "auto",
        batch_size: int = 64,
        key: str | None = None,
        input_range: tuple[float, float] | None = None,
        vae: Any = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        latent_sample: str = "sample",
        oversample: int = 10,
        power_iterations: int = 2,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
        max_samples: int | None = None,
    ) -> GaussianStats:
        """Stream a dataset into Gaussian statistics, accumulating float64 sums (never holding all samples).

        Args:
            data: the samples. A tensor ``(N, ...)`` (split into batches of ``batch_size``), a ``torch.utils.data``
                ``Dataset`` (batched with a ``DataLoader``), or any iterable yielding batches: tensors ``(B, ...)``,
                numpy arrays, ``(images, labels)`` tuples (the first element is used) or dicts (``key``). The
                randomized method passes over the data several times, so it needs a re-iterable ``data`` (not a
                generator).
            rank (`int`, *optional*): keep only the top ``rank`` eigenpairs (plus the residual variance). Required
                for the randomized method.
            method (`str`, defaults to `"auto"`): ``"dense"`` accumulates the full ``D x D`` second moment
                (exact; memory ``8 D^2`` bytes); ``"randomized"`` runs a streamed randomized subspace iteration
                (Halko, Martinsson & Tropp 2011, Alg. 4.4 with Rayleigh-Ritz) with memory ``O(D (rank +
                oversample))``; ``"auto"`` picks dense up to ``D = 8192``.
            batch_size (`int`, defaults to 64): batch size when ``data`` is a tensor or a ``Dataset``.
            key (`str`, *optional*): the field of dict batches holding the samples (defaults to the first of
                ``"pixel_values"``, ``"images"``, ``"image"``, ``"sample"`` found).
            input_range (`tuple[float, float]`, *optional*): the value range of the data; when given, samples are
                mapped linearly to [-1, 1] (the diffusers convention for pixel models and VAE encoders).
            vae (`AutoencoderKL`-like, *optional*): encode each batch and accumulate statistics of its latents,
                ``(z - shift_factor) * scaling_factor``, the space the diffusion model sees. Images must then be in
                [-1, 1] (use ``input_range``).
            scaling_factor (`float`, *optional*): overrides ``vae.config.scaling_factor``.
            shift_factor (`float`, *optional*): overrides ``vae.config.shift_factor`` (SD3/Flux; 0 for SD).
            latent_sample (`str`, defaults to `"sample"`): ``"sample"`` draws from the VAE posterior, as diffusers'
                training scripts do (so the statistics include the posterior noise the model was trained on);
                ``"mode"`` uses its mean.
            oversample (`int`, defaults to 10): randomized method: extra sketch columns beyond ``rank``.
            power_iterations (`int`, defaults to 2): randomized method: passes after the first one; the last pass
                also yields the eigenvalues (Rayleigh-Ritz). The result is exact when the data's centred rank is at
                most ``rank + oversample``.
            generator (`torch.Generator`, *optional*): for the random sketch and VAE posterior samples.
            device (`str` or `torch.device`, *optional*): where the VAE runs and the sums accumulate (default: the
                VAE's device, else the CPU). Sums are float64 (not available on MPS).
            max_samples (`int`, *optional*): stop after this many samples.

        Returns:
            `GaussianStats`.
        """
        if method not in ("auto", "dense", "randomized"):
            raise ValueError(f"method must be 'auto', 'dense' or 'randomized', got {method!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if latent_sample not in ("sample", "mode"):
            raise ValueError(f"latent_sample must be 'sample' or 'mode', got {latent_sample!r}")
        if input_range is not None and (len(input_range) != 2 or not float(input_range[1]) > float(input_range[0])):
            raise ValueError(f"input_range must be a (low, high) pair with low < high, got {input_range!r}")
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 2):
            raise ValueError(f"max_samples must be an int >= 2, got {max_samples!r}")
        if not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample must be a non-negative int, got {oversample!r}")
        if not isinstance(power_iterations, int) or power_iterations < 1:
            raise ValueError(f"power_iterations must be an int >= 1, got {power_iterations!r}")
        if device is None:
            device = getattr(vae, "device", None) if vae is not None else None
        device = torch.device(device or "cpu")
        if device.type == "mps":
            raise ValueError("device must support float64 (not MPS) for the statistics")

        encode = None
        latent_kwargs: dict[str, Any] = {}
        if vae is not None:
            vae_config = getattr(vae, "config", None)
            if not hasattr(vae, "encode"):
                raise TypeError(f"vae must have an encode method, got {type(vae).__name__}")
            if scaling_factor is None:
                scaling_factor = getattr(vae_config, "scaling_factor", None)
            if shift_factor is None:
                shift_factor = getattr(vae_config, "shift_factor", None)
            sf = 1.0 if scaling_factor is None else float(scaling_factor)
            shift = 0.0 if shift_factor is None else float(shift_factor)
            encode = _VaeEncoder(vae, sf, shift, latent_sample, generator, device)
            latent_kwargs = {"space": "latent", "scaling_factor": sf, "shift_factor": shift}

        def batches() -> Iterable[torch.Tensor]:
            seen = 0
            for raw in _iterate_batches(data, batch_size, key):
                x = raw
                if input_range is not None:  # linear map to [-1, 1]
                    lo, hi = float(input_range[0]), float(input_range[1])
                    x = (x.to(torch.float64) - lo) * (2.0 / (hi - lo)) - 1.0
                if encode is not None:
                    x = encode(x)
                if max_samples is not None:
                    x = x[: max_samples - seen]
                seen += x.shape[0]
                if x.shape[0]:
                    yield x
                if max_samples is not None and seen >= max_samples:
                    return

        source = iter(batches())
        first = next(source, None)
        if first is None:
            raise ValueError("data is empty")
        shape = tuple(first.shape[1:])
        dim = math.prod(shape)
        rank = _check_rank(rank, dim)
        if method == "auto":
            method = "dense" if dim <= _MAX_DENSE_DIM else "randomized"
        if method == "randomized" and rank == dim:
            raise ValueError(f"rank must be given (and below D = {dim}) for the randomized method")
        value_range = (-1.0, 1.0) if input_range is not None and vae is None else None
        meta = dict(shape=shape, value_range=value_range, **latent_kwargs)

        if method == "dense":
            acc = _MomentAccumulator(dim, device)
            acc.update(_flat(first, dim, device))
            for x in source:
                acc.update(_flat(x, dim, device))
            if acc.count < 2:
                raise ValueError("data must hold at least two samples")
            return cls.from_moments(acc.mean.cpu(), acc.covariance().cpu(), rank=rank, num_samples=acc.count, **meta)

        if iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a tensor, list, Dataset or DataLoader) for the randomized method, "
                f"got the one-shot iterator {type(data).__name__}"
            )
        width = min(rank + oversample, dim)
        omega = torch.randn(dim, width, dtype=torch.float64, generator=generator).to(device)
        if encode is not None and latent_sample == "sample":
            # every pass must see the same posterior draws, so each pass restarts the generator from one state
            if generator is None:
                generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
                encode.generator = generator
            state = generator.get_state()

            def one_pass() -> Iterable[torch.Tensor]:
                generator.set_state(state)
                return batches()
        else:
            one_pass = batches
        # pass 1: sketch Y = C Omega about a reference point (the first batch's mean) so that the centring
        # correction n (mu - c)(mu - c)^T stays small and cancellation is mild
        ref = _flat(first, dim, device).mean(0)
        count, total, sq_norm = 0, torch.zeros(dim, dtype=torch.float64, device=device), 0.0
        sketch = torch.zeros(dim, width, dtype=torch.float64, device=device)
        for x in one_pass():
            xc = _flat(x, dim, device) - ref
            count += xc.shape[0]
            total += xc.sum(0)
            sq_norm += float((xc * xc).sum())
            sketch += xc.T @ (xc @ omega)
        if count < 2:
            raise ValueError("data must hold at least two samples")
        delta = total / count  # mu - c
        mean = ref + delta
        trace = (sq_norm - count * float(delta @ delta)) / (count - 1)
        sketch = (sketch - count * torch.outer(delta, delta @ omega)) / (count - 1)
        basis = torch.linalg.qr(sketch).Q
        for _ in range(power_iterations):
            # Y = C Q; Rayleigh-Ritz on the current basis uses B = Q^T Y = Q^T C Q
            product = torch.zeros_like(basis)
            for x in one_pass():
                xc = _flat(x, dim, device) - mean
                product += xc.T @ (xc @ basis)
            product /= count - 1
            projected = basis.T @ product
            last_basis, basis = basis, torch.linalg.qr(product).Q
        evals, evecs = torch.linalg.eigh(0.5 * (projected + projected.T))
        evals, evecs = evals.flip(0)[:rank].clamp(min=0), (last_basis @ evecs.flip(1))[:, :rank]
        resid = max((trace - float(evals.sum())) / (dim - rank), 0.0)
        return cls(mean.cpu(), evecs.cpu(), evals.cpu(), resid, num_samples=count, **meta)

    @classmethod
    def from_image_folder(
        cls,
        folder: str | os.PathLike,
        *,
        size: int | tuple[int, int] | None = None,
        mode: str = "RGB",
        recursive: bool = False,
        extensions: Sequence[str] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"),
        **kwargs: Any,
    ) -> GaussianStats:
        """Statistics of a folder of images, in [-1, 1] pixels (or a VAE's latents with ``vae=``).

        Files are read in sorted order with Pillow and streamed in batches; each pass re-reads the folder.

        Args:
            folder (`str` or `os.PathLike`): the directory.
            size (`int` or `tuple[int, int]`, *optional*): resize every image to ``(height, width)`` (bicubic);
                otherwise all images must already share one size.
            mode (`str`, defaults to `"RGB"`): Pillow mode to convert to (``"L"`` for grey).
            recursive (`bool`, defaults to `False`): include sub-directories.
            extensions (`Sequence[str]`): file suffixes to read (case-insensitive).
            **kwargs: passed to :meth:`from_dataset` (``rank``, ``batch_size``, ``vae``, ``method``, ...);
                ``input_range`` is fixed to [0, 1] (the loader's output).
        """
        if "input_range" in kwargs:
            raise TypeError("input_range is set by from_image_folder (images load into [0, 1])")
        loader = _ImageFolder(folder, size=size, mode=mode, recursive=recursive, extensions=extensions)
        return cls.from_dataset(loader, input_range=(0.0, 1.0), **kwargs)

    # -- safetensors I/O ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to a ``.safetensors`` file (tensors plus JSON metadata; no pickle).

        The write is atomic (a temporary file in the same folder, moved into place), so an interrupted save leaves
        the previous file, or none, and no temporary file behind; the file gets the permissions the umask gives.

        Args:
            path (`str` or `os.PathLike`): the file to write; its folder must exist.
        """
        from safetensors.torch import save as to_bytes

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        folder = os.path.dirname(os.fspath(path)) or "."
        if not os.path.isdir(folder):
            raise ValueError(f"cannot save to {os.fspath(path)!r}: the folder {folder!r} does not exist")
        tensors = {
            "mean": self.mean,
            "eigvecs": self.eigvecs,
            "eigvals": self.eigvals,
            "residual_variance": torch.tensor([self.residual_variance], dtype=torch.float64),
        }
        metadata = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "shape": json.dumps(list(self.shape)),
            "space": self.space,
            "num_samples": str(self.num_samples),
            "value_range": json.dumps(self.value_range),
            "scaling_factor": json.dumps(self.scaling_factor),
            "shift_factor": json.dumps(self.shift_factor),
        }
        atomic_write(path, to_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianStats:
        """Read statistics written by :meth:`save`.

        Args:
            path (`str` or `os.PathLike`): a ``.safetensors`` file. Anything else (a truncated copy, a pickle renamed
                ``.safetensors``, another model's weights, a file of another format version) raises a ``ValueError``
                naming it.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        name = os.fspath(path)
        tensors, metadata, _ = load_tagged_safetensors(
            path, _FORMAT, _FORMAT_VERSION, what="GaussianStats", version_key="format_version"
        )
        missing = sorted({"mean", "eigvecs", "eigvals", "residual_variance"} - set(tensors))
        if missing:
            raise ValueError(f"{name} is not a complete GaussianStats file (missing tensors {', '.join(missing)})")
        try:
            value_range = json.loads(metadata.get("value_range", "null"))
            residual = tensors["residual_variance"].reshape(-1)
            if residual.numel() != 1:
                raise ValueError(f"residual_variance holds {residual.numel()} values, not 1")
            return cls(
                mean=tensors["mean"],
                eigvecs=tensors["eigvecs"],
                eigvals=tensors["eigvals"],
                residual_variance=float(residual[0]),
                shape=tuple(json.loads(metadata["shape"])),
                space=metadata.get("space", "pixel"),
                num_samples=int(metadata.get("num_samples", 0)),
                value_range=None if value_range is None else tuple(value_range),
                scaling_factor=json.loads(metadata.get("scaling_factor", "null")),
                shift_factor=json.loads(metadata.get("shift_factor", "null")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{name} is not a valid GaussianStats file ({err})") from err


def _check_rank(rank: int | None, dim: int) -> int:
    if rank is None:
        return dim
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= dim:
        raise ValueError(f"rank must be an int in [1, {dim}], got {rank!r}")
    return rank


def _flat(x: torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    x = x.to(device=device, dtype=torch.float64).reshape(x.shape[0], -1)
    if x.shape[1] != dim:
        raise ValueError(f"every sample must have {dim} values, got a batch with {x.shape[1]}")
    return x


class _MomentAccumulator:
    """Streaming mean and covariance by Chan, Golub & LeVeque's pairwise update (exact, no E[xx^T] - mu mu^T
    cancellation), in float64.

    Not :class:`diffsamplers.eval.StreamingStats`: that one keeps raw sums so that processes can all-reduce them, and
    it lives above this layer; data statistics (pixels with a mean far larger than their spread at the image border)
    need the cancellation-free form, and teleportation needs no cross-process merge."""

    def __init__(self, dim: int, device: torch.device):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        n_b = x.shape[0]
        mean_b = x.mean(0)
        centred = x - mean_b
        n = self.count + n_b
        delta = mean_b - self.mean
        # M2 = M2_a + M2_b + delta delta^T n_a n_b / n
        self.m2 += centred.T @ centred + torch.outer(delta, delta) * (self.count * n_b / n)
        self.mean += delta * (n_b / n)
        self.count = n

    def covariance(self) -> torch.Tensor:
        return self.m2 / (self.count - 1)


def _to_tensor(batch: Any, key: str | None) -> torch.Tensor:
    if isinstance(batch, dict):
        names = [key] if key is not None else ["pixel_values", "images", "image", "sample"]
        for name in names:
            if name in batch:
                return _to_tensor(batch[name], None)
        raise ValueError(f"dict batches need the key {key!r}" if key else f"no image key in batch keys {list(batch)}")
    if isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], (int, float)):
        return _to_tensor(batch[0], key)
    if isinstance(batch, torch.Tensor):
        return batch
    try:
        import numpy as np

        if isinstance(batch, np.ndarray):
            return torch.from_numpy(batch)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(
        f"data batches must be tensors, arrays, (tensor, label) tuples or dicts, got {type(batch).__name__}"
    )


def _iterate_batches(data: Any, batch_size: int, key: str | None) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.ndim < 2:
            raise ValueError(f"data must have shape (N, ...), got {tuple(data.shape)}")
        yield from data.split(batch_size)
        return
    if isinstance(data, (str, bytes)) or not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise TypeError(f"data must be a tensor, a Dataset or an iterable of batches, got {type(data).__name__}")
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        x = _to_tensor(batch, key)
        if x.ndim < 2:
            raise ValueError(f"each batch must have shape (B, ...), got {tuple(x.shape)}")
        yield x


class _VaeEncoder:
    """Encode [-1, 1] images into the scaled latents a diffusion model sees (float64)."""

    def __init__(self, vae: Any, scaling: float, shift: float, latent_sample: str, generator: Any, device: Any):
        self.vae, self.scaling, self.shift, self.latent_sample = vae, scaling, shift, latent_sample
        self.generator, self.device = generator, device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        out = vae.encode(x.to(device=getattr(vae, "device", self.device), dtype=getattr(vae, "dtype", torch.float32)))
        dist = getattr(out, "latent_dist", None)
        if dist is not None:
            z = dist.sample(generator=self.generator) if self.latent_sample == "sample" else dist.mode()
        elif hasattr(out, "latents"):  # e.g. AutoencoderTiny
            z = out.latents
        else:
            z = out[0]
        # the diffusers pipelines' convention: latents = (z - shift_factor) * scaling_factor
        return (z.to(torch.float64) - self.shift) * self.scaling


class _ImageFolder:
    """Re-iterable loader of an image folder: yields float tensors in [0, 1] of shape (1, C, H, W)."""

    def __init__(self, folder: Any, *, size: Any, mode: str, recursive: bool, extensions: Sequence[str]):
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"folder must be a str or os.PathLike, got {type(folder).__name__}")
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"folder {folder!r} is not a directory")
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size must be a positive int or a (height, width) pair, got {size!r}")
        suffixes = tuple(e.lower() for e in extensions)
        if recursive:
            files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
        else:
            files = [os.path.join(folder, f) for f in os.listdir(folder)]
        self.files = sorted(f for f in files if f.lower().endswith(suffixes) and os.path.isfile(f))
        if not self.files:
            raise ValueError(f"folder {folder!r} holds no images with extensions {suffixes}")
        self.size, self.mode = size, mode

    def __iter__(self):
        import numpy as np
        from PIL import Image

        expected = None
        for path in self.files:
            try:
                with Image.open(path) as img:
                    img = img.convert(self.mode)
                    if self.size is not None:
                        img = img.resize((self.size[1], self.size[0]), Image.BICUBIC)
                    arr = np.asarray(img, dtype=np.float64) / 255.0
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                # Pillow reports truncated or foreign files as OSError (UnidentifiedImageError is one), some
                # corrupt headers as SyntaxError; a missing file should stay a FileNotFoundError
                if isinstance(err, FileNotFoundError):
                    raise
                raise ValueError(f"image {path!r} could not be read: {err}") from err
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if expected is None:
                expected = arr.shape
            elif arr.shape != expected:
                raise ValueError(f"image {path!r} has shape {arr.shape}, expected {expected}; pass size=")
            yield torch.from_numpy(np.ascontiguousarray(arr))[None]
