"""The report of a red-teaming run: JSON (also the resume file), Markdown, a chart.

The JSON holds the settings and every run's `RunState`, finished or not; it is rewritten
atomically after every step, so an interrupted run resumes from it. Outputs stay local:
nothing is sent anywhere.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from .attack import METHODS, RunState


def save_json(path: str | Path, settings: dict, runs: list[RunState]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"settings": settings, "summary": summarize(runs),
            "runs": [r.to_json() for r in runs]}
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def load_json(path: str | Path) -> tuple[dict, list[RunState]]:
    data = json.loads(Path(path).read_text())
    return data["settings"], [RunState.from_json(r) for r in data["runs"]]


def summarize(runs: list[RunState]) -> dict:
    """Per method: success and exact rates, steps to exact, loss, forwards, wall time; and
    plain GCG's wall time over probe sampling's on the goals both ran."""
    out = {}
    for m in METHODS:
        rs = [r for r in runs if r.method == m and r.done]
        if not rs:
            continue
        checked = [r for r in rs if r.success is not None]
        steps = [r.exact_step for r in rs if r.exact_step is not None]
        jb = [r.success_step for r in rs if r.success_step is not None]
        out[m] = {
            "runs": len(rs),
            "success_rate": _mean([r.success for r in checked]),
            "exact_rate": _mean([r.exact for r in checked]),
            "target_exact_rate": _mean([r.exact_step is not None for r in rs]),
            "median_steps_to_exact": statistics.median(steps) if steps else None,
            "median_steps_to_success": statistics.median(jb) if jb else None,
            "median_final_loss": statistics.median(r.best_loss for r in rs),
            "target_rows": sum(r.target_rows for r in rs),
            "draft_rows": sum(r.draft_rows for r in rs),
            "wall_s": round(sum(r.wall_s for r in rs), 2),
            "steps": sum(r.step for r in rs),
            "steps_per_s": round(sum(r.step for r in rs) / max(1e-9, sum(r.wall_s for r in rs)), 4),
        }
    if "gcg" in out and "probe" in out:
        pairs = _pairs(runs)
        if pairs:
            out["gcg_over_probe_wall"] = round(sum(g.wall_s for g, _ in pairs)
                                               / max(1e-9, sum(p.wall_s for _, p in pairs)), 3)
            out["median_per_goal_ratio"] = round(statistics.median(
                g.wall_s / max(1e-9, p.wall_s) for g, p in pairs), 3)
    return out


def _mean(xs):
    return round(sum(bool(x) for x in xs) / len(xs), 4) if xs else None


def _pairs(runs):
    done = {(r.goal_index, r.method): r for r in runs if r.done}
    return [(done[(g, "gcg")], done[(g, "probe")])
            for g in sorted({g for g, _ in done}) if (g, "gcg") in done and (g, "probe") in done]


def write_markdown(path: str | Path, settings: dict, runs: list[RunState],
                   chart: str | None = None) -> None:
    s = summarize(runs)
    lines = ["# hasten redteam gcg", "",
             "Adversarial-suffix search against one's own model; outputs stay in this report.", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             "| method | runs | success | exact reply | target exact | median steps to exact | "
             "median loss | target rows | draft rows | steps/s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        if m in s:
            x = s[m]
            lines.append(f"| {m} | {x['runs']} | {x['success_rate']} | {x['exact_rate']} | "
                         f"{x['target_exact_rate']} | {x['median_steps_to_exact']} | "
                         f"{x['median_final_loss']:.3f} | {x['target_rows']} | {x['draft_rows']} | "
                         f"{x['steps_per_s']} | {x['wall_s']} |")
    if "gcg_over_probe_wall" in s:
        lines += ["", f"Plain GCG wall time / probe sampling wall time: "
                      f"{s['gcg_over_probe_wall']}x in total, {s['median_per_goal_ratio']}x "
                      "median per goal."]
    lines += ["", "| goal | method | success | exact | steps to success | steps to exact | steps "
                  "| final loss | target rows | draft rows | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r.goal_index, r.method)):
        lines.append(f"| {r.goal_index} | {r.method} | {r.success} | {r.exact} | {r.success_step} "
                     f"| {r.exact_step} | {r.step} | {r.best_loss:.3f} | {r.target_rows} | "
                     f"{r.draft_rows} | {r.wall_s:.1f} |")
    if chart:
        lines += ["", f"![loss against time]({chart})"]
    Path(path).write_text("\n".join(lines) + "\n")


def plot(path: str | Path, runs: list[RunState]) -> None:
    """Best loss against search time, one line per run (GCG solid, probe sampling dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    goals = sorted({r.goal_index for r in runs})
    for r in runs:
        if not r.history:
            continue
        t = [0.0] + [h[0] for h in r.history]
        loss = [r.history[0][2]] + [h[2] for h in r.history]
        c = colors[goals.index(r.goal_index) % len(colors)]
        ax.plot(t, loss, color=c, linestyle="-" if r.method == "gcg" else "--",
                label=f"goal {r.goal_index} {r.method}" if len(goals) <= 5 else None)
    ax.set_xlabel("search time (s)")
    ax.set_ylabel("best target loss")
    ax.set_title("GCG (solid) vs probe sampling (dashed)")
    if len(goals) <= 5:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
