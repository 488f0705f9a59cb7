"""How close two models are: perplexity on text, greedy agreement, logit MSE and KL.

- `perplexity(model, windows)`: exp of the mean next-token cross-entropy over [n, t] windows.
- `greedy_continuations(model, prompts, n)`: each prompt's greedy continuation of n tokens
  (stop tokens are not special: every prompt gets exactly n).
- `agreement(model, prompts, continuations)`: teacher-forced greedy agreement, the fraction of
  continuation tokens that are the model's argmax given the prompt and the continuation so
  far. With the reference's own greedy continuations this is "how often would the model have
  picked the same next token", position by position, with no drift after a first miss.
- `logit_distance(student, teacher, windows)`: mean squared logit error and KL(teacher ||
  student) per token, the two numbers scale distillation reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.llama import LlamaModel
from .runtime import forward_logits


@torch.inference_mode()
def perplexity(model: LlamaModel, windows: torch.Tensor, batch: int = 4) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        logits = forward_logits(model, ids[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return float(torch.tensor(total / count).exp())


@torch.inference_mode()
def greedy_continuations(model: LlamaModel, prompts: list[list[int]], n: int) -> list[list[int]]:
    out = []
    for prompt in prompts:
        model.reset(batch_size=1, capacity=len(prompt) + n + 1)
        step = model.forward(torch.tensor([prompt]), last_only=True)
        model.commit()
        tokens = []
        for _ in range(n):
            tokens.append(int(step.logits[0, -1].argmax()))
            step = model.forward(torch.tensor([[tokens[-1]]]), last_only=True)
            model.commit()
        out.append(tokens)
    return out


@torch.inference_mode()
def agreement(model: LlamaModel, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    hits = total = 0
    for prompt, cont in zip(prompts, continuations):
        ids = torch.tensor([prompt + cont[:-1]])
        predicted = forward_logits(model, ids)[0, len(prompt) - 1:].argmax(-1)
        hits += int((predicted == torch.tensor(cont)).sum())
        total += len(cont)
    return hits / total


def logit_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """(mean squared error, KL(teacher || student) per token), both differentiable."""
    s, t = student_logits.float(), teacher_logits.float()
    mse = (s - t).pow(2).mean()
    kl = F.kl_div(s.log_softmax(-1).flatten(0, -2), t.log_softmax(-1).flatten(0, -2),
                  log_target=True, reduction="batchmean")
    return mse, kl


@torch.inference_mode()
def logit_distance(student: LlamaModel, teacher: LlamaModel, windows: torch.Tensor,
                   batch: int = 2) -> tuple[float, float]:
    mse = kl = 0.0
    n = 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        m, k = logit_terms(forward_logits(student, ids), forward_logits(teacher, ids))
        mse += m.item() * len(ids)
        kl += k.item() * len(ids)
        n += len(ids)
    return mse / n, kl / n
