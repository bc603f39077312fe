"""Flow matching checked against closed forms of the linear path with a Gaussian target.

For x1 ~ N(mu, diag(sigma^2)) the probability-flow ODE maps the noise z exactly to
mu + sigma * z (x_t = t mu + s_t z with s_t^2 = t^2 sigma^2 + (1 - t)^2), so ODE samplers can be
checked per sample; SDE samplers are checked on the mean and std of 20k samples.
"""

from __future__ import annotations

import math

import pytest
import torch

from dmvae_lightning import flow

MU = torch.tensor([1.5, -0.5])
SIGMA = torch.tensor([0.5, 2.0])
N = 20_000


def _gaussian_vf(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
    return flow.gaussian_velocity(x, t, MU, SIGMA)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The samplers run thousands of tiny element-wise ops; on a shared 2-core machine OpenMP
    threads waiting for each other make them 10-100x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return torch.randn(N, 2, generator=torch.Generator().manual_seed(0))


def _assert_moments(x: torch.Tensor, bias: float = 0.0) -> None:
    """Mean within 4 standard errors; std within 4 standard errors plus ``bias`` (relative)."""
    se_mean = SIGMA / math.sqrt(N)
    se_std = SIGMA / math.sqrt(2 * N)
    assert ((x.mean(0) - MU).abs() < 4 * se_mean).all(), x.mean(0)
    assert ((x.std(0) - SIGMA).abs() < 4 * se_std + bias * SIGMA).all(), x.std(0)


# ----------------------------------------------------------------------------- time sampling


def test_shift_formula():
    t = torch.linspace(0, 1, 11)
    s = 3.0
    public = 1 - s * (1 - t) / (1 + (s - 1) * (1 - t))  # noise-level form sigma' = s sigma / ...
    torch.testing.assert_close(flow.shift_time(t, s), public)
    assert flow.shift_time(0.5, 3.0).item() == pytest.approx(0.25)
    assert torch.equal(flow.shift_time(t, 1.0), t)
    assert (flow.shift_time(t, 3.0) <= t).all()  # shift > 1 moves toward noise (t = 0)
    assert flow.shift_time(torch.tensor([0.0, 1.0]), 5.0).tolist() == [0.0, 1.0]
    grid = flow.timesteps(4, shift=3.0)
    torch.testing.assert_close(grid, flow.shift_time(torch.tensor([0, 0.25, 0.5, 0.75, 1]), 3.0))


def test_sample_t_fp32_under_autocast_and_many_distinct_values():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dist in ("uniform", "logit_normal"):
            t = flow.sample_t(N, "cpu", dist, generator=torch.Generator().manual_seed(0))
            assert t.dtype == torch.float32 and t.shape == (N,)
            assert t.unique().numel() > 10_000
            assert (t >= 0).all() and (t <= 1).all()


def test_sample_t_shift_range_and_logit_normal_moments():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    base = flow.sample_t(N, generator=gen())
    ranged = flow.sample_t(N, t_min=0.2, t_max=0.6, generator=gen())
    torch.testing.assert_close(ranged, 0.2 + 0.4 * base)
    shifted = flow.sample_t(N, shift=2.0, t_min=0.2, t_max=0.6, generator=gen())
    torch.testing.assert_close(shifted, ranged / (ranged + 2.0 * (1 - ranged)))
    t = flow.sample_t(N, dist="logit_normal", mean=-0.5, std=0.8, generator=gen())
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(-0.5, abs=4 * 0.8 / math.sqrt(N))
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)
    with pytest.raises(ValueError, match="dist"):
        flow.sample_t(4, dist="beta")
    with pytest.raises(ValueError, match="t_min"):
        flow.sample_t(4, t_min=0.7, t_max=0.3)


# ----------------------------------------------------------------------------- path algebra


def test_interpolate_fp32_and_endpoints():
    x1 = torch.randn(4, 3, 2, 2).bfloat16()
    eps = torch.randn(4, 3, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xt = flow.interpolate(x1, eps, torch.tensor([0.0, 1.0, 0.25, 0.5]))
    assert xt.dtype == torch.float32
    torch.testing.assert_close(xt[0], eps[0])
    torch.testing.assert_close(xt[1], x1[1].float())
    torch.testing.assert_close(xt[2], 0.25 * x1[2].float() + 0.75 * eps[2])


def test_gaussian_velocity_is_the_derivative_of_the_exact_flow_map():
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    t = torch.rand(64, generator=torch.Generator().manual_seed(2)).double() * 0.98 + 0.01
    mu, sig = MU.double(), SIGMA.double()

    def path(tt: torch.Tensor) -> torch.Tensor:
        tt = tt[:, None]
        return tt * mu + torch.sqrt(tt**2 * sig**2 + (1 - tt) ** 2) * z.double()

    h = 1e-6
    numeric = (path(t + h) - path(t - h)) / (2 * h)
    torch.testing.assert_close(
        flow.gaussian_velocity(path(t), t, MU, SIGMA).double(), numeric, rtol=1e-4, atol=1e-4
    )
    # Finite at both ends: t = 0 (pure noise) and t = 1 (data).
    ends = flow.gaussian_velocity(z, torch.tensor([0.0, 1.0]).repeat(32), MU, SIGMA)
    assert torch.isfinite(ends).all()


def test_conversions_match_the_gaussian_posterior_and_score():
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(4)) * 2
    t = torch.rand(256, generator=torch.Generator().manual_seed(5)) * 0.9 + 0.05
    v = flow.gaussian_velocity(x, t, MU, SIGMA)
    tt = t[:, None]
    s2 = tt**2 * SIGMA**2 + (1 - tt) ** 2
    centred = x - tt * MU
    torch.testing.assert_close(flow.velocity_to_x1(x, t, v), MU + tt * SIGMA**2 / s2 * centred)
    torch.testing.assert_close(flow.velocity_to_eps(x, t, v), (1 - tt) / s2 * centred)
    score = flow.velocity_to_score(x, t, v)
    torch.testing.assert_close(score, -centred / s2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score, flow.gaussian_score(x, t, MU, SIGMA), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flow.score_to_velocity(x, t, score), v, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- loss


def test_velocity_loss_zero_for_exact_model_on_point_mass():
    c = torch.tensor([0.7, -1.2, 3.0]).view(1, 3, 1, 1)
    x1 = c.expand(512, 3, 1, 1)
    calls = []

    def exact(x_t: torch.Tensor, t: torch.Tensor, y: object) -> torch.Tensor:
        calls.append((x_t.dtype, t.dtype, y))
        return flow.gaussian_velocity(x_t, t, c[0], 0.0)  # point mass: (c - x) / (1 - t)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, info = flow.velocity_loss(
            exact, x1, "label", t_max=0.99, generator=torch.Generator().manual_seed(0)
        )
    assert loss.dtype == torch.float32 and loss.item() < 1e-8
    assert calls == [(torch.float32, torch.float32, "label")]
    assert info["per_sample_loss"].shape == (512,) and info["t"].max() <= 0.99
    wrong, _ = flow.velocity_loss(lambda x, t, y: torch.zeros_like(x), x1, t_max=0.99)
    assert wrong.item() > 1.0


def test_velocity_loss_of_exact_gaussian_model_is_the_conditional_variance():
    """At fixed t the minimum loss is Var(x1 - eps | x_t) = sigma^2 + 1 - (t sigma^2 - 1 + t)^2 / s_t^2
    per dimension (averaged over dimensions)."""
    gen = torch.Generator().manual_seed(6)
    x1 = MU + SIGMA * torch.randn(N, 2, generator=gen)
    t = 0.3
    loss, info = flow.velocity_loss(
        lambda x, tt, y: flow.gaussian_velocity(x, tt, MU, SIGMA), x1, t=t, generator=gen
    )
    s2 = t**2 * SIGMA**2 + (1 - t) ** 2
    expected = (SIGMA**2 + 1 - (t * SIGMA**2 - (1 - t)) ** 2 / s2).mean().item()
    assert loss.item() == pytest.approx(expected, rel=0.03)
    torch.testing.assert_close(info["target"], x1 - info["eps"])


# ----------------------------------------------------------------------------- guidance


def _counting_model():
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * (1 + y.view(-1, 1).float()) + t.view(-1, 1)  # depends on x, t and y

    return model, calls


def test_cfg_batched_equals_separate_calls():
    model, calls = _counting_model()
    x = torch.randn(4, 3)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    y = torch.tensor([0, 1, 2, 3])
    guided = flow.cfg_velocity(model, x, t, y, 4.0, null_class=7)
    assert calls == [8]  # one forward on the stacked cond + null batch
    cond, null = model(x, t, y), model(x, t, torch.full_like(y, 7))
    torch.testing.assert_close(guided, null + 4.0 * (cond - null))
    calls.clear()
    torch.testing.assert_close(flow.cfg_velocity(model, x, t, y, 1.0, 7), cond)
    assert calls == [4]  # scale 1: no null pass


def test_cfg_interval_guides_only_inside():
    model, _ = _counting_model()
    x = torch.randn(4, 3)
    t = torch.tensor([0.1, 0.3, 0.7, 0.9])
    y = torch.tensor([0, 1, 2, 3])
    guided = flow.cfg_velocity(model, x, t, y, 3.0, 7, interval=(0.3, 0.7))
    cond, null = model(x, t, y), model(x, t, torch.full_like(y, 7))
    full = null + 3.0 * (cond - null)
    torch.testing.assert_close(guided[[0, 3]], cond[[0, 3]])
    torch.testing.assert_close(guided[[1, 2]], full[[1, 2]])


# ----------------------------------------------------------------------------- samplers


def test_euler_200_steps_follows_the_exact_flow_map(noise):
    exact = MU + SIGMA * noise
    x = flow.euler_sample(_gaussian_vf, noise, 200)
    err = (x - exact).abs().max().item()
    assert err < 0.1
    err2 = (flow.euler_sample(_gaussian_vf, noise, 400) - exact).abs().max().item()
    assert 1.7 < err / err2 < 2.3  # first order
    torch.testing.assert_close(x.mean(0), exact.mean(0), rtol=0, atol=0.01)
    torch.testing.assert_close(x.std(0), exact.std(0), rtol=0.01, atol=0)
    _assert_moments(x, bias=0.01)


def test_heun_50_steps_follows_the_exact_flow_map(noise):
    exact = MU + SIGMA * noise
    x = flow.heun_sample(_gaussian_vf, noise, 50, progress=True)
    err = (x - exact).abs().max().item()
    assert err < 5e-3
    err2 = (flow.heun_sample(_gaussian_vf, noise, 100) - exact).abs().max().item()
    assert 3.0 < err / err2 < 5.0  # second order
    _assert_moments(x)
    shifted = flow.heun_sample(_gaussian_vf, noise, 50, shift=3.0)
    assert (shifted - exact).abs().max().item() < 1e-2


@pytest.mark.parametrize(
    ("kwargs", "bias"),
    [
        ({}, 0.0),
        ({"last_step_size": 0.04}, 0.0),  # the public gFID sampler's grid
        ({"shift": 3.0}, 0.0),
        ({"diffusion": "sbdm"}, 0.01),
    ],
)
def test_euler_maruyama_250_steps_reproduces_the_gaussian(noise, kwargs, bias):
    gen = torch.Generator().manual_seed(1)
    x = flow.euler_maruyama_sample(_gaussian_vf, noise, 250, generator=gen, **kwargs)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    _assert_moments(x, bias=bias)
    # Stochastic: not the deterministic ODE map.
    assert (x - (MU + SIGMA * noise)).abs().mean() > 0.05


def test_euler_maruyama_without_diffusion_is_euler(noise):
    ode = flow.euler_sample(_gaussian_vf, noise[:100], 20)
    sde = flow.euler_maruyama_sample(
        _gaussian_vf, noise[:100], 20, diffusion="constant", diffusion_norm=0.0
    )
    torch.testing.assert_close(sde, ode)


def test_euler_maruyama_last_step_is_the_mean_drift_step(noise):
    """The final step from the last grid point to t = 1 is x + dt * (v - eps_hat) for the
    "sigma" diffusion (w = 2 (1 - t)), with no noise; without last_step_mean it is noisy."""
    seen = []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((x.clone(), t.clone()))
        return _gaussian_vf(x, t)

    out = flow.euler_maruyama_sample(
        recording, noise[:64], 10, last_step_size=0.05, generator=torch.Generator().manual_seed(5)
    )
    assert len(seen) == 10
    torch.testing.assert_close(seen[-1][1], torch.full((64,), 0.95))
    x, t = seen[-1]
    v = _gaussian_vf(x, t)
    eps_hat = x - 0.95 * v
    torch.testing.assert_close(out, x + 0.05 * (v - eps_hat), rtol=0, atol=1e-6)
    noisy = flow.euler_maruyama_sample(
        _gaussian_vf,
        noise[:64],
        10,
        last_step_size=0.05,
        last_step_mean=False,
        generator=torch.Generator().manual_seed(5),
    )
    assert (noisy - out).abs().max() > 1e-2
    with pytest.raises(ValueError, match="sbdm"):
        flow.euler_maruyama_sample(_gaussian_vf, noise[:4], 10, diffusion="sbdm", t_start=0.0)
