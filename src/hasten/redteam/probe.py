"""Probe sampling (Zhao et al. 2024, arXiv 2403.01251): GCG with most candidates scored by a
draft model.

One step, after GCG's candidates (`gcg.propose`):
1. the draft scores all B candidates (cheap);
2. the target scores a random probe set of k = B * probe_fraction of them (1/8 in the paper);
3. agreement alpha = (1 + rho) / 2, rho the Spearman rank correlation of draft and target
   losses on the probe set (rho undefined, e.g. constant losses, counts as 0);
4. the target scores the filtered set: the max(1, int((1 - alpha) * B / R)) candidates
   outside the probe set that the draft ranks best (R = `reduction`, 8 by default);
5. the new suffix is the lowest target loss over probe set and filtered set.
When the draft agrees with the target (alpha near 1) the target scores little beyond the
probe set; when it does not, the target falls back to scoring more of the draft's picks.
"""

from __future__ import annotations

import torch

from .gcg import Search, StepResult, propose, score
from .losses import candidate_losses


def ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata)."""
    x = x.double()
    order = x.argsort(stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    for value in x.unique():  # average the ranks of tied values
        tied = x == value
        if int(tied.sum()) > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the ranks; NaN when either is constant."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.pow(2).sum() * ry.pow(2).sum()).sqrt()
    return float("nan") if float(den) == 0 else float((rx * ry).sum() / den)


def agreement(rho: float) -> float:
    return 0.5 if rho != rho else (1 + rho) / 2  # NaN -> rho = 0


def filtered_size(alpha: float, batch: int, reduction: float) -> int:
    return max(1, int((1 - alpha) * batch / reduction))


def probe_step(s: Search, draft, suffix: list[int], generator: torch.Generator,
               probe_fraction: float = 1 / 8, reduction: float = 8) -> StepResult:
    """One probe-sampling step; `draft.losses(cands, suffix)` scores candidates on the draft."""
    cands = propose(s, suffix, generator)
    b = len(cands)
    if b == 0:
        scored = candidate_losses(s.scorer, s.prefix, [suffix], s.layout, s.chunk)
        return StepResult(suffix, float(scored.losses[0]), bool(scored.exact[0]), 1)
    draft_losses = draft.losses(cands, suffix)
    k = min(b, max(1, round(b * probe_fraction)))
    probe = torch.randperm(b, generator=generator)[:k]
    probe_scored = score(s, suffix, cands[probe])
    alpha = agreement(spearman(draft_losses[probe], probe_scored.losses))
    outside = torch.ones(b, dtype=torch.bool)
    outside[probe] = False
    rest = outside.nonzero().squeeze(1)
    n = min(len(rest), filtered_size(alpha, b, reduction))
    filtered = rest[draft_losses[rest].argsort(stable=True)[:n]]
    pool = torch.cat([probe, filtered])
    losses, exact = probe_scored.losses, probe_scored.exact
    if n:
        f = score(s, suffix, cands[filtered])
        losses, exact = torch.cat([losses, f.losses]), torch.cat([exact, f.exact])
    best = int(losses.argmin())
    return StepResult(cands[pool[best]].tolist(), float(losses[best]), bool(exact[best]),
                      len(pool), b, alpha)
