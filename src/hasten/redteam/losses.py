"""The prompt around the suffix, and the target loss of many candidate suffixes at once.

A prompt is laid out as

    before (chat template + goal)  |  suffix (L tokens, searched)  |  after (end of the
    user turn + assistant header)  |  target ("Sure, here is ...")

`before` is the same for every candidate, so its K/V is computed once per goal
(`scorer.prefix`) and every batch of candidates runs as rows `suffix + after + target`
over it. Rows may differ in length (a draft with another tokenizer re-tokenises the
candidate text); they are right-padded, which changes nothing before the padding, and each
row's loss is read at its own target positions. The loss is the mean cross-entropy of the
target tokens, as in GCG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MARK = "\x00SUFFIX\x00"  # stands in for the suffix while the chat template is applied


@dataclass
class Layout:
    before: list[int]
    after: list[int]
    target: list[int]


def make_layout(tokenizer, goal: str, target: str, chat: bool = True,
                system: str | None = None) -> Layout:
    """Token ids of one goal's prompt around the suffix (the suffix follows the goal directly;
    GCG's initial suffix starts with a space)."""
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": goal + MARK}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        before, after = text.split(MARK)
        return Layout(enc(before), enc(after), enc(target))
    # No chat template (a base model): the goal, the suffix, then the target right after.
    before = tokenizer.encode(goal, add_special_tokens=True)
    return Layout(before, [], enc(" " + target.lstrip()))


@dataclass
class Scored:
    losses: torch.Tensor  # [B] mean target cross-entropy per candidate
    exact: torch.Tensor   # [B] bool: greedy decoding of this prompt starts with the target


def _rows(suffixes: list[list[int]], after: list[int], target: list[int], device):
    """Right-padded rows `suffix + after + target[:-1]` and the index of each row's first
    target-predicting position. (The last target token predicts nothing we score.)"""
    lengths = [len(s) for s in suffixes]
    width = max(lengths) + len(after) + len(target) - 1
    rows = torch.zeros(len(suffixes), width, dtype=torch.long, device=device)
    for i, s in enumerate(suffixes):
        row = s + after + target[:-1]
        rows[i, :len(row)] = torch.tensor(row, device=device)
    # position j predicts token j + 1: the first target token is predicted at len(s)+len(after)-1
    first = torch.tensor(lengths, device=device) + len(after) - 1
    return rows, first


def target_loss(scorer, hidden: torch.Tensor, first: torch.Tensor, target: list[int]) -> Scored:
    """Loss from hidden states [B, T, D]; `first` [B] = each row's first predicting position.
    Only the target positions go through the LM head."""
    b, n = hidden.shape[0], len(target)
    index = first[:, None] + torch.arange(n, device=hidden.device)[None, :]  # [B, n]
    h = hidden.gather(1, index[..., None].expand(b, n, hidden.shape[-1]))
    logits = scorer.logits(h)
    logits = logits.float() if logits.element_size() < 4 else logits  # half: CE in float32
    labels = torch.tensor(target, device=hidden.device).expand(b, n)
    ce = F.cross_entropy(logits.reshape(b * n, -1), labels.reshape(-1), reduction="none")
    exact = (logits.argmax(-1) == labels).all(-1)
    return Scored(ce.view(b, n).mean(-1), exact)


@torch.inference_mode()
def candidate_losses(scorer, prefix, suffixes: list[list[int]] | torch.Tensor, layout: Layout,
                     chunk: int = 128) -> Scored:
    """Target loss of each candidate suffix (ids in the scorer's tokenizer), `chunk` rows per
    forward over the shared prefix K/V."""
    if isinstance(suffixes, torch.Tensor):
        suffixes = suffixes.tolist()
    losses, exact = [], []
    for lo in range(0, len(suffixes), chunk):
        rows, first = _rows(suffixes[lo:lo + chunk], layout.after, layout.target, scorer.device)
        hidden = scorer.hidden(prefix, scorer.embed(rows))
        scored = target_loss(scorer, hidden, first, layout.target)
        losses.append(scored.losses)
        exact.append(scored.exact)
    if not losses:
        return Scored(torch.empty(0), torch.empty(0, dtype=torch.bool))
    return Scored(torch.cat(losses), torch.cat(exact))



# One forward costs about this many token rows beyond its rows (reading every weight once,
# Python per layer); it only steers how candidates are grouped, never a result.
GROUP_OVERHEAD_ROWS = 24


def plan_groups(widths: list[int], overhead: int = GROUP_OVERHEAD_ROWS,
                max_rows: int = 128) -> list[tuple[int, int]]:
    """Split rows sorted by width, widest first, into runs [lo, hi) padded to their first
    row's width, minimising sum(overhead + rows * width) (dynamic programming)."""
    n = len(widths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for hi in range(1, n + 1):
        for lo in range(max(0, hi - max_rows), hi):
            cost = best[lo] + overhead + (hi - lo) * widths[lo]
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    groups, hi = [], n
    while hi:
        groups.append((cut[hi], hi))
        hi = cut[hi]
    return groups[::-1]


@torch.inference_mode()
def swap_losses(scorer, prefix, base: list[int], cands: torch.Tensor, layout: Layout,
                chunk: int = 128) -> Scored:
    """`candidate_losses` for candidates that each differ from `base` from some position p on
    (GCG's one-token swaps): everything before p is `base`, so its K/V is shared too. The
    base suffix's K/V is computed once over the prefix; a candidate swapping position p runs
    as the row `cand[p:] + after + target` over the first P + p cached entries, so on average
    half the suffix is never recomputed. Rows are sorted by p and grouped (`plan_groups`) so
    that a few tokens of padding buy fewer forwards; scorers that cannot offset rows
    (`row_offsets` False) run one group per p. Same losses as `candidate_losses` (up to
    float rounding)."""
    b, L = cands.shape
    differs = cands.cpu() != torch.tensor(base)
    # the first differing position; a candidate equal to base recomputes its last token
    first = torch.where(differs.any(1), differs.float().argmax(1), torch.full((b,), L - 1))
    ext = scorer.extend(prefix, base)
    P = prefix[0][0].shape[2]
    order = first.argsort(stable=True)
    if getattr(scorer, "row_offsets", False):
        groups = plan_groups([L - int(first[i]) for i in order], max_rows=chunk)
    else:
        groups, lo = [], 0
        for n in torch.unique_consecutive(first[order], return_counts=True)[1].tolist():
            groups += [(a, min(a + chunk, lo + n)) for a in range(lo, lo + n, chunk)]
            lo += n
    losses, exact = [None] * b, [None] * b
    for lo, hi in groups:
        part = order[lo:hi]
        starts = first[part]
        rows, at = _rows([cands[i, int(p):].tolist() for i, p in zip(part, starts)],
                         layout.after, layout.target, scorer.device)
        if getattr(scorer, "row_offsets", False):
            hidden = scorer.hidden(ext, scorer.embed(rows), (P + starts).to(scorer.device))
        else:
            p = int(starts[0])
            hidden = scorer.hidden([(k[:, :, :P + p], v[:, :, :P + p]) for k, v in ext],
                                   scorer.embed(rows))
        scored = target_loss(scorer, hidden, at, layout.target)
        for j, i in enumerate(part.tolist()):
            losses[i], exact[i] = scored.losses[j], scored.exact[j]
    return Scored(torch.stack(losses), torch.stack(exact))
