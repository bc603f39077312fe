"""The 2-D toy study: the S-shape source against its construction, the evaluation distances
against closed forms, the points / fake-model schedule of PointAlignmentModule, and a tiny
end-to-end study in which DMD must clearly pull uniform points onto the S-shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from dmvae_lightning.callbacks.reference_feeder import ReferenceFeeder
from dmvae_lightning.data.sources import Draw, build_source
from dmvae_lightning.losses.matching import DMDLoss, SlicedWassersteinLoss
from dmvae_lightning.metrics.distances import (
    cloud_metrics,
    coverage,
    energy_distance,
    precision,
    sliced_wasserstein,
)
from dmvae_lightning.modules.toy2d import PointAlignmentModule
from dmvae_lightning.nets.dit import DiT
from dmvae_lightning.toy2d import run_study

REPO = Path(__file__).resolve().parents[1]


def s_shape(n: int, seed: int = 0, **options) -> torch.Tensor:
    source = build_source({"name": "s_shape", "shape": [2, 1, 1], **options})
    z, labels = source.draw(Draw(n=n, generator=torch.Generator().manual_seed(seed)))
    assert labels is None
    return z


# ------------------------------------------------------------------ the S-shape source


def test_s_shape_equals_its_construction_draw_by_draw() -> None:
    """Recompute PAPER.md's construction from the same generator draws (u, normal offset,
    isotropic noise, in that order): every sample matches."""
    n = 4000
    z = s_shape(n, seed=7)
    assert z.shape == (n, 2, 1, 1) and z.dtype == torch.float32
    gen = torch.Generator().manual_seed(7)
    u = (2 * torch.rand(n, generator=gen) - 1).double()
    offset = torch.randn(n, generator=gen).double()
    iso = torch.randn(n, 2, generator=gen).double()
    x = 0.85 * torch.sin(math.pi * u)
    y = 0.85 * u - 0.15 * torch.sin(2 * math.pi * u)
    tx = 0.85 * math.pi * torch.cos(math.pi * u)
    ty = 0.85 - 2 * math.pi * 0.15 * torch.cos(2 * math.pi * u)
    length = torch.sqrt(tx**2 + ty**2)
    spread = 0.03 * (0.4 + 0.6 * u.abs())
    px = x + 0.06 * offset * (-ty / length) + spread * iso[:, 0]
    py = y + 0.06 * offset * (tx / length) + spread * iso[:, 1]
    expected = torch.stack([px, -py], 1).clamp(-1, 1)  # y flipped, then clipped
    assert torch.allclose(z.view(n, 2).double(), expected, atol=1e-5)
    assert z.abs().max() <= 1.0


def test_s_shape_distance_to_the_centre_curve() -> None:
    """Without noise the samples lie on the (flipped) centre curve; with the normal thickness
    only, their distance to it has RMS 0.06; the default spread is wider but stays close."""
    u = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    curve = torch.stack(
        [0.85 * torch.sin(math.pi * u), -(0.85 * u - 0.15 * torch.sin(2 * math.pi * u))], 1
    )

    def distances(z: torch.Tensor) -> torch.Tensor:
        return torch.cdist(z.view(-1, 2).double(), curve).min(dim=1).values

    on_curve = distances(s_shape(2000, thickness=0.0, noise=0.0))
    assert on_curve.max() < 1e-3  # the polyline's own resolution (spacing ~1.2e-3)
    thick = distances(s_shape(5000, noise=0.0))
    assert thick.square().mean().sqrt().item() == pytest.approx(0.06, rel=0.05)
    full = distances(s_shape(5000))
    assert 0.06 < full.square().mean().sqrt().item() < 0.07  # + isotropic 0.03(0.4 + 0.6|u|)
    assert (full < 0.25).float().mean() > 0.999


def test_s_shape_is_seeded_by_the_generator_and_validated() -> None:
    assert torch.equal(s_shape(64, seed=1), s_shape(64, seed=1))
    assert not torch.equal(s_shape(64, seed=1), s_shape(64, seed=2))
    with pytest.raises(ValueError, match=r"reference\.shape.*\[2, 1, 1\]"):
        build_source({"name": "s_shape", "shape": [4, 8, 8]})
    with pytest.raises(ValueError, match=r"do not apply to name 's_shape'"):
        build_source({"name": "s_shape", "std": 1.0})
    with pytest.raises(ValueError, match=r"reference\.thickness"):
        build_source({"name": "s_shape", "thickness": -1.0})
    feeder = ReferenceFeeder({"name": "s_shape", "shape": [2, 1, 1]}, seed=3)
    batch = feeder.feed({"image": torch.zeros(5, 1, 4, 4)})
    assert batch["reference"].shape == (5, 2, 1, 1) and "reference_label" not in batch


# ------------------------------------------------------------------ evaluation distances


def test_energy_distance_closed_forms() -> None:
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    a, b = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])
    assert energy_distance(a, b) == pytest.approx(10.0)  # 2 |a - b|
    shifts = [energy_distance(x, x + torch.tensor([d, 0.0])) for d in (0.1, 0.5, 2.0)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]
    # {0} vs {-d, +d}: 2 E|X - Y| - E|Y - Y'| = 2d - (0 + 2d + 2d + 0) / 4 = d
    pair = torch.tensor([[-0.7, 0.0], [0.7, 0.0]])
    assert energy_distance(torch.zeros(1, 2), pair) == pytest.approx(0.7)


def test_sliced_wasserstein_closed_forms() -> None:
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    d = torch.tensor([0.3, -0.4], dtype=torch.float64)
    theta = torch.randn(2, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theta = theta / theta.norm(dim=0)
    exact = (d @ theta).square().mean().sqrt().item()  # a shift keeps the order
    assert sliced_wasserstein(x, x + d, projections=theta) == pytest.approx(exact, rel=1e-9)
    # random directions: SW_2^2 -> |d|^2 / 2 in 2-D
    assert sliced_wasserstein(x, x + d, num_projections=4096) ** 2 == pytest.approx(0.125, rel=0.05)
    # unequal sizes, exact quantile coupling: {0, 1} equals {0, 0, 1, 1}; {0} vs {1, 3} -> W2^2 5
    e1 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    two = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    four = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert sliced_wasserstein(two, four, projections=e1) == pytest.approx(0.0, abs=1e-12)
    one, pair = torch.zeros(1, 2), torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert sliced_wasserstein(one, pair, projections=e1) == pytest.approx(math.sqrt(5))
    with pytest.raises(ValueError, match="features per sample"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 3))


def test_coverage_and_precision() -> None:
    ref = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    assert coverage(ref, ref) == 1.0 and precision(ref, ref) == 1.0
    near = ref[:1] + torch.tensor([[0.03, 0.0]])
    assert coverage(near, ref, radius=0.05) == 0.25  # one of four reference points
    assert precision(near, ref, radius=0.05) == 1.0  # but the point itself is on the data
    assert coverage(near, ref, radius=0.02) == 0.0
    far = torch.full((10, 2), 100.0)
    assert (
        cloud_metrics(far, ref)["coverage"] == 0.0 and cloud_metrics(far, ref)["precision"] == 0.0
    )
    # a fresh S-shape sample covers the S; the uniform start does not
    reference = s_shape(2048, seed=11).view(-1, 2)
    sample = cloud_metrics(s_shape(1536, seed=12), reference, radius=0.03)
    uniform = cloud_metrics(
        PointAlignmentModule.uniform_points(1536, 1.5, 0), reference, radius=0.03
    )
    assert sample["coverage"] > 0.85 and uniform["coverage"] < 0.5
    assert sample["sw2"] < 0.04 < 0.3 < uniform["sw2"]


# ------------------------------------------------------------------ the module's schedule


def _tiny_dmd(objective: str = "dmd") -> DMDLoss:
    real = DiT(
        input_size=1,
        in_channels=2,
        patch_size=1,
        hidden_size=16,
        depth=1,
        num_heads=2,
        num_classes=1,
    )
    return DMDLoss(real, objective=objective, fake_label_dropout=0.0)


class _Recorder(pl.Callback):
    """Which batches changed the points and the fake model."""

    def __init__(self) -> None:
        self.points_moved: list[int] = []
        self.fake_moved: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._points = module.points.detach().clone()
        self._fake = [p.detach().clone() for p in module.loss.fake_parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not torch.equal(self._points, module.points):
            self.points_moved.append(batch_idx)
        if any(
            not torch.equal(a, b)
            for a, b in zip(self._fake, module.loss.fake_parameters(), strict=True)
        ):
            self.fake_moved.append(batch_idx)


def _fit(module: pl.LightningModule, *callbacks: pl.Callback) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("warmup", [0, 6])
def test_points_step_every_fifth_batch_and_fake_every_batch(warmup: int) -> None:
    module = PointAlignmentModule(
        _tiny_dmd(),
        num_points=32,
        fake_batch=8,
        batches_per_epoch=12,
        fake_warmup=warmup,
        eval_reference=64,
        field_grid=3,
        field_draws=1,
        field_times=[0.5],
    )
    recorder = _Recorder()
    trainer = _fit(module, recorder)
    expected = [4, 9] if warmup == 0 else [9]
    assert recorder.points_moved == expected
    assert recorder.fake_moved == list(range(12))
    assert int(module.batch_count) == 12 and int(module.points_steps) == len(expected)
    assert trainer.global_step == 12 + len(expected)  # optimizer steps, not batches
    assert int(module.loss.num_steps) == len(expected)
    assert set(module.final_metrics) == {"sw2", "energy", "coverage", "precision", "points_steps"}


def test_runs_repeat_exactly_and_sample_set_losses_train_no_fake() -> None:
    def run(loss) -> torch.Tensor:
        module = PointAlignmentModule(
            loss,
            num_points=24,
            fake_batch=8,
            batches_per_epoch=10,
            eval_reference=64,
            field_grid=3,
            field_draws=1,
            field_times=[0.5],
        )
        _fit(module)
        return module.points.detach().clone()

    torch.manual_seed(0)
    first = run(_tiny_dmd())
    torch.manual_seed(0)
    assert torch.equal(first, run(_tiny_dmd()))
    swd = PointAlignmentModule(
        SlicedWassersteinLoss(16), num_points=24, batches_per_epoch=10, eval_reference=64
    )
    assert len(swd.configure_optimizers()) == 1 and not swd.trains_fake
    real_only = PointAlignmentModule(_tiny_dmd("real_only"), num_points=24, eval_reference=64)
    assert len(real_only.configure_optimizers()) == 1
    start = swd.points.detach().clone()
    _fit(swd)
    assert int(swd.points_steps) == 2 and not torch.equal(start, swd.points)


def test_update_field_of_dmd_is_the_normalised_score_difference() -> None:
    """At a fixed (t, eps) the field is -(dL/dz) * numel = x_hat_real - x_hat_fake over the
    per-sample mean |z - x_hat_real| (times latent_scale = 1 here)."""
    loss = _tiny_dmd()
    with torch.no_grad():
        for p in loss.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module = PointAlignmentModule(
        loss, num_points=8, field_grid=3, field_draws=1, eval_reference=64
    )
    grid = module.field_grid()
    assert grid.shape == (9, 2) and grid.min() == -1.5 and grid.max() == 1.5
    field = module.update_field(0.3, grid)
    # the same eps the module draws, then the DMD direction by hand
    from dmvae_lightning.utils.rng import step_seed

    gen = torch.Generator().manual_seed(step_seed(0 ^ 0x51_0F1E_1D00, int(0.3 * 1e6)))
    eps = torch.randn(9, 2, 1, 1, generator=gen)
    z = grid.view(9, 2, 1, 1)
    t = torch.full((9,), 0.3)
    y = torch.zeros(9, dtype=torch.long)
    z_t = 0.3 * z + 0.7 * eps
    with torch.no_grad():
        x_real = z_t + 0.7 * loss.real(z_t, t, y)
        x_fake = z_t + 0.7 * loss.fake(z_t, t, y)
    expected = (x_real - x_fake) / (z - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(field, expected.view(9, 2), atol=1e-5)


def test_bad_options_name_the_yaml_key() -> None:
    with pytest.raises(ValueError, match=r"model\.init_args\.points_every"):
        PointAlignmentModule(SlicedWassersteinLoss(), points_every=0)
    with pytest.raises(ValueError, match=r"model\.init_args\.reference"):
        PointAlignmentModule(
            SlicedWassersteinLoss(), reference={"name": "gaussian", "shape": [4, 1, 1]}
        )
    with pytest.raises(FileNotFoundError, match=r"DMDLoss\.real_model.*does not exist"):
        DMDLoss("no/such/real.ckpt")


# ------------------------------------------------------------------ the tiny study


def test_tiny_study_dmd_pulls_uniform_points_onto_the_s(tmp_path: Path) -> None:
    """Real model (small DiT, 250 batches) then DMD on 256 points for 250 batches (50 point
    steps): distances to fresh S-shape samples fall well below the uniform start's."""
    real_args = [
        "--model.init_args.dit.hidden_size",
        "64",
        "--model.init_args.dit.depth",
        "2",
        "--data.init_args.batch_size",
        "256",
    ]
    result = run_study(
        out=tmp_path,
        configs=REPO / "configs" / "toy2d",
        objectives=["dmd"],
        points=256,
        batches=250,
        real_steps=250,
        real_args=real_args,
        objective_args=["--model.init_args.field_draws", "2", "--model.init_args.field_grid", "7"],
        verbose=False,
    )
    dmd, start = result.rows["dmd"], result.rows["uniform start"]
    assert dmd["sw2"] < 0.35 * start["sw2"]
    assert dmd["energy"] < 0.2 * start["energy"]
    assert dmd["coverage"] > start["coverage"] + 0.1
    for name in (
        "table.md",
        "results.json",
        "clouds.png",
        "dmd/points_final.png",
        "dmd/field_final.png",
    ):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "dmd" / "metrics.json").read_text())["points_steps"] == 50
    assert list((tmp_path / "dmd").rglob("events.out.tfevents*"))
    assert "| dmd |" in result.table and "| uniform start |" in result.table
