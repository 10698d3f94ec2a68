# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The exact testbed: a Gaussian mixture whose denoiser is known in closed form.

For data ``x0 ~ sum_k w_k N(m_k, C_k)`` with ``C_k = diag(d_k) + F_k F_k^T`` (diagonal plus low rank), the noisy
marginal at ``x_t = alpha x0 + sigma eps`` is ``sum_k w_k N(alpha m_k, M_k)`` with
``M_k = alpha^2 C_k + sigma^2 I``, and the posterior mean is

    E[x0 | x_t] = sum_k r_k(x_t) (m_k + alpha C_k M_k^{-1} (x_t - alpha m_k)),

with responsibilities ``r_k`` proportional to ``w_k N(x_t; alpha m_k, M_k)``. ``M_k`` is inverted with the
Woodbury identity, so one evaluation costs O(K d r^2): cheap enough for float64 ODE solves at 1e-8 tolerance.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..schedule import NoiseSchedule, _check_prediction_type, config_family, from_x0_eps


class GaussianMixtureModel(nn.Module):
    """A diffusers-compatible denoiser with a closed-form output (the exact posterior mean of a Gaussian mixture).

    It is called like a ``UNet2DModel``: ``model(sample, timestep, ...).sample``, and carries ``config.sample_size``,
    ``config.in_channels``, ``dtype`` and ``device``, so ``DDIMPipeline(unet=model, scheduler=...)`` runs on it.
    The timestep is read through the :class:`~diffsamplers.schedule.NoiseSchedule` of ``scheduler_config``
    (diffusers timesteps for VP, ``sigma * 1000`` for flow); inputs are the VP / flow frame samples a UNet sees.

    Args:
        means (`torch.Tensor` of shape `(K, C, H, W)`): component means.
        stds (`torch.Tensor` of shape `(K,)`): isotropic per-component standard deviations.
        weights (`torch.Tensor` of shape `(K,)`, *optional*): mixture weights summing to one (uniform if omitted).
        scheduler_config (`dict`): any diffusers scheduler config; fixes the timestep -> (alpha, sigma) map.
        prediction_type (`str`, defaults to `"epsilon"`): ``"epsilon"``, ``"sample"``, ``"v_prediction"`` or
            ``"flow_prediction"`` (the velocity ``eps - x0``).
        factors (`torch.Tensor` of shape `(K, D, r)`, *optional*): low-rank covariance factors ``F_k``; the
            covariance becomes ``stds_k^2 I + F_k F_k^T``.
        diag (`torch.Tensor` of shape `(K, D)`, *optional*): per-dimension variances replacing ``stds**2``.
        component_class (`torch.Tensor` of shape `(K,)`, *optional*): class of each component. Given a class, the
            model is the mixture of that class's components; without one (or with the null class
            ``num_classes``), the whole mixture. Classes come from ``class_labels`` or from
            ``encoder_hidden_states`` built by :meth:`class_embeddings`.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        *,
        scheduler_config: Any,
        prediction_type: str = "epsilon",
        factors: torch.Tensor | None = None,
        diag: torch.Tensor | None = None,
        component_class: torch.Tensor | None = None,
    ):
        super().__init__()
        _check_prediction_type(prediction_type)
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 4:
            raise ValueError(f"means must have shape (K, C, H, W), got {tuple(means.shape)}")
        num_components, channels, height, width = means.shape
        dim = channels * height * width
        if diag is None:
            if stds is None:
                raise ValueError("give stds (K,) or diag (K, D)")
            stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
            if stds.shape != (num_components,) or (stds < 0).any():
                raise ValueError(f"stds must be {num_components} non-negative values")
            diag = (stds**2)[:, None].expand(num_components, dim).clone()
        diag = torch.as_tensor(diag, dtype=torch.float64).reshape(num_components, dim)
        if factors is None:
            factors = torch.zeros(num_components, dim, 0, dtype=torch.float64)
        factors = torch.as_tensor(factors, dtype=torch.float64)
        if factors.shape[:2] != (num_components, dim):
            raise ValueError(f"factors must have shape (K, D, r) = ({num_components}, {dim}, r)")
        if weights is None:
            weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.shape != (num_components,) or (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-6:
            raise ValueError("weights must be K non-negative values summing to 1")
        if component_class is None:
            component_class = torch.zeros(num_components, dtype=torch.long)
        self.register_buffer("means", means.reshape(num_components, dim))
        self.register_buffer("diag", diag)
        self.register_buffer("factors", factors)
        self.register_buffer("log_weights", torch.log(weights))
        self.register_buffer("component_class", torch.as_tensor(component_class, dtype=torch.long))
        self.num_classes = int(self.component_class.max()) + 1
        self.schedule = NoiseSchedule.from_config(scheduler_config)
        self.prediction_type = prediction_type
        self.config = SimpleNamespace(
            sample_size=height if height == width else (height, width),
            in_channels=channels,
            out_channels=channels,
            num_class_embeds=self.num_classes,
        )
        self.shape = (channels, height, width)
        self.num_calls = 0  # model evaluations since construction (tests count NFE with it)
        self._dtype_anchor = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)

    # -- diffusers-model surface --------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._dtype_anchor.device

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        **unused: Any,
    ):
        self.num_calls += 1
        batch = sample.shape[0]
        alpha, sigma = self.schedule.alpha_sigma(_timestep_tensor(timestep, batch))
        classes = self._classes(batch, encoder_hidden_states, class_labels)
        x = sample.detach().to(torch.float64).reshape(batch, -1)
        x0, eps = self.posterior(x, alpha.to(x.device), sigma.to(x.device), classes)
        a, s = alpha.to(x.device)[:, None], sigma.to(x.device)[:, None]
        out = from_x0_eps(x0, eps, a, s, self.prediction_type).reshape(sample.shape).to(sample.dtype)
        return SimpleNamespace(sample=out) if return_dict else (out,)

    # -- the closed form ----------------------------------------------------------------------------------------

    def posterior_mean(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``E[x0 | x_t = x]`` for flat float64 ``x`` of shape (B, D) and per-sample ``alpha``, ``sigma`` (B,)."""
        return self.posterior(x, alpha, sigma, classes)[0]

    def posterior(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[x0 | x_t], E[eps | x_t])`` for flat float64 ``x`` (B, D) and per-sample ``alpha``, ``sigma`` (B,).

        The noise prediction is formed as ``sigma M_k^{-1} (x - alpha m_k)`` rather than ``(x - alpha x0) / sigma``:
        the same value, but with no division by ``sigma``, so it stays exact as ``sigma -> 0`` (and
        ``alpha = 0`` is allowed too)."""
        m, dg, F = self.means.to(x), self.diag.to(x), self.factors.to(x)
        a, s = alpha.reshape(-1, 1, 1).to(x), sigma.reshape(-1, 1, 1).to(x)  # (B, 1, 1)
        b = a**2 * dg[None] + s**2  # (B, K, D) diagonal of M_k
        G = a[..., None] * F[None]  # (B, K, D, r)
        r = x[:, None, :] - a * m[None]  # (B, K, D) residual x - alpha m_k
        rank = F.shape[-1]
        rb = r / b
        if rank:
            Gb = G / b[..., None]
            cap = torch.eye(rank, dtype=x.dtype, device=x.device) + G.transpose(-1, -2) @ Gb  # (B, K, r, r)
            chol = torch.linalg.cholesky(cap)
            proj = (G.transpose(-1, -2) @ rb[..., None])  # (B, K, r, 1)
            sol = torch.cholesky_solve(proj, chol)
            minv_r = rb - (Gb @ sol)[..., 0]  # M^{-1} r
            logdet = torch.log(b).sum(-1) + 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            c_minv_r = dg[None] * minv_r + (F[None] @ (F[None].transpose(-1, -2) @ minv_r[..., None]))[..., 0]
        else:
            minv_r = rb
            logdet = torch.log(b).sum(-1)
            c_minv_r = dg[None] * minv_r
        log_lik = -0.5 * ((r * minv_r).sum(-1) + logdet)  # (B, K), constants dropped
        log_w = self.log_weights.to(x)[None].expand_as(log_lik)
        if classes is not None:
            own = self.component_class.to(x.device)[None] == classes[:, None]
            uncond = (classes < 0) | (classes >= self.num_classes)
            log_w = torch.where(own | uncond[:, None], log_w, torch.full_like(log_w, -torch.inf))
        resp = torch.softmax(log_lik + log_w, dim=-1)[..., None]  # (B, K, 1)
        x0 = (resp * (m[None] + a * c_minv_r)).sum(1)
        eps = (resp * (s * minv_r)).sum(1)  # x - a (m + a C M^-1 r) = (M - a^2 C) M^-1 r = s^2 M^-1 r
        return x0, eps

    def _classes(self, batch: int, encoder_hidden_states: Any, class_labels: Any) -> torch.Tensor | None:
        if class_labels is not None:
            labels = torch.as_tensor(class_labels).reshape(-1).long()
            return labels.expand(batch) if labels.numel() == 1 else labels
        if encoder_hidden_states is not None:
            emb = encoder_hidden_states[:, 0, : self.num_classes].float()
            has = emb.abs().sum(-1) > 0
            return torch.where(has, emb.argmax(-1), torch.full_like(has, self.num_classes, dtype=torch.long)).cpu()
        return None

    def class_embeddings(self, labels: Any, seq_len: int = 1, dim: int | None = None) -> torch.Tensor:
        """``prompt_embeds`` that select classes: one-hot rows; label ``-1`` (or ``num_classes``) is unconditional."""
        labels = torch.as_tensor(labels).reshape(-1).long()
        dim = dim or self.num_classes
        emb = torch.zeros(labels.numel(), seq_len, dim)
        valid = (labels >= 0) & (labels < self.num_classes)
        emb[valid.nonzero()[:, 0], :, labels[valid]] = 1.0
        return emb

    # -- statistics the tests need ------------------------------------------------------------------------------

    def covariances(self) -> torch.Tensor:
        """Dense component covariances (K, D, D), float64."""
        return torch.diag_embed(self.diag) + self.factors @ self.factors.transpose(-1, -2)

    def sample_data(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact draws of clean data, shape (num, C, H, W), float64."""
        comp = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        D, r = self.diag.shape[1], self.factors.shape[-1]
        z1 = torch.randn(num, D, dtype=torch.float64, generator=generator)
        z2 = torch.randn(num, r, 1, dtype=torch.float64, generator=generator)
        x = self.means[comp] + self.diag[comp].sqrt() * z1 + (self.factors[comp] @ z2)[..., 0]
        return x.reshape(num, *self.shape)

    # -- constructors -------------------------------------------------------------------------------------------

    @classmethod
    def toy_2d(cls, scheduler_config: Any = None, prediction_type: str = "epsilon") -> "GaussianMixtureModel":
        """Four well-separated, anisotropic components in 2-D (shape (1, 1, 2))."""
        means = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], dtype=torch.float64) * 0.8
        factors = torch.tensor([[[0.2], [0.1]], [[0.0], [0.25]], [[0.15], [-0.15]], [[0.3], [0.0]]])
        return cls(
            means.reshape(4, 1, 1, 2),
            torch.full((4,), 0.08),
            torch.tensor([0.4, 0.3, 0.2, 0.1]),
            scheduler_config=scheduler_config or {},
            prediction_type=prediction_type,
            factors=factors,
        )

    @classmethod
    def from_data(
        cls,
        data: torch.Tensor,
        labels: torch.Tensor,
        *,
        rank: int = 8,
        scheduler_config: Any = None,
        prediction_type: str = "epsilon",
        min_var: float = 1e-3,
    ) -> "GaussianMixtureModel":
        """One Gaussian per label: mean, top-``rank`` principal directions and an isotropic residual variance."""
        data = torch.as_tensor(data, dtype=torch.float64)
        labels = torch.as_tensor(labels).long()
        classes = labels.unique()
        shape, D = data.shape[1:], data[0].numel()
        means, diags, factors, weights = [], [], [], []
        for c in classes:
            x = data[labels == c].reshape(-1, D)
            mu = x.mean(0)
            cov = (x - mu).T @ (x - mu) / max(len(x) - 1, 1)
            evals, evecs = torch.linalg.eigh(cov)
            evals = evals.flip(0).clamp(min=0)
            evecs = evecs.flip(1)
            resid = max(float(evals[rank:].mean()) if rank < D else 0.0, min_var)
            top = (evals[:rank] - resid).clamp(min=0)
            means.append(mu)
            diags.append(torch.full((D,), resid, dtype=torch.float64))
            factors.append(evecs[:, :rank] * top.sqrt())
            weights.append(len(x))
        weights = torch.tensor(weights, dtype=torch.float64)
        return cls(
            torch.stack(means).reshape(len(classes), *shape),
            weights=weights / weights.sum(),
            scheduler_config=scheduler_config or {},
            prediction_type=prediction_type,
            factors=torch.stack(factors),
            diag=torch.stack(diags),
            component_class=torch.arange(len(classes)),
        )

    @classmethod
    def digits(
        cls,
        size: int = 8,
        channels: int = 1,
        rank: int = 8,
        scheduler_config: Any = None,
        prediction_type: str = "epsilon",
    ) -> "GaussianMixtureModel":
        """One low-rank Gaussian per class of scikit-learn's digits, in [-1, 1], at ``size`` x ``size`` pixels
        (bilinear upsampling from 8x8) with ``channels`` copies of the grey channel; class-conditional."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float64)[:, None] / 8.0 - 1.0
        if size != 8:
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.expand(-1, channels, -1, -1)
        return cls.from_data(
            images,
            torch.tensor(digits.target),
            rank=rank,
            scheduler_config=scheduler_config,
            prediction_type=prediction_type,
        )

    @classmethod
    def for_pipeline(cls, base: "GaussianMixtureModel", scheduler_config: Any, **kwargs) -> "GaussianMixtureModel":
        """The same mixture under another noise schedule (and prediction type, if given)."""
        kwargs.setdefault("prediction_type", base.prediction_type)
        if config_family(dict(scheduler_config)) == "flow":
            kwargs["prediction_type"] = "flow_prediction"
        return cls(
            base.means.reshape(-1, *base.shape),
            weights=base.weights,
            scheduler_config=scheduler_config,
            factors=base.factors,
            diag=base.diag,
            component_class=base.component_class,
            **kwargs,
        )


def _timestep_tensor(timestep: Any, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep).detach().to(torch.float64).cpu().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep must be a scalar or have one entry per sample ({batch}), got {t.numel()}")
    return t
