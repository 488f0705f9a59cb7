"""Training the EAGLE head on cached target features (`data.py`); the backbone stays frozen.

Per unrolled step s (s = 0: EAGLE-1's teacher-forced pass; s >= 1: EAGLE-3's training-time
test, the head fed its own outputs; weight `decay`**s), on the trained positions only:

    feature loss  smooth L1(output_s[i], f_{i+1+s})                (EAGLE-1's regression)
    token loss    cross-entropy of lm(output_s[i]) against softmax(lm(f_{i+1+s}))
                  over the draft vocabulary: the *target's* distribution, not the data token

AdamW, linear warm-up then cosine decay; a checkpoint every `save_every` steps (resumed when
the same run is started again); a progress bar with the loss and top-1 agreement per depth.
On a CPU with bfloat16 units the forward runs under bfloat16 autocast.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HastenError
from ..medusa.data import batches_by_length
from .data import FeatureCache, trained_positions, training_batch
from .head import EagleHead


@dataclass
class EagleTrainConfig:
    epochs: float = 2.0
    batch_tokens: int = 8192  # padded tokens per batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.03
    min_lr_ratio: float = 0.05
    unroll: int = 2  # training-time test steps after the first (0 = EAGLE-1 only)
    decay: float = 0.8  # weight of unrolled step s: decay ** s
    feature_weight: float = 1.0
    token_weight: float = 1.0
    noise: float = 0.1  # uniform noise on input features, +- noise/2 (EAGLE's data noise)
    save_every: int = 200
    seed: int = 0


def lr_at(step: int, total: int, cfg: EagleTrainConfig) -> float:
    warm = max(1, int(total * cfg.warmup))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def eagle_loss(head: EagleHead, batch: dict, embed: torch.Tensor, vocab_weight: torch.Tensor,
               cfg: EagleTrainConfig, train: bool = True) -> tuple[torch.Tensor, dict]:
    """The loss of a batch from `training_batch`, and top-1 agreement with the target per
    depth (depth s + 1 = unrolled step s). The head reads `batch["inputs"]` where the batch has
    them (another feature than the one it predicts, e.g. several layers'), else the features."""
    tokens, feats = batch["tokens"], batch["features"]
    b, width, _ = feats.shape
    embeds = embed[tokens[:, 1:]]  # the pair at i holds x_{i+1}; [B, width - 1 + unroll, d]
    inputs = batch.get("inputs", feats)[:, :width - 1]
    if train and cfg.noise:
        inputs = inputs + (torch.rand_like(inputs) - 0.5) * cfg.noise
    outs = head(embeds, inputs, unroll=cfg.unroll)
    with torch.no_grad():  # the target's distribution at every position, once for all steps
        target_logp = (feats[:, 1:] @ vocab_weight.T).float().log_softmax(-1)
    total = feats.new_zeros(())
    stats = {}
    for s, out in enumerate(outs):
        n = width - 1 - s  # pairs whose target f_{i+1+s} lies inside the padded batch
        mask = trained_positions(batch["lengths"], batch["prompts"], n, s)
        if n <= 0 or not bool(mask.any()):
            continue
        target_feat = feats[:, 1 + s:1 + s + n][mask]
        target = target_logp[:, s:s + n][mask]
        pred = out[:, :n][mask].float()
        logq = (pred @ vocab_weight.T).float().log_softmax(-1)
        token = -(target.exp() * logq).sum(-1).mean()
        feature = F.smooth_l1_loss(pred, target_feat.float())
        total = total + cfg.decay ** s * (cfg.token_weight * token + cfg.feature_weight * feature)
        stats[f"acc{s + 1}"] = float((logq.argmax(-1) == target.argmax(-1)).float().mean())
        stats[f"n{s + 1}"] = int(mask.sum())
    stats["loss"] = float(total.detach())
    return total, stats


def _use_bf16_autocast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def evaluate(head: EagleHead, cache: FeatureCache, embed: torch.Tensor, vocab_weight: torch.Tensor,
             cfg: EagleTrainConfig, device, max_sequences: int = 200) -> dict:
    """Top-1 agreement with the target per depth on held-out sequences (weighted by rows)."""
    head.eval()
    idx = list(range(min(len(cache), max_sequences)))
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=_use_bf16_autocast(device)):
        for batch_ids in batches_by_length([int(cache.index[i][1]) for i in idx], cfg.batch_tokens):
            batch = training_batch(cache, [idx[i] for i in batch_ids], cfg.unroll, device)
            _, st = eagle_loss(head, batch, embed, vocab_weight, cfg, train=False)
            for k, v in st.items():
                if k.startswith("acc"):
                    n = st["n" + k[3:]]
                    sums[k] = sums.get(k, 0.0) + v * n
                    counts[k] = counts.get(k, 0) + n
    head.train()
    return {k: round(sums[k] / counts[k], 4) for k in sorted(sums)}


def train_head(head: EagleHead, train: FeatureCache, held: FeatureCache | None, embed: torch.Tensor,
               lm_head: torch.Tensor, out_dir: str | Path, cfg: EagleTrainConfig = EagleTrainConfig(),
               device="cpu", progress: bool = True) -> dict:
    """Train `head` in place; returns the training record. `embed`, `lm_head`: the target's
    [V, d] matrices (frozen). Resumes from `out_dir/checkpoint.pt` of the same run."""
    from tqdm import tqdm

    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head.to(device).train()
    embed = embed.detach().to(device, torch.float32)
    vocab = head.draft_vocab.to(device)
    vocab_weight = lm_head.detach().to(device, torch.float32)
    vocab_weight = vocab_weight[vocab] if vocab.numel() else vocab_weight
    lengths = [int(x) for x in train.index[:, 1]]
    batches = batches_by_length(lengths, cfg.batch_tokens)
    per_epoch = len(batches)
    total = max(1, int(per_epoch * cfg.epochs))
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, run_key = 0, {"config": asdict(cfg), "tokens": train.num_tokens, "sequences": len(train)}
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state.get("run") == run_key:
            head.load_state_dict(state["head"])
            opt.load_state_dict(state["optimizer"])
            step = state["step"]
    autocast = _use_bf16_autocast(device)
    start, seen = time.perf_counter(), 0
    bar = tqdm(total=total, initial=step, desc="eagle", unit="step", disable=not progress)
    last: dict = {}
    while step < total:
        epoch = step // per_epoch
        order = list(range(per_epoch))
        random.Random(cfg.seed + epoch).shuffle(order)
        for b in order[step % per_epoch:]:
            if step >= total:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            batch = training_batch(train, batches[b], cfg.unroll, device)
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                loss, last = eagle_loss(head, batch, embed, vocab_weight, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            seen += int(batch["lengths"].sum())
            bar.set_postfix({k: round(v, 3) for k, v in last.items() if k.startswith(("loss", "acc"))})
            bar.update(1)
            if step % cfg.save_every == 0 or step == total:
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"run": run_key, "head": head.state_dict(), "optimizer": opt.state_dict(),
                            "step": step}, tmp)
                tmp.replace(ckpt)
    bar.close()
    seconds = time.perf_counter() - start
    record = {**asdict(cfg), "steps": total, "sequences": len(train), "tokens": train.num_tokens,
              "seconds": round(seconds, 1), "tokens_per_second": round(seen / max(seconds, 1e-9)),
              "device": device.type, "bf16_autocast": autocast, "final": last}
    if held is not None and len(held):
        record["heldout"] = evaluate(head, held, embed, vocab_weight, cfg, device)
    (out_dir / "training.json").write_text(json.dumps(record, indent=1))
    head.eval()
    return record


def split_cache_indices(cache: FeatureCache, holdout: int) -> tuple[list[int], list[int]]:
    """The last `holdout` sequences are held out (records keep their build order)."""
    n = len(cache)
    holdout = min(holdout, max(0, n - 1))
    return list(range(n - holdout)), list(range(n - holdout, n))


class SubsetCache(FeatureCache):
    """A view of some sequences of a cache (the train / held-out split)."""

    def __init__(self, cache: FeatureCache, indices: list[int]):
        self.folder, self.meta = cache.folder, cache.meta
        self.tokens, self.features, self.inputs = cache.tokens, cache.features, cache.inputs
        self.index = cache.index[np.asarray(indices, dtype=np.int64)]

    @property
    def num_tokens(self) -> int:
        return int(self.index[:, 1].sum())


def run_eagle(backbone, records: list[dict], out_dir: str | Path, *, name: str | None,
              model_key: str, cfg: EagleTrainConfig = EagleTrainConfig(), holdout: int = 50,
              draft_vocab: int = 8192, cache_dir: str | Path | None = None,
              cache_tokens: int = 8192, device=None, save_dtype=torch.float16,
              calibration_prompts: int = 32, progress: bool = True,
              init: EagleHead | None = None, feature_layers: list[int] | None = None) -> dict:
    """Features -> split -> draft vocabulary -> train -> E(n) measured by decoding held-out
    prompts -> `out_dir` holds a loadable head. `init`: a head to continue from (its weights
    and draft vocabulary) instead of a fresh one. `feature_layers`: the head reads those
    target layers' outputs (default: `init`'s, else the last hidden state)."""
    from ..medusa.heads import base_identity, lm_head_weight
    from .data import build_features, frequent_tokens
    from .drafter import embedding_weight, final_norm_weight
    from .head import EagleConfig, save_head

    out_dir = Path(out_dir)
    had = (init.config.feature_layers or None) if init is not None else None
    if feature_layers and had and list(feature_layers) != list(had):
        raise HastenError(f"the --init head reads layers {had}; train that head on them, or "
                          f"start a head over {list(feature_layers)} from one over the last "
                          "hidden state")
    layers = list(feature_layers or had or [])
    cache = build_features(backbone, records, Path(cache_dir or out_dir / "cache"), model_key,
                           cache_tokens, progress, tuple(layers))
    train_ids, held_ids = split_cache_indices(cache, holdout)
    train, held = SubsetCache(cache, train_ids), SubsetCache(cache, held_ids)
    if init is not None:
        head = EagleHead(replace(init.config, feature_layers=layers or None))
        weights = {k: v.float() for k, v in init.state_dict().items()}
        head.load_state_dict(weights, strict=False)  # a new `reduce` keeps its start
        if layers and not had:  # the last layer normed as the final norm does: init's input
            head.start_reduce_as_last(final_norm_weight(backbone))
        head.draft_vocab = init.draft_vocab.clone()
    else:
        vocab = frequent_tokens(train, draft_vocab) if draft_vocab else torch.empty(0, dtype=torch.long)
        head = EagleHead(EagleConfig.like(backbone.config, int(vocab.numel()) or None, layers))
        head.draft_vocab = vocab
    torch.manual_seed(cfg.seed)
    record = train_head(head, train, held, embedding_weight(backbone), lm_head_weight(backbone),
                        out_dir, cfg, device or backbone.device, progress)
    record["expected_lengths"] = expected_lengths(backbone, head, held, calibration_prompts)
    head = head.to("cpu", save_dtype)
    save_head(head, out_dir, base_identity(backbone, name), training=record,
              heldout=record.get("heldout"))
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    return record


def expected_lengths(backbone, head: EagleHead, held: FeatureCache, prompts: int) -> list[float] | None:
    """E(n) measured by decoding the prompts of up to `prompts` held-out sequences."""
    from ..medusa.heads import lm_head_weight
    from .calibrate import measure_expected_lengths
    from .drafter import EagleDrafter, embedding_weight
    if not prompts or not len(held):
        return None
    dtype = backbone.dtype
    runner = EagleHead(head.config).to(backbone.device, dtype)
    runner.load_state_dict(head.state_dict())
    runner.draft_vocab = head.draft_vocab.to(backbone.device)
    drafter = EagleDrafter(runner.eval(), embedding_weight(backbone), lm_head_weight(backbone))
    seqs = [held.sequence(i) for i in range(min(prompts, len(held)))]
    return measure_expected_lengths(backbone, drafter, [t[:p].tolist() for t, _, p in seqs])
