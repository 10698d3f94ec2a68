# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Frechet distance and streaming feature statistics, computed with torch in float64.

The distance uses symmetric eigendecompositions instead of ``scipy.linalg.sqrtm``: the trace of
``sqrt(S1 S2)`` equals the trace of ``sqrt(S1^{1/2} S2 S1^{1/2})``, whose argument is symmetric positive
semi-definite, so its eigenvalues are real and can be clipped at zero. This works for singular covariances
(fewer samples than features), never returns complex values, and runs on the GPU.

Statistics are streamed: :class:`StreamingStats` keeps the count, the sum and the sum of outer products in
float64, so features never need to be held in memory, partial statistics from several processes can be summed,
and the covariance is the unbiased one (``ddof=1``) that ``numpy.cov`` and clean-fid use.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

__all__ = ["COVARIANCE_RTOL", "StreamingStats", "fid_from_features", "fid_from_stats", "frechet_distance"]

_STATS_FORMAT = "diffsamplers.StreamingStats"
_STATS_VERSION = "1"


def _to_float64(x: Any, device: torch.device, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray) or np.isscalar(x):
        x = torch.from_numpy(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"`{name}` must be real, got dtype {x.dtype}")
    return x.detach().to(device=device, dtype=torch.float64)


def _common_device(*xs: Any) -> torch.device:
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


#: Relative tolerance of the covariance checks in :func:`frechet_distance`: asymmetry and negative eigenvalues up to
#: this fraction of the covariance's scale are round-off (float32 statistics, fewer samples than features) and are
#: symmetrised / clipped away; anything larger means the matrix is not a covariance.
COVARIANCE_RTOL = 1e-5


def _mean_vector(mu: torch.Tensor, name: str) -> torch.Tensor:
    # (d,) as numpy/clean-fid give it; (1, d) from a keepdim mean is accepted, anything else is a swapped argument
    if mu.ndim == 2 and mu.shape[0] == 1:
        mu = mu[0]
    if mu.ndim != 1 or mu.shape[0] == 0:
        raise ValueError(f"`{name}` must be a mean vector of shape (d,) with d >= 1, got shape {tuple(mu.shape)}")
    return mu


def _checked_covariance(sigma: torch.Tensor, name: str) -> torch.Tensor:
    """``sigma`` symmetrised, after checking that it is symmetric and positive semi-definite up to round-off."""
    scale = sigma.abs().max()
    asymmetry = (sigma - sigma.T).abs().max()
    if asymmetry > COVARIANCE_RTOL * scale:
        raise ValueError(
            f"`{name}` is not symmetric (max |S - S^T| = {float(asymmetry):.3g}, max |S| = {float(scale):.3g}); "
            "pass a covariance matrix"
        )
    sigma = 0.5 * (sigma + sigma.T)
    diag = torch.diagonal(sigma)
    # for a PSD matrix max |S_ij| <= max S_ii, so the largest diagonal entry bounds the eigenvalues' scale from below
    # and a Cholesky factorisation of S + tol * max(diag) * I succeeds exactly when min eig(S) > -tol * max(diag)
    # (up to rounding): one O(d^3 / 3) factorisation instead of an eigendecomposition
    top = diag.max().clamp_min(0)
    shift = COVARIANCE_RTOL * top + torch.finfo(torch.float64).tiny
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    _, info = torch.linalg.cholesky_ex(sigma + shift * eye)
    if int(info) != 0:
        lowest = float(torch.linalg.eigvalsh(sigma)[0])
        raise ValueError(
            f"`{name}` is not positive semi-definite (smallest eigenvalue {lowest:.3g}, largest diagonal entry "
            f"{float(top):.3g}, tolerance {COVARIANCE_RTOL:g} relative); pass a covariance matrix"
        )
    return sigma


def _sqrt_factor(sigma: torch.Tensor, method: str) -> torch.Tensor:
    """A matrix ``R`` with ``R R^T = sigma`` (up to rounding), from which ``R^T S2 R`` is similar to ``S1 S2``."""
    if method == "cholesky":
        factor, info = torch.linalg.cholesky_ex(sigma)
        if int(info) == 0:
            return factor
        # not numerically positive definite (e.g. fewer samples than features): fall through to eigh
    evals, evecs = torch.linalg.eigh(sigma)
    # V diag(sqrt(l)) is enough: V diag(sqrt l) V^T S2 V diag(sqrt l) V^T and diag(sqrt l) V^T S2 V diag(sqrt l)
    # are similar, so the transposed factor gives the same eigenvalues for one matmul less
    return evecs * evals.clamp_min(0).sqrt()


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, *, method: str = "eigh"
) -> float:
    """Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` between two Gaussians.

    Computed in float64 on the device of the first torch tensor among the inputs (CPU for numpy inputs). The trace
    term is ``sum(sqrt(clip(eig(R^T S2 R), 0)))`` with ``R R^T = S1``. With ``method="eigh"`` (the default) ``R``
    comes from a symmetric eigendecomposition of ``S1`` with negative eigenvalues clipped to zero, which handles
    singular and slightly indefinite covariances. ``method="cholesky"`` uses a Cholesky factor of ``S1`` when it is
    numerically positive definite (several times faster on CPU, same eigenvalues) and falls back to ``eigh``
    otherwise. float64 matmuls never use TF32, so no global flag is touched.

    Both covariances must be symmetric and positive semi-definite up to round-off: an asymmetry above
    :data:`COVARIANCE_RTOL` times their largest entry, or an eigenvalue below ``-COVARIANCE_RTOL`` times their
    largest diagonal entry, raises a ``ValueError`` (such a matrix is not a covariance, and the formula would return
    a meaningless, possibly negative number). Smaller deviations are symmetrised and clipped away.

    Args:
        mu1 (`torch.Tensor` or `np.ndarray`): mean of the first set, shape ``(d,)``.
        sigma1 (`torch.Tensor` or `np.ndarray`): covariance of the first set, shape ``(d, d)``.
        mu2 (`torch.Tensor` or `np.ndarray`): mean of the second set, shape ``(d,)``.
        sigma2 (`torch.Tensor` or `np.ndarray`): covariance of the second set, shape ``(d, d)``.
        method (`str`, *optional*, defaults to `"eigh"`): `"eigh"` or `"cholesky"`, see above.

    Returns:
        `float`: the distance. It can be a tiny negative number (rounding) for identical statistics.

    Raises:
        `ValueError`: a mean that is not a vector, mismatched dimensions, NaN or infinite entries, or a covariance
            that is not symmetric positive semi-definite; the message names the argument.
    """
    if method not in ("eigh", "cholesky"):
        raise ValueError(f"`method` must be 'eigh' or 'cholesky', got {method!r}")
    device = _common_device(mu1, sigma1, mu2, sigma2)
    mu1 = _mean_vector(_to_float64(mu1, device, "mu1"), "mu1")
    mu2 = _mean_vector(_to_float64(mu2, device, "mu2"), "mu2")
    sigma1 = _to_float64(sigma1, device, "sigma1")
    sigma2 = _to_float64(sigma2, device, "sigma2")
    d = mu1.shape[0]
    if mu2.shape[0] != d:
        raise ValueError(f"`mu1` and `mu2` have different lengths: {d} and {mu2.shape[0]}")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"`{name}` must have shape ({d}, {d}) to match the means, got {tuple(sigma.shape)}")
    for name, x in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not torch.isfinite(x).all():
            raise ValueError(f"`{name}` contains NaN or infinite values")
    sigma1 = _checked_covariance(sigma1, "sigma1")
    sigma2 = _checked_covariance(sigma2, "sigma2")

    root = _sqrt_factor(sigma1, method)
    inner = root.T @ sigma2 @ root
    inner = 0.5 * (inner + inner.T)
    tr_covmean = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + torch.trace(sigma1) + torch.trace(sigma2) - 2.0 * tr_covmean)


class StreamingStats:
    """Running mean and covariance of feature vectors, accumulated in float64.

    Keeps ``count``, ``sum`` (``d``) and ``sum of outer products`` (``d x d``, 32 MiB at ``d = 2048``). Raw sums
    make merging and all-reducing across processes a plain addition. Their float64 cancellation error in the
    covariance is about ``1e-16 * (|mean| / std)^2`` relative, negligible for network features.

    Args:
        num_features (`int`, *optional*): feature dimension; taken from the first :meth:`update` when left out.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the sums live. Put them on the
            GPU that makes the features to avoid a copy per batch.
    """

    def __init__(self, num_features: int | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer_sum: torch.Tensor | None = None
        if num_features is not None:
            self._allocate(int(num_features))

    def _allocate(self, num_features: int) -> None:
        if num_features < 1:
            raise ValueError(f"`num_features` must be positive, got {num_features}")
        self.sum = torch.zeros(num_features, dtype=torch.float64, device=self.device)
        self.outer_sum = torch.zeros(num_features, num_features, dtype=torch.float64, device=self.device)

    @property
    def num_features(self) -> int | None:
        """Feature dimension, or `None` before the first update."""
        return None if self.sum is None else self.sum.shape[0]

    @torch.no_grad()
    def update(self, features: ArrayLike) -> StreamingStats:
        """Add a batch of feature vectors.

        Args:
            features (`torch.Tensor` or `np.ndarray`): shape ``(n, d)``; ``(n, d, 1, 1)`` from pooling layers is
                flattened. Any real dtype; converted to float64 on :attr:`device`.

        Returns:
            `StreamingStats`: ``self``, for chaining.
        """
        x = _to_float64(features, self.device, "features")
        if x.ndim == 4 and x.shape[2:] == (1, 1):
            x = x.flatten(1)
        if x.ndim != 2:
            raise ValueError(f"`features` must have shape (n, d), got {tuple(x.shape)}")
        if self.sum is None:
            self._allocate(x.shape[1])
        if x.shape[1] != self.num_features:
            raise ValueError(f"`features` has {x.shape[1]} features, these statistics have {self.num_features}")
        # no finiteness check here: it would synchronise the GPU on every batch; NaNs surface in `mean`
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer_sum += x.T @ x
        return self

    @torch.no_grad()
    def merge(self, other: StreamingStats) -> StreamingStats:
        """Add another set of statistics (for example one gathered from another process) into this one.

        Args:
            other (`StreamingStats`): statistics of the same feature dimension; unchanged.

        Returns:
            `StreamingStats`: ``self``.
        """
        if not isinstance(other, StreamingStats):
            raise TypeError(f"`other` must be a StreamingStats, got {type(other).__name__}")
        if other.sum is None:
            return self
        if self.sum is None:
            self._allocate(other.num_features)
        if other.num_features != self.num_features:
            raise ValueError(f"`other` has {other.num_features} features, these statistics have {self.num_features}")
        self.count += other.count
        self.sum += other.sum.to(self.device)
        self.outer_sum += other.outer_sum.to(self.device)
        return self

    @torch.no_grad()
    def all_reduce(self) -> StreamingStats:
        """Sum the statistics of all processes in place (no-op without an initialised ``torch.distributed``).

        Every process must call it. Processes that saw no features take part too: the feature dimension is agreed
        first. With NCCL the statistics must live on the process's GPU; with gloo on the CPU.

        Returns:
            `StreamingStats`: ``self``, now holding the statistics of all processes.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        dim = torch.tensor([self.num_features or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)
        if int(dim) == 0:
            return self
        if self.sum is None:
            self._allocate(int(dim))
        elif self.num_features != int(dim):
            raise ValueError(f"feature dimension differs across processes: {self.num_features} here, {int(dim)} max")
        count = torch.tensor([self.count], dtype=torch.int64, device=self.device)
        dist.all_reduce(count)
        dist.all_reduce(self.sum)
        dist.all_reduce(self.outer_sum)
        self.count = int(count)
        return self

    def _require(self, minimum: int) -> None:
        if self.count < minimum:
            raise ValueError(f"need at least {minimum} feature vectors, have {self.count}")
        if not torch.isfinite(self.sum).all():
            raise ValueError("the features added to these statistics contained NaN or infinite values")

    @property
    def mean(self) -> torch.Tensor:
        """Mean feature vector (float64, shape ``(d,)``)."""
        self._require(1)
        return self.sum / self.count

    @property
    def covariance(self) -> torch.Tensor:
        """Unbiased covariance (``ddof=1``, like ``numpy.cov``), float64, shape ``(d, d)``."""
        self._require(2)
        mean = self.mean
        cov = (self.outer_sum - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return 0.5 * (cov + cov.T)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the statistics (``count``, ``sum``, ``outer_sum``)."""
        if self.sum is None:
            raise ValueError("cannot save empty statistics: no features were added")
        return {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "sum": self.sum.cpu(),
            "outer_sum": self.outer_sum.cpu(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> StreamingStats:
        """Replace the statistics with those of :meth:`state_dict`.

        Args:
            state (`dict`): with the keys ``count``, ``sum`` and ``outer_sum``.
        """
        missing = {"count", "sum", "outer_sum"} - set(state)
        if missing:
            raise ValueError(f"`state` lacks the keys {sorted(missing)}")
        d = state["sum"].shape[0]
        if state["outer_sum"].shape != (d, d):
            raise ValueError(
                f"`state` has sum of shape ({d},) but outer_sum of shape {tuple(state['outer_sum'].shape)}"
            )
        self.count = int(state["count"].reshape(-1)[0])
        self.sum = state["sum"].to(device=self.device, dtype=torch.float64).clone()
        self.outer_sum = state["outer_sum"].to(device=self.device, dtype=torch.float64).clone()
        return self

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write the statistics to a safetensors file, atomically (a kill never leaves a torn file at ``path``).

        Args:
            path (`str` or `os.PathLike`): destination file; its folder must exist.
            metadata (`dict[str, str]`, *optional*): stored in the file header, e.g. which extractor and resize
                made the features. The keys ``format`` and ``version`` are reserved.
        """
        from safetensors.torch import save

        from .._io import atomic_write

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
        extra = {str(k): str(v) for k, v in (metadata or {}).items()}
        reserved = sorted(set(extra) & {"format", "version"})
        if reserved:
            raise ValueError(f"`metadata` must not set the reserved keys {reserved}")
        meta = {"format": _STATS_FORMAT, "version": _STATS_VERSION, **extra}
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        atomic_write(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> StreamingStats:
        """Read statistics written by :meth:`save`.

        The file must carry this class's format tag and version, exactly the tensors ``count`` (int64, ``(1,)``),
        ``sum`` (float64, ``(d,)``) and ``outer_sum`` (float64, ``(d, d)``), and a non-negative count; anything else
        (another safetensors file, a truncated copy, a pickle renamed ``.safetensors``) raises a ``ValueError``
        naming the file.

        Args:
            path (`str` or `os.PathLike`): the safetensors file.
            device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where to put the sums.
        """
        from .._io import check_tensors, load_tagged_safetensors

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
        name = os.fspath(path)
        tensors, _, _ = load_tagged_safetensors(path, _STATS_FORMAT, _STATS_VERSION, what="StreamingStats")
        total = tensors.get("sum")
        if total is None or total.ndim != 1 or total.numel() == 0:
            raise ValueError(f"{name}: no tensor 'sum' of shape (d,), d >= 1 (tensors {sorted(tensors)})")
        d = total.shape[0]
        expected = {"count": ((1,), torch.int64), "sum": ((d,), torch.float64), "outer_sum": ((d, d), torch.float64)}
        check_tensors(path, tensors, expected)
        if int(tensors["count"][0]) < 0:
            raise ValueError(f"{name}: negative count {int(tensors['count'][0])}")
        return cls(device=device).load_state_dict(tensors)

    def __repr__(self) -> str:
        return f"StreamingStats(count={self.count}, num_features={self.num_features}, device={self.device})"


def fid_from_stats(stats1: StreamingStats, stats2: StreamingStats, *, method: str = "eigh") -> float:
    """Frechet distance between two :class:`StreamingStats`, on the device of ``stats1``.

    Args:
        stats1 (`StreamingStats`): statistics of the first set.
        stats2 (`StreamingStats`): statistics of the second set.
        method (`str`, *optional*, defaults to `"eigh"`): see :func:`frechet_distance`.
    """
    return frechet_distance(
        stats1.mean,
        stats1.covariance,
        stats2.mean.to(stats1.device),
        stats2.covariance.to(stats1.device),
        method=method,
    )


def fid_from_features(features1: ArrayLike, features2: ArrayLike, *, method: str = "eigh") -> float:
    """Frechet distance between two sets of feature vectors held in memory.

    Args:
        features1 (`torch.Tensor` or `np.ndarray`): shape ``(n1, d)``, ``n1 >= 2``.
        features2 (`torch.Tensor` or `np.ndarray`): shape ``(n2, d)``, ``n2 >= 2``.
        method (`str`, *optional*, defaults to `"eigh"`): see :func:`frechet_distance`.
    """
    device = _common_device(features1, features2)
    stats1 = StreamingStats(device=device).update(features1)
    stats2 = StreamingStats(device=device).update(features2)
    return fid_from_stats(stats1, stats2, method=method)
