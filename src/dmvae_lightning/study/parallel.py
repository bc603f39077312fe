"""Running a study as parallel worker processes (``dmvae study --jobs N``).

The work of a study splits into *units*, each run by ``python -m dmvae_lightning.study --unit
NAME`` in a fresh process with ``--threads T`` torch threads:

* ``shared:<stage>``: a shared stage (classifier, FID net, stage-1 tokenizer, reference model);
* ``arm:<arm>``: an arm's tokenizer stages, their evaluation and its latent cache;
* ``control:<arm>``: the tokenizer stages of arm ``<arm>`` alone, when it is the control
  (``ablation``) of an arm being run but is not run itself: the arm's evaluation encodes with
  it (the latent-distance column), and as a unit of its own it trains beside the arm and shows
  in the plan, instead of inside the arm's evaluation;
* ``seed:<arm>:<seed>``: one generator of an arm, trained and evaluated.

A unit starts when the units it needs have finished (:func:`plan` names them); at most ``jobs``
run at once, each with ``threads`` torch threads, except that a unit which starts with no other
unit ready to start takes every core the running units leave free (a one-arm study's tokenizer
unit, a shared stage all the rest waits on): a unit only becomes ready when another finishes, so
nothing else could use those cores until then, and they are never oversubscribed. The
dependencies only order the work: every stage is also built under a lock file
(:func:`~dmvae_lightning.study.driver.stage_lock`), so a stage the plan missed is still built
once, by whichever unit asks first. Each unit writes its results into the runs folder as the
sequential study does; the calling process then reads them back and writes the report, so a
parallel study and a sequential one leave the same result files (the parallel one adds the
workers' logs). A unit's output goes to
``<runs>/logs/<unit>.log``; a failed unit stops new starts, lets the running ones finish and
raises with the path of its log.

Why processes, and why one thread each by default: the study's models are small (a 1.3 M
parameter DiT on 4 tokens, 32x32 convolutions), so a step cannot keep two cores busy; two
single-thread processes do more work per second than one process with two threads (measured
by ``benchmarks/bench_study_jobs.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmvae_lightning.study.arms import ENCODER_OF, REFERENCES, SHARED, Arm, load_overlay


@dataclass(frozen=True)
class Unit:
    """One piece of a study for a worker process: ``name`` and the units it waits for."""

    name: str
    needs: tuple[str, ...] = ()


def named_stages(value: Any) -> set[str]:
    """Shared stages named by ``@<stage>`` / ``@latents/<stage>`` strings anywhere in
    ``value`` (an overlay); ``@runs/...`` paths name none."""
    if isinstance(value, str) and value.startswith("@") and not value.startswith("@runs"):
        return {value[len("@latents/") :] if value.startswith("@latents/") else value[1:]}
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return set().union(*(named_stages(v) for v in value)) if value else set()
    return set()


def stage_needs(name: str) -> set[str]:
    """The shared stages shared stage ``name`` is built from (direct ones)."""
    return named_stages(SHARED[name].overlay)


def tokenizer_needs(arm: Arm, configs: Path) -> set[str]:
    """The shared stages ``arm``'s tokenizer stages use (direct ones)."""
    needs: set[str] = set()
    if arm.reference:
        ref = REFERENCES[arm.reference]
        needs |= {ref.tokenizer, ref.model}
        if ref.tokenizer in ENCODER_OF:
            needs.add(ENCODER_OF[ref.tokenizer])
        needs |= named_stages(ref.source)
    for stage in arm.tokenizer:
        needs |= named_stages(load_overlay(stage.get("overlay"), configs))
    return needs


def arm_needs(arm: Arm, configs: Path) -> set[str]:
    """The shared stages ``arm``'s tokenizer stages and evaluation use (direct ones)."""
    needs = tokenizer_needs(arm, configs) | {"fid_net"}  # rFID of the tokenizer, gFID
    return needs | named_stages(load_overlay(arm.generator, configs))


def plan(study: Any, arms: Sequence[Arm]) -> list[Unit]:
    """The units left to run for ``arms`` of ``study`` (a :class:`Study`), in a good start
    order: shared stages first, then the tokenizers of controls not run themselves, then the
    arms' tokenizers, then their generators. Finished work (checkpoints, prepared arms,
    trained controls, the result and generator files of these seeds at this generator budget)
    is left out, and so are the needs on it. Of two units whose arms share an unfinished
    tokenizer stage (:meth:`~dmvae_lightning.study.arms.Arm.stage_fingerprint`), the second
    needs the first, which trains it; the second copies it (``Study.tokenizer``)."""
    units: dict[str, Unit] = {}

    def done_stage(name: str) -> bool:  # an interrupted stage's checkpoint is not done
        return study.stage_finished(study.shared_checkpoint(name))

    def add_stage(name: str) -> str | None:
        if name not in SHARED:
            raise KeyError(f"unknown shared stage {name!r}; known: {sorted(SHARED)}")
        key = f"shared:{name}"
        if done_stage(name) or key in units:
            return key if key in units else None
        needs = [k for dep in sorted(stage_needs(name)) if (k := add_stage(dep))]
        units[key] = Unit(key, tuple(needs))
        return key

    # a tokenizer stage two units would train (the same fingerprint, finished nowhere) is
    # trained by the first; the other waits for it and copies it (Study.tokenizer)
    stage_units: dict[str, str] = {}

    def same_stage_needs(arm: Arm, key: str) -> tuple[str, ...]:
        needs: list[str] = []
        for i, ckpt in enumerate(study.tokenizer_checkpoints(arm)):
            if study.stage_finished(ckpt) or study.same_stage(arm, i) is not None:
                continue
            owner = stage_units.setdefault(arm.stage_fingerprint(i), key)
            if owner != key and owner not in needs:
                needs.append(owner)
        return tuple(needs)

    def trains_nothing(arm: Arm) -> bool:
        return all(
            study.stage_finished(ckpt) or study.same_stage(arm, i) is not None
            for i, ckpt in enumerate(study.tokenizer_checkpoints(arm))
        )

    control_units: dict[str, Unit] = {}
    arm_units: list[Unit] = []
    seed_units: list[Unit] = []
    running = {arm.key for arm in arms}
    for arm in arms:
        if study.finished(arm) is not None:
            continue
        # the arm's evaluation encodes with its control's tokenizer; a control not run here
        # gets a unit of its own. No need on it (nor on the control's arm unit): both train
        # at once, and the evaluation waits on the control's stage locks (or trains them)
        # only if it gets there first; an arm with nothing of its own to train would, so it
        # needs the control's unit (below)
        prepared = study.arm_prepared(arm)
        if arm.ablation and arm.ablation not in running and not prepared:
            control = study.arm(arm.ablation)
            key = f"control:{control.key}"
            if key not in control_units and not study.tokenizer_trained(control):
                deps = sorted(tokenizer_needs(control, study.configs))
                needs = tuple(k for d in deps if (k := add_stage(d)))
                control_units[key] = Unit(key, needs + same_stage_needs(control, key))
        needs = tuple(k for dep in sorted(arm_needs(arm, study.configs)) if (k := add_stage(dep)))
        if prepared:  # its seeds read the tokenizer and caches back
            seed_needs = needs
        else:
            seed_needs = (f"arm:{arm.key}",)
            arm_units.append(Unit(seed_needs[0], needs + same_stage_needs(arm, seed_needs[0])))
        for seed in study.seeds:
            if not study.seed_file(arm, seed).is_file():
                seed_units.append(Unit(f"seed:{arm.key}:{seed}", seed_needs))
    # an arm unit with no stage of its own to train (all finished, or copied from another arm)
    # goes straight to its evaluation, which would sit on the lock of its control's stage while
    # the control trains: it needs the control's unit instead, leaving the worker to others
    unit_names = set(control_units) | {u.name for u in arm_units}
    for j, unit in enumerate(arm_units):
        arm = study.arm(unit.name[len("arm:") :])
        control = next(
            (k for k in (f"arm:{arm.ablation}", f"control:{arm.ablation}") if k in unit_names),
            None,
        )
        if control and control not in unit.needs and trains_nothing(arm):
            arm_units[j] = Unit(unit.name, unit.needs + (control,))
    return list(units.values()) + list(control_units.values()) + arm_units + seed_units


def log_name(unit: str) -> str:
    """File name of ``unit``'s log (``seed:cfg3:1`` -> ``seed_cfg3_1.log``)."""
    return unit.replace(":", "_") + ".log"


def run_units(
    units: Iterable[Unit],
    command: Callable[[str, int], list[str]],
    jobs: int,
    logs: Path,
    env: Callable[[int], dict[str, str]] | None = None,
    log: Callable[[str], None] = print,
    poll: float = 0.2,
    threads: int = 1,
    cores: int | None = None,
) -> dict[str, float]:
    """Run ``units`` as processes ``command(unit.name, n_threads)`` (environment
    ``env(n_threads)``; None: this one), at most ``jobs`` at once, each after the units it
    needs; stdout and stderr go to ``logs/<unit>.log``. A unit gets ``threads`` threads; with
    ``cores`` given, one that starts when no other unit is ready to start gets
    ``max(threads, cores - threads of the running units)`` (see the module docstring; None:
    always ``threads``). Returns each unit's wall seconds. Raises RuntimeError naming the first
    unit that failed and its log (after letting the running ones finish; none is started after
    a failure) or the units that can never start (a need that is neither a unit nor done).
    Ctrl-C stops the running units."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    pending = list(units)
    names = {u.name for u in pending}
    for unit in pending:
        missing = [n for n in unit.needs if n not in names]
        if missing:
            raise ValueError(f"unit {unit.name} needs {missing}, which are not units")
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, Any, float, int]] = {}
    finished: set[str] = set()
    seconds: dict[str, float] = {}
    failed: tuple[str, int] | None = None
    try:
        while pending or running:
            while failed is None and len(running) < jobs:
                ready = [u for u in pending if finished.issuperset(u.needs)]
                if not ready:
                    break
                unit = ready[0]
                pending.remove(unit)
                n_threads = threads
                if cores is not None and len(ready) == 1:
                    used = sum(entry[3] for entry in running.values())
                    n_threads = max(threads, cores - used)
                handle = open(logs / log_name(unit.name), "w")  # noqa: SIM115 - closed below
                proc = subprocess.Popen(
                    command(unit.name, n_threads),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env=None if env is None else env(n_threads),
                )
                running[unit.name] = (proc, handle, time.perf_counter(), n_threads)
                log(
                    f"[study] start {unit.name} ({len(running)} running, {len(pending)} "
                    f"waiting, {n_threads} thread{'s' if n_threads > 1 else ''})"
                )
            if not running:
                break  # nothing can start: a failure, or needs that never finish
            time.sleep(poll)
            for name, (proc, handle, start, _) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                handle.close()
                del running[name]
                seconds[name] = time.perf_counter() - start
                if code == 0:
                    finished.add(name)
                    log(f"[study] done {name} in {seconds[name]:.0f} s")
                else:
                    log(f"[study] FAILED {name} (exit {code}): {logs / log_name(name)}")
                    failed = failed or (name, code)
    except BaseException:  # Ctrl-C or an error here: do not leave workers behind
        for proc, handle, *_ in running.values():
            proc.terminate()
            proc.wait()
            handle.close()
        raise
    if failed is not None:
        name, code = failed
        raise RuntimeError(
            f"study unit {name} failed (exit {code}); its output: {logs / log_name(name)} "
            "(rerun the study to resume: finished stages are kept)"
        )
    if pending:
        raise RuntimeError(f"study units never started: {[u.name for u in pending]}")
    return seconds


def run_unit(study: Any, name: str) -> None:
    """Run unit ``name`` (see the module docstring) of ``study`` in this process."""
    kind, _, rest = name.partition(":")
    if kind == "shared":
        study.shared(rest)
    elif kind == "arm":
        study.prepare_arm(study.arm(rest))
    elif kind == "control":
        study.tokenizer(study.arm(rest))
    elif kind == "seed":
        key, _, seed = rest.rpartition(":")
        arm = study.arm(key)
        tokenizer, _, cache = study.prepare_arm(arm)  # read back: the arm unit ran first
        study.run_seed(arm, tokenizer, cache, int(seed))
    else:
        raise ValueError(
            f"unknown study unit {name!r} (shared:<stage>, arm:<arm>, control:<arm>, seed:<arm>:<n>)"
        )


def worker_command(argv: Sequence[str]) -> Callable[[str, int], list[str]]:
    """``command(unit, threads)`` for :func:`run_units`: this Python running the study CLI with
    the caller's options ``argv`` and ``--threads threads --unit unit``."""
    base = [sys.executable, "-m", "dmvae_lightning.study", *argv]
    return lambda unit, threads: [*base, "--threads", str(threads), "--unit", unit]


def worker_env(threads: int) -> dict[str, str]:
    """The environment of the workers: this one with the OpenMP / MKL thread counts set."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env
