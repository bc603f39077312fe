"""Matching losses checked against closed forms, brute force and single-process equivalents.

Gaussian facts used (t = 1 data): for x1 ~ N(mu, sigma^2) the exact velocity and score of the
linear path are :func:`flow.gaussian_velocity` / :func:`flow.gaussian_score`; for the RBF kernel
with bandwidth h and X ~ N(mu_x, s^2 I_d), Y ~ N(mu_y, s^2 I_d),
``E k(X, Y) = (h^2 / (h^2 + 2 s^2))^(d/2) exp(-|mu_x - mu_y|^2 / (2 (h^2 + 2 s^2)))``; projecting
N(0, I_d) and N(m, I_d) on a uniform unit direction theta gives W_2^2 = (theta . m)^2, whose
mean over directions is |m|^2 / d.
"""

from __future__ import annotations

import itertools
import math
import socket

import pytest
import torch
from torch import nn

from dmvae_lightning import flow
from dmvae_lightning.losses.matching import (
    DMDLoss,
    GaussianKLLoss,
    MMDLoss,
    PointwiseAlignmentLoss,
    SlicedWassersteinLoss,
)
from dmvae_lightning.nets.encoders import MLPBottleneck


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GaussianVelocity(nn.Module):
    """Exact velocity of x1 ~ N(mu[y], diag(sigma[y]^2)) per channel; row K of the (K + 1, C)
    tables is the null class. No parameters (buffers only). Records each call's inputs."""

    def __init__(self, mu, sigma) -> None:
        super().__init__()
        mu = torch.as_tensor(mu, dtype=torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if mu.ndim == 1:
            mu, sigma = mu[None], sigma[None]
        self.register_buffer("mu", mu.clone())
        self.register_buffer("sigma", sigma.clone())
        self.num_classes = mu.shape[0] - 1
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def stats(self, y: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (y.shape[0], -1) + (1,) * (ndim - 2)
        return self.mu[y].view(shape), self.sigma[y].view(shape)

    def forward(self, x, t, y):
        self.calls.append((x.detach(), t.detach(), y.detach()))
        mu, sigma = self.stats(y, x.ndim)
        return flow.gaussian_velocity(x, t, mu, sigma)


def _fit(model: GaussianVelocity, z: torch.Tensor) -> None:
    """Refit an unconditional Gaussian model to the per-channel mean / std of z."""
    with torch.no_grad():
        model.mu.copy_(z.mean((0, 2, 3))[None])
        model.sigma.copy_(z.std((0, 2, 3))[None])


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


# ----------------------------------------------------------------------------- MMD


def _rbf_mmd2(d: int, s: float, shift: float, bandwidths) -> float:
    """Closed-form MMD^2 between N(0, s^2 I_d) and N(m, s^2 I_d), |m| = shift, RBF mean."""
    total = 0.0
    for h in bandwidths:
        c = (h * h / (h * h + 2 * s * s)) ** (d / 2)
        total += 2 * c * (1 - math.exp(-(shift**2) / (2 * (h * h + 2 * s * s))))
    return total / len(bandwidths)


def _antithetic(n: int, d: int, shift: float, gen: torch.Generator) -> torch.Tensor:
    """n samples of N(shift * e_1, I_d) as +-pairs around the mean (the sample mean is exact,
    which removes the dominant noise of MMD estimates without changing the distribution)."""
    a = torch.randn(n // 2, d, generator=gen)
    x = torch.cat([a, -a])
    x[:, 0] += shift
    return x


def test_mmd_rbf_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    bw = (1.0, 2.0)
    mmd = MMDLoss(bandwidths=bw, bandwidth_unit="absolute")
    x, y = _antithetic(3000, 4, 0.0, gen), _antithetic(3000, 4, 0.75, gen)
    expected = _rbf_mmd2(4, 1.0, 0.75, bw)  # 0.0303; estimator sd ~1.5 % over seeds
    assert mmd.loss(x, y).item() == pytest.approx(expected, rel=0.06)
    assert abs(mmd.loss(x, _antithetic(3000, 4, 0.0, gen)).item()) < 1e-3
    # linear-time estimator: same expectation, larger variance (sd ~1.6 % here over seeds)
    linear = MMDLoss(bandwidths=bw, bandwidth_unit="absolute", estimator="linear")
    x2, y2 = torch.randn(40_000, 2, generator=gen), torch.randn(40_000, 2, generator=gen)
    y2[:, 0] += 1.5
    assert linear.loss(x2, y2).item() == pytest.approx(_rbf_mmd2(2, 1.0, 1.5, bw), rel=0.06)
    # sqrt_dim bandwidths are the absolute ones times sqrt(D); inputs (B, ...) are flattened
    scaled = MMDLoss(bandwidths=[b / 2 for b in bw])  # D = 4 -> sqrt(D) = 2
    torch.testing.assert_close(scaled.loss(x.view(-1, 2, 2), y.view(-1, 2, 2)), mmd.loss(x, y))


def _brute_mmd2(x, y, k) -> float:
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_kernels_equal_brute_force_and_kid():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen).double()
    y = torch.randn(5, 3, generator=gen).double() + 0.5
    bw = (0.5, 2.0)

    def rbf(a, b):
        return sum(math.exp(-float((a - b).square().sum()) / (2 * h * h)) for h in bw) / 2

    def imq(a, b):
        return sum((1 + float((a - b).square().sum()) / (h * h)) ** -0.5 for h in bw) / 2

    for kernel, k in (("rbf", rbf), ("imq", imq)):
        loss = MMDLoss(kernel=kernel, bandwidths=bw, bandwidth_unit="absolute")
        assert loss.loss(x, y).item() == pytest.approx(_brute_mmd2(x, y, k), abs=1e-6)
        lin = MMDLoss(kernel=kernel, bandwidths=bw, bandwidth_unit="absolute", estimator="linear")
        h = [k(x[0], x[1]) + k(y[0], y[1]) - k(x[0], y[1]) - k(x[1], y[0])]
        h.append(k(x[2], x[3]) + k(y[2], y[3]) - k(x[2], y[3]) - k(x[3], y[2]))
        assert lin.loss(x, y).item() == pytest.approx(sum(h) / 2, abs=1e-6)

    from torchmetrics.image.kid import poly_mmd

    xs, ys = torch.randn(64, 16, generator=gen), torch.randn(64, 16, generator=gen) + 0.3
    torch.testing.assert_close(MMDLoss(kernel="poly").loss(xs, ys), poly_mmd(xs, ys))


def test_mmd_metric_forward_update_compute():
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(32, 4, generator=gen), torch.randn(32, 4, generator=gen) + 1) for _ in "ab"
    ]
    values = [MMDLoss().loss(x, y).item() for x, y in batches]
    metric = MMDLoss()
    x0 = batches[0][0].clone().requires_grad_(True)
    out = metric(x0, batches[0][1])  # forward: differentiable batch value, also accumulated
    assert out.requires_grad and out.dtype == torch.float32
    assert out.item() == pytest.approx(values[0], rel=1e-6)
    out.backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert not metric.total.requires_grad  # the running state is detached
    with torch.no_grad():
        metric.update(*batches[1])
    assert metric.compute().item() == pytest.approx(sum(values) / 2, rel=1e-6)
    metric.reset()
    metric.update(*batches[1])
    assert metric.compute().item() == pytest.approx(values[1], rel=1e-6)
    assert MMDLoss.is_differentiable and not MMDLoss.higher_is_better
    assert not MMDLoss.full_state_update


# ----------------------------------------------------------------------------- SWD


def test_swd_1d_equals_exact_transport():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 1, generator=gen), 2 * torch.randn(6, 1, generator=gen) + 0.5
    for p in (1.0, 2.0, 3.0):
        # W_p^p between equal-weight empirical measures: the best of all 720 matchings
        exact = min(
            sum(abs(float(x[i]) - float(y[j])) ** p for i, j in enumerate(perm)) / 6
            for perm in itertools.permutations(range(6))
        )
        value = SlicedWassersteinLoss(num_projections=5, p=p).loss(x, y)  # theta = +-1 in 1-D
        assert value.item() == pytest.approx(exact, rel=1e-5)


def test_swd_gaussians_closed_form_and_resampling():
    torch.manual_seed(4)
    d = 4
    m = torch.tensor([2.0, 0.0, 0.0, 0.0])
    swd = SlicedWassersteinLoss(num_projections=256)
    # directions are uniform on the sphere: E (theta . m)^2 = |m|^2 / d = 1
    theta = SlicedWassersteinLoss(num_projections=20_000).projections(d, torch.device("cpu"))
    assert theta.norm(dim=0).allclose(torch.ones(20_000))
    assert (m @ theta).square().mean().item() == pytest.approx(1.0, abs=0.03)
    # a shifted copy: every projected transport is the shift theta . m, so SW_2^2 is exact
    x = torch.randn(2048, d)
    shifted = x[torch.randperm(2048)] + m
    torch.manual_seed(40)
    theta = swd.projections(d, torch.device("cpu"))
    torch.manual_seed(40)  # the loss draws the same directions from the same global RNG state
    value = swd.loss(x, shifted)
    assert value.item() == pytest.approx((m @ theta).square().mean().item(), rel=1e-4)
    # independent samples of N(0, I) and N(m, I): W_2^2 = (theta . m)^2 per direction
    x, y, same = torch.randn(8192, d), torch.randn(8192, d) + m, torch.randn(8192, d)
    torch.manual_seed(41)
    value = swd.loss(x, y)
    torch.manual_seed(41)
    expected = (m @ swd.projections(d, torch.device("cpu"))).square().mean()
    assert value.item() == pytest.approx(expected.item(), abs=0.05)
    assert swd.loss(x, same).item() < 0.005
    # 1-D: N(0, 1) vs N(m, 1) has W_2 = |m|, i.e. SW_2^2 = m^2
    assert SlicedWassersteinLoss().loss(x[:, :1], x[:, :1] + 1.5).item() == pytest.approx(2.25)
    # directions are redrawn per call; fixed ones give a deterministic value
    assert swd.loss(x, y).item() != swd.loss(x, y).item()
    fixed = torch.eye(d)[:, :1]
    exact = (torch.sort(x[:, 0]).values - torch.sort(y[:, 0]).values).square().mean()
    torch.testing.assert_close(swd.loss(x, y, projections=fixed), exact)
    with pytest.raises(ValueError, match="equal sample counts"):
        swd.loss(x, y[:-1])


# ----------------------------------------------------------------------------- DMD (Gaussians)

REAL_MU, REAL_SIGMA = [0.0, 1.0], [1.0, 0.5]


def test_dmd_gradient_is_the_score_difference():
    torch.manual_seed(5)
    loss = DMDLoss(GaussianVelocity(REAL_MU, REAL_SIGMA))
    z = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1) + 0.3 * torch.randn(16, 2, 3, 3)
    _fit(loss.fake, z)
    mu_f, sigma_f = loss.fake.stats(torch.zeros(16, dtype=torch.long), 4)
    mu_r, sigma_r = loss.real.stats(torch.zeros(16, dtype=torch.long), 4)

    # one draw: z.grad * numel is the normalised x0 difference, parallel to s_fake - s_real
    z1 = z.clone().requires_grad_(True)
    t = torch.rand(16) * 0.8 + 0.1
    eps = torch.randn_like(z)
    value, _ = loss.loss(z1, t=t, eps=eps)
    value.backward()
    z_t = flow.interpolate(z, eps, t)
    x_f = flow.velocity_to_x1(z_t, t, flow.gaussian_velocity(z_t, t, mu_f, sigma_f))
    x_r = flow.velocity_to_x1(z_t, t, flow.gaussian_velocity(z_t, t, mu_r, sigma_r))
    g = (x_f - x_r) / (z - x_r).abs().mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(z1.grad * z.numel(), g)
    assert value.item() == pytest.approx(0.5 * g.square().mean().item(), rel=1e-5)
    score_diff = flow.gaussian_score(z_t, t, mu_f, sigma_f) - flow.gaussian_score(
        z_t, t, mu_r, sigma_r
    )
    assert _cos(z1.grad, score_diff).min() > 0.99

    # averaged over 512 noise draws at t = 0.5: parallel to E_eps[s_fake - s_real](z_t)
    reps = 512
    zr = z.repeat(reps, 1, 1, 1).requires_grad_(True)
    value, _ = loss.loss(zr, t=0.5)
    value.backward()
    mean_grad = zr.grad.view(reps, *z.shape).mean(0)
    var_f, var_r = 0.25 * sigma_f**2 + 0.25, 0.25 * sigma_r**2 + 0.25
    expected = -(0.5 * z - 0.5 * mu_f) / var_f + (0.5 * z - 0.5 * mu_r) / var_r
    assert _cos(mean_grad, expected).min() > 0.99


def test_dmd_steps_move_latents_onto_the_reference():
    torch.manual_seed(6)
    loss = DMDLoss(GaussianVelocity(REAL_MU, REAL_SIGMA))
    z = (2.0 + 0.3 * torch.randn(256, 2, 2, 2)).requires_grad_(True)
    for _ in range(300):
        _fit(loss.fake, z.detach())
        z.grad = None
        loss(z).backward()
        with torch.no_grad():
            z -= 0.05 * z.grad * z.numel()
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.tensor(REAL_MU), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.tensor(REAL_SIGMA), atol=0.02, rtol=0)
    assert int(loss.num_steps) == 300


def _toy_run(objective: str, z0: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    loss = DMDLoss(GaussianVelocity(REAL_MU, REAL_SIGMA), objective=objective)
    z = z0.clone().requires_grad_(True)
    for _ in range(steps):
        _fit(loss.fake, z.detach())
        z.grad = None
        loss(z).backward()
        with torch.no_grad():
            z -= lr * z.grad * z.numel()
    return z.detach()


def test_toy_objectives_behave_as_in_the_paper():
    torch.manual_seed(7)
    z0 = 2.0 + 0.3 * torch.randn(256, 2, 2, 2)
    # loss difference (Jacobian path) also aligns both moments
    z = _toy_run("loss_difference", z0, 300, 0.05)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.tensor(REAL_MU), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.tensor(REAL_SIGMA), atol=0.02, rtol=0)
    # real score only: finds the mode but drops the spread (std far below the reference)
    z = _toy_run("real_only", z0, 300, 0.05)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.tensor(REAL_MU), atol=0.05, rtol=0)
    assert (z.std((0, 2, 3)) < 0.3 * torch.tensor(REAL_SIGMA)).all()
    # fake score only (end to end): the samples collapse onto their own mean
    z1 = torch.randn(256, 2, 2, 2)
    z = _toy_run("fake_only", z1, 100, 0.05)
    assert (z.std((0, 2, 3)) < 0.3 * z1.std((0, 2, 3))).all()


def test_cfg_is_one_batched_forward_per_model_and_equals_separate_calls():
    torch.manual_seed(8)
    mu = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [0.0, 0.5]])  # classes 0, 1 and null (2)
    sigma = torch.tensor([[0.5, 1.0], [1.0, 0.7], [1.2, 1.1]])
    real = GaussianVelocity(mu, sigma)
    loss = DMDLoss(real, cfg_scale=3.0)
    assert loss.null_class == 2
    with torch.no_grad():
        loss.fake.mu.add_(0.3)
    z = torch.randn(6, 2, 2, 2).requires_grad_(True)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    t, eps = torch.rand(6), torch.randn(6, 2, 2, 2)
    value, _ = loss.loss(z, y, t=t, eps=eps)
    value.backward()
    assert len(loss.real.calls) == 1 and len(loss.fake.calls) == 1  # 2 forwards in all
    x, tt, yy = loss.real.calls[0]
    assert x.shape[0] == 12 and torch.equal(yy, torch.cat([y, torch.full_like(y, 2)]))

    def separate(model):
        z_t = flow.interpolate(z.detach(), eps, t)
        v_c = flow.gaussian_velocity(z_t, t, *model.stats(y, 4))
        v_n = flow.gaussian_velocity(z_t, t, *model.stats(torch.full_like(y, 2), 4))
        return flow.velocity_to_x1(z_t, t, v_c + (3.0 - 1.0) * (v_c - v_n))

    x_f, x_r = separate(loss.fake), separate(loss.real)
    g = (x_f - x_r) / (z.detach() - x_r).abs().mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(z.grad * z.numel(), g)


def test_fake_loss_trains_null_class_with_label_dropout():
    torch.manual_seed(9)
    mu = torch.tensor([[1.0], [-1.0], [0.0]])
    loss = DMDLoss(GaussianVelocity(mu, torch.ones(3, 1)), fake_label_dropout=0.5)
    y = torch.zeros(20_000, dtype=torch.long)
    value = loss.fake_loss(torch.randn(20_000, 1, 1, 1), y)
    seen = loss.fake.calls[-1][2]
    assert seen.float().mean().item() == pytest.approx(2 * 0.5, abs=0.05)  # about half null
    assert set(seen.tolist()) == {0, 2} and value.ndim == 0
    none = DMDLoss(GaussianVelocity(mu, torch.ones(3, 1)), fake_label_dropout=0.0)
    none.fake_loss(torch.randn(8, 1, 1, 1), y[:8])
    assert torch.equal(none.fake.calls[-1][2], y[:8])
    none.fake_loss(torch.randn(8, 1, 1, 1))  # unconditional: null labels
    assert (none.fake.calls[-1][2] == 2).all()


def test_fake_loss_is_the_flow_matching_loss_of_the_fake_model():
    """fake_loss(z) = mean((v_fake(z_t, t) - (z - eps))^2), z_t = t z + (1 - t) eps, with t ~ U[0, 1)
    then eps ~ N(0, I) from the global RNG, evaluated with the fake model's exact Gaussian
    velocity (fake shifted away from the real model, so using the real one would fail)."""
    mu, sigma = [[0.5, -1.0], [0.0, 0.0]], [[0.8, 1.5], [1.0, 1.0]]  # class 0 and the null class
    loss = DMDLoss(GaussianVelocity(mu, sigma), fake_label_dropout=0.0)
    with torch.no_grad():
        loss.fake.mu[0] += torch.tensor([1.0, -0.5])
        loss.fake.sigma[0] *= 0.5
    z = torch.randn(64, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(11)
    value = loss.fake_loss(z, y)
    torch.manual_seed(11)
    t = torch.rand(64)
    eps = torch.randn(z.shape)
    tt = t.view(-1, 1, 1, 1)
    z_t = tt * z + (1 - tt) * eps
    mu_f, sigma_f = loss.fake.mu[0].view(1, 2, 1, 1), loss.fake.sigma[0].view(1, 2, 1, 1)
    s2 = tt**2 * sigma_f**2 + (1 - tt) ** 2
    v = mu_f + (tt * sigma_f**2 - (1 - tt)) / s2 * (z_t - tt * mu_f)  # exact velocity
    expected = (v - (z - eps)).square().mean()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    x_seen, t_seen, y_seen = loss.fake.calls[-1]
    torch.testing.assert_close(x_seen, z_t)
    torch.testing.assert_close(t_seen, t)
    assert torch.equal(y_seen, y) and not loss.real.calls


def test_score_l2_on_gaussians_value_and_gradient():
    """objective="score_l2" on exact Gaussian velocity models: the value is
    mean((s_f(z_t) - s_r(z_t))^2) with the closed-form scores -(x - t mu) / (t^2 sigma^2 + (1-t)^2),
    and, the scores being linear in z_t = t z + (1 - t) eps, its gradient w.r.t. z is
    2 (s_f - s_r) (1/V_r - 1/V_f) t / numel."""
    loss = DMDLoss(GaussianVelocity(REAL_MU, REAL_SIGMA), objective="score_l2")
    mu_f, sigma_f = torch.tensor([1.0, -0.5]), torch.tensor([0.7, 1.3])
    with torch.no_grad():
        loss.fake.mu.copy_(mu_f[None])
        loss.fake.sigma.copy_(sigma_f[None])
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(32, 2, 3, 3, generator=gen).requires_grad_(True)
    t = 0.1 + 0.8 * torch.rand(32, generator=gen)
    eps = torch.randn(z.shape, generator=gen)
    value, _ = loss.loss(z, t=t, eps=eps)
    value.backward()
    tt = t.view(-1, 1, 1, 1)
    z_t = tt * z.detach() + (1 - tt) * eps

    def score(mu, sigma):
        mu, sigma = torch.as_tensor(mu).view(1, 2, 1, 1), torch.as_tensor(sigma).view(1, 2, 1, 1)
        var = tt**2 * sigma**2 + (1 - tt) ** 2
        return -(z_t - tt * mu) / var, var

    s_f, var_f = score(mu_f, sigma_f)
    s_r, var_r = score(REAL_MU, REAL_SIGMA)
    torch.testing.assert_close(value, (s_f - s_r).square().mean(), rtol=1e-5, atol=0)
    grad = 2 * (s_f - s_r) * (1 / var_r - 1 / var_f) * tt / z.numel()
    torch.testing.assert_close(z.grad, grad, rtol=1e-4, atol=1e-9)
    assert value.item() > 0.1  # far from the trivial 0 of equal models


def test_annealing_and_step_counter():
    loss = DMDLoss(
        GaussianVelocity([0.0], [1.0]), t_min=0.0, t_max=1.0, anneal_steps=100, anneal_t_max=0.5
    )
    assert loss.t_range(0) == (0.0, 1.0)
    assert loss.t_range(50) == (0.0, 0.75)
    assert loss.t_range(1000) == (0.0, 0.5)
    z = torch.randn(64, 1, 2, 2, requires_grad=True)
    loss(z, step=100)
    assert loss.last_info["t"].max() <= 0.5 and float(loss.last_info["t_max"]) == 0.5
    assert int(loss.num_steps) == 1
    loss.update(z.detach())  # validation updates use, but do not advance, the counter
    assert int(loss.num_steps) == 1 and loss.t_range() == (0.0, 0.995)
    assert float(loss.last_info["t_max"]) == pytest.approx(0.995)
    # without ``step`` (how DMVAEModule calls it in training) the call reads the counter
    loss.num_steps.fill_(50)
    loss(z)
    assert float(loss.last_info["t_max"]) == 0.75 and loss.last_info["t"].max() <= 0.75
    assert int(loss.num_steps) == 51
    loss.update(z.detach())
    assert float(loss.last_info["t_max"]) == pytest.approx(1 - 0.5 * 0.51)
    lifted = DMDLoss(GaussianVelocity([0.0], [1.0]), anneal_steps=10, anneal_t_min=0.6)
    assert lifted.t_range(5) == (0.3, 1.0)
    with pytest.raises(ValueError, match="objective"):
        DMDLoss(GaussianVelocity([0.0], [1.0]), objective="dmd2")
    with pytest.raises(ValueError, match="annealed range"):
        DMDLoss(GaussianVelocity([0.0], [1.0]), t_min=0.5, anneal_steps=1, anneal_t_max=0.4)
    with pytest.raises(ValueError, match="null_class"):
        DMDLoss(nn.Identity(), cfg_scale=2.0)


# ----------------------------------------------------------------------------- DMD (DiT)


def _tiny_dit(seed: int):
    from dmvae_lightning.nets.dit import DiT

    torch.manual_seed(seed)
    dit = DiT.from_preset("tiny", input_size=4, in_channels=4, num_classes=3)
    with torch.no_grad():  # adaLN-Zero starts at v = 0; make both nets non-trivial
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit


def test_dmd_refuses_labels_the_real_model_has_no_class_for():
    """An unconditional real model (null class 0) given the data's labels, or a 3-class one
    given label 5, is an error naming the options, before any forward; labels in range pass."""
    from dmvae_lightning.nets.dit import DiT

    torch.manual_seed(0)
    z = torch.randn(3, 4, 4, 4)
    unconditional = DiT.from_preset("tiny", input_size=4, in_channels=4, num_classes=0)
    with pytest.raises(ValueError, match="matching_labels: false"):
        DMDLoss(unconditional)(z, torch.tensor([1, 5, 9]))
    loss = DMDLoss(_tiny_dit(0))  # 3 classes, null class 3
    with pytest.raises(
        ValueError, match=r"labels 0\.\.5 are outside the real model's classes 0\.\.3"
    ):
        loss(z, torch.tensor([0, 5, 1]))
    assert torch.isfinite(loss(z, torch.tensor([0, 2, 3])))  # 3: the null class itself


def test_dit_objectives_keep_fp32_time_and_never_train_score_nets():
    dit = _tiny_dit(10)
    seen = []

    def record(module, args, kwargs):
        seen.append((module, args[0].dtype, args[1].dtype, args[0].shape[0]))

    for objective in ("dmd", "loss_difference", "real_only", "fake_only", "score_l2"):
        loss = DMDLoss(dit, cfg_scale=2.0, objective=objective)
        assert all(not p.requires_grad for p in loss.real.parameters())
        assert all(p.requires_grad for p in loss.fake_parameters())
        with torch.no_grad():
            for p in loss.fake.parameters():
                p.add_(0.02 * torch.randn_like(p))
        loss.train()
        assert not loss.real.training and not loss.fake.training
        hooks = [
            m.register_forward_pre_hook(record, with_kwargs=True) for m in (loss.real, loss.fake)
        ]
        seen.clear()
        z = torch.randn(3, 4, 4, 4, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(z, torch.tensor([0, 1, 2]))
        value.backward()
        for h in hooks:
            h.remove()
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert all(x == torch.float32 and t == torch.float32 for _, x, t, _ in seen)
        expected = 1 if objective in ("real_only", "fake_only") else 2
        assert len(seen) == expected and all(b == 6 for *_, b in seen)  # cond + null batched
        assert z.grad is not None and z.grad.abs().sum() > 0
        assert all(p.grad is None for p in loss.real.parameters())
        assert all(p.grad is None for p in loss.fake.parameters()), objective
    # the fake loss trains the fake only
    fake_value = loss.fake_loss(z, torch.tensor([0, 1, 2]))
    fake_value.backward()
    assert all(p.grad is None for p in loss.real.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.fake.parameters())


def test_real_model_from_latent_diffusion_checkpoint(tmp_path):
    from helpers import save_module_checkpoint

    from dmvae_lightning.modules.diffusion import LatentDiffusionModule

    module = LatentDiffusionModule(
        latent_shape=[4, 4, 4], num_classes=3, latent_mean=0.5, latent_scale=2.0, ema_decay=0.5
    )
    with torch.no_grad():
        for p in module.dit.parameters():
            p.add_(0.1)
    module.ema.update(module.dit)  # EMA now differs from the raw weights
    path = save_module_checkpoint(module, tmp_path / "reference.ckpt")
    for source in (str(path), module):
        loss = DMDLoss(source, cfg_scale=5.0)
        state = module.state_dict()
        raw = dict(module.dit.named_parameters())
        for name, p in loss.real.named_parameters():
            assert torch.equal(p, state["ema." + name.replace(".", "__")])
            assert not torch.equal(p, raw[name]) and not p.requires_grad
            assert torch.equal(dict(loss.fake.named_parameters())[name], p)
        assert loss.null_class == 3
        torch.testing.assert_close(loss.normalize(torch.full((1,), 1.5)), torch.full((1,), 2.0))
    assert any(k.startswith("fake.") for k in loss.state_dict())  # the fake is checkpointed
    with pytest.raises(FileNotFoundError, match="real_model"):
        DMDLoss(str(tmp_path / "missing.ckpt"))


# ----------------------------------------------------------------------------- per-sample losses


def test_gaussian_kl_closed_form():
    gen = torch.Generator().manual_seed(11)
    mean, logvar = torch.randn(5, 2, 3, 3, generator=gen), torch.randn(5, 2, 3, 3, generator=gen)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    per_sample = torch.distributions.kl_divergence(q, p).sum((1, 2, 3))
    metric = GaussianKLLoss()
    torch.testing.assert_close(metric(mean, logvar), per_sample.mean())
    metric.update(mean[:2], logvar[:2])  # weighted by samples: 7 in all
    expected = (per_sample.sum() + per_sample[:2].sum()) / 7
    torch.testing.assert_close(metric.compute(), expected)
    assert GaussianKLLoss().loss(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_pointwise_alignment_closed_forms():
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(2, 8, 3, 3, generator=gen)
    loss = PointwiseAlignmentLoss(margin_cos=0.5, margin_dist=0.25)
    assert loss.loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    # opposite vectors: cos = -1 -> relu(1 - 0.5 + 1) = 1.5; self-similarities unchanged
    assert loss.loss(z, -z).item() == pytest.approx(1.5, abs=1e-5)
    # rotations keep the distance matrix: only the cosine term remains
    rot, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    f = torch.einsum("dc,bchw->bdhw", rot, z)
    cos = torch.nn.functional.cosine_similarity(z, f, dim=1)
    assert loss.loss(z, f).item() == pytest.approx(torch.relu(0.5 - cos).mean().item(), abs=1e-5)
    # two positions: orthogonal latents, identical features -> |0 - 1| - 0.25 on 2 of 4 pairs
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    f2 = torch.ones(1, 2, 1, 2)
    dist_only = PointwiseAlignmentLoss(weight_cos=0.0)
    assert dist_only.loss(z2, f2).item() == pytest.approx(0.375, abs=1e-6)
    # projection C -> D: gradients reach z and the projection, never the frozen features
    proj = PointwiseAlignmentLoss(proj=[4, 8])
    zp = torch.randn(2, 4, 3, 3, requires_grad=True)
    feats = torch.randn(2, 8, 3, 3, requires_grad=True)
    proj(zp, feats).backward()
    assert zp.grad is not None and proj.proj.weight.grad is not None and feats.grad is None
    with pytest.raises(ValueError, match="proj"):
        loss.loss(zp, feats)


def test_mlp_bottleneck_gaussian():
    torch.manual_seed(13)
    plain = MLPBottleneck(6, 3, 16)
    with pytest.raises(RuntimeError, match="gaussian=True"):
        plain.forward_stats(torch.randn(2, 6, 2, 2))
    net = MLPBottleneck(6, 3, 16, gaussian=True)
    assert net.mlp[2].weight.shape == (6, 16)
    x = torch.randn(2, 6, 2, 2)
    mean, logvar = net.forward_stats(x)
    assert mean.shape == logvar.shape == (2, 3, 2, 2)
    full = net.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(mean, full[:, :3])
    torch.testing.assert_close(logvar, full[:, 3:])
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, D) layout splits the last dim
    torch.testing.assert_close(net.forward_stats(tokens)[0], mean.flatten(2).transpose(1, 2))
    torch.testing.assert_close(net.eval()(x), mean)
    net.train()
    samples = torch.stack([net(x) for _ in range(4000)])
    torch.testing.assert_close(samples.mean(0), mean, atol=0.1, rtol=0)
    torch.testing.assert_close(samples.std(0), (0.5 * logvar).exp(), atol=0.1, rtol=0.05)
    kl = GaussianKLLoss()(mean, logvar)
    assert kl.item() == pytest.approx(
        0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean().item(), rel=1e-6
    )


# ----------------------------------------------------------------------------- DDP (2 processes)


def _ddp_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        gen = torch.Generator().manual_seed(0)
        x_all, y_all = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen) + 0.7
        x_rows = [slice(0, 5), slice(5, 8)][rank]  # uneven shards: 5 + 3 and 3 + 5
        y_rows = [slice(0, 3), slice(3, 8)][rank]
        for make in (
            lambda **kw: MMDLoss(**kw),
            lambda **kw: MMDLoss(kernel="imq", estimator="linear", **kw),
            lambda **kw: SlicedWassersteinLoss(num_projections=16, **kw),
        ):
            for scale in (True, False):
                x_cat = x_all.clone().requires_grad_(True)
                torch.manual_seed(100)  # same projection seed as rank 0 below
                ref = make(gather=False).loss(x_cat, y_all)
                ref.backward()
                a = torch.ones((), requires_grad=True)  # a "parameter" scaling the samples
                x_loc = (a * x_all[x_rows]).detach().requires_grad_(True)
                torch.manual_seed(100 + rank)  # ranks draw different seeds; rank 0's wins
                value = make(scale_grad_by_world=scale)(x_loc, y_all[y_rows])
                value.backward()
                torch.testing.assert_close(value, ref)
                factor = world if scale else 1
                torch.testing.assert_close(x_loc.grad, factor * x_cat.grad[x_rows])
                # DDP averages parameter grads: with scaling this is the single-process grad
                grad_a = (x_loc.grad * x_all[x_rows]).sum()
                dist.all_reduce(grad_a)
                expected_a = (x_cat.grad * x_all).sum()
                torch.testing.assert_close(grad_a / world, expected_a * factor / world)
        metric = MMDLoss()
        metric.update(x_all[x_rows], y_all[y_rows])
        metric.update(2 * x_all[x_rows], y_all[y_rows])
        plain = MMDLoss(gather=False)
        expected = (plain.loss(x_all, y_all) + plain.loss(2 * x_all, y_all)) / 2
        torch.testing.assert_close(metric.compute(), expected)
    finally:
        dist.destroy_process_group()


def test_ddp_gathered_losses_equal_single_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port), nprocs=2, join=True)
