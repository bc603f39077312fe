"""Linear-path flow matching: time sampling, the velocity loss, CFG, conversions and samplers.

Convention (used everywhere in this package): t in [0, 1], **t = 1 is data, t = 0 is noise**::

    x_t = t * x1 + (1 - t) * eps,          x1 ~ data, eps ~ N(0, I)
    v   = x1 - eps                          (velocity target; the network predicts E[v | x_t])
    x1_hat  = x_t + (1 - t) * v             (data / x0-prediction)
    eps_hat = x_t - t * v                   (noise prediction)
    score   = -eps_hat / (1 - t) = (t * v - x_t) / (1 - t)      (grad log p_t(x_t))

Time shift (SD3 / LightningDiT): the noise level ``sigma = 1 - t`` is mapped to
``shift * sigma / (1 + (shift - 1) * sigma)``, i.e. ``t' = t / (t + shift * (1 - t))``;
``shift > 1`` moves times toward noise, ``shift = 1`` is the identity, 0 and 1 are fixed points.

Precision: t, the noise and all path arithmetic (interpolation, targets, conversions, guidance,
sampler updates) are fp32 whatever the autocast state; only the network call runs under the
caller's autocast. Functions here are pure: randomness comes from an optional
``torch.Generator`` or the global RNG.

Samplers run under ``torch.no_grad()``.

Callables: ``model_fn(x, t, y) -> v`` (a class-conditional velocity network such as
``nets.dit.DiT``) and ``velocity_fn(x, t) -> v`` (what the samplers integrate), where ``x`` is
(N, ...), ``t`` is (N,) fp32 and ``v`` has the shape of ``x``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from tqdm import tqdm

__all__ = [
    "ModelFn",
    "VelocityFn",
    "cfg_velocity",
    "euler_maruyama_sample",
    "euler_sample",
    "gaussian_score",
    "gaussian_velocity",
    "heun_sample",
    "interpolate",
    "sample_t",
    "score_to_velocity",
    "shift_time",
    "timesteps",
    "velocity_loss",
    "velocity_to_eps",
    "velocity_to_score",
    "velocity_to_x1",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TimeDist = Literal["uniform", "logit_normal"]
Diffusion = Literal["sigma", "sbdm", "constant"]


def _batch_t(t: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    """Scalar or (n,) time -> (n,) fp32 on ``device``."""
    t = torch.as_tensor(t, device=device).float()
    if t.ndim == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t must be a scalar or have shape ({n},), got {tuple(t.shape)}")
    return t


def _like(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Time as fp32 shaped (N, 1, ..., 1) to broadcast over the non-batch dims of ``x``."""
    t = _batch_t(t, x.shape[0], x.device)
    return t.view(-1, *([1] * (x.ndim - 1)))


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """``t / (t + shift * (1 - t))`` in fp32 (see the module docstring); ``shift > 0``."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.as_tensor(t).float()
    if shift == 1.0:
        return t
    return t / (t + shift * (1.0 - t))


def timesteps(
    steps: int, shift: float = 1.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Sampling grid (steps + 1,) fp32 from 0 (noise) to 1 (data): ``shift_time(k / steps)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, device=device), shift)


def sample_t(
    n: int,
    device: torch.device | str | None = None,
    dist: TimeDist = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times, (n,) fp32 (never the autocast dtype).

    ``u ~ U(0, 1)`` (``dist="uniform"``) or ``u = sigmoid(mean + std * N(0, 1))``
    (``"logit_normal"``); then ``t = shift_time(t_min + (t_max - t_min) * u, shift)``.
    """
    if dist not in ("uniform", "logit_normal"):
        raise ValueError(f"dist must be 'uniform' or 'logit_normal', got {dist!r}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    kw = {"device": device, "dtype": torch.float32, "generator": generator}
    if dist == "uniform":
        u = torch.rand(n, **kw)
    else:
        u = torch.sigmoid(mean + std * torch.randn(n, **kw))
    return shift_time(t_min + (t_max - t_min) * u, shift)


def interpolate(x1: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """``x_t = t * x1 + (1 - t) * eps`` in fp32; x1, eps (N, ...), t scalar or (N,)."""
    tt = _like(t, x1)
    return tt * x1.float() + (1.0 - tt) * eps.float()


def velocity_to_x1(x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """Data prediction ``x_t + (1 - t) * v`` (fp32)."""
    return x_t.float() + (1.0 - _like(t, x_t)) * v.float()


def velocity_to_eps(x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """Noise prediction ``x_t - t * v`` (fp32)."""
    return x_t.float() - _like(t, x_t) * v.float()


def velocity_to_score(
    x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor, min_sigma: float = 0.0
) -> torch.Tensor:
    """Score ``(t * v - x_t) / (1 - t)`` (fp32). Singular at t = 1; ``1 - t`` is clamped below
    at ``min_sigma`` (default 0: no clamp, t = 1 gives inf)."""
    sigma = (1.0 - _like(t, x_t)).clamp_min(min_sigma)
    return -velocity_to_eps(x_t, t, v) / sigma


def score_to_velocity(
    x_t: torch.Tensor, t: torch.Tensor | float, score: torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`velocity_to_score`: ``v = (x_t + (1 - t) * score) / t`` (fp32).
    Undefined at t = 0, where the score of pure noise carries no information about the data."""
    tt = _like(t, x_t)
    return (x_t.float() + (1.0 - tt) * score.float()) / tt


def gaussian_velocity(
    x: torch.Tensor,
    t: torch.Tensor | float,
    mu: torch.Tensor | float,
    sigma: torch.Tensor | float,
) -> torch.Tensor:
    """Exact velocity ``E[x1 - eps | x_t = x]`` when x1 ~ N(mu, diag(sigma^2)) (fp32).

    With ``s_t^2 = t^2 sigma^2 + (1 - t)^2`` (the variance of x_t), per dimension::

        v(x, t) = mu + (t * sigma^2 - (1 - t)) / s_t^2 * (x - t * mu)

    finite for all t in [0, 1] as long as sigma > 0 or t < 1 (sigma = 0: a point mass, where
    ``v = (mu - x) / (1 - t)``). ``mu`` and ``sigma`` broadcast against ``x.shape[1:]``.
    """
    tt = _like(t, x)
    mu = torch.as_tensor(mu, device=x.device).float()
    var = torch.as_tensor(sigma, device=x.device).float() ** 2
    s2 = tt**2 * var + (1.0 - tt) ** 2
    return mu + (tt * var - (1.0 - tt)) / s2 * (x.float() - tt * mu)


def gaussian_score(
    x: torch.Tensor,
    t: torch.Tensor | float,
    mu: torch.Tensor | float,
    sigma: torch.Tensor | float,
) -> torch.Tensor:
    """Exact score ``-(x - t mu) / (t^2 sigma^2 + (1 - t)^2)`` of p_t for x1 ~ N(mu, sigma^2)."""
    tt = _like(t, x)
    mu = torch.as_tensor(mu, device=x.device).float()
    var = torch.as_tensor(sigma, device=x.device).float() ** 2
    return -(x.float() - tt * mu) / (tt**2 * var + (1.0 - tt) ** 2)


def velocity_loss(
    model_fn: ModelFn,
    x1: torch.Tensor,
    y: Any = None,
    t: torch.Tensor | float | None = None,
    eps: torch.Tensor | None = None,
    *,
    dist: TimeDist = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-matching loss ``mean((model_fn(x_t, t, y) - (x1 - eps))^2)`` in fp32.

    Args:
        model_fn: ``(x_t, t, y) -> v``; x_t is fp32 (N, ...), t (N,) fp32.
        x1: (N, ...) data (any float dtype; used in fp32).
        y: conditioning passed through to ``model_fn`` (labels or None).
        t: scalar or (N,) times; drawn by :func:`sample_t` with the keyword options if None.
        eps: (N, ...) noise; standard normal fp32 (from ``generator``) if None.

    Returns:
        ``(loss, info)``: the scalar fp32 loss (mean over all elements) and detached tensors
        ``t`` (N,), ``eps``, ``x_t``, ``target`` (N, ...) and ``per_sample_loss`` (N,).
    """
    n, device = x1.shape[0], x1.device
    if t is None:
        t = sample_t(n, device, dist, mean, std, shift, t_min, t_max, generator)
    t = _batch_t(t, n, device)
    if eps is None:
        eps = torch.randn(x1.shape, device=device, dtype=torch.float32, generator=generator)
    eps = eps.float()
    x_t = interpolate(x1, eps, t)
    target = x1.float() - eps
    pred = model_fn(x_t, t, y)
    if pred.shape != x1.shape:
        raise ValueError(f"model output {tuple(pred.shape)} != data shape {tuple(x1.shape)}")
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
    info = {"t": t, "eps": eps, "x_t": x_t, "target": target, "per_sample_loss": per_sample}
    return per_sample.mean(), {k: v.detach() for k, v in info.items()}


def cfg_velocity(
    model_fn: ModelFn,
    x: torch.Tensor,
    t: torch.Tensor | float,
    y: torch.Tensor,
    scale: float,
    null_class: int,
    interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Classifier-free guided velocity ``v_null + scale * (v_cond - v_null)`` (fp32).

    Cond and null run in ONE ``model_fn`` call on ``cat([x, x])``, ``cat([t, t])``,
    ``cat([y, null_class])`` (``model_fn`` must not drop labels at random itself; see
    ``DiT.forward_with_cfg``). ``scale == 1`` makes a single conditional call.
    ``interval=(lo, hi)``: guidance only for samples with lo <= t <= hi, else ``v_cond``.
    Shapes: x (N, ...), t scalar or (N,), y (N,) -> (N, ...).
    """
    n = x.shape[0]
    t = _batch_t(t, n, x.device)
    if scale == 1.0:
        return model_fn(x, t, y).float()
    y_null = torch.full_like(y, null_class)
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float()
    cond, null = out[:n], out[n:]
    guided = null + scale * (cond - null)
    if interval is not None:
        lo, hi = interval
        inside = ((t >= lo) & (t <= hi)).view(-1, *([1] * (x.ndim - 1)))
        guided = torch.where(inside, guided, cond)
    return guided


def _steps(n: int, progress: bool, desc: str) -> Any:
    return tqdm(range(n), desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Euler ODE from noise (t = 0) to data (t = 1) on :func:`timesteps` (``steps`` NFE).

    Returns the fp32 sample with the shape of ``noise`` (N, ...).
    """
    grid = timesteps(steps, shift, noise.device)
    x = noise.float()
    for k in _steps(steps, progress, "euler"):
        t = grid[k].expand(x.shape[0])
        x = x + (grid[k + 1] - grid[k]) * velocity_fn(x, t).float()
    return x


@torch.no_grad()
def heun_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Heun (trapezoidal predictor-corrector) ODE from t = 0 to t = 1; ``2 * steps`` NFE.

    The velocity is finite at t = 1 in this convention, so the last step is corrected too.
    Returns the fp32 sample with the shape of ``noise``.
    """
    grid = timesteps(steps, shift, noise.device)
    x = noise.float()
    n = x.shape[0]
    for k in _steps(steps, progress, "heun"):
        dt = grid[k + 1] - grid[k]
        v0 = velocity_fn(x, grid[k].expand(n)).float()
        x_pred = x + dt * v0
        v1 = velocity_fn(x_pred, grid[k + 1].expand(n)).float()
        x = x + 0.5 * dt * (v0 + v1)
    return x


def _diffusion(t: torch.Tensor, form: str, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w(t), w(t) / (2 (1 - t)))`` for the SDE ``dx = [v - w/(2(1-t)) eps_hat] dt + sqrt(w) dW``."""
    if form == "sigma":
        return 2.0 * norm * (1.0 - t), torch.full_like(t, norm)
    if form == "sbdm":
        return 2.0 * norm * (1.0 - t) / t, norm / t
    if form == "constant":
        return torch.full_like(t, 2.0 * norm), norm / (1.0 - t)
    raise ValueError(f"diffusion must be 'sigma', 'sbdm' or 'constant', got {form!r}")


@torch.no_grad()
def euler_maruyama_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    diffusion: Diffusion = "sigma",
    diffusion_norm: float = 1.0,
    last_step_mean: bool = True,
    last_step_size: float | None = None,
    t_start: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Euler-Maruyama, forward in t (noise -> data), for an SDE whose marginals are the p_t of
    the path::

        dx = [v(x, t) + 0.5 * w(t) * score(x, t)] dt + sqrt(w(t)) dW
           = [v - w(t) / (2 (1 - t)) * eps_hat] dt + sqrt(w(t)) dW,   eps_hat = x - t v

    integrated forward from t_start (noise) to 1 (data). Diffusion ``w(t)`` (``n`` =
    ``diffusion_norm``):

    * ``"sigma"`` (default; the public DMVAE gFID sampler): ``w = 2 n (1 - t)``; the drift is
      ``v - n * eps_hat``, finite on all of [0, 1];
    * ``"sbdm"`` (SiT default): ``w = 2 n (1 - t) / t``, singular at t = 0, so ``t_start``
      defaults to 1e-3 (the noise is taken as x at t_start);
    * ``"constant"``: ``w = 2 n``, the drift is singular at t = 1 (the last step stops short).

    Grid: ``steps`` points ``linspace(t_start, 1 - last_step_size, steps)`` followed by 1, all
    passed through :func:`shift_time`; ``last_step_size`` defaults to ``1 / steps`` (a uniform
    grid). ``steps - 1`` stochastic steps are followed by one final step to t = 1 that takes the
    mean (drift only, no noise) when ``last_step_mean`` (public: "Mean", with 250 steps and
    ``last_step_size=0.04``). NFE = ``steps``. Returns the fp32 sample shaped like ``noise``.
    """
    if steps < 2:
        raise ValueError(f"euler_maruyama_sample needs steps >= 2, got {steps}")
    if t_start is None:
        t_start = 1e-3 if diffusion == "sbdm" else 0.0
    if diffusion == "sbdm" and t_start <= 0:
        raise ValueError("diffusion='sbdm' is singular at t=0: pass t_start > 0")
    last = 1.0 / steps if last_step_size is None else last_step_size
    if not 0.0 < last < 1.0 - t_start:
        raise ValueError(f"last_step_size must be in (0, 1 - t_start), got {last}")
    device = noise.device
    grid = torch.linspace(t_start, 1.0 - last, steps, device=device)
    grid = shift_time(torch.cat([grid, torch.ones(1, device=device)]), shift)
    x = noise.float()
    n = x.shape[0]
    for k in _steps(steps, progress, "euler-maruyama"):
        t = grid[k].expand(n)
        dt = grid[k + 1] - grid[k]
        v = velocity_fn(x, t).float()
        w, lam = _diffusion(grid[k], diffusion, diffusion_norm)
        x = x + dt * (v - lam * (x - grid[k] * v))
        if k < steps - 1 or not last_step_mean:
            dw = torch.randn(x.shape, device=device, dtype=torch.float32, generator=generator)
            x = x + torch.sqrt(w * dt) * dw
    return x
