"""`hasten finetune`: full-rank fine-tuning of a Llama-family model on one text domain.

What trains: by default every block linear weight (q, k, v, o, gate, up, down of every
layer: 79% of SmolLM2-135M's parameters), full rank, with AdamW on next-token cross-entropy.
Embeddings, the (tied) LM head and the norms stay frozen: a fine-tune that moves the 49k x 576
embedding would have to ship it in full (21% of the model), which caps any delta format at
~4x smaller, and per-tenant norms would stop tenants from sharing one batched forward.
`train="all"` trains every parameter instead.

The result is a Hugging Face folder (config.json, tokenizer files and chat template copied
from the base, model.safetensors) plus `finetune.json` with the settings and a held-out
evaluation: domain perplexity of the base and the fine-tune, and the base's greedy agreement
with the fine-tune on held-out prompts (1.0 would mean it did not move).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import HastenError
from ..models.config import LlamaConfig
from ..models.llama import build_llama
from ..models.sources import load_tokenizer, load_weights, resolve_model
from . import data, evaluate
from .runtime import forward_logits, hf_state_dict

TRAINABLE = ("linear", "all")


def load_llama(spec: str | Path | None, dtype=torch.float32):
    """(LlamaModel, tokenizer, config.json dict) of a model spec (a Hugging Face folder, a
    .gguf, None = the default model)."""
    folder = resolve_model(None if spec is None else str(spec)).folder
    if not (folder / "config.json").is_file():
        raise HastenError(f"{folder} is not a model folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    model = build_llama(LlamaConfig.from_hf_dict(config), load_weights(folder), dtype)
    return model, load_tokenizer(folder), config


def save_folder(model, base_folder: Path, output: Path) -> None:
    """`model` as a Hugging Face folder beside copies of the base's non-weight files."""
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    for f in Path(base_folder).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "manifest.json":
            shutil.copy2(f, output / f.name)
    save_file(hf_state_dict(model), output / "model.safetensors", metadata={"format": "pt"})


def finetune(base: str | Path, output: str | Path, domain: str, steps: int = 100, batch: int = 4,
             window: int = 128, lr: float = 5e-5, train: str = "linear", seed: int = 0,
             eval_windows: int = 32, eval_prompts: int = 50, eval_tokens: int = 32,
             progress: bool = True) -> dict:
    """Fine-tune the model in folder `base` on `domain` (see `data.DOMAINS`) into `output`."""
    if train not in TRAINABLE:
        raise HastenError(f"--train must be one of {', '.join(TRAINABLE)}, not {train!r}")
    if steps < 1 or batch < 1:
        raise HastenError("--steps and --batch must be at least 1")
    log = (lambda msg: print(f"hasten finetune: {msg}", file=sys.stderr, flush=True)) \
        if progress else (lambda msg: None)
    base, output = resolve_model(None if base is None else str(base)).folder, Path(output)
    model, tokenizer, _ = load_llama(base)
    texts = data.windows(tokenizer, data.documents(domain, "train"), steps * batch, window + 1)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    texts = texts[order]
    params = []
    for name, p in model.named_parameters():
        if train == "all" or (name.startswith("blocks.") and name.endswith("weight_t")):
            p.requires_grad_(True)
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup + 1))))
    log(f"{domain}: {steps} steps x {batch} windows of {window} tokens, lr {lr}, "
        f"training {sum(p.numel() for p in params) / 1e6:.1f}M parameters ({train})")
    start, losses = time.perf_counter(), []
    for step in range(steps):
        ids = texts[step * batch:(step + 1) * batch]
        logits = forward_logits(model, ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == steps:
            spent = time.perf_counter() - start
            log(f"step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                f"({spent / (step + 1):.1f} s/step, {spent / (step + 1) * (steps - step - 1):.0f} s left)")
    train_s = time.perf_counter() - start
    model.requires_grad_(False)
    optimizer = None
    save_folder(model, base, output)
    report = {"base": str(base), "domain": domain, "steps": steps, "batch": batch,
              "window": window, "lr": lr, "train": train, "seed": seed,
              "train_seconds": round(train_s, 1), "threads": torch.get_num_threads(),
              "final_loss": sum(losses[-10:]) / len(losses[-10:])}
    if eval_windows or eval_prompts:
        log("held-out evaluation")
        report["eval"] = compare_to_base(build_base(base), model, tokenizer, domain,
                                         eval_windows, eval_prompts, eval_tokens, window)
        log(json.dumps(report["eval"]))
    (output / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_base(folder: Path):
    return load_llama(folder)[0]


def compare_to_base(base_model, tuned, tokenizer, domain: str, n_windows: int, n_prompts: int,
                    n_tokens: int, window: int = 128) -> dict:
    """Held-out domain perplexity of both, and the base's greedy agreement with `tuned`."""
    result = {}
    if n_windows:
        held = data.windows(tokenizer, data.documents(domain, "eval"), n_windows, window + 1)
        result["ppl_base"] = evaluate.perplexity(base_model, held)
        result["ppl_finetune"] = evaluate.perplexity(tuned, held)
    if n_prompts:
        prompts = data.prompts(tokenizer, domain, n_prompts)
        reference = evaluate.greedy_continuations(tuned, prompts, n_tokens)
        result["base_agreement_with_finetune"] = evaluate.agreement(base_model, prompts, reference)
    return result
