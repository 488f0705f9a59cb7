"""A PNG people can read at a glance: speedup per method, and how many tokens each step gained."""

from __future__ import annotations

from pathlib import Path


def write_chart(summary: dict[str, dict], baseline: str, path: Path, title: str) -> bool:
    """Two panels: median per-prompt speedup vs `baseline` (min-max as error bars), and the
    accepted-length histogram of each speculative method. False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in summary if "failed" not in summary[n]]  # failed rows have no speed
    speed = [summary[n]["speedup_vs_" + baseline] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    med = [s["median"] for s in speed]
    err = [[m - s["min"] for m, s in zip(med, speed)], [s["max"] - m for m, s in zip(med, speed)]]
    bars = left.bar(names, med, yerr=err, capsize=4, color="#4c72b0")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.bar_label(bars, labels=[f"{m:.2f}x" for m in med], padding=2)
    left.set_ylabel(f"tokens/s vs {baseline} (median per prompt)")
    left.set_title("speedup")
    shown = False
    for n in names:
        hist = summary[n].get("accepted_histogram") or {}
        if hist and set(hist) != {1}:  # plain decoding gains exactly one token per step
            total = sum(hist.values())
            xs = sorted(hist)
            right.plot(xs, [hist[x] / total for x in xs], marker="o", label=n)
            shown = True
    right.set_xlabel("tokens gained in one step")
    right.set_ylabel("share of steps")
    right.set_title("accepted length per step")
    if shown:
        right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
