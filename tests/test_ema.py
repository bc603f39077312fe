"""EMA of a chosen module: closed-form averages, exact swap/restore, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmvae_lightning.ema import EMA


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


class Owner(nn.Module):
    def __init__(self, decay=0.9, warmup=False):
        super().__init__()
        self.net = _net()
        self.ema = EMA(self.net, decay=decay, warmup=warmup)


def _set_all(module, value):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_k_updates_with_constant_params_match_closed_form():
    net = _net()
    p0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    ema = EMA(net, decay=0.9)
    _set_all(net, 0.25)
    k = 7
    for _ in range(k):
        ema.update(net)
    for name, init in p0.items():
        expected = 0.25 + (init - 0.25) * 0.9**k
        torch.testing.assert_close(getattr(ema, name.replace(".", "__")), expected)
    assert ema.num_updates.item() == k and ema.num_updates.dtype == torch.long


def test_buffers_copied_verbatim_and_not_averaged():
    net = _net()
    ema = EMA(net, decay=0.99)
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
        net[1].num_batches_tracked.fill_(11)
    ema.update(net)
    assert torch.equal(ema.get_buffer("1__running_mean"), torch.full((4,), 3.0))
    assert ema.get_buffer("1__num_batches_tracked").item() == 11


def test_warmup_decay_schedule():
    net = _net()
    p0 = net[0].weight.detach().clone()
    ema = EMA(net, decay=0.5, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)
    _set_all(net, 1.0)
    ema.update(net)
    torch.testing.assert_close(ema.get_buffer("0__weight"), 0.1 * p0 + 0.9)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates.fill_(10)
    assert ema.current_decay() == 0.5  # min(0.5, 11 / 20)
    assert EMA(net, decay=0.9).current_decay() == 0.9


def test_scope_swaps_and_restores_exactly_also_on_exception():
    net = _net()
    ema = EMA(net, decay=0.5)
    _set_all(net, 2.0)
    ema.update(net)  # averages are now (p0 + 2) / 2
    original = {k: v.clone() for k, v in net.state_dict().items()}
    averaged = ema.get_buffer("0__weight").clone()

    with ema.scope(net) as swapped:
        assert swapped is net
        assert torch.equal(net[0].weight, averaged)
    for k, v in net.state_dict().items():
        assert torch.equal(v, original[k]), k

    with pytest.raises(RuntimeError, match="boom"), ema.scope(net):
        with torch.no_grad():
            net[2].bias.add_(5.0)
        raise RuntimeError("boom")
    for k, v in net.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_copy_to_writes_averages():
    """decay 0.7, two updates towards another net: copy_to writes 0.7^2 p0 + 0.3 (0.7 p1 + p2)
    into the parameters and the last buffers verbatim."""
    net = _net()
    p0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    ema = EMA(net, decay=0.7)
    first, second = _net(seed=1), _net(seed=2)
    ema.update(first)
    ema.update(second)
    ema.copy_to(net)
    p1, p2 = dict(first.named_parameters()), dict(second.named_parameters())
    for name, param in net.named_parameters():
        expected = 0.49 * p0[name] + 0.21 * p1[name] + 0.3 * p2[name]
        torch.testing.assert_close(param, expected.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(net[0].weight, p2["0.weight"])  # an average, not the latest
    for name, buf in net.named_buffers():
        assert torch.equal(buf, dict(second.named_buffers())[name]), name


def test_state_dict_round_trip_and_no_duplicate_model():
    owner = Owner()
    _set_all(owner.net, 0.5)
    owner.ema.update(owner.net)
    owner.ema.update(owner.net)
    state = owner.state_dict()
    ema_keys = {k for k in state if k.startswith("ema.")}
    n_model = len(owner.net.state_dict())
    assert len(ema_keys) == n_model + 1  # one per tracked tensor + num_updates
    assert "ema.0__weight" in ema_keys and "ema.num_updates" in ema_keys
    assert not any(k.startswith("ema.net") for k in state)

    fresh = Owner()
    fresh.load_state_dict(state, strict=True)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.ema.num_updates.item() == 2
    fresh.to(torch.float64)
    assert fresh.ema.get_buffer("0__weight").dtype == torch.float64
    fresh.ema.update(fresh.net)  # still works after the move


def test_mismatched_model_is_an_error():
    ema = EMA(_net())
    with pytest.raises(KeyError, match="does not match"):
        ema.update(nn.Linear(3, 4))


def test_ema_buffers_never_require_grad_and_update_builds_no_graph():
    net = _net()
    ema = EMA(net)
    ema.update(net)
    assert all(not b.requires_grad for b in ema.buffers())
    assert list(ema.parameters()) == []
