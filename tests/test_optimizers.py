"""Optimizers and schedulers by injection (``OptimizerCallable`` / ``LRSchedulerCallable``):
every shipped config keeps the numbers of the AdamW + warm-up it had before, an injected
optimizer is used as given, and the default AdamW runs fused only where that changes nothing."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import checkpoints, config_stack, shipped_configs
from lightning.fabric.utilities.data import AttributeDict
from torch import nn

from dmvae_lightning.cli import main
from dmvae_lightning.modules import (
    ClassifierModule,
    DMVAEModule,
    LatentDiffusionModule,
    PointAlignmentModule,
)
from dmvae_lightning.modules.common import build_optimizer, fused_supported

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tokenizer_tiny.yaml")
ALL_CONFIGS = shipped_configs()
HYPER = ("lr", "betas", "weight_decay", "eps", "amsgrad", "maximize", "foreach", "fused")


def groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Hyperparameters of each group; ``lr`` is the base rate (a warm-up scheduler has already
    scaled ``lr`` and kept the base as ``initial_lr``)."""
    return [
        {k: g.get("initial_lr", g["lr"]) if k == "lr" else g.get(k) for k in HYPER}
        for g in optimizer.param_groups
    ]


def params() -> list[nn.Parameter]:
    return list(nn.Linear(2, 2).parameters())


def before_the_change(hp: AttributeDict, cls: type, trains_fake: bool) -> list:
    """The optimizers each module built before injection existed (copied from that code)."""
    adamw = torch.optim.AdamW
    if cls is DMVAEModule:
        opts = [
            adamw(params(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay),
            adamw(
                params(),
                lr=hp.disc_lr if hp.disc_lr is not None else hp.lr,
                betas=hp.betas,
                weight_decay=hp.disc_weight_decay,
            ),
        ]
        if trains_fake:
            lr = hp.fake_lr if hp.fake_lr is not None else hp.lr
            opts.append(adamw(params(), lr=lr, betas=hp.betas, weight_decay=hp.fake_weight_decay))
        return opts
    if cls is LatentDiffusionModule:
        return [adamw(params(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)]
    if cls is ClassifierModule:
        return [adamw(params(), lr=hp.lr, weight_decay=hp.weight_decay)]
    opts = [adamw(params(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)]
    if trains_fake:
        opts.append(adamw(params(), lr=hp.fake_lr, betas=tuple(hp.fake_betas), weight_decay=0))
    return opts


def stub(cls: type, hp: AttributeDict, trains_fake: bool) -> SimpleNamespace:
    """What ``configure_optimizers`` reads from the module, with 2x2 stand-in networks."""
    # a matching loss with a fake model and no parameters of its own for the VAE optimizer
    fake = SimpleNamespace(fake_parameters=params, parameters=lambda: iter(()))
    factories = {
        name: None
        for name in (
            "optimizer",
            "scheduler",
            "disc_optimizer",
            "disc_scheduler",
            "fake_optimizer",
            "fake_scheduler",
        )
    }
    return SimpleNamespace(
        hparams=hp,
        tokenizer=nn.Linear(2, 2),
        discriminator=nn.Linear(2, 2),
        matching_loss=fake,
        loss=fake,
        trains_fake=trains_fake,
        dit=nn.Linear(2, 2),
        net=nn.Linear(2, 2),
        points=nn.Parameter(torch.zeros(4, 2)),
        _factories=factories,
        _optimizer_factory=None,
        _scheduler_factory=None,
    )


def as_list(out) -> tuple[list, list]:
    if isinstance(out, dict):
        return [out["optimizer"]], [out["lr_scheduler"]]
    if isinstance(out, tuple):
        return list(out[0]), list(out[1])
    return list(out), []


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_shipped_configs_keep_their_optimizer_numbers(config, capsys):
    """Each shipped config (every default filled in by ``--print_config``) builds, through the
    module's own ``configure_optimizers``, optimizers whose hyperparameters equal those of the
    AdamW the module built before, and the same warm-up factors."""
    with pytest.raises(SystemExit):
        main(["fit", *config_stack(config), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    module_name, _, name = model["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    hp = AttributeDict(model["init_args"])
    for key in ("optimizer", "scheduler", "disc_optimizer", "fake_optimizer"):
        assert hp.get(key) is None, f"{config} injects {key}: compare it by hand"
    matching = hp.get("matching_loss") or hp.get("loss") or {}
    is_dmd = str(matching.get("class_path", "")).endswith("DMDLoss")
    trains_fake = is_dmd and hp.get("matching_weight", 1.0) != 0
    if cls is PointAlignmentModule:
        trains_fake = is_dmd and matching["init_args"].get("objective", "dmd") in (
            "dmd",
            "loss_difference",
            "fake_only",
            "score_l2",
        )
    optimizers, schedulers = as_list(cls.configure_optimizers(stub(cls, hp, trains_fake)))
    expected = before_the_change(hp, cls, trains_fake)
    assert [type(o) for o in optimizers] == [type(o) for o in expected]
    assert [groups(o) for o in optimizers] == [groups(o) for o in expected]
    # one warm-up schedule per optimizer (the toy's point alignment has none), so that the
    # loop below cannot pass by having nothing to check
    assert len(schedulers) == (0 if cls is PointAlignmentModule else len(optimizers))
    warmup = hp.get("warmup_steps")
    for entry in schedulers:
        assert entry["interval"] == "step"
        sched = entry["scheduler"]
        factors = [f(k) for f in sched.lr_lambdas for k in (0, 1, warmup or 0, 10**6)]
        steps = max(warmup, 1)
        assert factors == [min(1.0, (k + 1) / steps) for k in (0, 1, warmup or 0, 10**6)]


def test_tiny_tokenizer_run_equals_an_explicit_adamw_run(tmp_path):
    """A short stage-1 fit with the defaults gives the losses and weights of the same run with
    the pre-change optimizers written out in YAML (AdamW, betas (0.9, 0.95), weight decays 5e-3 /
    5e-4, linear warm-up), bit for bit."""
    overlay = tmp_path / "explicit.yaml"
    adamw = "torch.optim.AdamW"
    overlay.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "init_args": {
                        "optimizer": {
                            "class_path": adamw,
                            "init_args": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 5e-3},
                        },
                        "disc_optimizer": {
                            "class_path": adamw,
                            "init_args": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 5e-4},
                        },
                        "scheduler": {
                            "class_path": "torch.optim.lr_scheduler.LinearLR",
                            "init_args": {"start_factor": 0.5, "end_factor": 1.0, "total_iters": 1},
                        },
                        "disc_scheduler": {
                            "class_path": "torch.optim.lr_scheduler.LinearLR",
                            "init_args": {"start_factor": 0.5, "end_factor": 1.0, "total_iters": 1},
                        },
                    }
                }
            }
        )
    )
    runs = {}
    for name, extra in (("default", []), ("explicit", ["--config", str(overlay)])):
        root = tmp_path / name
        cli = main(
            ["--config", TINY, *extra, "--trainer.default_root_dir", str(root)]
            + ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6"]
            + ["--trainer.logger", "false"],
            run=False,
        )
        losses: list[float] = []

        original = cli.model.generator_loss

        def generator_loss(*args, _orig=original, _out=losses):
            loss, logs = _orig(*args)
            _out.append(float(loss))
            return loss, logs

        cli.model.generator_loss = generator_loss
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        runs[name] = (losses, torch.load(checkpoints(root)[-1], weights_only=True))
    # warmup_steps 2 is (k + 1) / 2 = 0.5, 1, 1, ...: LinearLR(0.5 -> 1 over 1 step)
    (loss_a, ckpt_a), (loss_b, ckpt_b) = runs["default"], runs["explicit"]
    assert len(loss_a) == 6 and loss_a == loss_b
    for key, value in ckpt_a["state_dict"].items():
        assert torch.equal(value, ckpt_b["state_dict"][key]), key
    # the checkpoint layout of the optimizers is unchanged (AdamW state per parameter)
    for a, b in zip(ckpt_a["optimizer_states"], ckpt_b["optimizer_states"], strict=True):
        assert a["param_groups"][0].keys() == b["param_groups"][0].keys()
        assert a["state"].keys() == b["state"].keys()


def test_generator_sgd_and_fake_lr_from_yaml(tmp_path, stage_ckpts):
    """Through the CLI: the DMD alignment run's generator optimizer is SGD and the fake score
    model's AdamW takes its learning rate from YAML; both are used in training."""
    overlay = tmp_path / "optim.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "init_args": {
                        "optimizer": {
                            "class_path": "torch.optim.SGD",
                            "init_args": {"lr": 0.05, "momentum": 0.9},
                        },
                        "fake_optimizer": {
                            "class_path": "torch.optim.AdamW",
                            "init_args": {"lr": 3.0e-4, "weight_decay": 0.0},
                        },
                    }
                }
            }
        )
    )
    cli = main(
        ["--config", str(REPO / "tests" / "configs" / "align_tiny.yaml"), "--config", str(overlay)]
        + ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
        + ["--model.init_args.init_from", stage_ckpts["tokenizer"]]
        + ["--model.init_args.matching_loss.init_args.real_model", stage_ckpts["reference"]],
        run=False,
    )
    model = cli.model
    before = {k: p.detach().clone() for k, p in model.tokenizer.named_parameters()}
    fake_before = [p.detach().clone() for p in model.matching_loss.fake_parameters()]
    cli.trainer.fit(model, datamodule=cli.datamodule)
    opt_g, opt_d, opt_f = cli.trainer.optimizers
    # the fake model's AdamW stepped on every batch and moved the fake model
    steps = {int(state["step"]) for state in opt_f.state.values()}
    assert steps == {int(model.batch_count)} and int(model.batch_count) > 0
    fake_after = list(model.matching_loss.fake_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(fake_after, fake_before, strict=True))
    assert type(opt_g) is torch.optim.SGD and opt_g.defaults["momentum"] == 0.9
    assert type(opt_d) is torch.optim.AdamW and type(opt_f) is torch.optim.AdamW
    # warm-up (2 steps) reached its end: the base learning rates are the YAML's
    assert opt_g.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt_f.param_groups[0]["lr"] == pytest.approx(3.0e-4)
    assert opt_f.param_groups[0]["weight_decay"] == 0.0
    assert all("momentum_buffer" in s for s in opt_g.state.values()) and opt_g.state
    moved = [k for k, p in model.tokenizer.named_parameters() if not torch.equal(p, before[k])]
    assert moved
    # the YAML form is what the checkpoint records, so the run reloads with its optimizers
    hparams = torch.load(checkpoints(tmp_path)[-1], weights_only=True)["hyper_parameters"]
    assert hparams["optimizer"]["class_path"] == "torch.optim.SGD"


def test_injected_callable_in_python_stays_out_of_saved_hparams():
    """A factory passed in Python (a lambda) is used but not saved: checkpoints load with
    ``weights_only=True``."""
    module = ClassifierModule(widths=[4, 8], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert "optimizer" not in module.hparams
    (opt,), _ = module.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["initial_lr"] == 0.1


def test_default_adamw_is_fused_only_on_cuda():
    cpu = params()
    assert not fused_supported(cpu)
    assert build_optimizer(None, cpu, lr=1e-3).param_groups[0]["fused"] is None
    if torch.cuda.is_available():
        gpu = [p.cuda() for p in params()]
        assert fused_supported(gpu)
        assert build_optimizer(None, gpu, lr=1e-3).param_groups[0]["fused"] is True
