"""How many draft tokens a verify step should carry, chosen for the hardware.

On a GPU a forward over 64 tokens costs about as much as over one; on a CPU it costs several
times more, so a big tree can make decoding slower. We measure the cost of a verify forward
for a few tree sizes once per (model, device, dtype, threads), cache the curve, and pick the
size that maximises expected tokens per second:

    tokens/s(n) = E[tokens gained per step | n draft nodes] / cost(n)

E is estimated online from the drafter's recent acceptance: with a per-token acceptance rate
a along a chain, a step gains 1 + a + a^2 + ... + a^n tokens (the bonus token included).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Protocol
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.backbone import Backbone
from ..paths import write_json

SIZES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Upper bound on draft nodes per step; the measured verify costs pick the size actually used
# (a CPU settles on a few nodes, a GPU, where 64 tokens cost about what one does, on many).
MAX_TREE_SIZE = 64


@dataclass
class CostCurve:
    """Seconds per verify forward of 1 + n tokens, for the measured n in `sizes`."""
    sizes: list[int]
    seconds: list[float]

    def __post_init__(self):
        # The engine asks for every size 0..max each step: a table, not a search per call.
        self._table = [self._interpolate(n) for n in range(self.sizes[-1] + 1)]

    def cost(self, n: int) -> float:
        """Linear interpolation between measured sizes (flat beyond the last)."""
        if 0 <= n < len(self._table):
            return self._table[n]
        return self.seconds[-1] if n > self.sizes[-1] else self.seconds[0]

    def _interpolate(self, n: int) -> float:
        for (a, ta), (b, tb) in zip(zip(self.sizes, self.seconds), zip(self.sizes[1:], self.seconds[1:])):
            if a <= n <= b:
                return ta + (tb - ta) * (n - a) / (b - a)
        return self.seconds[-1] if n > self.sizes[-1] else self.seconds[0]

    def relative(self) -> dict[int, float]:
        return {n: round(t / self.seconds[0], 2) for n, t in zip(self.sizes, self.seconds)}


@torch.inference_mode()
def measure_cost_curve(backbone: Backbone, sizes=SIZES, past: int = 128, repeats: int = 5) -> CostCurve:
    """Time a verify-shaped forward (a chain after `past` cached tokens) for each size.

    Sizes are timed round-robin, `repeats` rounds after a warm-up round, and each size keeps
    its fastest time: load from other processes only ever adds time, so the minimum is the
    cost of the work itself (a median still carried bursts of load on a shared machine into
    the cached curve, e.g. one token measured at 1.9x). A bigger verify never costs less than
    a smaller one, so the curve is then made non-decreasing.
    """
    backbone.reset(1, past + max(sizes) + 2)
    ids = torch.randint(0, backbone.vocab_size, (1, past + max(sizes) + 1), device=backbone.device)
    backbone.forward(ids[:, :past])
    backbone.commit()
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for round_ in range(repeats + 1):  # round 0 warms up kernels for every shape
        for n in sizes:
            t0 = time.perf_counter()
            backbone.forward(ids[:, past:past + n + 1])
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[n].append(time.perf_counter() - t0)
            backbone.commit(torch.empty(0, dtype=torch.long))
    seconds, floor = [], 0.0
    for n in sizes:
        floor = max(floor, min(times[n]))
        seconds.append(floor)
    return CostCurve(list(sizes), seconds)


def cached_cost_curve(backbone: Backbone, key: str, cache_dir: Path,
                      stale: Callable[[Backbone, CostCurve], bool] | None = None) -> CostCurve:
    """The curve for `key` from `cache_dir`, measured (a few seconds) and saved if absent.

    A cached curve is checked against a quick timing of two sizes first: one measured while
    the machine was busier (a test suite beside it: one token at 3.7x its cost, and the
    curve's shape off with it) would steer every later run's tree sizes. If the check finds
    it slower by more than `STALE`, the curve is measured again and each size keeps the lower
    of the two times, since load only ever adds time. `stale`: that check (default
    `measured_busier`)."""
    path = cache_dir / f"{key}.json"
    cached = _read_curve(path)
    if cached is not None and not (stale or measured_busier)(backbone, cached):
        return cached
    curve = measure_cost_curve(backbone)
    if cached is not None and cached.sizes == curve.sizes:
        curve = CostCurve(curve.sizes, [min(a, b) for a, b in zip(cached.seconds, curve.seconds)])
    write_json(path, {"sizes": curve.sizes, "seconds": curve.seconds})
    return curve


STALE = 1.25  # a cached cost this much above a fresh timing was measured under load
CHECK_SIZES = (0, 4)


def measured_busier(backbone: Backbone, cached: CostCurve) -> bool:
    """Whether a quick timing (sizes `CHECK_SIZES`, fastest of 3) finds the cached curve's
    costs too high: it was measured while something else used the machine."""
    quick = measure_cost_curve(backbone, CHECK_SIZES, repeats=3)
    return any(cached.cost(n) > STALE * t for n, t in zip(quick.sizes, quick.seconds))


def _read_curve(path: Path) -> CostCurve | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return CostCurve(data["sizes"], data["seconds"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None  # unreadable: measure again


def expected_gain(rate: float, n: int) -> float:
    """Tokens per step for a chain of n drafts accepted with per-token probability `rate`:
    1 + rate + ... + rate^n."""
    if abs(1.0 - rate) < 1e-9:
        return n + 1.0
    return (1.0 - rate ** (n + 1)) / (1.0 - rate)


def fastest_size(gain: Callable[[int], float], cost: Callable[[int], float], max_size: int) -> int:
    """The draft size n in 0..max_size with the most tokens per second, gain(n) / cost(n)."""
    return max(range(max_size + 1), key=lambda n: gain(n) / cost(n))


def best_size(curve: CostCurve, rate: float, max_size: int) -> int:
    """The number of draft nodes (0..max_size) with the highest expected tokens/second."""
    return fastest_size(lambda n: expected_gain(rate, n), curve.cost, max_size)


class TreeSizer(Protocol):
    """Picks the draft tree size of the next step; told how each step went."""

    size: int
    probe: ProbeSchedule
    draft_cost: DraftCost  # told how long each proposal took

    def update(self, proposed_depth: int, accepted_drafts: int, proposed_size: int) -> int:
        """After a step whose tree was `proposed_depth` deep with `proposed_size` nodes and
        kept `accepted_drafts` drafts; returns the next size."""

    def shadow(self, proposed_depth: int, accepted_drafts: int, proposed_size: int) -> None:
        """How a drafted but unverified tree would have done (a shadow probe)."""


class ProbeSchedule:
    """While drafting does not pay (best size 0) steps are plain, except for an occasional
    probe tree that keeps measuring whether the drafts got better. A probe that gains nothing
    doubles the wait before the next one (8, 16, ... 64 steps), one that gains resets it, so
    text the drafter cannot predict costs almost nothing and repetitive text is noticed."""

    def __init__(self, first: int = 8, longest: int = 64):
        self.first, self.longest = first, longest
        self.wait, self.idle, self.probing = first, 0, False

    def resolved(self, gained: bool) -> None:
        """A probe's outcome: back to the first wait if it gained tokens, else wait longer."""
        self.wait = self.first if gained else min(2 * self.wait, self.longest)
        self.probing = False

    def shadowed(self) -> None:
        """The probe due now is a shadow probe (drafted, not verified): its outcome comes
        later, through `resolved`, once the tokens it guessed have been decoded."""
        self.probing = False

    def next(self, best: int, probe_size: int, accepted_drafts: int) -> int:
        """The size to use next, given the best size and what the last step kept."""
        if self.probing:  # the step just taken was a probe
            self.resolved(accepted_drafts > 0)
        if best > 0:
            self.idle = 0
            return best
        self.idle += 1
        if self.idle >= self.wait:
            self.idle, self.probing = 0, True
            return probe_size
        return 0


class DraftCost:
    """Seconds the drafter spends per proposed node (exponentially weighted), so a drafter that
    costs a forward to propose (a draft model) is charged for it: size n then costs the verify
    of n nodes plus n nodes' drafting. Near zero for lookup and REST.

    `per_step=True` is for drafters whose cost does not grow with the nodes kept (EAGLE's
    tree levels cost one head forward each whatever n is cut from them): any n > 0 then
    costs one step's drafting."""

    def __init__(self, memory: float = 0.8, per_step: bool = False):
        self.memory, self.per_node, self.seen, self.per_step = memory, 0.0, False, per_step

    def add(self, seconds: float, nodes: int) -> None:
        if nodes > 0:
            per = seconds if self.per_step else seconds / nodes
            self.per_node = per if not self.seen else self.memory * self.per_node + (1 - self.memory) * per
            self.seen = True

    def __call__(self, n: int) -> float:
        if self.per_step:
            return self.per_node if n > 0 else 0.0
        return self.per_node * n


class AdaptiveTreeSize:
    """Tracks the drafter's per-token acceptance rate and re-picks the tree size each step."""

    def __init__(self, curve: CostCurve, max_size: int, prior_rate: float = 0.5,
                 memory: float = 0.9, probe: ProbeSchedule | None = None,
                 draft_cost: DraftCost | None = None):
        self.curve, self.max_size, self.memory = curve, max_size, memory
        self.probe, self.draft_cost = probe or ProbeSchedule(), draft_cost or DraftCost()
        # Exponentially weighted counts of accepted drafts and of drafts judged.
        self.accepted, self.trials = prior_rate, 1.0
        self.size = self.best()
        if self.size == 0:  # start with a probe: whether this text suits the drafter
            self.size, self.probe.probing = min(1, max_size), True

    @property
    def rate(self) -> float:
        return self.accepted / self.trials

    def cost(self, n: int) -> float:
        return self.curve.cost(n) + self.draft_cost(n)

    def best(self) -> int:
        return fastest_size(lambda n: expected_gain(self.rate, n), self.cost, self.max_size)

    def _count(self, proposed_depth: int, accepted_drafts: int) -> None:
        if proposed_depth > 0:
            # Each accepted draft was one success; a stop before the end was one failure.
            trials = accepted_drafts + (1 if accepted_drafts < proposed_depth else 0)
            self.accepted = self.memory * self.accepted + accepted_drafts
            self.trials = self.memory * self.trials + trials

    def update(self, proposed_depth: int, accepted_drafts: int, proposed_size: int = 0) -> int:
        self._count(proposed_depth, accepted_drafts)
        self.size = self.probe.next(self.best(), min(1, self.max_size), accepted_drafts)
        return self.size

    def shadow(self, proposed_depth: int, accepted_drafts: int, proposed_size: int) -> None:
        """A shadow probe's outcome: counted like a verified step's, without being a step."""
        self._count(proposed_depth, accepted_drafts)
        self.probe.resolved(accepted_drafts > 0)


class CalibratedTreeSize:
    """For a drafter that knows its expected tokens per step E(n) for n nodes (a Medusa tree
    measured on held-out data): the same per-step choice, with E corrected by what the drafter
    actually achieves on this text.

    E(n) comes from the training distribution; on other text the drafts are right less often
    (or more). The drafts accepted per step are compared with the E(n) - 1 that was expected
    at the size used, and every expected gain is scaled by that ratio:

        gain(n) = 1 + ratio * (E(n) - 1)

    Size 0 (a plain step) is allowed, so a tree that does not pay here is turned off, with
    probes on `ProbeSchedule`'s schedule to keep measuring.
    """

    def __init__(self, curve: CostCurve, expected_lengths: list[float], max_size: int,
                 memory: float = 0.9, probe: ProbeSchedule | None = None, probe_size: int = 4,
                 draft_cost: DraftCost | None = None):
        self.curve, self.expected, self.memory = curve, list(expected_lengths), memory
        self.max_size = min(max_size, len(self.expected) - 1)
        self.probe, self.probe_size = probe or ProbeSchedule(), probe_size
        self.draft_cost = draft_cost or DraftCost()
        # Exponentially weighted drafts accepted and drafts expected; the prior is the curve.
        self.got, self.wanted = 1.0, 1.0
        self.size = self.best()

    @property
    def ratio(self) -> float:
        return self.got / self.wanted

    def gain(self, n: int) -> float:
        return 1.0 + self.ratio * (self.expected[n] - 1.0)

    def cost(self, n: int) -> float:
        return self.curve.cost(n) + self.draft_cost(n)

    def best(self) -> int:
        return fastest_size(self.gain, self.cost, self.max_size)

    def _count(self, proposed_size: int, accepted_drafts: int) -> None:
        if proposed_size > 0:
            self.got = self.memory * self.got + accepted_drafts
            promised = self.expected[min(proposed_size, self.max_size)] - 1.0
            self.wanted = self.memory * self.wanted + promised

    def update(self, proposed_depth: int, accepted_drafts: int, proposed_size: int = 0) -> int:
        """After a step that verified `proposed_size` nodes and kept `accepted_drafts`."""
        self._count(proposed_size, accepted_drafts)
        self.size = self.probe.next(self.best(), min(self.probe_size, self.max_size),
                                    accepted_drafts)
        return self.size

    def shadow(self, proposed_depth: int, accepted_drafts: int, proposed_size: int) -> None:
        """A shadow probe's outcome: counted like a verified step's, without being a step."""
        self._count(proposed_size, accepted_drafts)
        self.probe.resolved(accepted_drafts > 0)
