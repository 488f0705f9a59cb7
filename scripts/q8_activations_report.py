"""compact (float32 activations) against compact-q8 (activations rounded to int8 blocks, as
llama.cpp computes) on the default model: speed interleaved in one process, and what the
rounding costs in quality: mean negative log-likelihood of held-out text under each plan
against the float32 reference, and how many greedy answers stay identical.

    .venv/bin/python scripts/q8_activations_report.py [--limit 6] [--max-new-tokens 128]
"""

import argparse
import statistics
import time

import torch

import hasten
from hasten.bench.prompts import load_prompts


def nll(model, ids: list[int]) -> float:
    """Mean next-token negative log-likelihood of `ids` (teacher forced, one forward)."""
    b = model.backbone
    x = torch.tensor([ids])
    with torch.inference_mode():
        b.reset(capacity=len(ids) + 8)
        logits = b.forward(x).logits[0, :-1].double()
    return torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    plans = {"float32": hasten.load(dtype="float32", progress=False), "compact": hasten.load(weights="compact", progress=False),
             "compact-q8": hasten.load(weights="compact-q8", progress=False)}
    prompts = load_prompts("chat", args.limit)
    speed = {p: [] for p in ("compact", "compact-q8")}
    answers = {p: [] for p in plans}
    for i, prompt in enumerate(prompts):
        chat = [{"role": "user", "content": prompt}]
        for plan, model in plans.items():  # interleaved: the same load for each
            ids = model.encode(chat)
            t = time.perf_counter()
            out = list(model.generate_ids(ids, args.max_new_tokens, ignore_eos=True))
            if plan in speed:
                speed[plan].append(len(out) / (time.perf_counter() - t))
            answers[plan].append((ids, out))
        print(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(f"{p} {s[-1]:.1f} tok/s" for p, s in speed.items()),
              flush=True)
    ratios = [q / c for q, c in zip(speed["compact-q8"], speed["compact"])]
    print(f"\nplain decoding, {len(prompts)} chat prompts x {args.max_new_tokens} tokens, "
          f"{torch.get_num_threads()} threads:")
    for p, s in speed.items():
        print(f"  {p}: median {statistics.median(s):.1f} tok/s")
    print(f"  compact-q8 / compact: median {statistics.median(ratios):.2f}x "
          f"({min(ratios):.2f}-{max(ratios):.2f})")
    # Quality: each plan scores the float32 reference's own answers (prompt + answer).
    print("\nmean NLL of the float32 reference's answers (nats per token; lower is better):")
    texts = [ids + out for ids, out in answers["float32"]]
    for plan, model in plans.items():
        print(f"  {plan}: {statistics.mean(nll(model, t) for t in texts):.4f}")
    for plan in ("compact", "compact-q8"):
        same = sum(a[1] == r[1] for a, r in zip(answers[plan], answers["float32"]))
        print(f"  {plan}: {same}/{len(prompts)} greedy answers identical to float32's")


if __name__ == "__main__":
    main()
