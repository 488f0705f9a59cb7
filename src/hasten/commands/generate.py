"""`hasten generate`: text from a prompt, streamed to stdout."""

from __future__ import annotations

import json
import sys
import time

from ..errors import HastenError
from .bitdelta import add_delta_args, apply_delta
from .common import add_draft_args, add_model_args, draft_spec, load_model, read_prompt


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                       description="Generate text. The chat template is applied for instruct "
                                   "models unless --raw is given.")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt; read from stdin if omitted or '-'")
    add_model_args(g)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--system", default=None, help="system message for chat models")
    g.add_argument("--max-new-tokens", "-n", type=int, default=256)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    add_draft_args(g)
    add_delta_args(g)
    g.add_argument("--stats", action="store_true", help="print a statistics summary to stderr")
    g.add_argument("--stats-json", action="store_true", help="print statistics as JSON to stderr")
    g.set_defaults(run=run)


def run(args) -> None:
    if args.max_new_tokens < 1:
        raise HastenError("--max-new-tokens must be at least 1")
    spec = draft_spec(args)
    prompt = read_prompt(args.prompt)
    t0 = time.perf_counter()
    model = apply_delta(load_model(args), args)  # a fine-tune as base + 1-bit delta, if asked
    drafter = model.drafter(spec)
    load_s = time.perf_counter() - t0
    for piece in model.stream(prompt, max_new_tokens=args.max_new_tokens, chat=False if args.raw else None,
                              system=args.system, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, draft=drafter,
                              tree_size=args.tree_size, typical=args.typical):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = model.last_stats
    if args.stats_json:
        print(json.dumps({"model": model.name, "load_time_s": round(load_s, 3), **stats.summary()}),
              file=sys.stderr)
    elif args.stats:
        print(f"[{model.name}] prompt {stats.prompt_tokens} tokens, {stats.new_tokens} new tokens "
              f"in {stats.total_time:.2f} s: {stats.tokens_per_second:.1f} tok/s "
              f"(decode {stats.decode_tokens_per_second:.1f} tok/s), time to first token "
              f"{stats.time_to_first_token * 1000:.0f} ms, load {load_s:.1f} s, "
              f"finish: {stats.finish_reason}", file=sys.stderr)
        if drafter is not None:
            print(f"[{args.draft}] {stats.steps} steps, {stats.mean_accepted:.2f} tokens per step, "
                  f"accepted lengths {stats.accepted_histogram()}, time draft "
                  f"{stats.draft_time:.2f} s / verify {stats.verify_time:.2f} s / accept "
                  f"{stats.accept_time:.2f} s", file=sys.stderr)
