"""Tokens per step of EAGLE heads on MT-Bench, per category, at fixed tree sizes, on the default
plan: for every prompt plain decoding first, then each head at each size (interleaved, so load
on the machine hits all alike); every output is checked against plain decoding's.

    python scripts/compare_eagle_heads.py default,out/head 4,8,16 [--per-category 3]

`default` is the packaged head; other entries are head folders (`hasten train eagle --out`).
"""

from __future__ import annotations

import argparse
import collections

import torch

import hasten
from hasten.bench.prompts import load_prompt_set
from hasten.drafters.spec import DraftSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("heads", help="comma-separated: 'default' and/or head folders")
    ap.add_argument("sizes", help="comma-separated tree sizes, e.g. 4,8,16")
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heads, sizes = args.heads.split(","), [int(x) for x in args.sizes.split(",")]
    model = hasten.load(progress=False)
    prompts = load_prompt_set("mt-bench", per_category=args.per_category)
    # (head, size) -> category -> [accepted tokens after the first, steps]
    counts = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    differ = collections.Counter()
    for i, prompt in enumerate(prompts):
        ids = model.encode(prompt.text)
        plain = list(model.generate_ids(ids, args.max_new_tokens, ignore_eos=True))
        for head in heads:
            spec = DraftSpec("eagle", eagle_head=None if head == "default" else head)
            for size in sizes:
                out = list(model.generate_ids(ids, args.max_new_tokens, ignore_eos=True, draft=spec,
                                              tree_size=size))
                stats = model.last_stats
                differ[head, size] += out != plain
                c = counts[head, size][prompt.category]
                c[0] += stats.new_tokens - 1
                c[1] += stats.steps
        print(f"{i + 1}/{len(prompts)} {prompt.category}", flush=True)
    for (head, size), cats in counts.items():
        tokens, steps = sum(c[0] for c in cats.values()), sum(c[1] for c in cats.values())
        per = ", ".join(f"{cat} {c[0] / c[1]:.2f}" for cat, c in cats.items())
        print(f"{head} @ {size}: {tokens / steps:.3f} tokens per step, {differ[head, size]} of "
              f"{len(prompts)} differ from plain; {per}")


if __name__ == "__main__":
    main()
