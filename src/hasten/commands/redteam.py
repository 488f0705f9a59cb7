"""`hasten redteam gcg`: adversarial-suffix search against one's own model (GCG, and GCG
sped up by probe sampling with a draft model). Outputs stay in the local report."""

from __future__ import annotations

import argparse

from ..errors import HastenError
from .common import add_model_args, load_model, log

DESCRIPTION = """\
Red-team your own model: search for an adversarial suffix that makes it answer harmful
requests ("goals") with an affirmative target ("Sure, here is ..."), to measure how robust
its refusals are before you ship it. Nothing leaves the machine; results go to a local
JSON + Markdown report and a loss-against-time chart.

Methods: gcg = Greedy Coordinate Gradient (Zou et al. 2023): per step the gradient wrt the
one-hot suffix, the --topk best substitutions per position, --batch-size candidates with one
token swapped (dropped unless they re-tokenise to the same ids), all scored on the model,
the best kept. probe = probe sampling (Zhao et al. 2024): all candidates scored on a cheap
--draft, a random 1/8 on the model; the draft/model rank agreement decides how many of the
draft's favourites the model scores besides. Both score candidates as one batch over the
shared chat prefix's K/V. Give both (--method gcg,probe) to compare them on the same goals
and seeds, interleaved per goal.

Goals: the first --goals of AdvBench (520; read from the pyrit==1.1.0 wheel on PyPI, not
installed), or --goals-file (.txt one goal per line, .csv goal,target, .jsonl
{"goal","target"}). Success = a greedy reply with none of llm-attacks' refusal strings;
exact = a reply starting with the target.
"""


def register(sub) -> None:
    rt = sub.add_parser("redteam", help="red-team your own model (adversarial suffix search)",
                        description="Red-teaming tools for testing one's own models.")
    rsub = rt.add_subparsers(dest="redteam_command", required=True, metavar="TOOL")
    p = rsub.add_parser("gcg", help="GCG adversarial-suffix search, optionally sped up by probe "
                                    "sampling", description=DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, weights="dense", dtype="float32")  # GCG takes gradients through the layers
    p.add_argument("--method", default="gcg",
                   help="gcg, probe, or both comma-separated (gcg,probe) (default: gcg)")
    p.add_argument("--goals", type=int, default=10,
                   help="how many goals: the first N of AdvBench or of --goals-file (default 10)")
    p.add_argument("--goals-file", default=None, help="goals (and targets) from this file instead")
    p.add_argument("--steps", type=int, default=250, help="search steps per goal (default 250)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="candidates per step, B (default 512, as in GCG)")
    p.add_argument("--topk", type=int, default=256,
                   help="substitutions considered per suffix position (default 256)")
    p.add_argument("--suffix-length", type=int, default=20,
                   help="suffix tokens, starting as ' ! ! ...' (default 20)")
    p.add_argument("--draft", default="self:4",
                   help="probe: the draft model, self:N (the target's first N layers, same "
                        "tokenizer; lean runtime) or a model spec with any tokenizer, e.g. "
                        "smollm2-135m-instruct (default self:4)")
    p.add_argument("--draft-dtype", default=None,
                   help="probe: the draft's precision, e.g. bfloat16 (3-4x faster matmuls on CPUs "
                        "with AVX512-BF16/AMX; only the draft's ranking is approximate, every "
                        "loss that decides is the target's) (default: the target's --dtype)")
    p.add_argument("--probe-fraction", type=float, default=1 / 8,
                   help="probe: share of candidates the target scores at random (default 1/8)")
    p.add_argument("--reduction", type=float, default=8.0,
                   help="probe: R in the filtered set's size (1 - alpha) * B / R (default 8)")
    p.add_argument("--early-stop", action="store_true",
                   help="stop a goal at the first step whose suffix makes greedy decoding "
                        "start with the target")
    p.add_argument("--check-every", type=int, default=0,
                   help="generate a reply every N steps to find the first step whose reply has "
                        "no refusal (steps to success; timed apart from the search) (default 0: "
                        "only after the last step)")
    p.add_argument("--allow-non-ascii", action="store_true",
                   help="let suffixes use tokens that are not printable ASCII")
    p.add_argument("--eval-batch", type=int, default=128,
                   help="candidate rows per forward (memory bound; results do not depend on it "
                        "beyond float rounding) (default 128)")
    p.add_argument("--flat-batches", action="store_true",
                   help="score every candidate's whole suffix instead of sharing the part before "
                        "its swapped token (same losses, slower; for measuring)")
    p.add_argument("--seed", type=int, default=0, help="seed of the candidate sampling (default 0)")
    p.add_argument("--output", "-o", default="redteam-report.json",
                   help="report JSON (a .md and .png are written next to it); rewritten after "
                        "every step (default redteam-report.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in --output where they stopped (same settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_gcg)


def run_gcg(args) -> None:
    from ..redteam.attack import METHODS
    from ..redteam.drafts import make_draft
    from ..redteam.goals import advbench_goals, goals_from_file
    from ..redteam.runner import run_campaign

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise HastenError(f"--method {args.method!r}: choose gcg, probe or gcg,probe")
    if args.check_every < 0:
        raise HastenError("--check-every must be >= 0")
    for name in ("goals", "steps", "batch_size", "topk", "suffix_length", "eval_batch"):
        if getattr(args, name) < 1:
            raise HastenError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.probe_fraction <= 1 or args.reduction <= 0:
        raise HastenError("--probe-fraction must be in (0, 1] and --reduction positive")
    goals = (goals_from_file(args.goals_file, args.goals) if args.goals_file
             else advbench_goals(args.goals))
    model = load_model(args)
    draft = None
    if "probe" in methods:
        from ..api import parse_dtype
        draft = make_draft(args.draft, model, args.eval_batch,
                           dtype=parse_dtype(args.draft_dtype) if args.draft_dtype else None)
    settings = {"model": model.name, "methods": methods, "goals": args.goals,
                "goals_file": args.goals_file, "steps": args.steps, "batch_size": args.batch_size,
                "topk": args.topk, "suffix_length": args.suffix_length,
                "draft": args.draft if draft else None,
                "draft_dtype": args.draft_dtype if draft else None, "probe_fraction": args.probe_fraction,
                "reduction": args.reduction, "early_stop": args.early_stop,
                "check_every": args.check_every,
                "allow_non_ascii": args.allow_non_ascii, "flat_batches": args.flat_batches,
                "seed": args.seed}
    runs = run_campaign(model, goals, methods, settings, args.output, draft, args.resume,
                        progress=not args.quiet, chunk=args.eval_batch)
    from ..redteam.report import summarize
    for method, s in summarize(runs).items():
        log(f"{method}: {s}")
    log(f"report: {args.output} (+ .md, .png)")
