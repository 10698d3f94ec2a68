# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The fitting core every learned solver shares: a bank of reference trajectories, disjoint seed splits, rollouts.

A learned solver is fitted to one model on a fixed set of noises whose high-accuracy solutions are computed once:
the exact solution on the Gaussian-mixture testbed, DPM-Solver++(2M) at >= 200 steps on a model. Fixed pairs,
solved once, are what BNS uses (Shaul et al., arXiv 2403.01329, Sec. 5: 520 training and 1024 validation pairs,
best-validation iterate); Bespoke's paper re-solves per iteration and suggests caching (arXiv 2310.19075, Sec. 4).

Seeds: each noise comes from its own CPU generator (as the bench draws them), so a bank never depends on its batch
size. Train, validation and test seeds are disjoint ranges far from the bench's seeds (``0 .. N``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._io import atomic_write, load_safetensors, read_json

# seed ranges of the fitting splits (the bench samples seeds 0 .. num_samples - 1)
FIT_SEED_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
REFERENCE_STEPS = 200
BANK_FORMAT = "diffsamplers-trajectory-bank"
BANK_VERSION = 1


def split_seeds(num_train: int, num_val: int, num_test: int = 0) -> dict[str, list[int]]:
    """Disjoint train / validation / test seeds (fixed ranges, so every fit of a model sees the same noises)."""
    counts = dict(train=num_train, val=num_val, test=num_test)
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n >= 1_000_000:
            raise ValueError(f"num_{name} must be an integer in [0, 1e6), got {n!r}")
    return {name: list(range(FIT_SEED_BASE[name], FIT_SEED_BASE[name] + n)) for name, n in counts.items()}


def check_disjoint(fit_seeds: list[int], other_seeds: list[int], name: str = "seeds") -> None:
    """Refuse fitting seeds that overlap the seeds a solver is evaluated on."""
    common = set(fit_seeds) & set(other_seeds)
    if common:
        raise ValueError(f"{name}: fitting and evaluation seeds overlap ({sorted(common)[:5]} ...); use disjoint "
                         "seeds")


def initial_noise(seeds: list[int], shape: tuple) -> torch.Tensor:
    """One float32 CPU generator per seed (as the bench draws its noise), returned in float64."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).double()


def module_hash(module: Any) -> str:
    """sha256 over a module's state-dict tensors (names, shapes and bytes): identifies the weights fitted to."""
    h = hashlib.sha256()
    state = module.state_dict() if hasattr(module, "state_dict") else {}
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class FitModel:
    """The model a solver is fitted to.

    Args:
        denoiser: called as ``denoiser(x, t, **call_kwargs).sample`` (a diffusers ``UNet2DModel`` or the testbed).
        scheduler_config (`dict`): the model's diffusers scheduler config (spacing ``"trailing"``: runs start at the
            noisiest training timestep).
        sample_shape (`tuple`): ``(C, H, W)`` of one latent.
        name (`str`): the model id recorded in the provenance.
        exact (`GaussianMixtureModel`, *optional*): the testbed: reference finals come from its exact solution.
        guidance_scale (`float`, *optional*): the CFG scale baked into ``denoiser`` (recorded and checked).
        call_kwargs (`dict`): extra model inputs.
        device: where the model runs.
        dtype (`torch.dtype`, *optional*): the dtype inputs are given in (default: the denoiser's; the testbed
            takes float64).
    """

    denoiser: Any
    scheduler_config: dict
    sample_shape: tuple
    name: str
    exact: Any = None
    guidance_scale: float | None = None
    call_kwargs: dict = field(default_factory=dict)
    device: Any = "cpu"
    dtype: torch.dtype | None = None
    _hash: str | None = None

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = module_hash(self.denoiser)
        return self._hash

    @property
    def prediction_type(self) -> str:
        family = self.scheduler_config.get("_class_name", "")
        if str(family).startswith("FlowMatch"):
            return "flow_prediction"
        return self.scheduler_config.get("prediction_type", "epsilon")

    def __call__(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """The model output at ``(x, t)`` in float64 (no gradients)."""
        with torch.no_grad():
            dtype = self.dtype or getattr(self.denoiser, "dtype", torch.float32)
            out = self.denoiser(x.to(self.device, dtype), t, **self.call_kwargs).sample
        return out.detach().double().cpu()

    def provenance(self, **extra: Any) -> dict:
        """What every fitted scheduler records about the model it was fitted to."""
        return dict(
            model=self.name, model_hash=self.model_hash, resolution=list(self.sample_shape[-2:]),
            guidance_scale=self.guidance_scale, prediction_type=self.prediction_type, **extra,
        )


def sample_loop(scheduler: Any, model: Callable, x_T: torch.Tensor, steps: int | None = None, **set_kwargs: Any):
    """A plain diffusers loop with ``model(x, t) -> output``; returns the final sample in float64."""
    scheduler.set_timesteps(steps, **set_kwargs)
    x = x_T * float(scheduler.init_noise_sigma)
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out.to(x.dtype), t, x).prev_sample
    return x.double()


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square difference over all elements (the bench's ``rmse_vs_gt``)."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@dataclass
class TrajectoryBank:
    """Reference trajectories of one model from fixed seeds.

    Attributes:
        seeds (`list[int]`): the seed of each row.
        timesteps (`torch.Tensor` of shape `(R,)`): the reference grid (diffusers timesteps, decreasing).
        states (`torch.Tensor` of shape `(N, R, C, H, W)`): the reference's inputs at each timestep
            (``states[:, 0]`` is ``x_T``).
        outputs (`torch.Tensor` of shape `(N, R, C, H, W)`): the model outputs there.
        final (`torch.Tensor` of shape `(N, C, H, W)`): the reference solution (exact on the testbed).
        info (`dict`): provenance: reference solver and steps, model id/hash, config.
    """

    seeds: list[int]
    timesteps: torch.Tensor
    states: torch.Tensor
    outputs: torch.Tensor
    final: torch.Tensor
    info: dict

    @property
    def x_T(self) -> torch.Tensor:
        return self.states[:, 0]

    def __len__(self) -> int:
        return len(self.seeds)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save

        tensors = dict(timesteps=self.timesteps, states=self.states, outputs=self.outputs, final=self.final,
                       seeds=torch.tensor(self.seeds, dtype=torch.int64))
        meta = dict(format=BANK_FORMAT, version=str(BANK_VERSION), info=json.dumps(self.info, sort_keys=True))
        atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrajectoryBank":
        tensors, meta, _ = load_safetensors(path)
        if meta.get("format") != BANK_FORMAT or meta.get("version") != str(BANK_VERSION):
            raise ValueError(f"{path} is not a {BANK_FORMAT} v{BANK_VERSION} file (metadata {meta})")
        missing = {"timesteps", "states", "outputs", "final", "seeds"} - set(tensors)
        if missing:
            raise ValueError(f"{path} lacks tensors {sorted(missing)}")
        return cls(tensors["seeds"].tolist(), tensors["timesteps"], tensors["states"], tensors["outputs"],
                   tensors["final"], json.loads(meta["info"]))


def _reference_scheduler(config: dict):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


def record_trajectories(model: Callable, scheduler: Any, x_T: torch.Tensor, steps: int):
    """Run ``scheduler`` for ``steps`` from ``x_T`` recording ``(timesteps, states, outputs, final)``."""
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    states, outputs = [], []
    for t in scheduler.timesteps:
        out = model(x, t)
        states.append(x.clone())
        outputs.append(out)
        x = scheduler.step(out, t, x).prev_sample.double()
    return scheduler.timesteps.double(), torch.stack(states, 1), torch.stack(outputs, 1), x


def bank_key(model: FitModel, seeds: list[int], reference_steps: int) -> dict:
    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    seeds_hash = hashlib.sha256(json.dumps([int(s) for s in seeds]).encode()).hexdigest()[:16]
    return dict(model=model.name, model_hash=model.model_hash, config=config, shape=list(model.sample_shape),
                guidance_scale=model.guidance_scale, seeds=seeds_hash,
                reference="exact" if model.exact is not None else "dpmpp2m", reference_steps=reference_steps)


def build_bank(
    model: FitModel,
    seeds: list[int],
    *,
    reference_steps: int = REFERENCE_STEPS,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> TrajectoryBank:
    """Reference trajectories for ``seeds``: DPM-Solver++(2M) at ``reference_steps`` (>= 200) records the path;
    the final is the exact solution on the testbed (``model.exact``), else the DPM-Solver++ final.

    With ``cache_dir`` the bank is cached under a key of the model (id, weights hash, config, shape, guidance) and
    settings, and built in chunks that are saved as they finish: an interrupted build resumes where it stopped.
    """
    if not seeds:
        raise ValueError("seeds must not be empty")
    if reference_steps < 200 and model.exact is None:
        raise ValueError(f"reference_steps must be >= 200 for a model reference (got {reference_steps})")
    key = bank_key(model, seeds, reference_steps)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    final_path = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        final_path = Path(cache_dir) / f"bank-{digest}.safetensors"
        if final_path.exists():
            bank = TrajectoryBank.load(final_path)
            if bank.seeds == list(seeds) and bank.info.get("key") == key:
                return bank
    chunks = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"reference trajectories ({len(seeds)} seeds)")
    parts = []
    for k, chunk in enumerate(chunks):
        part_path = None if final_path is None else final_path.with_name(f"bank-{digest}.part{k}.safetensors")
        if part_path is not None and part_path.exists():
            parts.append(TrajectoryBank.load(part_path))
            continue
        x_T = initial_noise(chunk, model.sample_shape)
        ts, states, outputs, final = record_trajectories(
            model, _reference_scheduler(model.scheduler_config), x_T, reference_steps
        )
        if model.exact is not None:
            from ..models import exact_solution

            final = exact_solution(model.exact, x_T, float(ts[0]))
        part = TrajectoryBank(list(chunk), ts, states, outputs, final, {})
        if part_path is not None:
            part.save(part_path)
        parts.append(part)
    info = dict(key=key, reference=key["reference"], reference_solver="DPMSolverMultistepScheduler(dpmsolver++, 2M)",
                reference_steps=reference_steps)
    bank = TrajectoryBank(
        list(seeds), parts[0].timesteps, torch.cat([p.states for p in parts]), torch.cat([p.outputs for p in parts]),
        torch.cat([p.final for p in parts]), info,
    )
    if final_path is not None:
        bank.save(final_path)
        for k in range(len(parts)):
            final_path.with_name(f"bank-{digest}.part{k}.safetensors").unlink(missing_ok=True)
    return bank


def increasing_times(theta: Any, tau0: list[float]) -> list[float]:
    """Increasing times with the ends of ``tau0``, from log-multipliers ``theta`` of its gaps (normalised cumulative
    gaps: monotone with fixed ends by construction, the parametrisation learned solvers search their times in)."""
    gaps = np.diff(tau0) * np.exp(np.asarray(theta, dtype=np.float64))
    t = tau0[0] + (tau0[-1] - tau0[0]) * np.concatenate([[0.0], np.cumsum(gaps) / gaps.sum()])
    t[-1] = tau0[-1]
    return t.tolist()


def reference_states(bank: TrajectoryBank, config: dict, tau: Any, prediction_type: str) -> torch.Tensor:
    """The bank's reference trajectories at OT times ``tau`` in OT coordinates, shape ``(N, len(tau), C, H, W)``.

    OT coordinates (Shaul et al., arXiv 2310.19075, Sec. 2.4 / Thm 2.3): ``tau = alpha / (alpha + sigma)`` and
    ``y = x / (alpha + sigma)``, where ``dy / dtau = x0_hat - eps_hat`` is bounded for every model type. Between two
    recorded points the path is the cubic Hermite interpolant of ``y`` and that velocity (the dense output Bespoke's
    paper suggests for a cached bank, Sec. 4); on the last interval, which ends at the clean final with no model call
    there, the quadratic through both ends with the start's velocity. Exact at the recorded points.
    """
    from ..schedule import NoiseSchedule, to_x0_eps

    tau = torch.as_tensor(tau, dtype=torch.float64).reshape(-1)
    alpha, sigma = NoiseSchedule.from_config(config).alpha_sigma(bank.timesteps.double())
    nodes = alpha / (alpha + sigma)
    shape = (-1,) + (1,) * (bank.states.dim() - 2)
    scale = (alpha + sigma).reshape(1, *shape)
    x0, eps = to_x0_eps(bank.outputs.double(), bank.states.double(), alpha.reshape(1, *shape),
                        sigma.reshape(1, *shape), prediction_type)
    y, u = bank.states.double() / scale, x0 - eps
    # the clean end: tau = 1 (alpha = 1, sigma = 0) where the reference final lives
    nodes = torch.cat([nodes, torch.ones(1, dtype=torch.float64)])
    y = torch.cat([y, bank.final.double()[:, None]], 1)
    if float(tau.min()) < float(nodes[0]) - 1e-9 or float(tau.max()) > 1.0 + 1e-12:
        raise ValueError(f"tau must lie in the bank's range [{float(nodes[0]):.6g}, 1], got "
                         f"[{float(tau.min()):.6g}, {float(tau.max()):.6g}]")
    last = len(nodes) - 2
    k = (torch.searchsorted(nodes, tau.contiguous(), right=True) - 1).clamp(0, last)
    out = []
    for j, kj in enumerate(k.tolist()):
        t0, t1 = float(nodes[kj]), float(nodes[kj + 1])
        width, d = t1 - t0, float(tau[j]) - t0
        y0, y1, u0 = y[:, kj], y[:, kj + 1], u[:, kj]
        if kj == last:
            out.append(y0 + u0 * d + (y1 - y0 - u0 * width) * (d / width) ** 2)
            continue
        u1, s = u[:, kj + 1], d / width
        h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
        out.append(h00 * y0 + h10 * width * u0 + h01 * y1 + h11 * width * u1)
    return torch.stack(out, 1)


def evaluate(scheduler: Any, model: Callable, bank: TrajectoryBank, steps: int | None = None, **kw: Any) -> float:
    """RMSE of a scheduler's samples from the bank's noises against the bank's reference finals."""
    return rmse(sample_loop(scheduler, model, bank.x_T, steps, **kw), bank.final)


def validated_search(
    train_score: Callable[[np.ndarray], float],
    val_score: Callable[[np.ndarray], float],
    theta0: np.ndarray,
    *,
    iterations: int,
    simplex_step: float,
    val_every: int = 10,
    checkpoint: str | os.PathLike | None = None,
    key: dict | None = None,
    progress: bool = True,
    desc: str = "fit",
) -> dict:
    """Derivative-free fit shared by the learned grids and Bespoke: Nelder-Mead on ``train_score`` from ``theta0``,
    keeping the iterate with the lowest ``val_score`` (checked every ``val_every`` iterations and at the end).

    With ``checkpoint`` (a JSON file) the best iterate is saved as it improves, tagged with ``key``; a checkpoint
    with the same ``key`` resumes: the search restarts from its best iterate for the iterations left. Returns
    ``dict(best_theta, best_val, init_val, iteration)``.
    """
    from scipy.optimize import minimize

    key = dict(key or {})
    init_val = val_score(theta0)
    state = dict(best_theta=np.asarray(theta0).tolist(), best_val=init_val, iteration=0, init_val=init_val)
    if checkpoint is not None and Path(checkpoint).exists():
        saved = read_json(checkpoint)
        if all(saved.get(k) == v for k, v in key.items()):
            state.update({k: saved[k] for k in ("best_theta", "best_val", "iteration", "init_val")})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=min(state["iteration"], iterations), desc=desc)

    def keep_if_better(theta: np.ndarray) -> None:
        value = val_score(theta)
        if value < state["best_val"]:
            state["best_val"], state["best_theta"] = value, np.asarray(theta).tolist()

    def save_checkpoint() -> None:
        if checkpoint is not None:
            atomic_write(checkpoint, json.dumps(dict(state, **key)).encode())

    def callback(theta: np.ndarray) -> None:
        state["iteration"] += 1
        if bar is not None:
            bar.update(1)
        if state["iteration"] % val_every == 0:
            keep_if_better(theta)
            if bar is not None:
                bar.set_postfix(val_rmse=f"{state['best_val']:.4g}")
            save_checkpoint()

    remaining = iterations - state["iteration"]
    if remaining > 0:
        x0 = np.asarray(state["best_theta"], dtype=np.float64)
        simplex = np.vstack([x0] + [x0 + simplex_step * row for row in np.eye(len(x0))])
        result = minimize(train_score, x0, method="Nelder-Mead", callback=callback,
                          options=dict(maxiter=remaining, initial_simplex=simplex))
        keep_if_better(result.x)
        # the budget is spent (Nelder-Mead may stop early or count one iteration fewer than its callback calls)
        state["iteration"] = max(state["iteration"], iterations)
        save_checkpoint()
    if bar is not None:
        bar.close()
    return state
