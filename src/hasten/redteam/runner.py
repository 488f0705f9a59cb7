"""A red-teaming campaign: goals x methods, interleaved per goal, saved after every step.

For each goal, each method runs in turn from the same initial suffix and seed (so the two
methods of a goal are compared on the same machine state, minutes apart at most). The
report JSON is rewritten after every step; `resume=True` reloads it, checks that the
settings match, skips finished runs and continues unfinished ones where they stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import HastenError
from .attack import RunState, check_progress, check_reply, new_state, run_steps
from .drafts import Draft
from .forward import scorer_for
from .gcg import Search, allowed_tokens
from .goals import Goal
from .losses import make_layout
from .report import load_json, plot, save_json, write_markdown


def initial_suffix(tokenizer, length: int) -> list[int]:
    """GCG's usual start: " ! ! ! ..." as `length` tokens."""
    ids = tokenizer.encode(" !" * length, add_special_tokens=False)[:length]
    if len(ids) < length:
        raise HastenError(f"cannot make a {length}-token initial suffix with this tokenizer")
    return ids


def run_campaign(model, goals: list[Goal], methods: list[str], settings: dict, output: str | Path,
                 draft: Draft | None = None, resume: bool = False, progress: bool = True,
                 chunk: int = 128) -> list[RunState]:
    output = Path(output)
    runs: dict[tuple[int, str], RunState] = {}
    if resume and output.is_file():
        old_settings, old_runs = load_json(output)
        # a setting an older report lacks counts as off (None / 0 / False)
        diff = {k: (old_settings.get(k), v) for k, v in settings.items()
                if old_settings.get(k, v if not v else None) != v}
        diff.update({k: (v, None) for k, v in old_settings.items() if k not in settings})
        if diff:
            raise HastenError(f"{output} was made with other settings {diff}; rerun them or "
                              "give another --output")
        runs = {(r.goal_index, r.method): r for r in old_runs}
    elif output.exists() and not resume:
        raise HastenError(f"{output} exists; pass --resume to continue it or choose another "
                          "--output")
    if "probe" in methods and draft is None:
        raise HastenError("--method probe needs a draft model (--draft self:N or a model spec)")
    scorer = scorer_for(model.backbone)
    allowed = allowed_tokens(model.tokenizer, scorer.vocab_size,
                             ascii_only=not settings.get("allow_non_ascii", False))
    init = initial_suffix(model.tokenizer, settings["suffix_length"])
    order = [(g, m) for g in goals for m in methods]
    for g, m in order:
        runs.setdefault((g.index, m), new_state(g, m, init, settings["seed"]))

    def save(_state=None):
        ordered = [runs[(g.index, m)] for g, m in order]
        save_json(output, settings, ordered)

    for n, (g, m) in enumerate(order, 1):
        state = runs[(g.index, m)]
        if state.done and state.reply is not None:
            continue
        layout = make_layout(model.tokenizer, g.goal, g.target)
        search = Search(scorer, scorer.prefix(layout.before), layout, model.tokenizer, allowed,
                        settings["batch_size"], settings["topk"], chunk,
                        share_suffix=not settings.get("flat_batches", False))
        if m == "probe":
            draft.for_goal(g.goal, g.target, chat=bool(getattr(model.tokenizer, "chat_template", None)))
        bar = _bar(progress, settings["steps"], state.step, f"[{n}/{len(order)}] goal {g.index} {m}")

        def on_step(st, bar=bar, layout=layout):
            every = settings.get("check_every") or 0
            if every and st.step % every == 0:
                check_progress(model, st, layout)
            save()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{st.history[-1][1]:.3f}", best=f"{st.best_loss:.3f}")

        run_steps(state, search, settings["steps"], draft if m == "probe" else None,
                  settings["probe_fraction"], settings["reduction"], settings["early_stop"], on_step)
        if bar is not None:
            bar.close()
        check_reply(model, state, layout)
        save()
    finished = [runs[(g.index, m)] for g, m in order]
    chart = output.with_suffix(".png")
    try:
        plot(chart, finished)
    except ImportError:  # matplotlib is optional (the `bench` extra)
        print("hasten: no chart: pip install matplotlib for one", file=sys.stderr)
        chart = None
    write_markdown(output.with_suffix(".md"), settings, finished, chart.name if chart else None)
    return finished


def _bar(progress: bool, total: int, done: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc=desc, file=sys.stderr, leave=True,
                dynamic_ncols=True)
