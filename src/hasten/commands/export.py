"""`hasten export medusa|eagle OUT --format ...`: our trained heads as vLLM / SGLang drafts."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HastenError
from ..models.loader import parse_dtype
from .common import add_model_args, load_model, log


def register(sub) -> None:
    e = sub.add_parser("export", help="write trained heads in the layout vLLM or SGLang loads",
                       description="Convert trained Medusa heads or an EAGLE head into a draft "
                                   "model folder (config.json + model.safetensors) that vLLM or "
                                   "SGLang serves beside the same base model. The base model is "
                                   "loaded to check that the heads were trained for it.")
    esub = e.add_subparsers(dest="export_target", required=True)
    m = esub.add_parser("medusa", help="Medusa heads -> vLLM's Medusa draft model",
                        description="Medusa heads -> vLLM's Medusa draft model (vLLM 0.6.5 to "
                                    "0.32; 0.33 removed Medusa). vLLM drafts each head's top-1 "
                                    "token.")
    _common_args(m, formats=("vllm",), default="vllm")
    m.add_argument("--heads", "--medusa-heads", default=None,
                   help="heads folder (default: the heads hasten finds for --model: next to "
                        "the model, else the ones shipped for it)")
    m.set_defaults(run=run_medusa)
    g = esub.add_parser("eagle", help="an EAGLE head -> vLLM's or SGLang's EAGLE-1 draft model",
                        description="An EAGLE head (hasten train eagle) -> the one-layer Llama "
                                    "draft model vLLM (method eagle) or SGLang (algorithm EAGLE) "
                                    "loads; the embedding and LM head are the target's.")
    _common_args(g, formats=("vllm", "sglang"), default=None)
    g.add_argument("--heads", "--eagle-head", default=None,
                   help="EAGLE head folder (default: the head --draft eagle finds for --model: "
                        "next to the model, else the shipped one over the last hidden state; "
                        "heads over several layers, --feature-layers, do not export)")
    g.set_defaults(run=run_eagle)


def _common_args(p, formats: tuple[str, ...], default: str | None) -> None:
    p.add_argument("dir", nargs="?", type=Path, default=None, metavar="DIR",
                   help="output folder (or --out)")
    p.add_argument("--out", "-o", type=Path, default=None, help="output folder (or DIR)")
    p.add_argument("--format", choices=formats, default=default, required=default is None,
                   help="the server whose loader reads the folder")
    add_model_args(p, weights="dense", dtype="float32")
    p.add_argument("--save-dtype", default=None,
                   help="dtype of the written weights: float32, bfloat16 or float16 (default: "
                        "--dtype, the one the model and heads are loaded in)")
    p.add_argument("--no-draft-vocab", action="store_true",
                   help="leave out the heads' reduced draft vocabulary (draft over all tokens)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def _out(args) -> Path:
    """The output folder, checked before the model is loaded."""
    from ..medusa.export import check_out
    if (args.dir is None) == (args.out is None):
        raise HastenError("give the output folder once: as DIR or as --out DIR")
    return check_out(args.dir or args.out, args.force)


def run_medusa(args) -> None:
    from ..medusa.drafter import find_heads
    from ..medusa.export import export_medusa_vllm
    from ..medusa.heads import lm_head_weight

    out, dtype = _out(args), _save_dtype(args)
    model = load_model(args)
    loaded = find_heads(model, args.heads)  # checked against the model's fingerprint
    layout = export_medusa_vllm(loaded, out, lm_head_weight(model.backbone),
                                use_draft_vocab=not args.no_draft_vocab, dtype=dtype,
                                force=args.force)
    _report(out, layout, "vLLM Medusa", loaded.path)
    spec = {"method": "medusa", "model": str(out.resolve()),
            "num_speculative_tokens": layout.config["num_heads"]}
    log(f"serve: vllm serve {model.folder} --speculative-config '{json.dumps(spec)}'")


def run_eagle(args) -> None:
    from ..eagle.drafter import find_head
    from ..eagle.export import TOKEN_MAP_FILE, export_eagle

    out, dtype = _out(args), _save_dtype(args)
    model = load_model(args)
    loaded = find_head(model, args.heads, exportable=True)  # checked against the model's fingerprint
    layout = export_eagle(loaded, out, args.format, use_draft_vocab=not args.no_draft_vocab,
                          dtype=dtype, force=args.force)
    _report(out, layout, f"{'vLLM' if args.format == 'vllm' else 'SGLang'} EAGLE", loaded.folder)
    draft = out.resolve()
    if args.format == "vllm":
        spec = {"method": "eagle", "model": str(draft), "num_speculative_tokens": 4}
        log(f"serve: vllm serve {model.folder} --speculative-config '{json.dumps(spec)}'")
    else:
        token_map = (f" --speculative-token-map {draft / TOKEN_MAP_FILE}"
                     if TOKEN_MAP_FILE in layout.files else "")
        log(f"serve: python -m sglang.launch_server --model-path {model.folder} "
            f"--speculative-algorithm EAGLE --speculative-draft-model-path {draft}{token_map}")


def _save_dtype(args):
    return parse_dtype(args.save_dtype) if args.save_dtype else None


def _report(out: Path, layout, what: str, source) -> None:
    size = sum(t.numel() * t.element_size() for t in layout.tensors.values())
    log(f"hasten: wrote {out} ({what} from {source}: {len(layout.tensors)} tensors, "
        f"{size / 1e6:.1f} MB)")
    for note in layout.notes:
        log(f"note: {note}")
