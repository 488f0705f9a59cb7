import torch

from hasten.decoding.budget import (AdaptiveBudget, CalibratedBudget, CostCurve, best_budget,
                                    cached_cost_curve, expected_gain, fastest_size,
                                    measure_cost_curve)
from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import generate_plain
from hasten.drafters.lookup import LookupDrafter
from tiny import tiny_pair

CPU_LIKE = CostCurve([0, 1, 2, 4, 8, 16, 32], [1.0, 1.3, 1.5, 1.9, 2.4, 3.0, 4.0])
GPU_LIKE = CostCurve([0, 1, 2, 4, 8, 16, 32], [1.0, 1.0, 1.0, 1.01, 1.02, 1.03, 1.05])


def test_interpolation_and_gain():
    assert CPU_LIKE.cost(3) == 1.7
    assert CPU_LIKE.cost(100) == 4.0
    assert expected_gain(0.5, 2) == 1.75
    assert expected_gain(1.0, 4) == 5


def test_cpu_gets_a_small_budget_gpu_a_large_one():
    assert best_budget(GPU_LIKE, 0.8, 32) > best_budget(CPU_LIKE, 0.8, 32)
    assert best_budget(CPU_LIKE, 0.1, 32) == 0  # drafts that are rarely right do not pay on a CPU
    assert best_budget(CPU_LIKE, 0.95, 32) >= 4


def test_adaptive_budget_follows_acceptance():
    ada = AdaptiveBudget(CPU_LIKE, 16)
    for _ in range(40):
        ada.update(ada.budget, ada.budget)  # everything accepted
    high = ada.budget
    budgets = []
    for _ in range(80):  # long enough for the exponential memory to forget the good run
        budgets.append(ada.update(ada.budget, 0))  # nothing accepted
    assert high > 1 and ada.rate < 0.25  # rate is only measured on steps that draft
    assert best_budget(CPU_LIKE, ada.rate, 16) == 0
    # drafts that never land stop being verified, except a one-token probe every 8th step
    assert budgets[-16:] == [0] * 7 + [1] + [0] * 7 + [1]


def test_measured_curve_and_cache(tmp_path):
    model, _ = tiny_pair()
    curve = measure_cost_curve(model, sizes=(0, 2, 4), past=8, repeats=1)
    assert curve.sizes == [0, 2, 4] and all(t > 0 for t in curve.seconds)
    assert curve.seconds == sorted(curve.seconds)  # never cheaper to verify more
    first = cached_cost_curve(model, "tiny", tmp_path)
    assert (tmp_path / "tiny.json").exists()
    again = cached_cost_curve(model, "tiny", tmp_path)
    assert again.seconds == first.seconds  # read back, not re-measured


def test_adaptive_generation_still_matches_plain():
    model, _ = tiny_pair()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    want = list(generate_plain(model, prompt, 30))
    got = list(generate_speculative(model, LookupDrafter(), prompt, 30, tree_budget=8,
                                    adaptive=AdaptiveBudget(CPU_LIKE, 8)))
    assert got == want


EXPECTED = [1.0, 1.5, 1.8, 1.95, 2.05, 2.1, 2.13, 2.15, 2.16]  # E(n) of a stored tree, n = 0..8


def test_calibrated_budget_starts_from_the_stored_curve():
    free = CostCurve([0, 8], [1.0, 1.0])
    assert CalibratedBudget(free, EXPECTED, 64).budget == 8  # free verification: biggest tree
    assert CalibratedBudget(free, EXPECTED, 3).budget == 3
    steep = CostCurve([0, 1, 8], [1.0, 1.3, 3.4])
    assert CalibratedBudget(steep, EXPECTED, 8).budget == fastest_size(EXPECTED.__getitem__, steep.cost, 8) == 1


def test_calibrated_budget_follows_what_the_drafts_achieve():
    cal = CalibratedBudget(CPU_LIKE, EXPECTED, 8)
    start = cal.budget
    assert start > 0
    for _ in range(30):  # drafts land exactly as expected: nothing changes
        assert cal.update(1, EXPECTED[cal.budget] - 1, cal.budget) == start
    budgets = []
    for _ in range(60):  # no draft ever lands: the tree is turned off, with a probe every 8th step
        budgets.append(cal.update(1, 0, cal.budget))
    assert cal.ratio < 0.5  # (only probes are measured once the tree is off)
    last = budgets[-16:]
    probes = [i for i, b in enumerate(last) if b]
    assert len(probes) == 2 and probes[1] - probes[0] == 8 and {last[i] for i in probes} == {4}
    for _ in range(60):  # drafts land far better than the stored curve says: back on, larger
        cal.update(4, 4, cal.budget or 4)
    assert cal.ratio > 1.5 and cal.budget >= start


def test_calibrated_generation_still_matches_plain():
    model, _ = tiny_pair()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    want = list(generate_plain(model, prompt, 30))
    got = list(generate_speculative(model, LookupDrafter(), prompt, 30, tree_budget=8,
                                    adaptive=CalibratedBudget(CPU_LIKE, EXPECTED, 8)))
    assert got == want
