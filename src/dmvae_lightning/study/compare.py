"""Is one group of arms better than another? ``python -m dmvae_lightning.study.compare A B``.

The study's decision rule, as code: group A beats group B when B's mean gFID exceeds A's by more
than **twice the larger of the two sample standard deviations** over generator seeds (lower gFID
is better). Each group is one arm or several pooled (comma-separated names: e.g. the same
setting under three alignment seeds), so a claim such as "DMD beats its ablation pooled over 3
alignment x 3 generator seeds" is one command::

    python -m dmvae_lightning.study.compare \\
        align_long_cfg3_ssl,align_long_cfg3_ssl_seed1,align_long_cfg3_ssl_seed2 \\
        ablation_long_ssl,ablation_long_ssl_seed1,ablation_long_ssl_seed2

Beside the rule it prints Welch's t (unequal variances) with its Welch-Satterthwaite degrees of
freedom, and, when both groups name as many arms, the same comparison pair by pair (arm i of A
against arm i of B: the per-alignment-seed view). The gFIDs come from the published rows
(``docs/study_results.json``, the default) or from a runs folder (``--runs runs/study``: its
``arms/<arm>/result.json``). ``--generator_steps N`` compares the arms' generators at another
budget (``result_steps<N>.json``, or the published ``docs/study_budget_results.json``). The
published rows keep two decimals: a gap on the threshold can fall either side in the two, so
quote the runs folder's when it is close.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dmvae_lightning.study.arms import DEFAULT_GENERATOR_STEPS
from dmvae_lightning.study.publish import BUDGETS, RESULTS, arm_result, load_rows
from dmvae_lightning.study.report import row_steps


@dataclass(frozen=True)
class Comparison:
    """Group A (``a``: its gFIDs) against group B (``b``); lower is better."""

    a: tuple[float, ...]
    b: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.a) < 2 or len(self.b) < 2:
            raise ValueError(
                f"a comparison needs at least 2 seeds per group (a spread), got {len(self.a)} "
                f"and {len(self.b)}"
            )

    @property
    def mean_a(self) -> float:
        return statistics.fmean(self.a)

    @property
    def mean_b(self) -> float:
        return statistics.fmean(self.b)

    @property
    def std_a(self) -> float:
        return statistics.stdev(self.a)

    @property
    def std_b(self) -> float:
        return statistics.stdev(self.b)

    @property
    def gap(self) -> float:
        """``mean_b - mean_a``: positive when A has the lower (better) gFID."""
        return self.mean_b - self.mean_a

    @property
    def threshold(self) -> float:
        """Twice the larger sample standard deviation of the two groups."""
        return 2.0 * max(self.std_a, self.std_b)

    @property
    def a_beats_b(self) -> bool:
        """The study's rule: A is better by more than :attr:`threshold`."""
        return self.gap > self.threshold

    @property
    def b_beats_a(self) -> bool:
        return -self.gap > self.threshold

    @property
    def welch_t(self) -> float:
        """Welch's t of the gap (positive: A lower); inf when both groups are constant."""
        se = math.sqrt(self.std_a**2 / len(self.a) + self.std_b**2 / len(self.b))
        return self.gap / se if se > 0 else math.copysign(math.inf, self.gap)

    @property
    def welch_df(self) -> float:
        """Welch-Satterthwaite degrees of freedom of :attr:`welch_t`."""
        va, vb = self.std_a**2 / len(self.a), self.std_b**2 / len(self.b)
        den = va**2 / (len(self.a) - 1) + vb**2 / (len(self.b) - 1)
        return (va + vb) ** 2 / den if den > 0 else math.inf

    def verdict(self) -> str:
        if self.a_beats_b:
            return "A better, beyond twice the spread"
        if self.b_beats_a:
            return "B better, beyond twice the spread"
        return "level by the rule (inside twice the spread)"

    def line(self, name_a: str = "A", name_b: str = "B") -> str:
        return (
            f"{name_a} {self.mean_a:.3f} ± {self.std_a:.3f} (n {len(self.a)}) vs {name_b} "
            f"{self.mean_b:.3f} ± {self.std_b:.3f} (n {len(self.b)}): gap {self.gap:+.3f}, "
            f"twice the larger std {self.threshold:.3f}, Welch t {self.welch_t:.2f} "
            f"(df {self.welch_df:.1f}): {self.verdict()}"
        )


def load_gfids(
    arms: Sequence[str],
    results: Path | None = None,
    runs: Path | None = None,
    generator_steps: int | None = DEFAULT_GENERATOR_STEPS,
):
    """``{arm: [gFID of each generator seed]}`` for ``arms`` at generator budget
    ``generator_steps``, from a runs folder (``runs``:
    :func:`~dmvae_lightning.study.publish.arm_result`) or else a published results file
    (``results``; default: the published rows, or the budget rows at another budget). Raises
    FileNotFoundError / KeyError naming the arm (and the option) when one has no numbers."""
    if runs is not None:
        return {
            arm: [g["gfid"] for g in arm_result(runs, arm, generator_steps)["generators"]]
            for arm in arms
        }
    default = RESULTS if generator_steps == DEFAULT_GENERATOR_STEPS else BUDGETS
    path = Path(results if results is not None else default)
    rows = {r["key"]: r for r in load_rows(path) if row_steps(r) == generator_steps}
    missing = [arm for arm in arms if arm not in rows]
    if missing:
        raise KeyError(
            f"arm {missing[0]!r} has no row in --results {path} at --generator_steps "
            f"{generator_steps or 0} (published there: {len(rows)} arms; give --runs for a "
            "study's own folder)"
        )
    return {arm: [g["gfid"] for g in rows[arm]["generators"]] for arm in arms}


def compare(group_a: Sequence[str], group_b: Sequence[str], gfids: dict[str, list[float]]):
    """The pooled comparison of the two groups, then (when they name as many arms) the
    comparisons of their arms pair by pair: ``(pooled, [(arm_a, arm_b, Comparison), ...])``."""
    pooled = Comparison(
        tuple(v for arm in group_a for v in gfids[arm]),
        tuple(v for arm in group_b for v in gfids[arm]),
    )
    pairs = []
    if len(group_a) == len(group_b) and len(group_a) > 1:
        pairs = [
            (x, y, Comparison(tuple(gfids[x]), tuple(gfids[y])))
            for x, y in zip(group_a, group_b, strict=True)
        ]
    return pooled, pairs


def main(argv: Sequence[str] | None = None) -> Comparison:
    parser = argparse.ArgumentParser(
        prog="python -m dmvae_lightning.study.compare",
        description="Compare the gFID of two groups of study arms (each one arm or several "
        "pooled, comma-separated) by the study's rule: better by more than twice the larger "
        "seed-to-seed std; Welch's t beside it.",
    )
    parser.add_argument("a", help="group A: arm name(s), comma-separated")
    parser.add_argument("b", help="group B: arm name(s), comma-separated")
    source = parser.add_mutually_exclusive_group()  # one source of numbers, not two
    source.add_argument("--results", type=Path, help=f"published rows to read (default: {RESULTS})")
    source.add_argument("--runs", type=Path, help="read a study's runs folder instead")
    parser.add_argument(
        "--generator_steps",
        type=int,
        default=DEFAULT_GENERATOR_STEPS,
        help=f"the generators' budget (default {DEFAULT_GENERATOR_STEPS}; another reads "
        f"result_steps<N>.json or {BUDGETS}; 0: diffusion.yaml's)",
    )
    args = parser.parse_args(argv)
    group_a, group_b = args.a.split(","), args.b.split(",")
    try:
        gfids = load_gfids(
            [*group_a, *group_b],
            results=args.results,
            runs=args.runs,
            generator_steps=args.generator_steps or None,
        )
        pooled, pairs = compare(group_a, group_b, gfids)
    except (FileNotFoundError, KeyError, ValueError) as err:
        parser.error(str(err.args[0] if isinstance(err, KeyError) else err))
    print(f"A = {', '.join(group_a)}\nB = {', '.join(group_b)}")
    print(pooled.line())
    for x, y, c in pairs:
        print("  " + c.line(x, y))
    return pooled


if __name__ == "__main__":
    main()
