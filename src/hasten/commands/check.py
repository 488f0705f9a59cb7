"""`hasten check`: what this machine does with the model, per plan (dtype / weights), measured."""

from __future__ import annotations

import json
import time

import torch

from ..decoding.exactness import row_classes
from .common import add_model_args, log


def register(sub) -> None:
    c = sub.add_parser(
        "check", help="measure this machine: verify costs, kernel invariance, exactness per plan",
        description="For each plan (float32, bfloat16, float16 dense weights; compact = the "
                    "GGUF's quantized blocks): the cost of one plain step and of a verify step "
                    "of 1 + n tokens relative to it (what makes trees pay), the row-count "
                    "classes of the model's matmuls (rows of one class are bit-identical however "
                    "many rows share the call), and whether speculative decoding is bit-exact "
                    "here (random trees on the model, every node against plain decoding). Then "
                    "the plan --dtype auto takes: the fastest exact one. Results are cached and "
                    "used by generate, serve and bench.")
    add_model_args(c)
    c.add_argument("--plans", "--dtypes", dest="plans", default=None,
                   help="comma-separated plans to check: float32, bfloat16, float16, compact "
                        "(default: the --dtype auto candidates for this model, float16 too)")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    c.set_defaults(run=run)


def run(args) -> None:
    from ..api import load
    from ..bench.runner import cpu_flags, cpu_name
    from ..models.sources import resolve_model
    from ..plans import (AUTO_CANDIDATES, candidates, choice_file, choose, emulated, half_cost_ratio,
                         measure_plan, save_choice)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {"processor": cpu_name(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device": args.device}
    report = {"machine": machine, "plans": {}}
    if not args.json:
        log(f"hasten check: {machine['processor']} ({' '.join(machine['cpu_flags']) or 'no AVX2'}), "
            f"torch {machine['torch']}, {machine['threads']} threads, device {args.device}")
    resolved = resolve_model(args.model, progress=False)
    lean = resolved.lean and args.runtime != "hf"
    if args.plans:
        plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    else:
        # Emulated half precision: minutes to measure, and never the fastest.
        skipped = [p for p in ("bfloat16", "float16") if emulated(p, args.device)]
        plans = [p for p in candidates(resolved.gguf is not None, lean, args.device) + ["float16"]
                 if (not p.startswith("compact") or args.device == "cpu") and p not in skipped]
        for plan in skipped:
            why = (f"not measured: emulated on this CPU (a product costs "
                   f"{half_cost_ratio(plan):.0f}x float32's); name it in --plans to measure it")
            report["plans"][plan] = {"skipped": why}
            if not args.json:
                log(f"{plan}: {why}")
    for plan in plans:
        t0 = time.perf_counter()
        model, entry = measure_plan(load, args.model, plan, args.device, args.runtime)
        b = model.backbone
        if hasattr(b, "blocks"):  # the lean runtime: its matmuls, as this plan computes them
            layer = b.blocks[0]
            entry["row_classes"] = {name: row_classes(m, trials=8, dtype=b.dtype) for name, m in (
                ("qkv", layer.wqkv), ("gate_up", layer.w_gate_up), ("down", layer.w_down),
                ("lm_head", b.lm_head))}
        if plan.startswith("compact"):
            from ..models.quant_kernels import kernel_failure, kernel_name
            entry["kernel"] = kernel_name() + (f" ({kernel_failure()})" if kernel_failure() else "")
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["plans"][plan] = entry
        if not args.json:
            print(describe(plan, entry), flush=True)
        del model, b
    auto = {p: e for p, e in report["plans"].items() if p in AUTO_CANDIDATES and "skipped" not in e}
    if auto:
        report["auto"] = save_choice(choice_file(resolved.folder.name, str(args.device), args.runtime), auto)
        if not args.json:
            exact = [p for p, e in auto.items() if e["exact"]]
            print(f"--dtype auto: {report['auto']} (exact here: {', '.join(exact) or 'none'}; the "
                  "cheapest plain step among them" + ("" if exact else "; none is exact, so the "
                                                      "float32 reference") + ")", flush=True)
    if args.json:
        print(json.dumps(report))


def describe(plan: str, e: dict) -> str:
    costs = ", ".join(f"{n}: {r:.2f}x" for n, r in e["verify_cost"].items() if int(n) in (1, 4, 8, 16, 32, 64))
    lines = [f"{plan}: one token {e['plain_step_ms']:.1f} ms; 1 + n tokens cost {costs}",
             f"  attention: {e['attention']}" + (f"; kernel: {e['kernel']}" if "kernel" in e else "")]
    for name, classes in e.get("row_classes", {}).items():
        lines.append(f"  matmul {name:8s} row classes by row count: {classes}")
    verdict = "yes" if e["exact"] else "no"
    lines.append(f"  speculative decoding exact here: {verdict} ({e['why']})")
    return "\n".join(lines)
