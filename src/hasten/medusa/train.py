"""Medusa-1 training: frozen backbone, heads learn from cached hidden states.

    loss = sum_k 0.8^k * CE(head_k)         each CE averaged over that head's answer targets

AdamW, linear warm-up then cosine decay, per-head top-1/top-5 accuracy logged, checkpoints
every `save_every` steps and at the end of each epoch (`checkpoint.pt`: heads, optimizer,
schedule, step), resumed automatically when the output folder has one. After training the
heads' rank of the true token is measured on held-out rows and a tree is grown from it
(`tree_search.py`); heads, tree and accuracies are saved together (`heads.py` format).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE, HiddenCache
from .heads import MedusaHeads, project
from .tree_search import search_tree

DECAY = 0.8


@dataclass
class TrainConfig:
    epochs: float = 2.0
    batch_size: int = 256  # rows (tokens) per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.03  # fraction of all steps (or an absolute count if >= 1)
    min_lr_ratio: float = 0.05
    decay: float = DECAY
    save_every: int = 1000
    log_every: int = 50
    seed: int = 0


def medusa_loss(logits: torch.Tensor, targets: torch.Tensor, decay: float = DECAY) -> tuple[torch.Tensor, dict]:
    """logits [K, N, V], targets [N, K] (IGNORE = no target) -> (sum_k decay^k CE_k, stats).

    stats: per-head `count` (targets that counted), `loss`, `top1`, `top5` (correct counts)."""
    k = logits.shape[0]
    total = logits.new_zeros(())
    stats = {"count": [], "loss": [], "top1": [], "top5": []}
    for h in range(k):
        lg, tg = logits[h], targets[:, h]
        keep = tg != IGNORE
        n = int(keep.sum())
        stats["count"].append(n)
        if n == 0:
            stats["loss"].append(0.0), stats["top1"].append(0), stats["top5"].append(0)
            continue
        lg, tg = lg[keep], tg[keep]
        ce = F.cross_entropy(lg.float(), tg)
        total = total + decay ** h * ce
        top = lg.detach().topk(min(5, lg.shape[-1]), dim=-1).indices
        hits = top == tg[:, None]
        stats["loss"].append(float(ce.detach()))
        stats["top1"].append(int(hits[:, 0].sum()))
        stats["top5"].append(int(hits.any(-1).sum()))
    return total, stats


def lr_lambda(total_steps: int, warmup: float, min_ratio: float):
    warm = int(warmup if warmup >= 1 else round(warmup * total_steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total_steps - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _rows(cache: HiddenCache, index: np.ndarray, device, preloaded=None):
    if preloaded is not None:
        h, t = preloaded
        index = torch.as_tensor(index, device=h.device)
        return h[index].float(), t[index].long()
    index = np.sort(index)  # memmap reads in order are faster
    h = torch.from_numpy(np.asarray(cache.hidden[index], dtype=np.float32)).to(device)
    t = torch.from_numpy(np.asarray(cache.targets[index], dtype=np.int64)).to(device)
    return h, t


def _preload(cache: HiddenCache, device: torch.device, limit_bytes: float):
    """Put the whole cache on the device when it fits (GPU epochs then cost nothing to feed)."""
    size = cache.hidden.nbytes + cache.targets.nbytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if size < min(limit_bytes, 0.5 * free):
            return (torch.from_numpy(np.array(cache.hidden)).to(device),
                    torch.from_numpy(np.asarray(cache.targets).astype(np.int64)).to(device))
    return None


def train_heads(heads: MedusaHeads, lm_head: torch.Tensor | None, train: HiddenCache,
                out_dir: str | Path, cfg: TrainConfig = TrainConfig(),
                device: str | torch.device = "cpu", held: HiddenCache | None = None,
                progress: bool = True, log=None, vocab: torch.Tensor | None = None) -> list[dict]:
    """Train `heads` in place on cached rows; returns the logged history.

    `lm_head`: the frozen base LM head [V, d] when the heads share it. `vocab`: train the
    heads' softmax over these token ids only (a reduced draft vocabulary, as the drafter will
    use it; targets outside it are skipped, logged accuracies are over in-vocabulary targets).
    Resumes from `out_dir/checkpoint.pt` if present."""
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    heads.to(device=device, dtype=torch.float32).train().requires_grad_(True)
    if lm_head is not None:
        lm_head = lm_head.detach().to(device, torch.float32)
    n = len(train)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup, cfg.min_lr_ratio))
    step, history = 0, []
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = state["step"], state.get("history", [])
        log(f"medusa: resuming from {ckpt} at step {step}/{total}")
    preloaded = _preload(train, device, 24e9)
    weight = heads.projection(lm_head) if heads.proj is None else None
    remap = None
    if vocab is not None:
        vocab = vocab.to(device)
        if weight is not None:
            weight = weight[vocab].contiguous()
        remap = torch.full((heads.config.vocab_size,), IGNORE, dtype=torch.long, device=device)
        remap[vocab] = torch.arange(vocab.numel(), device=device)

    def save(step):
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"heads": heads.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "step": step, "history": history,
                    "config": asdict(cfg)}, tmp)
        tmp.replace(ckpt)

    window = _Window(heads.num_heads)
    bar = tqdm(total=total, initial=step, desc="train medusa", unit="step", disable=not progress)
    t0 = time.perf_counter()
    for rows in resumable_batches(step, total, steps_per_epoch, n, cfg.batch_size, cfg.seed):
        h, t = _rows(train, rows, device, preloaded)
        t = t[:, 1:]
        if remap is not None:
            t = torch.where(t == IGNORE, t, remap[t.clamp(min=0)])
        proj = weight if weight is not None else (heads.proj if vocab is None else heads.proj[:, vocab])
        loss, stats = medusa_loss(project(heads.transform(h), proj), t, cfg.decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        window.add(float(loss.detach()), stats)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            entry = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                     "lr": sched.get_last_lr()[0], **window.summary(),
                     "seconds": round(time.perf_counter() - t0, 1)}
            history.append(entry)
            bar.set_postfix(loss=entry["loss"], top1=entry["top1"][0])
            with open(out_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            window = _Window(heads.num_heads)
        if step % cfg.save_every == 0:
            save(step)
        if held is not None and len(held) and step % steps_per_epoch == 0:
            acc = evaluate(heads, lm_head, held, device, vocab)
            history.append({"step": step, "eval": acc})
            log(f"medusa: step {step} held-out top-1 {acc['top1']} top-5 {acc['top5']}")
    bar.close()
    save(step)
    heads.eval().requires_grad_(False)
    return history


def resumable_batches(step: int, total: int, steps_per_epoch: int, n: int, batch_size: int,
                      seed: int):
    """Row indices of each training step from `step` to `total`: a fresh shuffle per epoch,
    seeded by the epoch, so a resumed run sees exactly the batches it would have seen."""
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(n)
        for i in range(offset, steps_per_epoch):
            if step >= total:
                return
            yield order[i * batch_size:(i + 1) * batch_size]
            step += 1


class _Window:
    def __init__(self, k: int):
        self.losses, self.k = [], k
        self.sums = {name: [0] * k for name in ("count", "top1", "top5")}

    def add(self, loss: float, stats: dict) -> None:
        self.losses.append(loss)
        for name in self.sums:
            self.sums[name] = [a + b for a, b in zip(self.sums[name], stats[name])]

    def summary(self) -> dict:
        c = self.sums["count"]
        return {"loss": round(sum(self.losses) / max(1, len(self.losses)), 4),
                "top1": [round(a / max(1, n), 4) for a, n in zip(self.sums["top1"], c)],
                "top5": [round(a / max(1, n), 4) for a, n in zip(self.sums["top5"], c)]}


@torch.no_grad()
def head_ranks(heads: MedusaHeads, lm_head: torch.Tensor | None, cache: HiddenCache,
               device="cpu", max_rank: int = 10, draft_vocab: torch.Tensor | None = None,
               batch_size: int = 1024) -> np.ndarray:
    """[N, K] rank of each head's target among its logits (max_rank = not in the top
    max_rank, or no target). With `draft_vocab` the heads only see those tokens, as the
    drafter does."""
    device = torch.device(device)
    heads = heads.to(device).eval()
    weight = heads.projection(None if lm_head is None else lm_head.to(device, heads.weight.dtype))
    vocab = None
    if draft_vocab is not None:
        vocab = draft_vocab.to(device)
        weight = weight[vocab] if weight.dim() == 2 else weight[:, vocab]
    out = np.full((len(cache), heads.num_heads), max_rank, dtype=np.int32)
    for start in range(0, len(cache), batch_size):
        idx = np.arange(start, min(len(cache), start + batch_size))
        h, t = _rows(cache, idx, device)
        logits = project(heads.transform(h.to(heads.weight.dtype)), weight)  # [K, B, Vd]
        top = logits.topk(max_rank, dim=-1).indices  # [K, B, R]
        if vocab is not None:
            top = vocab[top]
        tg = t[:, 1:].T  # [K, B]
        match = top == tg[..., None]
        rank = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(tg, max_rank))
        rank = torch.where(tg == IGNORE, torch.full_like(rank, max_rank), rank)
        out[idx] = rank.T.cpu().numpy()
    return out


def evaluate(heads: MedusaHeads, lm_head, cache: HiddenCache, device="cpu",
             draft_vocab: torch.Tensor | None = None) -> dict:
    """Per-head top-1 / top-5 accuracy over rows that have a target for that head."""
    ranks = head_ranks(heads, lm_head, cache, device, 5, draft_vocab)
    valid = np.asarray(cache.targets[:, 1:]) != IGNORE
    n = np.maximum(valid.sum(0), 1)
    return {"top1": [round(float(x), 4) for x in ((ranks == 0) & valid).sum(0) / n],
            "top5": [round(float(x), 4) for x in ((ranks < 5) & valid).sum(0) / n]}


def frequent_tokens(cache: HiddenCache, size: int) -> torch.Tensor:
    """The `size` most frequent target tokens of the cache (a reduced draft vocabulary)."""
    tokens = np.asarray(cache.targets[:, 0])
    counts = np.bincount(tokens[tokens >= 0])
    top = np.argsort(-counts, kind="stable")[:size]
    return torch.from_numpy(np.sort(top)).long()


def tree_for(heads: MedusaHeads, lm_head, held: HiddenCache, device="cpu", budget: int = 64,
             max_rank: int = 10, method: str = "joint",
             draft_vocab: torch.Tensor | None = None) -> dict:
    """Grow the tree from held-out ranks (`tree_search.search_tree`)."""
    ranks = head_ranks(heads, lm_head, held, device, max_rank, draft_vocab)
    return search_tree(ranks, budget, max_rank, method)


def run_medusa1(backbone, records: list[dict], out_dir: str | Path, *, name: str | None = None,
                model_key: str = "", num_heads: int = 4, num_layers: int = 1,
                shared_lm_head: bool = True, cfg: TrainConfig = TrainConfig(),
                device: str | torch.device = "cpu", holdout: float = 0.05,
                cache_dir: str | Path | None = None, max_len: int | None = 2048,
                cache_tokens: int = 8192, tree_nodes: int = 64, max_rank: int = 10,
                tree_method: str = "joint", draft_vocab: int = 0,
                save_dtype: torch.dtype | None = None, progress: bool = True, log=None) -> dict:
    """The whole Medusa-1 recipe: cache hidden states, train, measure, grow the tree, save.

    Returns the saved config (also in `out_dir/medusa_config.json`)."""
    from .data import build_cache, split_records
    from .heads import HeadsConfig, base_identity, lm_head_weight, save_heads

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    train_recs, held_recs = split_records(records, holdout)
    log(f"medusa: {len(train_recs)} training records, {len(held_recs)} held out")
    train_cache = build_cache(backbone, train_recs, cache_dir / "train", num_heads, model_key,
                              cache_tokens, max_len, progress)
    held_cache = build_cache(backbone, held_recs, cache_dir / "held", num_heads, model_key,
                             cache_tokens, max_len, progress) if held_recs else None
    log(f"medusa: {len(train_cache)} training rows, {len(held_cache) if held_cache else 0} held-out rows")
    lm = lm_head_weight(backbone)
    heads = MedusaHeads(HeadsConfig(hidden_size=lm.shape[1], vocab_size=lm.shape[0],
                                    num_heads=num_heads, num_layers=num_layers,
                                    shared_lm_head=shared_lm_head), lm)
    shared = lm if shared_lm_head else None
    vocab = frequent_tokens(train_cache, draft_vocab) if draft_vocab else None
    if vocab is not None:
        covered = np.isin(np.asarray(train_cache.targets[:, 0]), vocab.numpy()).mean()
        log(f"medusa: draft vocabulary of {vocab.numel()} tokens covers {covered:.1%} of answer tokens")
    started = time.perf_counter()
    history = train_heads(heads, shared, train_cache, out_dir, cfg, device, held_cache, progress,
                          log, vocab)
    seconds = time.perf_counter() - started
    measure = held_cache if held_cache is not None else train_cache
    full = evaluate(heads, shared, measure, device, vocab)
    tree = tree_for(heads, shared, measure, device, tree_nodes, max_rank, tree_method, vocab)
    log(f"medusa: held-out top-1 {full['top1']}, top-5 {full['top5']}; expected tokens per step "
        + ", ".join(f"{n} nodes: {tree['expected_lengths'][n]:.2f}"
                    for n in (4, 8, 16, 32, 64) if n < len(tree["expected_lengths"])))
    heads.draft_vocab = vocab
    extra = {"expected_lengths": tree["expected_lengths"], "head_accuracy": tree["head_accuracy"],
             "heldout": {**full, "rows": len(measure)}, "tree_method": tree_method,
             "draft_vocab_size": int(vocab.numel()) if vocab is not None else None,
             "training": {**asdict(cfg), "rows": len(train_cache), "records": len(train_recs),
                          "seconds": round(seconds, 1), "device": str(device),
                          "final": next((h for h in reversed(history) if "loss" in h), None)}}
    save_heads(heads, out_dir, base_identity(backbone, name), tree["choices"], save_dtype, **extra)
    log(f"medusa: heads saved to {out_dir}")
    return json.loads((out_dir / "medusa_config.json").read_text())


def research_tree(backbone, heads_dir: str | Path, records: list[dict], *, name: str | None = None,
                  model_key: str = "", device="cpu", holdout: float = 0.05,
                  cache_dir: str | Path | None = None, max_len: int | None = 2048,
                  tree_nodes: int = 64, max_rank: int = 10, method: str = "joint",
                  draft_vocab: int | None = None, progress: bool = True, log=None) -> dict:
    """Grow a new tree for saved heads from held-out records (optionally with a new draft
    vocabulary size: 0 = full vocabulary, None = keep) and store it with them."""
    from .data import build_cache, split_records
    from .heads import lm_head_weight, load_heads, save_heads

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    heads_dir = Path(heads_dir)
    loaded = load_heads(heads_dir, backbone, name)
    heads = loaded.heads.float()
    train_recs, held_recs = split_records(records, holdout)
    cache_dir = Path(cache_dir) if cache_dir else heads_dir / "cache"
    measure = build_cache(backbone, held_recs or train_recs, cache_dir / ("held" if held_recs else "train"),
                          heads.num_heads, model_key, 8192, max_len, progress)
    vocab = heads.draft_vocab
    if draft_vocab is not None:
        vocab = None
        if draft_vocab:
            counts = build_cache(backbone, train_recs, cache_dir / "train", heads.num_heads,
                                 model_key, 8192, max_len, progress)
            vocab = frequent_tokens(counts, draft_vocab)
    shared = lm_head_weight(backbone).float() if heads.proj is None else None
    tree = tree_for(heads, shared, measure, device, tree_nodes, max_rank, method, vocab)
    heads.draft_vocab = vocab
    meta = {k: v for k, v in loaded.meta.items()
            if k not in ("format", "version", "choices", "base_model", "hidden_size", "vocab_size",
                         "num_heads", "num_layers", "shared_lm_head", "dtype")}
    meta.update(expected_lengths=tree["expected_lengths"], head_accuracy=tree["head_accuracy"],
                tree_method=method, draft_vocab_size=int(vocab.numel()) if vocab is not None else None)
    save_dtype = getattr(torch, str(loaded.meta.get("dtype", "float32")), None)
    save_heads(heads, heads_dir, loaded.meta["base_model"], tree["choices"], save_dtype, **meta)
    log(f"medusa: new tree ({len(tree['choices'])} nodes, {method}) saved in {heads_dir}; expected "
        "tokens per step " + ", ".join(f"{n}: {tree['expected_lengths'][n]:.2f}"
                                       for n in (4, 8, 16, 32, 64) if n < len(tree["expected_lengths"])))
    return tree
