"""Reconstruction (L1/L2/LPIPS) and adversarial losses: closed forms, exactness, plumbing."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from helpers import run_ranks
from torch import nn

from dmvae_lightning.losses import (
    LPIPS,
    AdversarialLoss,
    DiffAugment,
    ReconstructionLoss,
    adaptive_weight,
    consistency_loss,
    generator_adv_loss,
    hinge_d_loss,
)

CHANNELS = (64, 128, 256, 512, 512)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random stand-ins for the VGG16 and lin-head weights, in the real files' key formats."""
    torch.manual_seed(0)
    with torch.device("meta"):
        features = torchvision.models.vgg16(weights=None).features
    features = features.to_empty(device="cpu")
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(m.bias, std=0.01)
    root = tmp_path_factory.mktemp("lpips")
    full = {f"features.{k}": v for k, v in features.state_dict().items()}
    full["classifier.0.weight"] = torch.zeros(4, 4)  # a full vgg16 state dict has these too
    torch.save(full, root / "vgg16.pth")
    torch.save(features.state_dict(), root / "vgg16_features.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    torch.save(lins, root / "vgg.pth")
    return {
        "vgg_weights_path": str(root / "vgg16.pth"),
        "lin_weights_path": str(root / "vgg.pth"),
        "features_only": str(root / "vgg16_features.pth"),
        "features": features,
        "lins": lins,
    }


@pytest.fixture(scope="module")
def lpips_net(lpips_files):
    return LPIPS(lpips_files["vgg_weights_path"], lpips_files["lin_weights_path"])


def _images(b=2, c=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g) * 2 - 1


def _reference_lpips(features, lins, x, y):
    """Independent LPIPS: VGG split into the lpips package's five slices."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    bounds = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
    hx, hy = (x - shift) / scale, (y - shift) / scale
    total = torch.zeros(x.shape[0])
    for k, (a, b) in enumerate(bounds):
        hx, hy = features[a:b](hx), features[a:b](hy)
        nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        d = ((nx - ny) ** 2 * lins[f"lin{k}.model.1.weight"]).sum(1)
        total += d.mean(dim=(1, 2))
    return total


def test_lpips_zero_on_identical_and_grows_with_noise(lpips_net):
    x = _images(b=3)
    assert torch.equal(lpips_net(x, x.clone()), torch.zeros(3))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    values = [lpips_net(x, x + s * noise) for s in (0.05, 0.2, 0.6)]
    assert values[0].shape == (3,)
    assert (values[0] > 0).all()
    assert (values[0] < values[1]).all() and (values[1] < values[2]).all()


def test_lpips_matches_independent_computation(lpips_net, lpips_files):
    x, y = _images(seed=2), _images(seed=3)
    with torch.no_grad():
        expected = _reference_lpips(lpips_files["features"], lpips_files["lins"], x, y)
        got = lpips_net(x, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lpips_grayscale_repeated_and_features_only_file(lpips_net, lpips_files):
    x, y = _images(c=1, seed=4), _images(c=1, seed=5)
    gray = lpips_net(x, y)
    torch.testing.assert_close(gray, lpips_net(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))
    other = LPIPS(lpips_files["features_only"], lpips_files["lin_weights_path"])
    assert torch.equal(other(x, y), gray)


def test_lpips_frozen_but_differentiable_in_input(lpips_net):
    assert all(not p.requires_grad for p in lpips_net.parameters())
    lpips_net.train()
    assert not lpips_net.training
    x = _images(seed=6).requires_grad_(True)
    lpips_net(x, _images(seed=7)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_net.parameters())


def test_lpips_missing_files_name_the_option(lpips_files, tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="lpips.vgg_weights_path") as err:
        LPIPS(missing, lpips_files["lin_weights_path"])
    assert missing in str(err.value)
    with pytest.raises(FileNotFoundError, match="lpips.lin_weights_path") as err:
        LPIPS(lpips_files["vgg_weights_path"], missing)
    assert missing in str(err.value)


def test_reconstruction_loss_matches_manual_l1_l2():
    x, x_rec = _images(seed=8), _images(seed=9)
    loss_fn = ReconstructionLoss(l1_weight=2.0, l2_weight=3.0)
    loss, logs = loss_fn(x, x_rec)
    l1 = (x - x_rec).abs().sum() / x.numel()
    l2 = ((x - x_rec) ** 2).sum() / x.numel()
    torch.testing.assert_close(loss, 2 * l1 + 3 * l2)
    torch.testing.assert_close(logs["l1"], l1)
    torch.testing.assert_close(logs["l2"], l2)
    assert set(logs) == {"l1", "l2"}
    assert list(loss_fn.state_dict()) == []


def test_reconstruction_loss_requires_lpips_config():
    with pytest.raises(ValueError, match="lpips"):
        ReconstructionLoss(lpips_weight=1.0)


def test_reconstruction_loss_lpips_term_and_kept_out_of_state_dict(lpips_files):
    kwargs = {k: lpips_files[k] for k in ("vgg_weights_path", "lin_weights_path")}
    owner = nn.Module()
    owner.head = nn.Linear(2, 2)
    owner.rec = ReconstructionLoss(l1_weight=1.0, lpips_weight=0.5, lpips=kwargs)
    x, x_rec = _images(seed=10), _images(seed=11)
    loss, logs = owner.rec(x, x_rec)
    lp = owner.rec.lpips_net(x_rec, x).mean()
    torch.testing.assert_close(loss, (x - x_rec).abs().mean() + 0.5 * lp)
    torch.testing.assert_close(logs["lpips"], lp)

    state = owner.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    fresh = nn.Module()
    fresh.head = nn.Linear(2, 2)
    fresh.rec = ReconstructionLoss(l1_weight=1.0, lpips_weight=0.5, lpips=kwargs)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.head.weight, owner.head.weight)
    assert set(state) == {"head.weight", "head.bias"}  # the caller's dict is untouched

    owner.to(torch.float64)  # the LPIPS net still moves with its owner
    assert all(p.dtype == torch.float64 for p in owner.rec.lpips_net.parameters())
    owner.train()
    assert owner.rec.training and not owner.rec.lpips_net.training


def test_hinge_and_generator_losses_hand_computed():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2] -> 2.5/3; relu(1 + fake) = [0, 1, 2.5] -> 3.5/3
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(1.0))
    torch.testing.assert_close(generator_adv_loss(fake), torch.tensor(0.5 / 3))
    patch = torch.tensor([[[[1.0, 3.0], [-1.0, 1.0]]]])
    torch.testing.assert_close(generator_adv_loss(patch), torch.tensor(-1.0))


def test_adaptive_weight_closed_form_and_clamp():
    w = torch.randn(4, 3, requires_grad=True)
    a, b = -3.0, 0.5
    got = adaptive_weight(a * w.sum(), b * w.sum(), w)
    n = math.sqrt(w.numel())
    torch.testing.assert_close(got, torch.tensor(abs(a) * n / (abs(b) * n + 1e-4)))
    assert not got.requires_grad and w.grad is None
    assert adaptive_weight(a * w.sum(), 1e-9 * w.sum(), w, max_weight=7.0).item() == 7.0
    with torch.no_grad(), pytest.raises(RuntimeError, match="graph"):
        adaptive_weight(a * w.sum(), b * w.sum(), w)


def _rank_weights(rank: int, world: int) -> dict:
    """Rank r: rec = a_r . W, g = b_r . W with direction vectors that differ per rank."""
    w = torch.zeros(4, requires_grad=True)
    a = torch.tensor([[3.0, 0.0, 1.0, 0.0], [0.0, -1.0, 1.0, 2.0]])[rank]
    b = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, -0.5, 1.0]])[rank]
    synced = adaptive_weight((a * w).sum(), (b * w).sum(), w)
    local = adaptive_weight((a * w).sum(), (b * w).sum(), w, sync=False)
    return {"synced": synced, "local": local}


def test_adaptive_weight_is_the_global_batch_weight_across_ranks(tmp_path):
    """2 ranks: the synced weight is ||mean_r a_r|| / (||mean_r b_r|| + eps), the weight of the
    averaged (global-batch) losses, on both ranks; per-rank weights differ from it."""
    a = torch.tensor([[3.0, 0.0, 1.0, 0.0], [0.0, -1.0, 1.0, 2.0]])
    b = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, -0.5, 1.0]])
    want = a.mean(0).norm() / (b.mean(0).norm() + 1e-4)
    outs = run_ranks(_rank_weights, tmp_path)
    for rank, out in enumerate(outs):
        torch.testing.assert_close(out["synced"], want)
        torch.testing.assert_close(out["local"], a[rank].norm() / (b[rank].norm() + 1e-4))
        assert abs(out["local"].item() - want.item()) > 0.1


def test_diffaugment_reproducible_from_generator():
    aug = DiffAugment()
    x = _images(b=8, size=16)
    out1 = aug(x, torch.Generator().manual_seed(3))
    out2 = aug(x, torch.Generator().manual_seed(3))
    out3 = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    assert out1.shape == x.shape


def test_diffaugment_identity_and_unknown_policy():
    x = _images(b=2, size=8)
    assert torch.equal(DiffAugment("")(x), x)
    with pytest.raises(ValueError, match="policy"):
        DiffAugment("color,rotate")


def test_diffaugment_color_closed_form():
    """colour = brightness + (u1 - 0.5), saturation x 2 u2 about the per-pixel channel mean,
    contrast x (u3 + 0.5) about the image mean, u1, u2, u3 ~ U[0, 1) per sample drawn in that
    order. In closed form, with d = x - mean_C(x) and k = u3 + 0.5:
    out = M + k (m - M) + 2 u2 k d, m = mean_C(x) + u1 - 0.5, M = mean_CHW(x) + u1 - 0.5."""
    x = _images(b=16, c=3, size=8, seed=3)
    out = DiffAugment("color")(x, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    u1, u2, u3 = (torch.rand(16, 1, 1, 1, generator=gen) for _ in range(3))
    m = x.mean(1, keepdim=True) + u1 - 0.5
    big_m = x.mean((1, 2, 3), keepdim=True) + u1 - 0.5
    k = u3 + 0.5
    expected = big_m + k * (m - big_m) + 2 * u2 * k * (x - x.mean(1, keepdim=True))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the image mean moves by the brightness shift only
    torch.testing.assert_close(out.mean((1, 2, 3)), x.mean((1, 2, 3)) + u1.flatten() - 0.5)


def _shift(x, dy, dx):
    """out[i, j] = x[i - dy, j - dx], zero where that is outside."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_diffaugment_translation_is_an_integer_shift_with_zero_padding():
    x = torch.rand(32, 3, 16, 16) + 0.5  # no zeros, so padding is recognisable
    out = DiffAugment("translation", translation_ratio=0.125)(x, torch.Generator().manual_seed(0))
    s = 2  # int(16 * 0.125 + 0.5)
    shifts = []
    for xi, oi in zip(x, out, strict=True):
        found = [
            (dy, dx)
            for dy in range(-s, s + 1)
            for dx in range(-s, s + 1)
            if torch.equal(oi, _shift(xi, dy, dx))
        ]
        assert len(found) == 1
        shifts.append(found[0])
        # the kept pixels are a sub-multiset of the input, the rest are zeros
        kept = oi[oi != 0]
        assert kept.numel() == 3 * (16 - abs(found[0][0])) * (16 - abs(found[0][1]))
    assert len(set(shifts)) > 5


def test_diffaugment_cutout_zeroes_clipped_box():
    b, size, ratio = 4000, 16, 0.5
    x = torch.ones(b, 3, size, size)
    out = DiffAugment("cutout", cutout_ratio=ratio)(x, torch.Generator().manual_seed(0))
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # same box in every channel
    zero = zero[:, 0]
    rows, cols = zero.any(dim=2), zero.any(dim=1)
    assert torch.equal(zero, rows.unsqueeze(2) & cols.unsqueeze(1))  # an axis-aligned box
    assert torch.equal(out[~zero.unsqueeze(1).expand_as(out)], x[~zero.unsqueeze(1).expand_as(x)])
    side = int(size * ratio + 0.5)
    lengths = [rows.sum(1), cols.sum(1)]
    for length in lengths:
        assert length.min() >= side // 2 and length.max() == side
    # closed form: centre c uniform over 0..size (side even), box rows [c - side/2, c + side/2)
    centres = range(size + 1 - side % 2)
    mean_len = sum(min(c + side // 2, size) - max(c - side // 2, 0) for c in centres) / len(centres)
    expected_fraction = (mean_len / size) ** 2
    fraction = zero.float().mean().item()
    assert abs(fraction - expected_fraction) < 0.01
    assert zero.sum(dim=(1, 2)).max().item() == side * side


def test_diffaugment_gradient_flows():
    x = _images(b=4, size=16).requires_grad_(True)
    DiffAugment()(x, torch.Generator().manual_seed(0)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _mean_disc(x):
    return x.mean(dim=(1, 2, 3))


def test_consistency_loss_closed_form():
    x = _images(b=4, size=8)
    torch.testing.assert_close(
        consistency_loss(_mean_disc, x, lambda t: t + 1.0), torch.tensor(1.0)
    )
    # per-image shifts d: the mean of d^2 (a squared error; |d| would give another number)
    d = torch.tensor([0.5, 2.0, -3.0, 1.5])
    shifted = consistency_loss(_mean_disc, x, lambda t: t + d.view(4, 1, 1, 1))
    torch.testing.assert_close(shifted, d.square().mean())
    assert consistency_loss(_mean_disc, x, lambda t: t).item() == 0.0


def test_adversarial_generator_loss_closed_form():
    adv = AdversarialLoss(disc_weight=0.5, start_step=5, diffaug_policy="")
    assert not adv.active(4) and adv.active(5)
    w = torch.tensor([0.3, -0.2, 0.7], requires_grad=True)  # the "last layer"
    c, k, a = 2.0, 3.0, 4.0
    x_rec = (c * w).view(1, 3, 1, 1).expand(2, 3, 4, 4)

    def disc(t):
        return k * _mean_disc(t)

    rec_loss = a * w.sum()
    loss, logs = adv.generator_loss(disc, x_rec, rec_loss, w)
    g_adv = -k * c * w.mean()
    # d g_adv / d w = -(k c / 3) * ones(3); d rec / d w = a * ones(3)
    weight = a * math.sqrt(3) / (k * c / 3 * math.sqrt(3) + 1e-4)
    torch.testing.assert_close(logs["adaptive_weight"], torch.tensor(weight))
    torch.testing.assert_close(loss, 0.5 * weight * g_adv)
    torch.testing.assert_close(logs["g_adv"], g_adv.detach())

    plain = AdversarialLoss(disc_weight=0.5, diffaug_policy="", adaptive=False)
    loss, logs = plain.generator_loss(disc, x_rec, rec_loss, w)
    torch.testing.assert_close(loss, 0.5 * g_adv)
    assert logs["adaptive_weight"].item() == 1.0
    with torch.no_grad():
        loss, logs = adv.generator_loss(disc, x_rec, rec_loss, w)
    assert loss.item() == 0.0 and logs["adaptive_weight"].item() == 0.0
    torch.testing.assert_close(logs["g_adv"], g_adv.detach())


@pytest.mark.parametrize("policy", ["", "translation"])
def test_generator_loss_backpropagates_the_discriminator_once_with_the_same_gradients(policy):
    """With a frozen discriminator (the generator step) the adaptive GAN term goes through the
    discriminator's backward once, where computing the weight and then the loss's backward
    took two; the loss value, the weight and the decoder's gradients are those of that
    two-pass computation, written out here. A trainable discriminator keeps the two passes
    (its parameters get their gradients from the loss)."""
    from dmvae_lightning.nets import PatchDiscriminator

    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))
    disc = PatchDiscriminator(in_channels=1, ch=8, n_layers=2)
    z, x = torch.randn(3, 4, 16, 16), torch.randn(3, 1, 16, 16)
    last = decoder[2].weight
    adv = AdversarialLoss(disc_weight=0.7, diffaug_policy=policy)
    passes = []
    disc.register_full_backward_hook(lambda m, gin, gout: passes.append(1))

    def run(one_pass: bool):
        decoder.zero_grad(set_to_none=True)
        disc.zero_grad(set_to_none=True)
        passes.clear()
        x_rec = decoder(z)
        rec = (x_rec - x).abs().mean()
        gen = torch.Generator().manual_seed(1)
        if one_pass:
            g_loss, logs = adv.generator_loss(disc, x_rec, rec, last, generator=gen)
            weight, g_adv = logs["adaptive_weight"], logs["g_adv"]
        else:  # the two-pass computation
            g_adv = -disc(adv.augment(x_rec, gen)).float().mean()
            weight = adaptive_weight(rec, g_adv, last)
            g_loss = 0.7 * weight * g_adv
        (rec + g_loss).backward()
        grads = [p.grad.clone() for p in decoder.parameters()]
        return g_loss.detach(), weight, g_adv.detach(), grads, len(passes)

    disc.requires_grad_(False)
    got, ref = run(True), run(False)
    assert got[4] == 1 and ref[4] == 2
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=0)
    assert got[1] > 0 and any(g.abs().sum() > 0 for g in got[3])
    for a, b in zip(got[3], ref[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    disc.requires_grad_(True)  # trainable: the loss itself goes through the discriminator
    got = run(True)
    assert got[4] == 2 and disc.main[0].weight.grad is not None


def test_adversarial_discriminator_loss_hinge_and_bcr():
    x, x_rec = _images(b=4, size=8, seed=1), _images(b=4, size=8, seed=2).requires_grad_(True)
    adv = AdversarialLoss(diffaug_policy="", consistency_weight=10.0)
    loss, logs = adv.discriminator_loss(_mean_disc, x, x_rec)
    expected = hinge_d_loss(_mean_disc(x), _mean_disc(x_rec))
    torch.testing.assert_close(loss, expected)
    assert logs["bcr"].item() == 0.0  # identity augmentation: D(x) == D(aug(x))
    torch.testing.assert_close(logs["logits_real"], _mean_disc(x).mean())
    assert set(logs) == {"d_loss", "logits_real", "logits_fake", "bcr"}

    disc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 1))
    adv = AdversarialLoss(diffaug_policy="translation,cutout", consistency_weight=2.0)
    loss, logs = adv.discriminator_loss(disc, x, x_rec, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    logits_real = disc(adv.augment(x, g))
    logits_fake = disc(adv.augment(x_rec.detach(), g))
    g = torch.Generator().manual_seed(5)

    def aug(t):
        return adv.augment(t, g)

    bcr = consistency_loss(disc, x, aug) + consistency_loss(disc, x_rec.detach(), aug)
    torch.testing.assert_close(logs["bcr"], bcr.detach())
    torch.testing.assert_close(loss, hinge_d_loss(logits_real, logits_fake) + 2.0 * bcr)
    assert logs["bcr"] > 0
    loss.backward()
    assert x_rec.grad is None  # the reconstruction is detached for the discriminator step
    assert all(p.grad is not None for p in disc.parameters())
