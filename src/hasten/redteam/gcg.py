"""One step of GCG (Zou et al. 2023): greedy coordinate gradient over a token suffix.

1. `token_gradient`: the suffix as a one-hot matrix [L, V] times the embedding matrix, the
   target loss of the whole prompt, its gradient with respect to the one-hot matrix. A
   large negative entry (i, v) says: putting token v at position i should lower the loss.
2. `sample_candidates`: for each of B candidates one position (spread evenly over the
   suffix, as llm-attacks does) and one of the `topk` most promising tokens there, drawn
   with a seeded generator. The current token is never among them, so every candidate
   differs from the suffix in exactly one token. Tokens outside `allowed` (special tokens,
   and by default anything that is not printable ASCII) are never proposed.
3. `retokenizes`: a candidate survives only if decoding it to text and encoding that text
   gives the same ids back; otherwise the prompt a user would send is not the one scored.
   Duplicates are dropped too.
4. The survivors are scored on the target (`losses.candidate_losses`) and the best becomes
   the new suffix, even if it is worse than the current one (GCG always moves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import Layout, Scored, candidate_losses, swap_losses, target_loss


def token_gradient(scorer, prefix, suffix: list[int], layout: Layout):
    """(gradient [L, V] of the target loss wrt the one-hot suffix, the loss)."""
    dev = scorer.device
    one_hot = torch.zeros(len(suffix), scorer.vocab_size, device=dev, dtype=scorer.dtype)
    one_hot[torch.arange(len(suffix)), torch.tensor(suffix, device=dev)] = 1
    one_hot.requires_grad_(True)
    rest = torch.tensor([layout.after + layout.target[:-1]], device=dev)
    with torch.enable_grad():
        embeds = torch.cat([scorer.embed_one_hot(one_hot)[None], scorer.embed(rest)], dim=1)
        hidden = scorer.hidden(prefix, embeds)
        first = torch.tensor([len(suffix) + len(layout.after) - 1], device=dev)
        loss = target_loss(scorer, hidden, first, layout.target).losses[0]
        (grad,) = torch.autograd.grad(loss, one_hot)
    return grad, float(loss.detach())


def allowed_tokens(tokenizer, vocab_size: int, ascii_only: bool = True) -> torch.Tensor:
    """Bool [V]: tokens a candidate may use. Never special tokens; with `ascii_only`, only
    tokens whose text is non-empty printable ASCII (llm-attacks' `allow_non_ascii=False`)."""
    ok = torch.ones(vocab_size, dtype=torch.bool)
    for i in set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {})):
        if i < vocab_size:
            ok[i] = False
    size = min(vocab_size, len(tokenizer))
    ok[size:] = False
    if ascii_only:
        texts = tokenizer.batch_decode([[i] for i in range(size)])
        for i, t in enumerate(texts):
            if not (t and t.isascii() and t.isprintable()):
                ok[i] = False
    return ok


def sample_candidates(suffix: list[int], grad: torch.Tensor, batch: int, topk: int,
                      generator: torch.Generator, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] candidates, each the suffix with exactly one token swapped for one of the
    `topk` lowest-gradient tokens at that position (the current token excluded)."""
    L = len(suffix)
    cur = torch.tensor(suffix, device=grad.device)
    scores = grad.detach().float().clone()
    if allowed is not None:
        scores[:, ~allowed.to(grad.device)] = float("inf")
    scores[torch.arange(L), cur] = float("inf")
    topk = max(1, min(topk, int(torch.isfinite(scores).sum(1).min())))
    top = scores.topk(topk, dim=1, largest=False).indices.cpu()          # [L, topk]
    positions = (torch.arange(batch) * L) // batch                          # evenly spread
    picks = torch.randint(0, topk, (batch,), generator=generator)
    cands = cur.cpu().repeat(batch, 1)
    cands[torch.arange(batch), positions] = top[positions, picks]
    return cands


def retokenizes(tokenizer, cands: torch.Tensor) -> torch.Tensor:
    """Bool [B]: decode -> encode gives the candidate's ids back (and it is not a repeat)."""
    texts = tokenizer.batch_decode(cands.tolist())
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seen, keep = set(), []
    for ids, back in zip(cands.tolist(), again):
        key = tuple(ids)
        keep.append(ids == back and key not in seen)
        seen.add(key)
    return torch.tensor(keep, dtype=torch.bool)


@dataclass
class StepResult:
    suffix: list[int]    # the suffix for the next step
    loss: float          # its target loss
    exact: bool          # greedy decoding with it starts with the target
    target_rows: int     # candidate rows the target scored this step
    draft_rows: int = 0  # candidate rows the draft scored this step
    alpha: float | None = None  # probe sampling's agreement


@dataclass
class Search:
    """Everything one goal's search needs besides the RNG."""
    scorer: object
    prefix: object
    layout: Layout
    tokenizer: object
    allowed: torch.Tensor
    batch: int
    topk: int
    chunk: int = 128
    share_suffix: bool = True  # swap_losses (suffix before the swap shared) or flat batches


def score(s: Search, suffix: list[int], cands: torch.Tensor) -> Scored:
    """Target losses of candidates of `suffix`, in the fastest exact plan."""
    if s.share_suffix:
        return swap_losses(s.scorer, s.prefix, suffix, cands, s.layout, s.chunk)
    return candidate_losses(s.scorer, s.prefix, cands, s.layout, s.chunk)


def propose(s: Search, suffix: list[int], generator: torch.Generator) -> torch.Tensor:
    """Steps 1-3: the gradient, B candidates, those that re-tokenise."""
    grad, _ = token_gradient(s.scorer, s.prefix, suffix, s.layout)
    cands = sample_candidates(suffix, grad, s.batch, s.topk, generator, s.allowed)
    return cands[retokenizes(s.tokenizer, cands)]


def gcg_step(s: Search, suffix: list[int], generator: torch.Generator) -> StepResult:
    cands = propose(s, suffix, generator)
    if len(cands) == 0:  # nothing re-tokenised: stay (the next draw differs)
        scored = candidate_losses(s.scorer, s.prefix, [suffix], s.layout, s.chunk)
        return StepResult(suffix, float(scored.losses[0]), bool(scored.exact[0]), 1)
    scored = score(s, suffix, cands)
    best = int(scored.losses.argmin())
    return StepResult(cands[best].tolist(), float(scored.losses[best]), bool(scored.exact[best]),
                      len(cands))
