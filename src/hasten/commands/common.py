"""Arguments and helpers shared by the commands: the model, the drafter, the prompt."""

from __future__ import annotations

import argparse
import sys

from ..drafters import DRAFTERS, DraftSpec
from ..errors import HastenError

MODEL_HELP = ("model: 'smollm2-135m-instruct' (embedded default), a .gguf file, or a Hugging Face "
              "folder (config.json + safetensors + tokenizer)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser, weights: str = "auto", dtype: str = "auto") -> None:
    """The model options; `weights` and `dtype`: their defaults (dense float32 for commands
    whose autograd runs through the model's layers or whose output trains heads)."""
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default=dtype,
                   help="float32 (the reference), bfloat16, float16, or auto: the fastest plan "
                        "that is exact on this machine, compact weights included (measured once, "
                        "see `hasten check`; with --weights named: float32) "
                        f"(default: {dtype})")
    p.add_argument("--runtime", default="auto", choices=("auto", "lean", "hf"),
                   help="lean: our Llama-family runtime; hf: generic transformers adapter; "
                        "auto: lean when the architecture allows (default)")
    p.add_argument("--weights", default=weights, choices=("auto", "dense", "compact", "compact-q8"),
                   help="dense: every weight dequantized to --dtype (float32: the reference); "
                        "compact: a GGUF's Q4_1 / Q8_0 blocks kept as they are, computed by "
                        "weight-only kernels with exactly the file's values (float32, CPU); "
                        "compact-q8: those blocks with each matmul's input rounded to int8 "
                        "blocks as llama.cpp does (integer dot products; fastest on AVX-512 "
                        "VNNI and AVX2 CPUs); auto: compact where it gives dense float32's exact bits "
                        "(float32 from a GGUF on a CPU with AVX-512 or AVX2), else dense; with --dtype "
                        f"auto the measured plan decides (default: {weights})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")


def add_draft_options(p: argparse.ArgumentParser) -> None:
    """The drafters' options and the tree size: what `DraftSpec` and the engine take."""
    p.add_argument("--tree-size", type=int, default=None,
                   help="most draft tokens verified per step (default: chosen each step for "
                        "this hardware from measured verify costs and the observed acceptance; "
                        "0 = no drafts)")
    p.add_argument("--medusa-heads", default=None,
                   help="medusa: a heads folder (default: next to the model, else the heads "
                        "shipped for it)")
    p.add_argument("--eagle-head", default=None,
                   help="eagle: a head folder from `hasten train eagle` (default: next to the "
                        "model, else the head shipped for it)")
    p.add_argument("--datastore", default=None,
                   help="rest: a datastore built by `hasten datastore build`")
    p.add_argument("--draft-model", default=None,
                   help="model: a smaller model sharing the tokenizer (default: self-draft from "
                        "the target's first --draft-layers layers)")
    p.add_argument("--draft-layers", type=int, default=None,
                   help="model: layers of the self-draft (default: a quarter of the target's)")
    p.add_argument("--draft-depth", type=int, default=4,
                   help="model: tokens the draft model proposes per step (default 4)")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    """--draft NAME plus its options, for commands that run one drafter."""
    p.add_argument("--draft", default="none", choices=DRAFTERS,
                   help="speculative drafter: none (plain decoding), lookup (n-grams of the prompt "
                        "and output so far), model (a draft model, or the target's own first "
                        "layers), rest (retrieval from --datastore), medusa (trained heads), "
                        "eagle (a trained feature head, dynamic trees); "
                        "output is unchanged, only speed differs")
    add_draft_options(p)
    p.add_argument("--typical", action="store_true",
                   help="Medusa's typical acceptance when sampling: faster but LOSSY (the output "
                        "no longer follows the model's distribution)")


def draft_spec(args, name: str | None = None) -> DraftSpec:
    """The drafter the arguments describe (`name` overrides --draft), validated once."""
    if args.tree_size is not None and args.tree_size < 0:
        raise HastenError("--tree-size must be >= 0")
    return DraftSpec.of(name or getattr(args, "draft", "none"), draft_model=args.draft_model,
                        draft_layers=args.draft_layers, draft_depth=args.draft_depth,
                        datastore=args.datastore, medusa_heads=args.medusa_heads,
                        eagle_head=args.eagle_head)


def load_model(args):
    import torch

    from ..api import load
    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, device=args.device, dtype=args.dtype, runtime=args.runtime,
                weights=getattr(args, "weights", "auto"))


def read_prompt(arg: str | None) -> str:
    if arg is None or arg == "-":
        if sys.stdin.isatty():
            raise HastenError("no prompt: pass one as an argument or pipe it on stdin")
        arg = sys.stdin.read()
    if not arg.strip():
        raise HastenError("the prompt is empty")
    return arg
