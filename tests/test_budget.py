import json

import pytest
import torch

from hasten.decoding.budget import (SIZES, AdaptiveTreeSize, CalibratedTreeSize, ProbeSchedule, CostCurve, best_size,
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
    assert best_size(GPU_LIKE, 0.8, 32) > best_size(CPU_LIKE, 0.8, 32)
    assert best_size(CPU_LIKE, 0.1, 32) == 0  # drafts that are rarely right do not pay on a CPU
    assert best_size(CPU_LIKE, 0.95, 32) >= 4


def test_adaptive_budget_follows_acceptance():
    ada = AdaptiveTreeSize(CPU_LIKE, 16)
    for _ in range(40):
        ada.update(ada.size, ada.size)  # everything accepted
    high = ada.size
    budgets = []
    for _ in range(80):  # long enough for the exponential memory to forget the good run
        budgets.append(ada.update(ada.size, 0))  # nothing accepted
    assert high > 1 and ada.rate < 0.25  # rate is only measured on steps that draft
    assert best_size(CPU_LIKE, ada.rate, 16) == 0
    # drafts that never land stop being verified, except probes that grow rarer: 8, 16, ... 64
    probes = [i for i, b in enumerate(budgets) if b and i >= 30]  # once drafting is off
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps and gaps == sorted(gaps) and gaps[-1] <= 64 and max(gaps) > 8
    assert {budgets[i] for i in probes} == {1}


def test_probe_schedule_backs_off_and_resets():
    probe = ProbeSchedule(first=4, longest=16)
    sizes = [probe.next(0, 3, 0) for _ in range(60)]  # nothing ever pays
    probes = [i for i, s in enumerate(sizes) if s]
    assert [b - a for a, b in zip(probes, probes[1:])][:3] == [8, 16, 16]
    assert sizes[probes[0]] == 3 and probes[0] == 3
    probe.next(0, 3, 0)
    while probe.next(0, 3, 0) == 0:  # run up to the next probe, which then succeeds
        pass
    after = [probe.next(0, 3, 2)] + [probe.next(0, 3, 0) for _ in range(4)]
    assert after.index(3) == 3  # back to the first wait after a probe gained tokens
    assert probe.next(5, 3, 0) == 5  # a size that pays is used at once


def test_measured_curve_and_cache(tmp_path):
    model, _ = tiny_pair()
    curve = measure_cost_curve(model, sizes=(0, 2, 4), past=8, repeats=1)
    assert curve.sizes == [0, 2, 4] and all(t > 0 for t in curve.seconds)
    assert curve.seconds == sorted(curve.seconds)  # never cheaper to verify more
    first = cached_cost_curve(model, "tiny", tmp_path)
    assert (tmp_path / "tiny.json").exists()
    again = cached_cost_curve(model, "tiny", tmp_path, stale=lambda backbone, curve: False)
    assert again.seconds == first.seconds  # read back, not re-measured


def test_a_curve_cached_under_load_is_measured_again(tmp_path):
    model, _ = tiny_pair()
    path = tmp_path / "tiny.json"
    sizes = list(SIZES)
    # Cached at 10 s per verify: far slower than any machine runs the tiny model.
    path.write_text(json.dumps({"sizes": sizes, "seconds": [10.0 + n for n in sizes]}))
    fresh = cached_cost_curve(model, "tiny", tmp_path)
    assert fresh.seconds[0] < 1.0 and fresh.seconds == sorted(fresh.seconds)
    assert json.loads(path.read_text())["seconds"] == fresh.seconds  # saved for next time
    # Cached faster than now (a quieter moment): kept, since load only ever adds time.
    quiet = [1e-9 * (n + 1) for n in sizes]
    path.write_text(json.dumps({"sizes": sizes, "seconds": quiet}))
    assert cached_cost_curve(model, "tiny", tmp_path).seconds == quiet
    # A check that finds it stale merges: each size keeps the lower time.
    merged = cached_cost_curve(model, "tiny", tmp_path, stale=lambda backbone, curve: True)
    assert merged.seconds == quiet


def test_adaptive_generation_still_matches_plain():
    model, _ = tiny_pair()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    want = list(generate_plain(model, prompt, 30))
    got = list(generate_speculative(model, LookupDrafter(), prompt, 30, tree_size=8,
                                    sizer=AdaptiveTreeSize(CPU_LIKE, 8)))
    assert got == want


EXPECTED = [1.0, 1.5, 1.8, 1.95, 2.05, 2.1, 2.13, 2.15, 2.16]  # E(n) of a stored tree, n = 0..8


def test_calibrated_budget_starts_from_the_stored_curve():
    free = CostCurve([0, 8], [1.0, 1.0])
    assert CalibratedTreeSize(free, EXPECTED, 64).size == 8  # free verification: biggest tree
    assert CalibratedTreeSize(free, EXPECTED, 3).size == 3
    steep = CostCurve([0, 1, 8], [1.0, 1.3, 3.4])
    assert CalibratedTreeSize(steep, EXPECTED, 8).size == fastest_size(EXPECTED.__getitem__, steep.cost, 8) == 1


def test_calibrated_budget_follows_what_the_drafts_achieve():
    cal = CalibratedTreeSize(CPU_LIKE, EXPECTED, 8)
    start = cal.size
    assert start > 0
    for _ in range(30):  # drafts land exactly as expected: nothing changes
        assert cal.update(1, EXPECTED[cal.size] - 1, cal.size) == start
    budgets = []
    for _ in range(60):  # no draft ever lands: the tree is turned off, with rare probes
        budgets.append(cal.update(1, 0, cal.size))
    assert cal.ratio < 0.5  # (only probes are measured once the tree is off)
    assert budgets[-8:] == [0] * 8 and {b for b in budgets[20:]} <= {0, 4}
    for _ in range(60):  # drafts land far better than the stored curve says: back on, larger
        cal.update(4, 4, cal.size or 4)
    assert cal.ratio > 1.5 and cal.size >= start


def test_calibrated_generation_still_matches_plain():
    model, _ = tiny_pair()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    want = list(generate_plain(model, prompt, 30))
    got = list(generate_speculative(model, LookupDrafter(), prompt, 30, tree_size=8,
                                    sizer=CalibratedTreeSize(CPU_LIKE, EXPECTED, 8)))
    assert got == want


class OracleDrafter:
    """Proposes the true continuation (a chain of 4): every draft would be accepted."""
    name, cheap = "oracle", True

    def __init__(self, truth, cheap=True):
        self.truth, self.cheap, self.proposed = truth, cheap, 0

    def reset(self, prompt, capacity=None):
        self.prompt_len = len(prompt)

    def observe(self, accepted, hidden=None):
        pass

    def propose(self, context, size, hidden=None):
        from hasten.decoding.tree import DraftTree
        done = len(context) - self.prompt_len
        self.proposed += 1
        return DraftTree.from_sequences([self.truth[done:done + 4]]).truncated(size)


NEVER_PAYS = CostCurve([0, 1, 64], [1.0, 50.0, 100.0])  # any draft costs far more than it gains


def forward_widths(model):
    widths = []
    real = model.forward
    model.forward = lambda ids, *a, **k: widths.append(ids.shape[1]) or real(ids, *a, **k)
    return widths


@pytest.mark.parametrize("cheap", [True, False])
def test_probes_of_cheap_drafters_are_shadow_probes(cheap):
    model, _ = tiny_pair()
    prompt = [5, 6, 7, 8]
    want = list(generate_plain(model, prompt, 60))
    drafter = OracleDrafter(want, cheap=cheap)
    sizer = AdaptiveTreeSize(NEVER_PAYS, 8, prior_rate=0.0)
    widths = forward_widths(model)
    got = list(generate_speculative(model, drafter, prompt, 60, sizer=sizer))
    del model.forward
    assert got == want and drafter.proposed >= 3  # probes happened
    if cheap:  # never verified: every step after prefill fed one token, yet acceptance was seen
        assert set(widths[1:]) == {1}
        assert sizer.rate > 0.5  # the oracle's drafts would all have been accepted
    else:  # a drafter that costs a forward to draft gets real, verified probes
        assert max(widths[1:]) > 1


def test_shadow_walk_counts_what_a_verify_would_accept():
    from hasten.decoding.engine import ShadowWalk
    from hasten.decoding.tree import DraftTree
    tree = DraftTree.from_sequences([[1, 2, 3], [1, 4], [5]])
    walk = ShadowWalk(tree)
    assert not walk.feed([1]) and walk.accepted == 1
    assert walk.feed([4, 9]) and walk.accepted == 2  # a leaf ends the walk
    walk = ShadowWalk(tree)
    assert walk.feed([7]) and walk.accepted == 0


def test_draft_cost_is_charged_to_the_tree_size():
    from hasten.decoding.budget import DraftCost
    free = AdaptiveTreeSize(GPU_LIKE, 16, prior_rate=0.7)
    costly = AdaptiveTreeSize(GPU_LIKE, 16, prior_rate=0.7)
    for _ in range(5):  # a draft model: each drafted node costs 0.6 of a plain step here
        costly.draft_cost.add(0.6 * 4, 4)
    assert free.best() > 4 and 0 < costly.best() < free.best()
    for _ in range(5):
        costly.draft_cost.add(2.0 * 4, 4)  # drafting dearer than verifying plain: off
    assert costly.best() == 0
    cost = DraftCost()
    cost.add(0.3, 0)  # nothing drafted: nothing learnt
    assert cost(4) == 0.0


def test_a_per_step_draft_cost_does_not_grow_with_the_tree():
    """EAGLE pays its tree levels whatever n is kept: charged per node it would look 16x dearer
    at 16 nodes than at one and the rule would keep trees needlessly small."""
    from hasten.decoding.budget import DraftCost
    per_step, per_node = DraftCost(per_step=True), DraftCost()
    for cost in (per_step, per_node):
        cost.add(0.4, 4)
    assert per_step(1) == per_step(16) == pytest.approx(0.4) and per_step(0) == 0.0
    assert per_node(16) == pytest.approx(1.6)
    sizer = AdaptiveTreeSize(GPU_LIKE, 16, prior_rate=0.7)
    sizer.draft_cost.per_step = True
    for _ in range(5):
        sizer.draft_cost.add(0.3 * 4, 4)
    assert sizer.best() == 16  # flat verify + flat drafting: the biggest tree


def test_a_drafters_measured_cost_carries_over_to_its_next_generation():
    """What proposing costs belongs to the drafter on this machine: the next generation's
    first tree is sized with it instead of starting as if drafting were free."""
    from hasten.decoding.engine import tree_sizer

    class Costly:
        expected_lengths = [1.0, 1.9, 2.5, 2.8, 3.0]
        cost_per_step = True

    drafter = Costly()
    first = tree_sizer(drafter, GPU_LIKE, 4)
    assert first.size > 0  # nothing known yet: drafting looks free on a flat curve
    first.draft_cost.add(5.0, 4)  # a proposal cost 5 plain steps
    second = tree_sizer(drafter, GPU_LIKE, 4)
    assert second.draft_cost is first.draft_cost and second.draft_cost.per_step
    assert second.size == 0
