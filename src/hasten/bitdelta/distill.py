"""Scale distillation: fit the per-matrix scales so the compressed model's logits match the
fine-tune's (mean squared error), on generic text (ShareGPT assistant turns).

What trains: only the scales, one per block linear matrix (210 numbers for SmolLM2-135M),
each as alpha = alpha0 * m with m starting at 1 (so the learning rate means a relative step,
whatever the size of the deltas: a short fine-tune's alpha0 is ~1e-4, where the reference's
absolute lr of 1e-4 would be a 100% step). The sign bits, the base and everything else stay
fixed. The reference implementation hands every parameter of its model to the optimizer;
training the base's weights, norms or embeddings would make them part of each tenant's delta
(no longer 1 bit per weight, no longer one shared base), so we do not.

The student's weights are W_base + alpha * S, formed per step (S unpacked once, int8), so one
matmul per layer and the gradient reaches alpha through autograd. The teacher (the fine-tune)
runs alongside without gradients. Progress is checkpointed into the delta folder
(`distill-state.pt`: step, multipliers, optimizer) every few steps; running again with the
same settings (the step count may differ) resumes there. Logit MSE and KL(fine-tune ||
compressed) are measured on held-out windows before and after, and stored in bitdelta.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..errors import HastenError
from ..models.sources import load_weights
from . import data
from .delta import check_base, load, model_folder, save, weights_fingerprint
from .evaluate import logit_terms
from .finetune import load_llama
from .pack import unpack_signs
from .runtime import FUSED, forward_logits

STATE_FILE = "distill-state.pt"


class _Logits(nn.Module):
    """forward_logits as a module, so functional_call can swap the fused weights in."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return forward_logits(self.model, ids)


class Student:
    """The base model with weights W_base + alpha0 * m * S for trainable multipliers m."""

    def __init__(self, base_model, delta):
        self.net = _Logits(base_model)
        self.names = delta.meta["linear"]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.alpha0 = torch.tensor([delta.initial_scales[n] for n in self.names])
        self.m = nn.Parameter(torch.ones(len(self.names)))
        self.layers = []  # (param name, base [in, out], signs [in, out] int8, matrix ids, rows)
        for i, block in enumerate(base_model.blocks):
            for fused, parts in FUSED.items():
                names = [f"model.layers.{i}.{p}.weight" for p in parts]
                base_t = getattr(block, fused).weight_t
                signs = torch.cat([unpack_signs(delta.signs[n], base_t.shape[0], torch.int8)
                                   for n in names]).t().contiguous()
                self.layers.append((f"model.blocks.{i}.{fused}.weight_t", base_t, signs,
                                    torch.tensor([self.index[n] for n in names]),
                                    torch.tensor([delta.signs[n].shape[0] for n in names])))

    def weights(self) -> dict[str, torch.Tensor]:
        alpha = self.alpha0 * self.m
        out = {}
        for name, base_t, signs, ids, rows in self.layers:
            scale = alpha[ids].repeat_interleave(rows)  # one per output column
            out[name] = base_t + signs.to(base_t.dtype) * scale.to(base_t.dtype)
        return out

    def logits(self, ids):
        return functional_call(self.net, self.weights(), (ids,))

    def scales(self) -> dict[str, float]:
        return dict(zip(self.names, (self.alpha0 * self.m.detach()).tolist()))


@torch.no_grad()
def _distance(student: Student, teacher, windows: torch.Tensor, batch: int = 2):
    mse = kl = 0.0
    for i in range(0, len(windows), batch):
        m, k = logit_terms(student.logits(windows[i:i + batch]),
                           forward_logits(teacher, windows[i:i + batch]))
        n = len(windows[i:i + batch])
        mse, kl = mse + m.item() * n, kl + k.item() * n
    return mse / len(windows), kl / len(windows)


def _without_steps(settings: dict) -> dict:
    """What must match to resume: everything but the number of steps (which may grow or
    shrink: the learning rate is constant, so step k is the same step either way)."""
    return {k: v for k, v in settings.items() if k != "steps"}


def distill(base: str | Path, finetune: str | Path, delta_path: str | Path, steps: int = 200,
            batch: int = 4, window: int = 128, windows: int = 800, lr: float = 1e-2,
            eval_windows: int = 16, checkpoint_every: int = 10, seed: int = 0,
            progress: bool = True, domain: str = "sharegpt", texts: torch.Tensor | None = None,
            held_out: torch.Tensor | None = None) -> dict:
    """Distil the scales of the delta in `delta_path` (rewritten in place) on `windows`
    windows of `domain` (`data.documents`: ShareGPT by default, or a text file). `texts` /
    `held_out` ([n, t] token ids) replace them outright."""
    log = (lambda msg: print(f"hasten bitdelta distill: {msg}", file=sys.stderr, flush=True)) \
        if progress else (lambda msg: None)
    delta_path = Path(delta_path)
    delta = load(delta_path)
    base, finetune = model_folder(base), model_folder(finetune)
    check_base(delta, load_weights(base), f"--base {base}")
    if weights_fingerprint(load_weights(finetune)) != delta.meta["finetune"]["fingerprint"]:
        raise HastenError(f"{finetune} is not the fine-tune this delta was compressed from; "
                          "give the same --finetune as to compress")
    base_model, tokenizer, _ = load_llama(base)
    teacher, _, _ = load_llama(finetune)
    settings = {"steps": steps, "batch": batch, "window": window, "windows": windows, "lr": lr,
                "seed": seed, "data": domain, "finetune": delta.meta["finetune"]["fingerprint"]}
    if texts is None:
        log(f"tokenizing {windows} + {eval_windows} windows of {window} tokens ({domain})")
        texts = data.windows(tokenizer, data.documents(domain, "train"), windows, window)
        held_out = data.windows(tokenizer, data.documents(domain, "eval"), eval_windows, window)
    texts = texts[torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))]
    student = Student(base_model, delta)
    optimizer = torch.optim.AdamW([student.m], lr=lr, weight_decay=0.0)
    state_path = delta_path / STATE_FILE
    state = {"step": 0, "losses": []}
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        if _without_steps(saved["settings"]) != _without_steps(settings):
            raise HastenError(f"{state_path} holds a distillation with other settings "
                              f"({saved['settings']}); use them to resume, or delete the file "
                              "to start over")
        state = saved
        with torch.no_grad():
            student.m.copy_(saved["m"])
        optimizer.load_state_dict(saved["optimizer"])
        log(f"resuming at step {state['step']}/{steps}")
    else:
        state["before"] = _distance(student, teacher, held_out)
        log(f"before: logit MSE {state['before'][0]:.4f}, KL {state['before'][1]:.4f}")
    start = time.perf_counter()
    first = state["step"]
    for step in range(first, steps):
        i = (step * batch) % len(texts)
        ids = texts[i:i + batch]
        with torch.no_grad():
            target = forward_logits(teacher, ids)
        loss, _ = logit_terms(student.logits(ids), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["losses"].append(loss.item())
        state["step"] = step + 1
        done = step + 1 - first
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            state.update(m=student.m.detach().clone(), optimizer=optimizer.state_dict(),
                         settings=settings)
            torch.save(state, state_path.with_suffix(".tmp"))
            os.replace(state_path.with_suffix(".tmp"), state_path)
            spent = time.perf_counter() - start
            log(f"step {step + 1}/{steps} mse {sum(state['losses'][-10:]) / len(state['losses'][-10:]):.4f} "
                f"({spent / done:.1f} s/step, {spent / done * (steps - step - 1):.0f} s left)")
    after = _distance(student, teacher, held_out)
    log(f"after: logit MSE {after[0]:.4f}, KL {after[1]:.4f}")
    delta.scales = student.scales()
    m = student.m.detach()
    delta.meta["distill"] = {
        **{k: v for k, v in settings.items() if k != "finetune"}, "steps": state["step"],
        "trained": "per-matrix scale multipliers only",
        "mse_before": state["before"][0], "kl_before": state["before"][1],
        "mse_after": after[0], "kl_after": after[1], "eval_windows": len(held_out),
        "multiplier_min": float(m.min()), "multiplier_max": float(m.max()),
        "first_losses": state["losses"][:5], "last_losses": state["losses"][-5:]}
    save(delta, delta_path)
    state_path.unlink(missing_ok=True)
    return delta.meta["distill"]
