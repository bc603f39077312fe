"""The parallel study (``dmvae study --jobs N``): its plan of units, the scheduler and the stage
locks. The end-to-end parallel run is in test_study.py (its first run uses ``--jobs 2``)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from dmvae_lightning import study
from dmvae_lightning.study.parallel import Unit, log_name, named_stages, plan, run_units

ROOT = Path(__file__).resolve().parents[1]


def make_study(tmp_path: Path, seeds=(0, 1)) -> study.Study:
    return study.Study(tmp_path / "runs", root=ROOT, seeds=seeds, quick=True, log=lambda _: None)


def test_named_stages_reads_shared_stage_references_from_an_overlay():
    overlay = {
        "model": {"init_args": {"encoder": {"weights_path": "@classifier"}, "x": ["@ssl", 3]}},
        "data": {"init_args": {"reference": {"path": "@latents/tokenizer_supervised"}}},
        "cache": "@runs/shared/text",
    }
    assert named_stages(overlay) == {"classifier", "ssl", "tokenizer_supervised"}
    assert named_stages({"a": "no@stage", "b": []}) == set()


def test_plan_orders_shared_stages_arms_and_seeds_and_leaves_out_finished_work(tmp_path):
    st = make_study(tmp_path)
    arms = [st.arm(k) for k in ("cfg3", "ablation", "diffusion_noise", "kl_vae")]
    units = {u.name: set(u.needs) for u in plan(st, arms)}
    order = list(units)
    assert units["shared:classifier"] == set()
    assert units["shared:tokenizer_supervised"] == {"shared:classifier"}
    assert units["shared:reference_supervised"] == {"shared:tokenizer_supervised"}
    # the diffusion-noise reference reads the stage-1 latents (@latents/tokenizer_supervised)
    assert units["shared:reference_diffusion_noise"] == {"shared:tokenizer_supervised"}
    # cfg3's evaluation encodes with its ablation's tokenizer, but the two train at once (the
    # evaluation waits on the ablation's stage locks if it gets there first)
    assert units["arm:cfg3"] == {
        "shared:classifier",
        "shared:fid_net",
        "shared:tokenizer_supervised",
        "shared:reference_supervised",
    }
    assert units["arm:kl_vae"] == {"shared:fid_net"}
    assert units["seed:cfg3:1"] == {"arm:cfg3"}
    assert "shared:ssl" not in units and "shared:reference_gaussian" not in units
    for name, needs in units.items():  # every need comes first: the start order is usable
        assert all(order.index(n) < order.index(name) for n in needs), name
    assert [n for n in order if n.startswith("seed:")] == [
        f"seed:{k}:{s}" for k in ("cfg3", "ablation", "diffusion_noise", "kl_vae") for s in (0, 1)
    ]

    # finished work drops out, and so do the needs on it
    shared = st.runs / "shared"
    shared.mkdir(parents=True)
    (shared / "classifier.ckpt").write_bytes(b"")
    (shared / "fid_net.ckpt").write_bytes(b"")
    # a checkpoint without its .seconds is an interrupted stage: still a unit to run
    units = {u.name: set(u.needs) for u in plan(st, arms)}
    assert units["shared:classifier"] == set() and units["shared:fid_net"] == set()
    for name in ("classifier", "fid_net"):
        (shared / f"{name}.seconds").write_text("1.0\n")
    arm_dir = st.runs / "arms" / "kl_vae"
    arm_dir.mkdir(parents=True)
    (arm_dir / "generator_seed0.json").write_text("{}")
    units = {u.name: set(u.needs) for u in plan(st, arms)}
    assert "shared:classifier" not in units and "shared:fid_net" not in units
    assert units["shared:tokenizer_supervised"] == set()
    assert units["arm:kl_vae"] == set() and units["seed:kl_vae:1"] == {"arm:kl_vae"}
    assert "seed:kl_vae:0" not in units
    # a prepared arm (tokenizer evaluated, latents cached) has no arm unit: its seeds need only
    # the shared stages not done yet
    ablation_dir = st.runs / "arms" / "ablation"
    (ablation_dir / "latents").mkdir(parents=True)
    (ablation_dir / "tokenizer.json").write_text("{}")
    (ablation_dir / "latents" / "train.seconds").write_text("1.0\n")
    assert "arm:ablation" in {u.name for u in plan(st, arms)}  # the val cache is missing
    (ablation_dir / "latents" / "val.seconds").write_text("1.0\n")
    units = {u.name: set(u.needs) for u in plan(st, arms)}
    assert "arm:ablation" not in units and "arm:cfg3" in units
    assert units["seed:ablation:0"] == {
        "shared:tokenizer_supervised",
        "shared:reference_supervised",
    }
    # an arm whose result holds these seeds is not planned at all
    (arm_dir / "result.json").write_text(json.dumps({"seeds": [0, 1], "generator_steps": 600}))
    assert not any("kl_vae" in u.name for u in plan(st, arms))


def test_a_second_generator_budget_reuses_the_prepared_arm_and_names_its_files_apart(tmp_path):
    """Generators at 1500 steps in a runs folder that holds the 600-step ones: the tokenizer
    and caches are reused (no arm unit), the 600-step seed and result files do not count as
    done, and the 1500-step files are named by their budget, so they do not count at 600."""
    st = make_study(tmp_path)
    arm = st.arm("kl_vae")
    arm_dir = st.runs / "arms" / "kl_vae"
    (arm_dir / "latents").mkdir(parents=True)
    (arm_dir / "tokenizer.json").write_text("{}")
    for split in ("train", "val"):
        (arm_dir / "latents" / f"{split}.seconds").write_text("1.0\n")
    for seed in (0, 1):
        (arm_dir / f"generator_seed{seed}.json").write_text("{}")
    (arm_dir / "result.json").write_text(json.dumps({"seeds": [0, 1], "generator_steps": 600}))
    assert plan(st, [arm]) == []
    longer = study.Study(st.runs, root=ROOT, seeds=(0, 1), quick=True, generator_steps=1500)
    assert longer.seed_file(arm, 1) == arm_dir / "generator_steps1500_seed1.json"
    assert longer.result_file(arm) == arm_dir / "result_steps1500.json"
    assert longer.seed_stage(arm, 1) == "kl_vae/generator_steps1500_seed1"
    units = {u.name: set(u.needs) for u in plan(longer, [arm])}
    assert set(units) == {"shared:fid_net", "seed:kl_vae:0", "seed:kl_vae:1"}
    assert units["seed:kl_vae:0"] == {"shared:fid_net"}  # the prepared tokenizer, read back
    longer.seed_file(arm, 0).write_text("{}")
    assert "seed:kl_vae:0" not in {u.name for u in plan(longer, [arm])}
    longer.result_file(arm).write_text(json.dumps({"seeds": [0, 1], "generator_steps": 1500}))
    assert plan(longer, [arm]) == []
    # a result of the default's name at another budget (as written before files named their
    # budget) is not taken for this one
    (arm_dir / "result.json").write_text(json.dumps({"seeds": [0, 1], "generator_steps": 3000}))
    assert st.finished(arm) is None


def test_budget_suffix_names_every_budget_but_the_default():
    assert study.budget_suffix(study.DEFAULT_GENERATOR_STEPS) == ""
    assert study.budget_suffix(1500) == "_steps1500"
    assert study.budget_suffix(None) == "_steps0"  # diffusion.yaml's own max_steps
    with pytest.raises(ValueError, match="generator_steps must be >= 1"):
        study.budget_suffix(-5)


def test_a_control_not_run_itself_gets_a_tokenizer_unit_until_it_is_trained(tmp_path):
    """cfg3's evaluation encodes with its control's (``ablation``) tokenizer. Run without it,
    the control's tokenizer is a unit of its own (before the arms, needing what that tokenizer
    needs, not the FID net), not a stage hidden in cfg3's evaluation; run with it, the
    control's arm unit trains it; trained, or with cfg3 already evaluated, it drops out."""
    st = make_study(tmp_path)
    units = {u.name: set(u.needs) for u in plan(st, [st.arm("cfg3")])}
    assert units["control:ablation"] == {
        "shared:classifier",
        "shared:tokenizer_supervised",
        "shared:reference_supervised",
    }
    order = list(units)
    assert order.index("control:ablation") < order.index("arm:cfg3")
    assert "control:ablation" not in units["arm:cfg3"]  # they train at once
    both = [st.arm("cfg3"), st.arm("ablation")]
    assert not any(n.startswith("control:") for n in (u.name for u in plan(st, both)))
    # only the first of the control's two stages finished: still a unit
    cfg3_dir = st.runs / "arms" / "cfg3"  # cfg3 evaluated already: no control needed
    (cfg3_dir / "latents").mkdir(parents=True)
    for path in ("tokenizer.json", "latents/train.seconds", "latents/val.seconds"):
        (cfg3_dir / path).write_text("1.0\n")
    assert not any(u.name.startswith("control:") for u in plan(st, [st.arm("cfg3")]))
    for path in ("tokenizer.json", "latents/train.seconds", "latents/val.seconds"):
        (cfg3_dir / path).unlink()
    first, last = st.tokenizer_checkpoints(st.arm("ablation"))
    first.parent.mkdir(parents=True)
    for path in (first, st.seconds_file(first), last):
        path.write_text("1.0\n")
    assert not st.tokenizer_trained(st.arm("ablation"))
    assert "control:ablation" in {u.name for u in plan(st, [st.arm("cfg3")])}
    st.seconds_file(last).write_text("1.0\n")
    assert st.tokenizer_trained(st.arm("ablation"))
    assert "control:ablation" not in {u.name for u in plan(st, [st.arm("cfg3")])}


def test_run_unit_dispatches_each_kind_and_names_the_kinds_of_an_unknown_one():
    from dmvae_lightning.study.parallel import run_unit

    calls: list[tuple[str, str]] = []

    class Stub:
        def arm(self, key):
            return key

        def shared(self, name):
            calls.append(("shared", name))

        def prepare_arm(self, arm):
            calls.append(("prepare", arm))
            return "tok", None, "cache"

        def tokenizer(self, arm):
            calls.append(("tokenizer", arm))

        def run_seed(self, arm, tokenizer, cache, seed):
            calls.append(("seed", f"{arm}/{tokenizer}/{cache}/{seed}"))

    for unit in ("shared:fid_net", "arm:cfg3", "control:ablation", "seed:cfg3:2"):
        run_unit(Stub(), unit)
    assert calls == [
        ("shared", "fid_net"),
        ("prepare", "cfg3"),
        ("tokenizer", "ablation"),  # the control's tokenizer only: no evaluation, no cache
        ("prepare", "cfg3"),
        ("seed", "cfg3/tok/cache/2"),
    ]
    with pytest.raises(ValueError, match="control:<arm>"):
        run_unit(Stub(), "generator:cfg3")


def _sleeper(tmp_path: Path, fail: str | None = None, slow: str | None = None):
    """A worker command that sleeps 0.4 s (unit ``slow``: 2 s), records its start and end times
    and its thread count in <unit>.json, and exits 3 for unit ``fail``."""
    code = (
        "import json, sys, time; t = time.time(); "
        "name = sys.argv[1]; out = sys.argv[2]; "
        "time.sleep(2.0 if name == sys.argv[5] else 0.4); "
        "open(out + '/' + name.replace(':', '_') + '.json', 'w')"
        ".write(json.dumps([t, time.time(), int(sys.argv[4])])); "
        "sys.exit(3 if name == sys.argv[3] else 0)"
    )
    return lambda unit, threads: [
        *(sys.executable, "-c", code, unit, str(tmp_path), fail or "", str(threads), slow or "")
    ]


def test_run_units_keeps_to_jobs_and_needs(tmp_path):
    units = [
        Unit("shared:a"),
        Unit("shared:b"),
        Unit("arm:x", ("shared:a", "shared:b")),
        Unit("arm:y", ("shared:a",)),
        Unit("seed:x:0", ("arm:x",)),
        Unit("seed:x:1", ("arm:x",)),
    ]
    lines: list[str] = []
    seconds = run_units(units, _sleeper(tmp_path), 2, tmp_path / "logs", log=lines.append)
    assert set(seconds) == {u.name for u in units} and min(seconds.values()) >= 0.4
    times = {
        u.name: json.loads((tmp_path / f"{u.name.replace(':', '_')}.json").read_text())
        for u in units
    }
    for unit in units:
        for need in unit.needs:
            assert times[need][1] <= times[unit.name][0], (need, unit.name)
    # never more than 2 at once, and 2 at once at some point (the shared stages)
    events = sorted([(t[0], 1) for t in times.values()] + [(t[1], -1) for t in times.values()])
    level, peak = 0, 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 2
    assert sum(line.startswith("[study] done") for line in lines) == len(units)
    assert (tmp_path / "logs" / "seed_x_1.log").is_file()


def test_a_unit_that_starts_alone_takes_the_free_cores(tmp_path):
    """jobs 2 on 4 cores, 2 threads a unit: the lone first stage gets all 4; two stages ready
    together get 2 each; a unit that starts beside a running one gets what that one leaves;
    ``cores=None`` (``--threads N``) gives every unit exactly N; the environment follows."""
    units = [
        Unit("shared:a"),
        Unit("shared:b", ("shared:a",)),
        Unit("shared:c", ("shared:a",)),
        Unit("arm:x", ("shared:b", "shared:c")),
        Unit("seed:x:0", ("arm:x",)),
        Unit("seed:x:1", ("arm:x",)),
        Unit("seed:x:2", ("arm:x",)),
    ]
    envs: list[int] = []

    def env(threads: int) -> dict[str, str]:
        envs.append(threads)
        return dict(os.environ)

    def threads_of(tag: str, **kwargs) -> dict[str, int]:
        out = tmp_path / tag
        out.mkdir()
        sleeper = _sleeper(out, slow="seed:x:1")
        run_units(units, sleeper, 2, out / "logs", env=env, log=lambda _: 0, **kwargs)
        return {
            u.name: json.loads((out / log_name(u.name)).with_suffix(".json").read_text())[2]
            for u in units
        }

    got = threads_of("free", threads=2, cores=4)
    assert got["shared:a"] == 4 and got["arm:x"] == 4  # alone: the whole machine
    assert got["shared:b"] == got["shared:c"] == 2  # ready together: 2 each
    # seeds 0 and 1 start together (2 each); seed 2 when seed 0 ends, beside the slow seed 1
    assert [got[f"seed:x:{s}"] for s in range(3)] == [2, 2, 2]
    assert envs == [got[u.name] for u in units]
    assert set(threads_of("fixed", threads=1).values()) == {1}
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        run_units(units, _sleeper(tmp_path), 2, tmp_path / "logs", threads=0)


def test_run_units_stops_at_a_failure_and_names_its_log(tmp_path):
    units = [Unit("shared:a"), Unit("arm:x", ("shared:a",)), Unit("seed:x:0", ("arm:x",))]
    with pytest.raises(RuntimeError, match=r"arm:x failed \(exit 3\).*arm_x\.log"):
        run_units(units, _sleeper(tmp_path, fail="arm:x"), 2, tmp_path / "logs", log=lambda _: 0)
    assert not (tmp_path / "seed_x_0.json").exists()  # nothing started after the failure
    # an independent unit, ready when the failure is seen (one job: it waits for the slot),
    # does not start either
    with pytest.raises(RuntimeError, match=r"arm:y failed"):
        run_units(
            [Unit("arm:y"), Unit("shared:b")],
            _sleeper(tmp_path, fail="arm:y"),
            1,
            tmp_path / "logs",
            log=lambda _: 0,
        )
    assert (tmp_path / "arm_y.json").exists() and not (tmp_path / "shared_b.json").exists()
    with pytest.raises(ValueError, match="needs \\['shared:z'\\]"):
        run_units([Unit("arm:x", ("shared:z",))], _sleeper(tmp_path), 1, tmp_path / "logs")
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        run_units([], _sleeper(tmp_path), 0, tmp_path / "logs")


def test_a_stage_asked_for_by_two_processes_at_once_is_trained_once(tmp_path):
    """Two study objects (as two ``--jobs`` workers) ask for the same shared stage at the same
    time: one trains it under the lock, the other waits and reads it back."""
    trained: list[str] = []

    def fake_train(self, config, overlay, ckpt, tb_name, seed):
        trained.append(tb_name)
        time.sleep(0.5)  # the other one asks meanwhile
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"weights")
        ckpt.with_suffix(".seconds").write_text("12.5\n")
        self.stage_seconds[tb_name] = 12.5
        return 12.5

    studies = [make_study(tmp_path), make_study(tmp_path)]
    for st in studies:
        st._train = fake_train.__get__(st)
    threads = [threading.Thread(target=st.shared, args=("fid_net",)) for st in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trained == ["shared/fid_net"]
    # the waiting one read the trainer's seconds back
    assert [st.stage_seconds.get("shared/fid_net") for st in studies] == [12.5, 12.5]


def _finish_shared_stages(st: study.Study) -> None:
    """Mark every shared stage trained (a checkpoint and its seconds), so that a test's
    ``Study.tokenizer`` only trains the arms' own stages."""
    from dmvae_lightning.study.arms import SHARED

    for name in SHARED:
        ckpt = st.shared_checkpoint(name)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"shared")
        st.seconds_file(ckpt).write_text("1.0\n")


def test_an_arm_copies_a_stage_that_another_arm_trained_the_same_way(tmp_path):
    """align_xxlong_cfg3_ssl_ft1000 is align_xxlong_cfg3_ssl with a longer second stage: its
    first stage (same reference, config, overlay and seeds) is copied from the other arm's, with
    its seconds and a note of where it came from, and only the second stage trains. A copy, not
    a link; another seed, or a stage already started in the arm's own folder, trains."""
    trained: list[str] = []
    lines: list[str] = []

    def fake_train(self, config, overlay, ckpt, tb_name, seed):
        trained.append(tb_name)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(tb_name.encode())
        self.seconds_file(ckpt).write_text(f"{len(trained)}.5\n")
        self.stage_seconds[tb_name] = len(trained) + 0.5
        return len(trained) + 0.5

    st = study.Study(tmp_path / "runs", root=ROOT, quick=True, log=lines.append)
    st._train = fake_train.__get__(st)
    _finish_shared_stages(st)
    base, longer = st.arm("align_xxlong_cfg3_ssl"), st.arm("align_xxlong_cfg3_ssl_ft1000")
    assert base.stage_fingerprint(0) == longer.stage_fingerprint(0)
    assert base.stage_fingerprint(1) != longer.stage_fingerprint(1)
    assert st.same_stage(longer, 0) is None  # nothing trained yet
    with pytest.raises(IndexError, match="2 tokenizer stages, not 3"):
        longer.stage_fingerprint(2)
    st.tokenizer(base)
    assert trained == ["align_xxlong_cfg3_ssl/0_align", "align_xxlong_cfg3_ssl/1_finetune"]

    trained.clear()
    final = st.tokenizer(longer)
    assert trained == ["align_xxlong_cfg3_ssl_ft1000/1_finetune"]
    assert final.read_bytes() == b"align_xxlong_cfg3_ssl_ft1000/1_finetune"
    source, copy = st.tokenizer_checkpoints(base)[0], st.tokenizer_checkpoints(longer)[0]
    assert copy.read_bytes() == b"align_xxlong_cfg3_ssl/0_align"
    assert os.stat(copy).st_ino != os.stat(source).st_ino
    assert st.seconds_file(copy).read_text() == "1.5\n"
    assert st.stage_seconds["align_xxlong_cfg3_ssl_ft1000/0_align"] == 1.5
    assert (
        copy.with_suffix(".reused").read_text()
        == "arms/align_xxlong_cfg3_ssl/tokenizer_0_align.ckpt\n"
    )
    assert any("copied arms/align_xxlong_cfg3_ssl/tokenizer_0_align.ckpt" in ln for ln in lines)

    trained.clear()  # alignment seed 1: its own stages
    st.tokenizer(st.arm("align_xxlong_cfg3_ssl_ft1000_seed1"))
    assert trained == [f"align_xxlong_cfg3_ssl_ft1000_seed1/{i}" for i in ("0_align", "1_finetune")]

    # a stage started in the arm's own folder (an interrupted run's save) is resumed, not
    # replaced by the copy
    third = st.arm("align_xxlong_cfg3_ssl_ft3ep")
    started = st.tokenizer_checkpoints(third)[0]
    started.parent.mkdir(parents=True)
    started.write_bytes(b"partial")
    trained.clear()
    st.tokenizer(third)
    assert trained == [f"align_xxlong_cfg3_ssl_ft3ep/{i}" for i in ("0_align", "2_finetune")]
    assert (
        st.tokenizer_checkpoints(third)[1].read_bytes()
        == b"align_xxlong_cfg3_ssl_ft1000/1_finetune"
    )


def test_the_plan_trains_a_stage_two_arms_share_once(tmp_path):
    """Run together with nothing trained, the arm (and the control) that share a first stage
    with an earlier one wait for it instead of training it beside it; once it is trained they
    do not wait."""
    st = make_study(tmp_path)
    arms = [st.arm("align_xxlong_cfg3_ssl"), st.arm("align_xxlong_cfg3_ssl_ft1000")]
    units = {u.name: set(u.needs) for u in plan(st, arms)}
    assert "arm:align_xxlong_cfg3_ssl" in units["arm:align_xxlong_cfg3_ssl_ft1000"]
    assert "arm:align_xxlong_cfg3_ssl_ft1000" not in units["arm:align_xxlong_cfg3_ssl"]
    # their controls share a first stage too
    assert "control:ablation_xxlong_ssl" in units["control:ablation_xxlong_ssl_ft1000"]
    # another seed shares nothing
    seeded = plan(st, [arms[0], st.arm("align_xxlong_cfg3_ssl_ft1000_seed1")])
    needs = {u.name: set(u.needs) for u in seeded}["arm:align_xxlong_cfg3_ssl_ft1000_seed1"]
    assert not any(n.startswith(("arm:", "control:")) for n in needs)

    first = st.tokenizer_checkpoints(arms[0])[0]
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    st.seconds_file(first).write_text("1.0\n")
    units = {u.name: set(u.needs) for u in plan(st, arms)}
    assert "arm:align_xxlong_cfg3_ssl" not in units["arm:align_xxlong_cfg3_ssl_ft1000"]


def test_an_arm_with_nothing_to_train_waits_for_its_controls_unit(tmp_path):
    """cfg3's evaluation encodes with its control's tokenizer. While cfg3 has stages to train,
    its unit and the control's train side by side; once they are all finished (or copied from
    another arm), its unit would go straight to the evaluation and sit on the control's stage
    lock, so it needs the control's unit (run as an arm, or as a control unit) instead."""
    st = make_study(tmp_path)
    cfg3, ablation = st.arm("cfg3"), st.arm("ablation")
    units = {u.name: set(u.needs) for u in plan(st, [cfg3, ablation])}
    assert "arm:ablation" not in units["arm:cfg3"]
    for ckpt in st.tokenizer_checkpoints(cfg3):
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"x")
        st.seconds_file(ckpt).write_text("1.0\n")
    units = {u.name: set(u.needs) for u in plan(st, [cfg3, ablation])}
    assert "arm:ablation" in units["arm:cfg3"]
    assert "arm:cfg3" not in units["arm:ablation"]
    units = {u.name: set(u.needs) for u in plan(st, [cfg3])}
    assert "control:ablation" in units["arm:cfg3"]
