"""`hasten check`: what this machine does with the model, per dtype, measured."""

from __future__ import annotations

import json
import time

import torch

from .common import add_model_args, log


def register(sub) -> None:
    c = sub.add_parser(
        "check", help="measure this machine: verify costs, kernel invariance, exactness per dtype",
        description="For each dtype: the cost of a verify step of 1 + n tokens relative to one "
                    "token (what makes trees pay), the row-count classes of the model's matmuls "
                    "(rows of one class are bit-identical however many rows share the call), and "
                    "whether speculative decoding is bit-exact here (random trees on the model, "
                    "every node against plain decoding). Results are cached and used by generate, "
                    "serve and bench.")
    add_model_args(c)
    c.add_argument("--dtypes", default="float32,bfloat16,float16",
                   help="comma-separated dtypes to check (default: float32,bfloat16,float16)")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    c.set_defaults(run=run)


def run(args) -> None:
    from ..api import load
    from ..bench.runner import cpu_flags, cpu_name
    from ..decoding.exactness import row_classes
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {"processor": cpu_name(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device": args.device}
    report = {"machine": machine, "dtypes": {}}
    if not args.json:
        log(f"hasten check: {machine['processor']} ({' '.join(machine['cpu_flags']) or 'no AVX2'}), "
            f"torch {machine['torch']}, {machine['threads']} threads, device {args.device}")
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        t0 = time.perf_counter()
        model = load(args.model, device=args.device, dtype=dtype, runtime=args.runtime, progress=False)
        model.choose_attention(measure=True)  # float32: exact attention only if measured exact
        exact = model.exactness()
        b = model.backbone
        entry = {}
        if hasattr(b, "blocks"):  # the lean runtime: its matmul shapes
            layer = b.blocks[0]
            entry["row_classes"] = {
                name: row_classes(w) for name, w in (
                    ("qkv", layer.wqkv.weight_t), ("gate_up", layer.w_gate_up.weight_t),
                    ("down", layer.w_down.weight_t), ("lm_head", b.lm_head.weight_t))}
        curve = model.cost_curve()
        entry.update({"attention": "exact" if getattr(b, "exact", False) else "sdpa",
                      "plain_step_ms": round(curve.seconds[0] * 1000, 2),
                      "verify_cost": {str(n): r for n, r in curve.relative().items()},
                      "exact": exact.exact, "why": exact.why,
                      "seconds": round(time.perf_counter() - t0, 1)})
        report["dtypes"][dtype] = entry
        if not args.json:
            print(describe(dtype, entry), flush=True)
        del model, b
    if args.json:
        print(json.dumps(report))


def describe(dtype: str, e: dict) -> str:
    costs = ", ".join(f"{n}: {r:.2f}x" for n, r in e["verify_cost"].items() if int(n) in (1, 4, 8, 16, 32, 64))
    lines = [f"{dtype}: one token {e['plain_step_ms']:.1f} ms; 1 + n tokens cost {costs}",
             f"  attention: {e['attention']}"]
    for name, classes in e.get("row_classes", {}).items():
        lines.append(f"  matmul {name:8s} row classes by row count: {classes}")
    verdict = "yes" if e["exact"] else "no"
    lines.append(f"  speculative decoding exact here: {verdict} ({e['why']})")
    return "\n".join(lines)
