"""Drafting inside the continuous batch: the same concurrent greedy requests through the server's
engine (`server/engine.py`, no HTTP), all plain vs all with a drafter, interleaved; tokens/s
together, tokens per step, and whether every answer is the plain one.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/batch_trees_speed.py [DRAFT] [NEW] [ROUNDS] [TREE]

DRAFT: lookup (default) or medusa / eagle / rest; NEW tokens per request (96); ROUNDS of
(plain, drafted) pairs (2); TREE: a fixed tree size (default: the per-step size rule).
The requests are queued before the worker starts, so all of them share the batch from the
first step (none decodes alone on the solo engine).
"""

import asyncio
import statistics
import sys
import time

import torch

import hasten
from hasten.drafters import DraftSpec
from hasten.server.engine import Engine, Job

CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
PROMPTS = [  # text that repeats: what lookup drafting is for (edits, copies, code)
    f"Rename the function below to rolling_mean and return the whole code:\n\n{CODE}",
    f"Add type hints to this function and show the complete function:\n\n{CODE}",
    "Repeat this sentence three times: The quick brown fox jumps over the lazy dog near the "
    "river bank.",
    "List the numbers from 1 to 40, separated by commas.",
]


async def run_all(engine, model, ids, new, draft, tree_size):
    loop = asyncio.get_running_loop()
    drafter = model.drafter(DraftSpec.of(draft)) if draft != "none" else None
    jobs = [Job(p, new, draft=draft, drafter=drafter, tree_size=tree_size, loop=loop,
                events=asyncio.Queue(), stream=False) for p in ids]
    for job in jobs:  # all queued before the worker takes the first
        engine.jobs.put(job)
    start = time.perf_counter()
    engine.start()

    async def finish(job):
        pieces = []
        async for kind, value in job.events_until_done():
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise value
        return "".join(pieces), job.outcome
    results = await asyncio.gather(*(finish(j) for j in jobs))
    return results, time.perf_counter() - start


def main():
    draft = sys.argv[1] if len(sys.argv) > 1 else "lookup"
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    tree_size = int(sys.argv[4]) if len(sys.argv) > 4 else None
    model = hasten.load(dtype="bfloat16", progress=False)
    ids = [model.encode(p) for p in PROMPTS]
    print(f"{model.name} bfloat16, {len(ids)} concurrent greedy requests x {new} tokens, "
          f"torch threads {torch.get_num_threads()}, draft {draft}, tree size "
          f"{tree_size if tree_size is not None else 'per step (rule)'}", flush=True)
    if draft != "none":
        model.cost_curve()  # measured once per machine, not inside the timing
    engine = Engine(model, max_batch=len(ids), context=2048)
    rates: dict[str, list[float]] = {"none": [], draft: []}
    answers: dict[str, list[str]] = {}
    for _ in range(rounds):
        for name in ("none", draft):
            results, wall = asyncio.run(run_all(engine, model, ids, new, name, tree_size))
            engine.stop()
            tokens = sum(o.completion_tokens for _, o in results)
            steps = [o.stats.steps for _, o in results]
            per_step = [round(o.stats.mean_accepted, 2) for _, o in results]
            rates[name].append(tokens / wall)
            texts = [t for t, _ in results]
            same = "" if name == "none" else (
                f", answers equal to plain: {sum(a == b for a, b in zip(texts, answers['none']))}"
                f" of {len(texts)}")
            answers.setdefault(name, texts)
            print(f"  {name:>7}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s "
                  f"together; steps {steps}, tokens/step {per_step}{same}", flush=True)
    plain, drafted = statistics.median(rates["none"]), statistics.median(rates[draft])
    print(f"median tok/s together: plain {plain:.1f}, {draft} {drafted:.1f} "
          f"({drafted / plain:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
