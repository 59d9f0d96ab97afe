"""Robust aggregation and DP-FedAvg on synthetic updates: what each defence withstands."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.aggregation import Defence
from cloud.aggregation.krum import krum_choice
from cloud.aggregation.median import capped_weights, mean_around_median
from cloud.robust import aggregate, clip_scales, dense_from

RNG = np.random.default_rng(7)
NAMES = ["w", "b"]
TRUE = {"w": np.full((20, 5), 0.1, np.float32), "b": np.full(5, -0.2, np.float32)}


def honest(count: int) -> list[dict[str, np.ndarray]]:
    return [{k: v + RNG.normal(0, 0.01, v.shape).astype(np.float32) for k, v in TRUE.items()} for _ in range(count)]


def scaled(count: int, factor: float) -> list[dict[str, np.ndarray]]:
    return [{k: factor * v for k, v in u.items()} for u in honest(count)]


def noise(count: int, scale: float) -> list[dict[str, np.ndarray]]:
    return [{k: RNG.normal(0, scale, v.shape).astype(np.float32) for k, v in TRUE.items()} for _ in range(count)]


def run(updates: list[dict[str, np.ndarray]], defence: Defence) -> dict[str, np.ndarray]:
    out, _ = aggregate(dense_from(updates), len(updates), NAMES, defence, [1.0] * len(updates))
    return out


def error(out: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(out[k] - TRUE[k]).max()) for k in NAMES)


@pytest.mark.parametrize("attack", ["scaled", "noise"])
@pytest.mark.parametrize("defence", [
    Defence("median", hostile=2), Defence("trimmed_mean", trim_fraction=0.25, hostile=2),
    Defence("krum", hostile=2), Defence("multi_krum", hostile=2), Defence("mean_around_median", hostile=2),
], ids=lambda d: d.aggregator if isinstance(d, Defence) else d)
def test_robust_aggregators_ignore_two_attackers_in_eight(attack: str, defence: Defence) -> None:
    attackers = scaled(2, -10.0) if attack == "scaled" else noise(2, 100 * 0.01 * np.sqrt(105))
    updates = honest(6) + attackers
    assert defence.problems(len(updates)) == []
    assert error(run(updates, defence)) < 0.05  # Krum's pick is one honest update: its own noise
    assert error(run(updates, Defence("mean"))) > 0.3  # what the attack does to FedAvg


def test_multi_krum_averages_the_honest_updates() -> None:
    updates = honest(6) + scaled(2, -10.0)
    _, report = aggregate(dense_from(updates), 8, NAMES, Defence("multi_krum", hostile=2), [1.0] * 8)
    assert report.selected == [0, 1, 2, 3, 4, 5]
    distances = np.array([[0, 1, 9], [1, 0, 9], [9, 9, 0]], np.float64)
    assert krum_choice(distances, f=0, m=1) in ([0], [1])


def spread(count: int) -> list[dict[str, np.ndarray]]:
    """Honest updates of non-IID agents: they agree on the direction, not on the size."""
    factors = np.linspace(0.5, 1.0, count) ** 3 * 1.6
    return [{k: float(f) * v for k, v in TRUE.items()} for f in factors]


def test_the_mean_around_the_median_drops_a_one_sided_attack_that_biases_the_trimmed_mean() -> None:
    good = spread(6)
    flipped = [{k: -10 * v for k, v in u.items()} for u in good[:2]]  # both on the same side
    updates = good + flipped
    honest_mean = {k: np.mean([u[k] for u in good], axis=0) for k in NAMES}
    defence = Defence("mean_around_median", hostile=2)
    out = run(updates, defence)
    for k in NAMES:  # the n - f values nearest the median are the honest ones: their mean, exactly
        np.testing.assert_allclose(out[k], honest_mean[k], rtol=1e-6)
    # The trimmed mean cuts the two attackers and the two lowest honest values: its window
    # moves towards the attackers' end; the median moves by one rank.
    trimmed = run(updates, Defence("trimmed_mean", trim_fraction=0.25, hostile=2))
    median = run(updates, Defence("median", hostile=2))
    for biased in (trimmed, median):
        assert np.abs(biased["w"] - honest_mean["w"]).max() > 0.01


def test_the_mean_around_the_median_weighs_examples_capped_at_the_median_count() -> None:
    assert capped_weights([10, 20, 30, 1e9]).tolist() == [10, 20, 25, 25]
    assert capped_weights([0, 0, 0]).tolist() == [1, 1, 1]
    good = spread(6)
    counts = [10, 20, 30, 40, 50, 60]
    updates = good + [{k: -10 * v for k, v in u.items()} for u in good[:2]]
    claims = counts + [1e12, 1e12]  # the attackers claim every example there is
    out, _ = aggregate(dense_from(updates), 8, NAMES, Defence("mean_around_median", hostile=2), claims)
    capped = np.minimum(counts, np.median(claims))  # the median claim: 45
    expected = sum(c * u["w"] for c, u in zip(capped, good)) / capped.sum()
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    # An attacker that hides next to the median is kept, but counts no more than the median agent.
    values = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]], np.float32)
    kept = mean_around_median(values, 1, np.array([1.0, 1.0, 1.0, 1.0, 1.0]))
    assert kept.tolist() == [1.5]
    zero = mean_around_median(values, 1, np.zeros(5))
    assert zero.tolist() == [1.5]  # no counts at all: every kept agent alike


def test_norm_bounding_caps_each_update_fixed_or_at_the_median() -> None:
    updates = honest(6) + scaled(2, 50.0)
    fixed = run(updates, Defence(clip_norm=2.0))
    honest_norm = np.sqrt(sum(float(np.square(v).sum()) for v in TRUE.values()))
    assert honest_norm < 2.0
    # The two attackers now weigh at most 2.0 (in L2) each in the mean of eight.
    assert error(fixed) < 2 * 2.0 / 8 + 0.05
    assert error(run(updates, Defence())) > 2  # unbounded: 12.25x the true update
    out, report = aggregate(dense_from(updates), 8, NAMES, Defence(clip_to_median=True), [1.0] * 8)
    assert report.clipped >= 2 and abs(report.clip_bound - honest_norm) < 0.1 * honest_norm
    assert error(out) < error(fixed)
    assert clip_scales(np.array([0.5, 2.0, 0.0]), 1.0).tolist() == [1.0, 0.5, 1.0]


def test_dp_noise_has_the_calibrated_scale() -> None:
    big = {"w": np.zeros((400, 250), np.float32), "b": np.zeros(5, np.float32)}
    updates = [big] * 4
    defence = Defence(clip_norm=2.0, dp_noise_multiplier=1.5)
    out, _ = aggregate(dense_from(updates), 4, NAMES, defence, [1.0] * 4, rng=np.random.default_rng(1))
    assert abs(float(out["w"].std()) - 1.5 * 2.0 / 4) < 0.01  # std z*C on the sum, then / n
    assert defence.problems(4) == []


@pytest.mark.parametrize(("defence", "n", "reason"), [
    (Defence("krum", hostile=2), 6, "Krum needs n > 2f + 2"),
    (Defence("trimmed_mean", trim_fraction=0.1, hostile=2), 10, "trim_fraction must be >= f/n = 0.200"),
    (Defence("median", hostile=3), 6, "needs n > 2f"),
    (Defence("mean", hostile=1), 10, "a plain mean tolerates no hostile agent"),
    (Defence("trimmed_mean", trim_fraction=0.5), 10, "trim_fraction must be in [0, 0.5)"),
    (Defence(dp_noise_multiplier=1.0), 10, "needs a fixed clip_norm"),
    (Defence("median", clip_norm=1.0, dp_noise_multiplier=1.0), 10, "use aggregator mean"),
    (Defence("multi_krum", hostile=1, krum_selected=10), 10, "krum_selected must be in 1..n-f = 9"),
    (Defence("rmean"), 10, "unknown aggregator"),
    (Defence("mean_around_median", hostile=2), 4, "it needs n > 2f"),
    (Defence("mean_around_median"), 4, "declare hostile_agents >= 1"),
    (Defence("mean_around_median", trim_fraction=0.25, hostile=1), 4, "use aggregator trimmed_mean"),
    (Defence("mean_around_median", hostile=1, clip_norm=1.0, dp_noise_multiplier=1.0), 4, "use aggregator mean"),
])
def test_settings_that_cannot_defend_are_refused_with_the_reason(defence: Defence, n: int, reason: str) -> None:
    problems = defence.problems(n)
    assert any(reason in p for p in problems), problems


def test_the_boundaries_themselves_are_accepted() -> None:
    assert Defence("krum", hostile=2).problems(7) == []
    assert Defence("trimmed_mean", trim_fraction=0.2, hostile=2).problems(10) == []
    assert Defence("median", hostile=2).problems(5) == []
    assert Defence("mean_around_median", hostile=2).problems(5) == []
