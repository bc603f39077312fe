"""SLURM on CPU: variables faked in the environment are picked up by the Trainer the ``dmvae``
CLI builds (ranks, world size, main address and port), a task / device mismatch is a clear error
before anything starts, and a requeue signal (SIGUSR1) writes an ``hpc_ckpt_*.ckpt`` that the next
run resumes from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_same, free_port
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_only as pl_rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

from dmvae_lightning.cli import check_slurm_layout, main

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_TINY = str(REPO / "tests" / "configs" / "tokenizer_tiny.yaml")


def fake_slurm(monkeypatch, **extra: str) -> None:
    """Task 3 of a 2-node x 2-task job 123456 (node 1, local rank 1)."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NAME": "dmvae-align",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "2",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "gpu-a,gpu-b",
        **extra,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # recorded so that the test's changes are undone
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    # a Trainer of task 3 sets the process-wide rank used by rank_zero_only (loggers, prints)
    for holder in (fabric_rank_zero_only, pl_rank_zero_only, utils_rank_zero_only):
        monkeypatch.setattr(holder, "rank", getattr(holder, "rank", 0))


def build(tmp_path: Path, *extra: str):
    return main(
        ["--config", TOKENIZER_TINY, "--trainer.default_root_dir", str(tmp_path)]
        + ["--trainer.logger", "false", *extra],
        run=False,
    )


def test_slurm_variables_are_picked_up(tmp_path, monkeypatch):
    """devices 2 x num_nodes 2 under a faked srun task: SLURMEnvironment is chosen, with world
    size 4, global rank 3, local rank 1, node rank 1, main address the first node of the list
    and main port 15000 + the last 4 digits of the job id (every task derives the same one)."""
    fake_slurm(monkeypatch)
    cli = build(tmp_path, "--trainer.devices", "2", "--trainer.num_nodes", "2")
    trainer = cli.trainer
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank) == (4, 3)
    assert (trainer.local_rank, trainer.node_rank) == (1, 1)
    assert env.main_address == "gpu-a"
    assert env.main_port == 15000 + 3456


def test_interactive_job_is_not_treated_as_slurm(tmp_path, monkeypatch):
    """A job named ``bash`` (salloc + an interactive shell) is an ordinary 1-process run."""
    fake_slurm(monkeypatch, SLURM_JOB_NAME="bash")
    trainer = build(tmp_path, "--trainer.devices", "1").trainer
    assert not isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert trainer.world_size == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--trainer.devices", "4", "--trainer.num_nodes", "2"], r"--ntasks-per-node=2.*devices"),
        (["--trainer.devices", "[0]", "--trainer.num_nodes", "2"], r"--ntasks-per-node=2"),
        (["--trainer.devices", "2", "--trainer.num_nodes", "1"], r"--nodes=2.*num_nodes"),
    ],
)
def test_tasks_devices_mismatch_is_a_clear_error(tmp_path, monkeypatch, args, match):
    """trainer.devices != sbatch --ntasks-per-node (or num_nodes != --nodes) fails while the
    CLI parses, naming both settings."""
    fake_slurm(monkeypatch)
    with pytest.raises(ValueError, match=match):
        build(tmp_path, *args)


def test_check_slurm_layout_unit():
    """Outside SLURM nothing is checked; ``auto`` devices and SLURM's "2(x2)" form are handled."""
    check_slurm_layout({"devices": 8}, environ={})
    slurm = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_NNODES": "2"}
    check_slurm_layout({"devices": "auto", "num_nodes": 2}, environ=slurm)
    check_slurm_layout({"devices": "2", "num_nodes": 2}, environ=slurm)
    with pytest.raises(ValueError, match="trainer.devices"):
        check_slurm_layout({"devices": 3, "num_nodes": 2}, environ=slurm)


class RequeueAt(pl.Callback):
    """At the start of batch ``at`` (1-based, counted over the whole fit), deliver SIGUSR1 to
    this process, as SLURM does ``--signal=SIGUSR1@90`` seconds before the time limit."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


class RecordStart(pl.Callback):
    def __init__(self) -> None:
        self.batch_count: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.batch_count = int(pl_module.batch_count)


def test_requeue_signal_writes_checkpoint_and_next_run_resumes(
    tmp_path, monkeypatch, fashion_mnist_root
):
    """A 1-task SLURM job gets SIGUSR1 during batch 4 of its 6: at the end of that batch
    (:class:`SynchronizedRequeue`, added by the CLI) Lightning's requeue routine writes
    ``hpc_ckpt_1.ckpt`` in default_root_dir, calls ``scontrol requeue <job id>`` (a fake scontrol
    records it) and the run stops. The requeued job, the same command with no ckpt_path,
    resumes from that checkpoint (batch counter 4), trains the 2 remaining batches and ends with
    exactly the weights of an uninterrupted run."""
    fake_slurm(
        monkeypatch,
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NODELIST="localhost",
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = ["--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false"]

    def fit(root: Path, *callbacks: pl.Callback):
        cli = build(root, *args)
        cli.trainer.callbacks.extend(callbacks)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return cli.model

    reference = fit(tmp_path / "full")
    assert int(reference.batch_count) == 6

    root = tmp_path / "job"
    first = fit(root, RequeueAt(4))
    assert int(first.batch_count) == 4
    assert (root / "hpc_ckpt_1.ckpt").is_file()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "123456"]

    start = RecordStart()
    resumed = fit(root, start)
    assert start.batch_count == 4
    assert int(resumed.batch_count) == 6
    assert_same(reference.state_dict(), resumed.state_dict())


def _srun(root: Path, out: Path, scontrol_dir: Path, signal_at: dict[int, int]) -> None:
    """What ``srun`` does for a 1-node x 2-task job: the same ``dmvae fit`` (stage 1 tiny,
    ``ddp_explicit``, 2 epochs of 3 batches) in 2 processes, each with its task's SLURM variables; task r
    gets SIGUSR1 at the start of its batch ``signal_at[r]`` (none when absent)."""
    port = str(free_port())
    command = [
        sys.executable,
        "-m",
        "dmvae_lightning.cli",
        "fit",
        "--config",
        TOKENIZER_TINY,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp_explicit",
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--model.init_args.disc_start",
        "2",
        "--trainer.callbacks+=helpers.SlurmProbe",
    ]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
            "PATH": f"{scontrol_dir}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "dmvae-tokenizer",
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1",
            "SLURM_NODEID": "0",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODELIST": "localhost",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PROBE_OUT": str(out),
            "PROBE_SIGNAL_AT": str(signal_at.get(rank, 0)),
        }
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("a SLURM task hung (collectives out of step?)") from None
        assert proc.returncode == 0, output.decode(errors="replace")[-3000:]


def test_requeue_two_tasks_signalled_at_different_batches(tmp_path, fashion_mnist_root):
    """A 1-node x 2-task job (2 processes started as srun does, ``ddp_explicit``): SIGUSR1
    reaches task 0 during batch 2 and task 1 during batch 3, as signals do, at different points
    of the step. Both tasks write the requeue checkpoint after the same complete batch (2: the
    batch during which the first task was signalled, mid-epoch), rank 0 calls ``scontrol
    requeue`` once, and the run stops; the requeued job resumes there on both ranks and ends
    bit-identical to an uninterrupted 2-task run (2 epochs of 3 batches). (Lightning's own handler saves inside the signal handler, i.e.
    mid-step on rank 0 while rank 1 is in another collective.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)

    _srun(tmp_path / "straight", tmp_path / "straight_out", bin_dir, {})
    job = tmp_path / "job"
    _srun(job, tmp_path / "first", bin_dir, {0: 2, 1: 3})
    assert (job / "hpc_ckpt_1.ckpt").is_file()
    assert log.read_text().split() == ["requeue", "4242"]
    for rank in range(2):
        stopped = torch.load(tmp_path / "first" / f"rank{rank}.pt")
        assert int(stopped["batch_count"]) == 2
    saved = torch.load(job / "hpc_ckpt_1.ckpt", weights_only=False)
    assert int(saved["state_dict"]["batch_count"]) == 2

    _srun(job, tmp_path / "resumed", bin_dir, {})
    straight = [torch.load(tmp_path / "straight_out" / f"rank{r}.pt") for r in range(2)]
    resumed = [torch.load(tmp_path / "resumed" / f"rank{r}.pt") for r in range(2)]
    for rank in range(2):
        assert int(torch.load(tmp_path / "resumed" / f"start{rank}.pt")["batch_count"]) == 2
        assert int(resumed[rank]["batch_count"]) == 6  # 2 epochs x 3 batches
        assert_same(straight[rank], resumed[rank])
    assert_same(resumed[0], resumed[1])


@pytest.mark.parametrize("stage", ["tokenizer", "diffusion", "align", "finetune"])
def test_sbatch_templates(tmp_path, stage):
    """Every template asks for auto-requeue (--signal=SIGUSR1@90, --requeue) and launches with
    srun; run by bash under a faked 2-node x 8-task allocation (srun replaced by echo) it passes
    num_nodes 2, devices 8, a fixed default_root_dir and no ckpt_path, and with SCALE_LR=1 the
    config's learning rates times global batch (2 x 8 x per-device batch) / 256."""
    import subprocess
    import sys

    import yaml

    template = REPO / "scripts" / "slurm" / f"{stage}.sbatch"
    text = template.read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\necho "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "8(x2)",
        "SCALE_LR": "1",
        "ROOT": str(tmp_path / "root"),
    }
    out = subprocess.run(
        ["bash", str(template)], env=env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()[-1]
    argv = out.split()
    options = dict(zip(argv[4::2], argv[5::2], strict=False))
    assert argv[:4] == [sys.executable, "-m", "dmvae_lightning.cli", "fit"]
    assert options["--trainer.num_nodes"] == "2" and options["--trainer.devices"] == "8"
    assert options["--trainer.default_root_dir"] == str(tmp_path / "root")
    assert "--ckpt_path" not in options
    config = yaml.safe_load((REPO / "configs" / "imagenet" / f"{stage}.yaml").read_text())
    model, batch = config["model"]["init_args"], config["data"]["init_args"]["batch_size"]
    for name in ("lr", "fake_lr", "disc_lr"):
        if model.get(name) is not None:
            expected = float(model[name]) * 2 * 8 * batch / 256
            assert float(options[f"--model.init_args.{name}"]) == pytest.approx(expected)
