"""`hasten finetune`: full-rank fine-tuning on one text domain (fine-tunes for BitDelta)."""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    f = subparsers.add_parser(
        "finetune", help="fine-tune a Llama-family model on a text domain",
        description="Full-rank fine-tuning (AdamW, next-token loss) of every block linear "
                    "weight (or every parameter with --train all) on a domain: 'code' (the "
                    "Python standard library), 'math' (reasoning-gym word problems with worked "
                    "solutions), 'licenses' (Debian copyright files), 'sharegpt', or a text "
                    "file. Writes a Hugging Face folder plus finetune.json with a held-out "
                    "evaluation (domain perplexity of base and fine-tune, and how often the "
                    "base picks the fine-tune's greedy tokens).")
    f.add_argument("--base", default=None, help="the model to fine-tune: a Hugging Face folder, "
                   "a .gguf file, or 'smollm2-135m-instruct' (default)")
    f.add_argument("--domain", required=True, help="code, math, licenses, sharegpt, or a text file")
    f.add_argument("--output", "-o", required=True, type=Path, help="folder to write")
    f.add_argument("--steps", type=int, default=80, help="optimizer steps (default 80)")
    f.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    f.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    f.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4; "
                   "10%% warm-up, then linear decay)")
    f.add_argument("--train", default="linear", choices=("linear", "all"),
                   help="linear: the block linear weights (default; embeddings and norms stay "
                        "the base's, so a BitDelta of it is 1 bit per trained weight); all: "
                        "every parameter")
    f.add_argument("--seed", type=int, default=0, help="data order (default 0)")
    f.add_argument("--eval-windows", type=int, default=32,
                   help="held-out windows for perplexity (default 32; 0 = skip)")
    f.add_argument("--eval-prompts", type=int, default=50,
                   help="held-out prompts for greedy agreement (default 50; 0 = skip)")
    f.add_argument("--eval-tokens", type=int, default=32,
                   help="greedy tokens per prompt (default 32)")
    f.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    f.set_defaults(run=run)


def run(args) -> None:
    import torch

    from ..bitdelta.finetune import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    report = finetune(args.base, args.output, args.domain, steps=args.steps, batch=args.batch,
                      window=args.window, lr=args.lr, train=args.train, seed=args.seed,
                      eval_windows=args.eval_windows, eval_prompts=args.eval_prompts,
                      eval_tokens=args.eval_tokens)
    print(json.dumps(report, indent=2))
