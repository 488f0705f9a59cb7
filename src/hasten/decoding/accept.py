"""Acceptance rules: which path of a verified draft tree to keep, and the bonus token after it.

Every rule takes the tree and the verify logits `[1 + N, vocab]` (index 0 = the root, index
i + 1 = node i; see `tree.py`) and returns `(path, bonus)`: the accepted node indices from the
root's child downwards, and one more token drawn at the last accepted position. The step
therefore emits `tree.tokens[path] + [bonus]`, at least one token, and the caller commits
`keep_indices(path)`.

- `accept_greedy`: token-identical to plain greedy decoding.
- `accept_sampling`: lossless; the emitted tokens follow the model's own sampling distribution
  (`sampling.probabilities`: temperature, top-k, top-p), whatever the draft.
- `accept_typical`: Medusa's typical acceptance. LOSSY: faster, but not the model's distribution.

All are pure functions. Only the rows along the walked path are read, turned into
probabilities and moved to the CPU (where the random draws happen), so the cost is a few
rows' worth, not the whole tree's, wherever the logits live.
"""

from __future__ import annotations

import functools
import math

import torch

from .sampling import SamplingParams, probabilities, sample
from .tree import DraftTree

Acceptance = tuple[list[int], int]  # (accepted node indices, bonus token)


def accept(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None,
           draft_probs: torch.Tensor | None = None) -> Acceptance:
    """The lossless rule for `params`: greedy when temperature is 0, else rejection sampling."""
    if params.greedy:
        return accept_greedy(tree, logits)
    return accept_sampling(tree, logits, params, generator, draft_probs)


# ---- greedy ---------------------------------------------------------------------------------

def accept_greedy(tree: DraftTree, logits: torch.Tensor | None = None,
                  argmax_ids: list[int] | None = None) -> Acceptance:
    """The deepest node whose whole path matches the model's argmax, plus the argmax after it.

    A node matches when its token is the argmax at its parent's position; every token emitted
    is then the argmax given everything before it, which is exactly plain greedy decoding
    (ties break like `argmax` does in plain decoding). With duplicate siblings several nodes
    can match at one depth; the deepest matching path wins (ties: first in node order), which
    emits the same tokens, only more of them. Only rows reached by matching paths are read.
    `argmax_ids` (every row's argmax, precomputed where the logits live, e.g. on a GPU) may
    replace `logits`.
    """
    if argmax_ids is not None:
        if len(argmax_ids) != tree.size + 1:
            raise ValueError(f"need {tree.size + 1} argmax ids (root + nodes), got {len(argmax_ids)}")
        argmax = argmax_ids.__getitem__
    else:
        logits = _rows(tree, logits)
        argmax = functools.cache(lambda position: int(logits[position].argmax()))
    tokens = tree.token_list

    def matching(position, children):
        target = argmax(position)
        return [(c, 0.0) for c in children if tokens[c] == target]

    best = _deepest_path(tree, matching)
    return tree.path_to(best), argmax(best + 1)


# ---- lossless sampling ----------------------------------------------------------------------

def accept_sampling(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
                    generator: torch.Generator | None = None,
                    draft_probs: torch.Tensor | None = None) -> Acceptance:
    """Lossless multi-candidate rejection sampling over the tree (SpecInfer / EAGLE scheme).

    Walk down from the root. At the current position let p = `probabilities(logits, params)`.
    Try its children in node order; child x with proposal q is accepted with probability
    min(1, p[x] / q[x]); on rejection p becomes the residual normalize(max(p - q, 0)) and the
    next child is tried. An accepted child becomes the current position. When a position has no
    children left to try (a leaf, or every child rejected) the bonus token is sampled from the
    current p (the full distribution at a leaf, the residual after rejections).

    Why it is lossless: each trial is one step of standard speculative sampling with target p
    and proposal q, which yields a token distributed as p provided the tried token was drawn
    from q *given everything that happened before at this position*; the fall-through case
    is, by induction, a token distributed as the residual. So the token emitted at each
    position is distributed exactly as the model's p, and the walk continues in the accepted
    child's context. What "drawn from q" means decides which `draft_probs` are correct:

    - `draft_probs=None`: every node is a point mass on its own token (q = one-hot). Then the
      acceptance probability is p[x] and the residual is p with x removed. This is lossless for
      ANY tree chosen before verification (Medusa top-k, REST, lookup, greedy draft model),
      duplicates included (a repeated sibling is simply rejected, as its p is already 0).
    - `draft_probs` [N, vocab]: row i is the distribution node i's token was actually sampled
      from, conditioned on its earlier siblings. For a chain from a sampling draft model this
      is the draft model's distribution at the parent: standard speculative sampling. For
      siblings drawn i.i.d. from one q (EAGLE/SpecInfer style) every sibling's row is that q,
      and duplicates must be kept (do not `deduplicated()` such a tree: merging repeats
      changes the residuals and breaks losslessness). For siblings drawn *without*
      replacement, row i must be q with the earlier siblings' tokens removed and
      renormalised; passing the unconditional q for all of them is NOT lossless, and neither
      is passing q for tokens that were picked deterministically (top-k) rather than sampled:
      use `draft_probs=None` for those. A row equal to one-hot(token) behaves exactly like the
      point mass, so mixed trees can be expressed.

    Greedy params (temperature 0) defer to `accept_greedy`, which is what this rule reduces to.
    """
    if params.greedy:
        return accept_greedy(tree, logits)
    logits = _rows(tree, logits)
    if draft_probs is not None and draft_probs.shape != (tree.size, logits.shape[-1]):
        raise ValueError(f"draft_probs must be [N, vocab] = [{tree.size}, {logits.shape[-1]}], "
                         f"got {list(draft_probs.shape)}")
    tokens = tree.token_list
    path: list[int] = []
    position = 0
    while True:
        # The residual updates below work on p in place (no allocation per rejection, which
        # matters on a 50k-token vocabulary); p stays unnormalised and `mass` is its total.
        p = _owned(probabilities(_host(logits[position]), params), logits)
        mass = 1.0
        chosen = None
        for child in tree.children_at(position):
            x = tokens[child]
            q = None if draft_probs is None else draft_probs[child]
            if _try_accept(float(p[x]) / mass, x, q, generator):
                chosen = child
                break
            mass = _remove_proposal(p, mass, x, q)
        if chosen is None:
            return path, sample(p, generator)
        path.append(chosen)
        position = chosen + 1


def _owned(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """p itself if it is a fresh tensor (what `probabilities` returns), else a copy: the
    caller's logits must never be edited."""
    if p.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        return p.clone()
    return p


def _try_accept(p_x: float, token: int, q: torch.Tensor | None,
                generator: torch.Generator | None) -> bool:
    """Accept `token` with probability min(1, p[token] / q[token]) (q = point mass if None)."""
    ratio = p_x
    if q is not None:
        q_x = float(q[token])
        if q_x <= 0:
            raise ValueError(f"draft token {token} has draft probability {q_x}: it cannot have "
                             "been sampled from that distribution")
        ratio /= q_x
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return u < ratio


def _remove_proposal(p: torch.Tensor, mass: float, token: int, q: torch.Tensor | None) -> float:
    """Turn p (total `mass`) into max(p / mass - q, 0) in place, after a rejected proposal
    from q; returns the new total. For a point mass that is just p without `token`."""
    if q is None:
        p_x = float(p[token])
        p[token] = 0
        new_mass = mass - p_x  # no pass over the vocabulary...
        if new_mass < 1e-4 * mass:  # ...unless cancellation could make the difference inexact
            new_mass = float(p.sum())
        if new_mass <= 0:  # only rounding can reject a token holding all the mass: undo
            p[token] = p_x
            return mass
        return new_mass
    p.div_(mass).sub_(q.to(p.dtype)).clamp_min_(0)
    new_mass = float(p.sum())
    if new_mass <= 0:  # p <= q everywhere means p == q: only rounding can get here
        p.copy_(q)
        return 1.0
    return new_mass


# ---- typical acceptance (lossy) -------------------------------------------------------------

def accept_typical(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
                   epsilon: float = 0.09, delta: float = 0.3) -> Acceptance:
    """Medusa's typical acceptance. LOSSY: output does NOT follow the model's distribution.

    A node is acceptable when p(x) > min(epsilon, delta * exp(-H(p))), with p = softmax(logits
    / temperature) at its parent and H its entropy (Medusa's rule; top-k/top-p do not enter, and
    the entropy is exact where Medusa adds 1e-5 inside the log). The accepted path is the
    deepest node whose whole path is acceptable; among equally deep ones the one with the
    highest summed log p, as Medusa picks among its candidates. The bonus token is the argmax
    at the last accepted position: Medusa (default "fast" mode) takes the next step's first
    token greedily, and the paper accepts that first token unconditionally. Deterministic: no
    random draws at all. With temperature 0 this is `accept_greedy`.
    """
    if params.greedy:
        return accept_greedy(tree, logits)
    logits = _rows(tree, logits)
    tokens = tree.token_list

    def typical(position, children):
        logp = torch.log_softmax(_host(logits[position]).float() / params.temperature, dim=-1)
        entropy = float(torch.special.entr(logp.exp()).sum())
        threshold = min(epsilon, delta * math.exp(-entropy))
        child_logp = logp[[tokens[c] for c in children]].tolist()
        return [(c, lp) for c, lp in zip(children, child_logp) if math.exp(lp) > threshold]

    best = _deepest_path(tree, typical)
    return tree.path_to(best), int(logits[best + 1].argmax())


# ---- helpers --------------------------------------------------------------------------------

def _host(row: torch.Tensor) -> torch.Tensor:
    """A logits row on the CPU (sampling draws there with a CPU generator)."""
    return row if row.device.type == "cpu" else row.float().cpu()


def _rows(tree: DraftTree, logits: torch.Tensor) -> torch.Tensor:
    """Logits as [1 + N, vocab] (a leading batch dimension of 1 is dropped)."""
    if logits.dim() == 3 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.dim() != 2 or logits.shape[0] != tree.size + 1:
        raise ValueError(f"expected verify logits [1 + N, vocab] with N = {tree.size}, "
                         f"got {list(logits.shape)}")
    return logits


def _deepest_path(tree: DraftTree, judge) -> int:
    """The deepest node reachable through accepted children only (-1 if none).

    `judge(position, children) -> [(child, score), ...]` names the children accepted at a
    forward position; it is called only for positions on accepted paths, so rows of the
    tree nobody reaches are never read. Ties at equal depth go to the highest summed score,
    then to the first node in order.
    """
    best, best_key = -1, (0, 0.0, 0)
    frontier = [(0, 0.0)]  # (forward position, summed score of its path)
    depth = 0
    while frontier:
        depth += 1
        reached = []
        for position, score in frontier:
            children = tree.children_at(position)
            if children:
                reached += [(child + 1, score + s) for child, s in judge(position, children)]
        for position, score in reached:
            key = (depth, score, -position)
            if key > best_key:
                best, best_key = position - 1, key
        frontier = reached
    return best
