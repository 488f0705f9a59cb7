"""`hasten train medusa | medusa-tree | eagle`: draft heads on distilled data."""

from __future__ import annotations

from pathlib import Path

from ..data.datasets import EXCHANGES
from ..errors import HastenError
from ..models.loader import parse_device, parse_dtype
from .common import add_model_args, load_model, log


def _model_key(model) -> str:
    b = model.backbone
    return f"{model.fingerprint}-{type(b).__name__}-{str(b.dtype).removeprefix('torch.')}"


def register(sub) -> None:
    t = sub.add_parser("train", help="train drafters (Medusa heads, EAGLE heads)")
    tsub = t.add_subparsers(dest="train_target", required=True)

    m = tsub.add_parser(
        "medusa", help="train Medusa heads on distilled data (Medusa-1; --joint for Medusa-2)",
        description="Medusa-1 (default): frozen backbone, hidden states cached once, heads "
                    "trained with loss sum_k 0.8^k CE_k on answer tokens; then a tree is grown "
                    "from held-out accuracy and saved with the heads in --out. Rerun the same "
                    "command to resume. Medusa-2 (--joint): backbone (LoRA or full) and heads "
                    "trained together; writes a merged model folder --out/model with the heads "
                    "in --out/model/medusa.")
    add_model_args(m, weights="dense", dtype="float32")  # heads train against the dense layers
    m.add_argument("--data", type=Path, required=True, help="distilled JSONL (hasten distill)")
    m.add_argument("--out", "-o", type=Path, required=True, help="output folder for the heads")
    m.add_argument("--train-device", default=None,
                   help="device for training (default: --device)")
    m.add_argument("--heads", type=int, default=4, help="number of heads K (default 4)")
    m.add_argument("--layers", type=int, default=1, help="residual blocks per head (default 1)")
    m.add_argument("--own-lm-head", action="store_true",
                   help="give each head its own vocabulary projection (initialised from the LM "
                        "head; large) instead of sharing the base LM head")
    m.add_argument("--epochs", type=float, default=None, help="default: 2 (Medusa-1), 1 (Medusa-2)")
    m.add_argument("--batch-size", type=int, default=None,
                   help="Medusa-1: token rows per step (default 256); Medusa-2: sequences (8)")
    m.add_argument("--lr", type=float, default=None,
                   help="default: 1e-3 (Medusa-1 heads), 1e-4 (Medusa-2 backbone; heads x4)")
    m.add_argument("--weight-decay", type=float, default=0.0)
    m.add_argument("--warmup", type=float, default=0.03, help="fraction of steps (or a count)")
    m.add_argument("--holdout", type=float, default=0.05,
                   help="fraction of records held out for accuracy and tree search")
    m.add_argument("--max-len", type=int, default=2048, help="truncate records to this many tokens")
    m.add_argument("--cache-dir", type=Path, default=None,
                   help="hidden-state cache (default: --out/cache)")
    m.add_argument("--cache-tokens", type=int, default=8192,
                   help="padded tokens per forward while caching hidden states")
    m.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps")
    m.add_argument("--log-every", type=int, default=50)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tree-nodes", type=int, default=64,
                   help="nodes of the tree stored with the heads (default 64); the engine cuts it "
                        "to the tree size it picks each step")
    m.add_argument("--max-rank", type=int, default=10, help="ranks per head the tree may use")
    m.add_argument("--tree-method", default="joint", choices=("joint", "independent"),
                   help="node probabilities: measured jointly (default) or Medusa's product")
    m.add_argument("--draft-vocab", type=int, default=0,
                   help="project the heads onto only the N most frequent answer tokens at "
                        "inference (0 = full vocabulary)")
    m.add_argument("--save-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="dtype of the saved heads (default float16: half the size)")
    j = m.add_argument_group("Medusa-2 (--joint)")
    j.add_argument("--joint", action="store_true", help="Medusa-2: train backbone and heads together")
    j.add_argument("--lora-r", type=int, default=32, help="LoRA rank (0 = full fine-tuning)")
    j.add_argument("--lora-alpha", type=int, default=64)
    j.add_argument("--backbone-loss", default="kl", choices=("kl", "ce"),
                   help="kl: stay close to the original model (self-distillation); ce: answers")
    j.add_argument("--lambda0", type=float, default=0.2, help="weight of the heads' loss")
    j.add_argument("--heads-warmup", type=float, default=0.1,
                   help="sine ramp of lambda over this fraction of steps (or count)")
    j.add_argument("--heads-lr-factor", type=float, default=4.0)
    j.add_argument("--init-heads", type=Path, default=None,
                   help="start from Medusa-1 heads (a folder saved by this command)")

    r = tsub.add_parser("medusa-tree", help="grow a new tree for trained heads",
                        description="Measure the heads' ranks on held-out distilled records and "
                                    "store a new tree (and optionally a new draft vocabulary) "
                                    "with them, without retraining.")
    add_model_args(r, weights="dense", dtype="float32")  # heads train against the dense layers
    r.add_argument("--heads-dir", type=Path, required=True, help="folder of trained heads")
    r.add_argument("--data", type=Path, required=True, help="distilled JSONL")
    r.add_argument("--holdout", type=float, default=0.05)
    r.add_argument("--max-len", type=int, default=2048)
    r.add_argument("--cache-dir", type=Path, default=None)
    r.add_argument("--tree-nodes", type=int, default=64, help="nodes of the stored tree (default 64)")
    r.add_argument("--max-rank", type=int, default=10)
    r.add_argument("--tree-method", default="joint", choices=("joint", "independent"))
    r.add_argument("--draft-vocab", type=int, default=None,
                   help="new draft vocabulary size (0 = full; default: keep)")
    _register_eagle(tsub)
    t.set_defaults(run=run)


def _register_eagle(tsub) -> None:
    e = tsub.add_parser(
        "eagle", help="train an EAGLE feature head (one decoder layer over the target's features)",
        description="The target's last hidden states over the data are computed once (batched, "
                    "resumable, cached in --cache-dir); then one decoder layer shaped like the "
                    "target's learns to predict the next feature and the target's next-token "
                    "distribution (EAGLE-1 loss), optionally unrolled on its own outputs "
                    "(--unroll, EAGLE-3's training-time test). Rerun the same command to resume. "
                    "--data sharegpt trains on ShareGPT answers (teacher forcing: no generation).")
    add_model_args(e, weights="dense", dtype="float32")  # heads train against the dense layers
    e.add_argument("--data", required=True,
                   help="distilled JSONL (hasten distill), or 'sharegpt' for ShareGPT answers")
    e.add_argument("--records", type=int, default=2000,
                   help="--data sharegpt: how many exchanges (default 2000)")
    e.add_argument("--turns", choices=EXCHANGES, default="first",
                   help="--data sharegpt: each chat's opening exchange (about 11k), the exchanges "
                        "after it (about 26k more, each as a prompt of its own), or all")
    e.add_argument("--skip", type=int, default=0, metavar="N",
                   help="--data sharegpt: pass over the first N usable exchanges (fresh data "
                        "for a run that continues an earlier one)")
    e.add_argument("--out", "-o", type=Path, required=True, help="output folder for the head")
    e.add_argument("--train-device", default=None, help="device for training (default: --device)")
    e.add_argument("--epochs", type=float, default=2.0)
    e.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per step")
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--unroll", type=int, default=2,
                   help="training-time test steps after the first (0 = EAGLE-1 only)")
    e.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature loss")
    e.add_argument("--token-weight", type=float, default=1.0, help="weight of the token loss")
    e.add_argument("--holdout", type=int, default=50, help="sequences held out for evaluation")
    e.add_argument("--max-len", type=int, default=512, help="truncate sequences to this many tokens")
    e.add_argument("--draft-vocab", type=int, default=8192,
                   help="draft only the N most frequent answer tokens (0 = full vocabulary)")
    e.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: --out/cache)")
    e.add_argument("--init", default=None, metavar="HEAD",
                   help="start from this head (a folder, or 'default' for the packaged head of "
                        "the model) instead of random weights; its draft vocabulary is kept")
    e.add_argument("--feature-layers", default=None, metavar="L1,L2,...",
                   help="read the outputs of these target layers (0-based) instead of the last "
                        "hidden state, EAGLE-3's idea: e.g. 'auto' for layer 2, the middle one "
                        "and the last. With --init from a head over the last hidden state, the "
                        "new head starts as that head (the last layer's part reproduces it)")
    e.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--save-dtype", default="float16", choices=("float16", "bfloat16", "float32"))


def run(args) -> None:
    import torch

    from ..medusa.data import read_records

    if args.train_target == "eagle":
        return _run_eagle(args)
    records = read_records(args.data)
    if args.train_target == "medusa-tree":
        model = load_model(args)
        research_args = dict(name=model.name, model_key=_model_key(model), device=model.backbone.device,
                             holdout=args.holdout, cache_dir=args.cache_dir, max_len=args.max_len,
                             tree_nodes=args.tree_nodes, max_rank=args.max_rank, method=args.tree_method,
                             draft_vocab=args.draft_vocab)
        from ..medusa.train import research_tree
        research_tree(model.backbone, args.heads_dir, records, **research_args)
        return
    save_dtype = getattr(torch, args.save_dtype)
    if args.joint:
        from ..medusa.medusa2 import Medusa2Config, train_medusa2
        from ..models.sources import resolve_model
        resolved = resolve_model(args.model)
        folder, name = resolved.folder, resolved.name
        cfg = Medusa2Config(epochs=args.epochs or 1.0, batch_size=args.batch_size or 8,
                            lr=args.lr or 1e-4, heads_lr_factor=args.heads_lr_factor,
                            lambda0=args.lambda0, heads_warmup=args.heads_warmup,
                            warmup=args.warmup, weight_decay=args.weight_decay,
                            backbone_loss=args.backbone_loss, lora_r=args.lora_r,
                            lora_alpha=args.lora_alpha, max_len=args.max_len,
                            save_every=args.save_every, log_every=args.log_every, seed=args.seed)
        pad = _pad_id(folder)
        target = train_medusa2(folder, records, args.out, cfg,
                               device=parse_device(args.train_device or args.device),
                               dtype=parse_dtype(args.dtype), num_heads=args.heads,
                               num_layers=args.layers, init_heads=args.init_heads, pad_id=pad,
                               holdout=args.holdout, name=name, tree_nodes=args.tree_nodes,
                               save_dtype=save_dtype)
        log(f"medusa2: done; run: hasten generate --model {target} --draft medusa")
        return
    from ..medusa.train import TrainConfig, run_medusa1
    model = load_model(args)
    cfg = TrainConfig(epochs=args.epochs or 2.0, batch_size=args.batch_size or 256,
                      lr=args.lr or 1e-3, weight_decay=args.weight_decay, warmup=args.warmup,
                      save_every=args.save_every, log_every=args.log_every, seed=args.seed)
    run_medusa1(model.backbone, records, args.out, name=model.name, model_key=_model_key(model),
                num_heads=args.heads, num_layers=args.layers, shared_lm_head=not args.own_lm_head,
                cfg=cfg, device=parse_device(args.train_device or args.device),
                holdout=args.holdout, cache_dir=args.cache_dir, max_len=args.max_len,
                cache_tokens=args.cache_tokens, tree_nodes=args.tree_nodes, max_rank=args.max_rank,
                tree_method=args.tree_method, draft_vocab=args.draft_vocab, save_dtype=save_dtype)


def _pad_id(folder: Path) -> int:
    from ..models.sources import load_tokenizer
    tok = load_tokenizer(folder)
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _run_eagle(args) -> None:
    import torch

    from ..eagle.train import EagleTrainConfig, run_eagle
    from ..medusa.data import read_records

    model = load_model(args)
    if args.data == "sharegpt":
        from ..eagle.data import sharegpt_records

        def encode(text: str, chat: bool) -> list[int]:
            return model.encode(text) if chat else model.tokenizer.encode(text, add_special_tokens=False)
        eos = model.stop_ids[0] if model.stop_ids else None
        records = sharegpt_records(encode, eos, args.records, args.max_len, skip=args.skip,
                                   turns=args.turns)
    else:
        records = [dict(r, answer_ids=r["answer_ids"][:max(1, args.max_len - len(r["prompt_ids"]))])
                   for r in read_records(args.data) if len(r["prompt_ids"]) < args.max_len]
    if len(records) < 2:
        raise HastenError("need at least 2 records to train and hold one out")
    cfg = EagleTrainConfig(epochs=args.epochs, batch_tokens=args.batch_tokens, lr=args.lr,
                           unroll=args.unroll, feature_weight=args.feature_weight,
                           token_weight=args.token_weight, save_every=args.save_every,
                           seed=args.seed)
    device = parse_device(args.train_device) if args.train_device else None
    init = None
    if args.init:  # the base model is checked: a head of another model is refused
        from ..eagle.drafter import find_head
        init = find_head(model, None if args.init == "default" else args.init).head
    from ..models.backbone import layer_count
    layers = parse_feature_layers(args.feature_layers, layer_count(model.backbone)) \
        if args.feature_layers else None
    record = run_eagle(model.backbone, records, args.out, name=model.name, model_key=_model_key(model),
                       cfg=cfg, holdout=args.holdout, draft_vocab=args.draft_vocab,
                       cache_dir=args.cache_dir, device=device,
                       save_dtype=getattr(torch, args.save_dtype), init=init,
                       feature_layers=layers)
    log(f"EAGLE head written to {args.out}: {record['tokens']} tokens, {record['steps']} steps, "
        f"{record['seconds']} s; held-out top-1 agreement per depth {record.get('heldout')}")


def parse_feature_layers(text: str, num_layers: int) -> list[int]:
    """'auto' (layer 2, the middle one and the last) or comma-separated 0-based layer indices."""
    try:
        layers = sorted({min(2, num_layers - 1), num_layers // 2, num_layers - 1}) \
            if text == "auto" else [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HastenError(f"--feature-layers: {text!r} is not 'auto' or comma-separated layer "
                          "numbers") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if len(layers) < 2 or bad or len(set(layers)) != len(layers):
        raise HastenError(f"--feature-layers: give two or more distinct layers in "
                          f"0..{num_layers - 1} (got {text!r})")
    return layers
