"""Medusa-2: train the backbone and the heads together, then ship a merged model + heads.

    L = L_backbone + lambda(step) * sum_k 0.8^k * CE(head_k)

- L_backbone: with self-distilled data, KL(original model || trained model) over the answer
  positions ("kl", the default: the model keeps its own distribution, so quality is kept),
  or plain next-token cross-entropy on the answers ("ce").
- lambda(step) = lambda0 * sin(pi/2 * min(1, step / heads_warmup)): the heads start weak and
  noisy, so their loss is ramped in and cannot wreck the backbone early on.
- The heads learn 4x faster than the backbone (their own AdamW parameter group).
- Backbone: LoRA adapters through `peft` (default; the frozen original for the KL is the same
  model with its adapters switched off, so no second copy is held) or full fine-tuning
  (a frozen copy serves as the teacher).

Why `transformers` here and not our lean runtime: training needs gradients through a plain
causal forward over padded batches; our runtime is built around a static KV cache for
decoding. `AutoModelForCausalLM` + `peft` is the standard path, merges LoRA into the weights,
and writes a Hugging Face folder that `hasten.load(folder)` reads (lean runtime for Llama-family
models). The heads are saved inside it as `<folder>/medusa/`, where `hasten generate --draft
medusa` finds them. Checkpoints (trainable weights, heads, optimizer, step) are written
every `save_every` steps and resumed from.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HastenError
from .data import head_targets, split_records
from .heads import HeadsConfig, MedusaHeads, base_identity, lm_head_weight, load_heads, project, save_heads
from .train import DECAY, lr_lambda, medusa_loss, resumable_batches

_WEIGHT_FILES = ("config.json", "generation_config.json", "manifest.json")


@dataclass
class Medusa2Config:
    epochs: float = 1.0
    batch_size: int = 8  # sequences per step
    lr: float = 1e-4  # backbone (LoRA: 1e-4 .. 2e-4; full fine-tuning: ~1e-5)
    heads_lr_factor: float = 4.0
    lambda0: float = 0.2
    heads_warmup: float = 0.1  # fraction of steps (or an absolute count if >= 1)
    warmup: float = 0.03
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    backbone_loss: str = "kl"  # "kl" (self-distillation) or "ce"
    lora_r: int = 32  # 0 = full fine-tuning
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    max_len: int = 1024
    decay: float = DECAY
    save_every: int = 200
    log_every: int = 10
    seed: int = 0


def heads_weight(step: int, total: int, cfg: Medusa2Config) -> float:
    """lambda(step): a sine ramp from 0 to lambda0 over the heads' warm-up."""
    warm = cfg.heads_warmup if cfg.heads_warmup >= 1 else cfg.heads_warmup * total
    if warm <= 0:
        return cfg.lambda0
    return cfg.lambda0 * math.sin(0.5 * math.pi * min(1.0, step / warm))


def make_batch(records: list[dict], num_heads: int, max_len: int, pad_id: int, device):
    """Right-padded ids [B, L], attention mask, answer-position mask [B, L] (position t
    predicts an answer token), head targets [B, L, K]."""
    seqs = [(r["prompt_ids"] + r["answer_ids"])[:max_len] for r in records]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    answer = torch.zeros(len(seqs), width, dtype=torch.bool)
    targets = torch.full((len(seqs), width, num_heads), -1, dtype=torch.long)
    for b, (s, r) in enumerate(zip(seqs, records)):
        p = len(r["prompt_ids"])
        ids[b, :len(s)] = torch.tensor(s)
        attn[b, :len(s)] = 1
        answer[b, p - 1:len(s) - 1] = True
        targets[b, :len(s)] = head_targets(torch.tensor(s), p, num_heads)
    return ids.to(device), attn.to(device), answer.to(device), targets.to(device)


def joint_loss(model, heads: MedusaHeads, batch, lam: float, cfg: Medusa2Config, teacher=None):
    """(total loss, backbone loss, heads loss, head stats) for one batch."""
    ids, attn, answer, targets = batch
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    logits = out.logits[answer].float()  # [M, V] positions that predict answer tokens
    if cfg.backbone_loss == "ce":
        nxt = torch.roll(ids, -1, dims=1)[answer]
        bb = F.cross_entropy(logits, nxt)
    else:
        with torch.no_grad():
            if teacher is None:  # LoRA: the original model is this one with adapters off
                with model.disable_adapter():
                    ref = model(input_ids=ids, attention_mask=attn).logits[answer].float()
            else:
                ref = teacher(input_ids=ids, attention_mask=attn).logits[answer].float()
        bb = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                      reduction="batchmean")
    hidden = out.hidden_states[-1]
    d = hidden.shape[-1]
    flat_t = targets.reshape(-1, heads.num_heads)
    keep = (flat_t >= 0).any(-1)
    h = hidden.reshape(-1, d)[keep]
    weight = heads.proj if heads.proj is not None else lm_head_weight(model)
    head_logits = project(heads.transform(h.to(heads.weight.dtype)), weight.to(heads.weight.dtype))
    hl, stats = medusa_loss(head_logits, flat_t[keep], cfg.decay)
    return bb + lam * hl, bb, hl, stats


def _load_hf(folder: Path, dtype, device):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise HastenError(f"transformers could not load {folder}: {exc}") from exc
    return model.to(device)


def train_medusa2(folder: str | Path, records: list[dict], out_dir: str | Path,
                  cfg: Medusa2Config = Medusa2Config(), *, device="cpu", dtype=torch.float32,
                  num_heads: int = 4, num_layers: int = 1, init_heads: str | Path | None = None,
                  pad_id: int = 0, holdout: float = 0.05, name: str | None = None,
                  tree_nodes: int = 64, save_dtype: torch.dtype | None = None,
                  progress: bool = True, log=None) -> Path:
    """Joint training; returns the merged model folder (`out_dir/model`, heads in `medusa/`)."""
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    folder, out_dir, device = Path(folder), Path(out_dir), torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = _load_hf(folder, dtype, device)
    model.config.use_cache = False
    teacher = None
    if cfg.lora_r > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise HastenError("Medusa-2 with LoRA needs peft: pip install peft (or --lora-r 0 "
                              "for full fine-tuning)") from exc
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout,
                                                 target_modules="all-linear", bias="none"))
    else:
        if cfg.backbone_loss == "kl":
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
    model.train()
    lm = lm_head_weight(model)
    if init_heads:
        heads = load_heads(init_heads, model, name).heads
        heads.draft_vocab = None  # joint training uses the full vocabulary
    else:
        heads = MedusaHeads(HeadsConfig(hidden_size=lm.shape[1], vocab_size=lm.shape[0],
                                        num_heads=num_heads, num_layers=num_layers), lm)
    heads.to(device=device, dtype=torch.float32).train().requires_grad_(True)
    train_recs, held_recs = split_records(records, holdout)
    n = len(train_recs)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    backbone_params = [p for p in model.parameters() if p.requires_grad]
    head_params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": backbone_params, "lr": cfg.lr},
                             {"params": head_params, "lr": cfg.lr * cfg.heads_lr_factor}],
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup, cfg.min_lr_ratio))
    ckpt = out_dir / "checkpoint.pt"
    step, history = 0, []
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in state["backbone"].items():
                params[k].copy_(v)
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = state["step"], state.get("history", [])
        log(f"medusa2: resuming from {ckpt} at step {step}/{total}")

    def save(step):
        params = dict(model.named_parameters())
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"backbone": {k: params[k].detach() for k in names}, "heads": heads.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "history": history, "config": asdict(cfg)}, tmp)
        tmp.replace(ckpt)

    bar = tqdm(total=total, initial=step, desc="train medusa-2", unit="step", disable=not progress)
    t0 = time.perf_counter()
    for rows in resumable_batches(step, total, steps_per_epoch, n, cfg.batch_size, cfg.seed):
        recs = [train_recs[j] for j in rows]
        batch = make_batch(recs, heads.num_heads, cfg.max_len, pad_id, device)
        lam = heads_weight(step, total, cfg)
        loss, bb, hl, stats = joint_loss(model, heads, batch, lam, cfg, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone_params + head_params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            c = [max(1, x) for x in stats["count"]]
            entry = {"step": step, "loss": round(float(loss.detach()), 4), "backbone": round(float(bb.detach()), 4),
                     "heads": round(float(hl.detach()), 4), "lambda": round(lam, 4),
                     "top1": [round(a / b, 4) for a, b in zip(stats["top1"], c)],
                     "top5": [round(a / b, 4) for a, b in zip(stats["top5"], c)],
                     "seconds": round(time.perf_counter() - t0, 1)}
            history.append(entry)
            bar.set_postfix(loss=entry["loss"], kl=entry["backbone"])
            with open(out_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        if step % cfg.save_every == 0:
            save(step)
    bar.close()
    save(step)
    return _export(model, heads, folder, out_dir, held_recs or train_recs, cfg, name, device,
                   tree_nodes, save_dtype, history, log)


def _export(model, heads, folder: Path, out_dir: Path, held: list[dict], cfg: Medusa2Config,
            name, device, tree_nodes: int, save_dtype, history, log) -> Path:
    """Merge LoRA, write the HF folder (+ tokenizer files), grow the tree, save the heads."""
    from ..models.hf_adapter import HFBackbone
    from .data import build_cache
    from .train import evaluate, tree_for

    model.eval()
    heads.eval().requires_grad_(False)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True
    target = out_dir / "model"
    model.save_pretrained(str(target))
    for f in folder.iterdir():  # tokenizer and chat template travel with the weights
        if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith(
                (".safetensors", ".bin", ".gguf", ".index.json", ".pt")):
            shutil.copy2(f, target / f.name)
    backbone = HFBackbone(model)
    shared = None if heads.proj is not None else lm_head_weight(backbone).detach().float()
    cache = build_cache(backbone, held, out_dir / "cache" / "held", heads.num_heads, "medusa2",
                        8192, cfg.max_len, progress=False)
    acc = evaluate(heads, shared, cache, device)
    tree = tree_for(heads, shared, cache, device, tree_nodes)
    save_heads(heads, target / "medusa", base_identity(backbone, name), tree["choices"], save_dtype,
               expected_lengths=tree["expected_lengths"], head_accuracy=tree["head_accuracy"],
               heldout={**acc, "rows": len(cache)}, tree_method="joint",
               training={"medusa": 2, **asdict(cfg), "final": history[-1] if history else None})
    log(f"medusa2: merged model in {target}, heads in {target / 'medusa'}; held-out top-1 "
        f"{acc['top1']}")
    return target
