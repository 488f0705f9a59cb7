"""Attention whose result for a token does not depend on how it was batched.

A plain decoding step attends one query over the contiguous cache; a verify step attends many
tree nodes, each over the committed past plus its own ancestors, which sit scattered among the
pending slots. `scaled_dot_product_attention` reduces masked and absent keys differently and
picks kernels by shape, so a node's output differs in the last bits from the plain step of the
same token, and in bfloat16 that flips argmaxes within tens of tokens.

Here every query reduces over its keys in *logical* order (the sequence a plain decode of it
would see: committed past, then its ancestors, then itself), cut into fixed blocks of `BLOCK`
positions counted from position 0:

  - per block: scores q.k, the block max, exp, the block sum and exp @ V, with the tail of the
    last block (positions after the query) at -inf / weight exactly 0;
  - blocks combined in order 0, 1, 2, ... with a sequential scan (`cumsum`), so trailing empty
    blocks add exact zeros and change nothing.

Blocks every query sees in full (the committed past below the last block boundary) are read
from the cache in place and shared by all queries; the rest is gathered per query. So a token's
output is a function of its own logical key sequence only, given matmuls whose rows do not
depend on the row count (true for bfloat16 on the CPUs measured; `hasten check` measures it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK = 64


class KeyPlan(NamedTuple):
    """Where each query's logical keys are, shared by all layers of one forward."""
    shared: int  # logical positions [0, shared) = cache slots [0, shared), seen by every query
    # long [T, W]: cache slot of logical position shared + w; None: slot w itself (one plain
    # query after the committed past, read in place: the same values as gathered, no copy)
    tail_slots: torch.Tensor | None
    tail_hidden: torch.Tensor  # bool [T, W / BLOCK, 1, BLOCK]: True past the query's own keys
    # long [T]: keys per query; set where the compiled float32 kernel runs instead (`fused`)
    counts: torch.Tensor | None = None


def plan_keys(mask: torch.Tensor | None, start: int, t: int, device, share: bool = True,
              fused: bool = False) -> KeyPlan:
    """The plan for `t` queries after `start` committed slots; `mask` [t, start + t] (True =
    may attend) or None for plain causal. Slots a query attends, in slot order, are its
    logical keys (trees are stored parents first, so ancestors come in order). `share=False`
    gathers every query's keys: its score matmuls then have G rows whatever `t` is, which
    float32 needs (MKL rounds a row of a 3-row and of a 3t-row product differently).
    `fused` (float32, `share=False`): the plan of the compiled kernel, `logical_attention`."""
    if mask is None:
        mask = torch.ones(t, start + t, dtype=torch.bool, device=device).tril(diagonal=start)
    counts = mask.sum(-1)  # keys per query = its position + 1
    # Blocks below the committed length are seen in full by every query: computed once for all
    # queries. For a plain step (one row and its copy) gathering everything costs fewer ops.
    shared = (start // BLOCK) * BLOCK if t > 2 and share else 0
    width = max(BLOCK, -(-(int(counts.max()) - shared) // BLOCK) * BLOCK)
    if t == 1 and shared == 0 and bool(mask.all()):  # one query over everything: in order
        positions = torch.arange(width, device=device)[None]
        hidden = positions >= counts[:, None]
        return KeyPlan(0, positions if fused else None,
                       hidden.reshape(1, width // BLOCK, 1, BLOCK), counts if fused else None)
    logical = mask.long().cumsum(-1) - 1  # logical index of each attended slot
    slots = torch.arange(mask.shape[-1], device=device).expand_as(mask)
    keep = mask & (logical >= shared)
    rows = torch.arange(t, device=device)[:, None].expand_as(mask)
    tail_slots = torch.zeros(t, width, dtype=torch.long, device=device)
    tail_slots[rows[keep], logical[keep] - shared] = slots[keep]
    hidden = torch.arange(width, device=device)[None] >= (counts - shared)[:, None]
    return KeyPlan(shared, tail_slots, hidden.reshape(t, width // BLOCK, 1, BLOCK),
                   counts if fused and shared == 0 else None)


def _block_partials(scores: torch.Tensor, values: torch.Tensor, dtype) -> tuple:
    """(max, sum, exp @ V) of float32 score blocks [..., B]. An empty block (all -inf) gets a
    max of -1e30, so its weights are exp(-inf) = 0 and it adds exactly nothing when combined."""
    block_max = scores.amax(-1, keepdim=True).clamp_(min=-1e30)
    weights = torch.exp(scores - block_max)
    return block_max.squeeze(-1), weights.sum(-1), (weights.to(dtype) @ values).float()


def exact_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    plan: KeyPlan, scale: float) -> torch.Tensor:
    """q [1, H, T, D] against one row of the cache k/v [1, KV, capacity, D] -> [1, H, T, D]."""
    if plan.counts is not None:  # the compiled kernel: same keys, same order, one call
        from .quant_kernels import logical_attention
        return logical_attention(q, k_cache, v_cache, plan, scale)
    _, heads, t, d = q.shape
    kv = k_cache.shape[1]
    group = heads // kv
    dtype = q.dtype
    qg = (q[0] * scale).reshape(kv, group * t, d)  # heads of one kv head together: [KV, G*T, D]
    k, v = k_cache[0].to(dtype), v_cache[0].to(dtype)  # [KV, capacity, D] (a float16 cache: converted)
    nt = plan.tail_hidden.shape[1]
    width = nt * BLOCK
    if plan.tail_slots is None and width <= k.shape[1]:  # slots 0..width-1, copied in order
        # A copy, not a view: float32 bmm over the cache's strides rounds otherwise (measured).
        kt = k[:, :width].reshape(kv, 1, nt, BLOCK, d).contiguous()
        vt = v[:, :width].reshape(kv, 1, nt, BLOCK, d).contiguous()
    else:
        slots = (plan.tail_slots.reshape(-1) if plan.tail_slots is not None else
                 torch.arange(width, device=k.device).clamp_(max=k.shape[1] - 1))
        # index_select: the same gather, 4x cheaper than k[:, idx]
        kt = k.index_select(1, slots).reshape(kv, t, nt, BLOCK, d)  # gathered: [KV, T, nt, B, D]
        vt = v.index_select(1, slots).reshape(kv, t, nt, BLOCK, d)
    qt = qg.reshape(kv, group, t, d).transpose(1, 2)[:, :, None]  # [KV, T, 1, G, D]
    scores = (qt @ kt.transpose(-1, -2)).float()  # [KV, T, nt, G, B]
    scores.masked_fill_(plan.tail_hidden, float("-inf"))
    m, l_, o = _block_partials(scores, vt, dtype)
    # [KV, T, nt, G] -> [KV, G*T, nt] (the row order of qg: group-major, then query)
    m = m.permute(0, 3, 1, 2).reshape(kv, group * t, nt)
    l_ = l_.permute(0, 3, 1, 2).reshape(kv, group * t, nt)
    o = o.permute(0, 3, 1, 2, 4).reshape(kv, group * t, nt, d)
    if plan.shared:
        n = plan.shared // BLOCK
        ks = k[:, :plan.shared].reshape(kv, n, BLOCK, d)
        vs = v[:, :plan.shared].reshape(kv, n, BLOCK, d)
        scores = (qg[:, None] @ ks.transpose(-1, -2)).float()  # [KV, n, G*T, B]
        ms, ls, os_ = _block_partials(scores, vs, dtype)
        m = torch.cat([ms.transpose(1, 2), m], -1)  # shared blocks first: logical order
        l_ = torch.cat([ls.transpose(1, 2), l_], -1)
        o = torch.cat([os_.permute(0, 2, 1, 3), o], -2)
    w = torch.exp(m - m.amax(-1, keepdim=True))
    # Blocks combined in logical order by a sequential scan: empty trailing blocks add zeros.
    total = (w * l_).cumsum(-1)[..., -1:]
    out = (w[..., None] * o).cumsum(-2)[..., -1, :] / total
    return out.to(dtype).reshape(kv * group, t, d)[None]
