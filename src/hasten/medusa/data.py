"""Training data for Medusa heads: distilled records, targets, and the hidden-state cache.

A record (one line of the distilled JSONL) is `{"key", "prompt_ids", "answer_ids", ...}`.
For the sequence x = prompt + answer (prompt length P, total L):

    hidden h_t (t = P-1 .. L-2)  --LM head-->  x_{t+1}          (the base model's own token)
                                 --head k -->  x_{t+2+k}        (k = 0 .. K-1)

Only these positions train the heads, and only targets inside the answer count: the loss
ignores the prompt entirely (`head_targets`). For Medusa-1 the backbone is frozen, so
the hidden states are computed once and cached on disk (float16) as rows:

    cache/hidden.npy   [N, d] float16    h_t for every answer-predicting position
    cache/targets.npy  [N, 1 + K] int32  x_{t+1}, then each head's target (-1 = none)
    cache/meta.json    what the cache was built from (data file, model, K) and progress

An epoch is then a pass over rows: no backbone forward at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import HastenError

IGNORE = -1


def read_records(path: str | Path) -> list[dict]:
    """Complete records of a distilled JSONL file (a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise HastenError(f"no distilled data at {path}: run `hasten distill --out {path}` first")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("answer_ids") and rec.get("prompt_ids"):
                records.append(rec)
    if not records:
        raise HastenError(f"{path} holds no usable records (prompt_ids + non-empty answer_ids)")
    return records


def is_holdout(key: str, fraction: float) -> bool:
    """A fixed, order-independent split: a record's key decides which side it is on."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def split_records(records: list[dict], holdout: float) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for r in records:
        (held if is_holdout(str(r["key"]), holdout) else train).append(r)
    if holdout > 0 and not held and len(train) > 1:
        held.append(train.pop())
    return train, held


def head_targets(tokens: torch.Tensor, prompt_len: int, num_heads: int) -> torch.Tensor:
    """[L, K] long: targets[t, k] = tokens[t + 2 + k] if t >= prompt_len - 1 and t + 2 + k < L,
    else IGNORE. Everything a head is trained on is an answer token."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    length = tokens.numel()
    t = torch.arange(length)[:, None]
    k = torch.arange(num_heads)[None, :]
    src = t + 2 + k
    valid = (t >= prompt_len - 1) & (src < length)
    return torch.where(valid, tokens[src.clamp(max=length - 1)], torch.full_like(src, IGNORE))


def record_rows(rec: dict, num_heads: int) -> tuple[int, int, torch.Tensor]:
    """(first position, row count, targets [rows, 1 + K]) of a record's training rows."""
    tokens = torch.tensor(rec["prompt_ids"] + rec["answer_ids"], dtype=torch.long)
    p, length = len(rec["prompt_ids"]), tokens.numel()
    first, rows = p - 1, length - p  # positions P-1 .. L-2
    heads = head_targets(tokens, p, num_heads)[first:first + rows]
    base = tokens[first + 1:first + 1 + rows, None]
    return first, rows, torch.cat([base, heads], dim=1)


@torch.inference_mode()
def padded_forward(backbone, seqs: list[list[int]], taps: tuple[int, ...] = ()):
    """The StepOutput of left-padded sequences: hidden [B, W, d] (and `taps`' outputs), each
    row computed exactly as if alone (own positions, padding masked). Row b's tokens sit at
    the last len(seqs[b]) slots."""
    rows, width = len(seqs), max(len(s) for s in seqs)
    dev = backbone.device
    ids = torch.zeros(rows, width, dtype=torch.long, device=dev)
    valid = torch.zeros(rows, width, dtype=torch.bool, device=dev)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s, device=dev)
        valid[r, width - len(s):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    eye = torch.eye(width, dtype=torch.bool, device=dev)
    mask = (torch.ones(width, width, dtype=torch.bool, device=dev).tril() & valid[:, None, :]) | eye
    backbone.reset(rows, width)
    out = backbone.forward(ids, positions=positions, mask=mask, last_only=True,
                           **({"taps": taps} if taps else {}))
    backbone.commit(torch.empty(0, dtype=torch.long))
    return out


def sequence_states(backbone, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Last hidden states [len(s), d] of each sequence (`sequence_outputs`)."""
    return [hidden for hidden, _ in sequence_outputs(backbone, seqs)]


def sequence_outputs(backbone, seqs: list[list[int]], taps: tuple[int, ...] = ()
                     ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per sequence: last hidden states [len(s), d] and the outputs of layers `taps` [len(s),
    len(taps) d] (None without taps). Where the backbone prefills a prompt of that length on
    the kernels it decodes with (`LlamaModel.prefill_plan`: the compact plans, the default),
    one solo forward per sequence: a drafter then learns from the very features it drafts
    from (bit for bit: a test checks), and faster (compact-q8, 2 threads: 1,630 against 610
    tok/s for padded batches). Else one left-padded batch (`padded_forward`)."""
    from ..models.llama import LlamaModel
    if isinstance(backbone, LlamaModel) and all(backbone.prefill_plan(len(s)) is not None for s in seqs):
        out, capacity = [], max(map(len, seqs))
        for s in seqs:
            backbone.reset(1, capacity)  # one allocation for the batch (reset reuses it)
            step = backbone.forward(torch.tensor([s], device=backbone.device), last_only=True, taps=taps)
            out.append((step.hidden[0], None if step.taps is None else step.taps[0]))
            backbone.commit(torch.empty(0, dtype=torch.long))
        return out
    step = padded_forward(backbone, seqs, taps)
    width = step.hidden.shape[1]
    return [(step.hidden[r, width - len(s):], None if step.taps is None else step.taps[r, width - len(s):])
            for r, s in enumerate(seqs)]


def batches_by_length(lengths: list[int], max_tokens: int, max_rows: int = 64) -> list[list[int]]:
    """Index batches of similar lengths, each padded size at most `max_tokens` (or one row)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if cur and (w * (len(cur) + 1) > max_tokens or len(cur) >= max_rows):
            batches.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


def _fingerprint(records: list[dict]) -> str:
    h = hashlib.sha1()
    for r in records:
        h.update(str(r["key"]).encode())
        h.update(np.asarray(r["answer_ids"], dtype=np.int32).tobytes())
    return h.hexdigest()[:16]


class HiddenCache:
    """Memory-mapped rows of a built cache (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.hidden = np.load(folder / "hidden.npy", mmap_mode="r")
        self.targets = np.load(folder / "targets.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.hidden.shape[0]


def build_cache(backbone, records: list[dict], folder: str | Path, num_heads: int,
                model_key: str, max_tokens: int = 8192, max_len: int | None = None,
                progress: bool = True) -> HiddenCache:
    """Compute (or reuse, or finish) the hidden-state cache of `records` in `folder`.

    Resumable: rows are filled batch by batch and the progress is saved; rerunning with the
    same data and model continues. `max_len` truncates long records (prompt kept whole)."""
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if max_len:
        records = [dict(r, answer_ids=r["answer_ids"][:max(1, max_len - len(r["prompt_ids"]))])
                   for r in records if len(r["prompt_ids"]) < max_len]
    key = {"data": _fingerprint(records), "model": model_key, "num_heads": num_heads,
           "records": len(records), "max_len": max_len}
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rows_per = [len(r["answer_ids"]) for r in records]
    total = sum(rows_per)
    d = int(lm_hidden_size(backbone))
    if meta.get("key") != key:  # new or stale: start over
        meta = {"key": key, "rows": total, "hidden_size": d, "done_batches": 0, "complete": False}
        np.lib.format.open_memmap(folder / "hidden.npy", "w+", np.float16, (total, d))
        np.lib.format.open_memmap(folder / "targets.npy", "w+", np.int32, (total, 1 + num_heads))
        _write_json(meta_path, meta)
    if meta.get("complete"):
        return HiddenCache(folder)
    hidden = np.load(folder / "hidden.npy", mmap_mode="r+")
    targets = np.load(folder / "targets.npy", mmap_mode="r+")
    offsets = np.concatenate([[0], np.cumsum(rows_per)])
    batches = batches_by_length([len(r["prompt_ids"]) + len(r["answer_ids"]) for r in records],
                                max_tokens)
    bar = tqdm(total=len(batches), initial=meta["done_batches"], desc="hidden states",
               unit="batch", disable=not progress)
    for b, batch in enumerate(batches):
        if b < meta["done_batches"]:
            continue
        seqs = [records[i]["prompt_ids"] + records[i]["answer_ids"] for i in batch]
        states = sequence_states(backbone, seqs)
        for row, i in enumerate(batch):
            first, n, tg = record_rows(records[i], num_heads)
            hidden[offsets[i]:offsets[i] + n] = states[row][first:first + n].float().cpu().numpy()
            targets[offsets[i]:offsets[i] + n] = tg.numpy()
        if b % 20 == 19 or b == len(batches) - 1:
            hidden.flush()
            targets.flush()
            meta["done_batches"] = b + 1
            _write_json(meta_path, meta)
        bar.update(1)
    bar.close()
    meta["complete"] = True
    _write_json(meta_path, meta)
    return HiddenCache(folder)


def lm_hidden_size(backbone) -> int:
    from .heads import lm_head_weight
    return lm_head_weight(backbone).shape[1]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
