"""`hasten bench`: methods side by side on the same prompts, interleaved in one process.

Each method is a function `prompt_ids -> (new token ids, seconds)`. After one warm-up run
of every method, prompts are taken one by one and the methods run in a rotating order,
so drift on a shared machine (thermal, noisy neighbours) hits every method alike. Speed is
reported as medians and as per-prompt ratios against a baseline; correctness as the number
of prompts whose greedy output differs from the baseline's, token for token.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .isolated import MethodFailed

# A method returns (new token ids, seconds) or (new token ids, seconds, info), where info may
# hold "steps" (decode steps), "ttft" (seconds to the first token) and "accepted" (tokens
# gained at each step).
Method = Callable[[list[int]], tuple]


@dataclass
class MethodResult:
    name: str
    tokens: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)  # decode steps, where the method says
    ttft: list[float | None] = field(default_factory=list)  # seconds to first token, likewise
    accepted: list[int] = field(default_factory=list)  # tokens gained per step, all prompts
    failure: str | None = None  # why the method stopped running (crash, timeout, unavailable)
    exact: bool | None = None  # speculative methods: bit-exact with plain decoding here

    def add(self, tokens: list[int], seconds: float, info: dict) -> None:
        self.tokens.append(list(tokens))
        self.seconds.append(seconds)
        self.steps.append(info.get("steps"))
        self.ttft.append(info.get("ttft"))
        self.accepted.extend(info.get("accepted", []))
        if info.get("exact") is not None:
            self.exact = info["exact"]

    @property
    def mean_accepted(self) -> float | None:
        """Tokens gained per decode step (the first token comes from prefill, not a step)."""
        if not self.steps or None in self.steps or sum(self.steps) == 0:
            return None
        return sum(len(t) - 1 for t in self.tokens) / sum(self.steps)

    @property
    def tokens_per_second(self) -> list[float]:
        return [len(t) / s for t, s in zip(self.tokens, self.seconds)]

    def subset(self, indices: list[int]) -> MethodResult:
        """These prompts only. `accepted` is pooled over all prompts, so it is left out."""
        def pick(values: list) -> list:  # steps/ttft may be missing: None, as `add` records
            return [values[i] if i < len(values) else None for i in indices]
        return MethodResult(self.name, pick(self.tokens), pick(self.seconds), pick(self.steps),
                            pick(self.ttft))


def rotation(methods: list[str], index: int) -> list[str]:
    """The order methods run in for prompt `index`: rotate by one each prompt."""
    k = index % len(methods)
    return methods[k:] + methods[:k]


def run_interleaved(methods: dict[str, Method], prompts: list[list[int]], warmup: bool = True,
                    progress: Callable[[str], None] | None = None) -> dict[str, MethodResult]:
    """Every method on every prompt, in rotating order. A method that raises `MethodFailed`
    (a peer whose process crashed or hung) keeps its reason and is not run again; the others
    go on."""
    names = list(methods)
    results = {name: MethodResult(name) for name in names}

    def attempt(name: str, prompt: list[int]):
        try:
            return methods[name](prompt)
        except MethodFailed as e:
            results[name].failure = str(e)
            if progress:
                progress(f"{name}: {e}; the other methods go on")
            return None

    if warmup:
        for name in names:
            attempt(name, prompts[0])
    for i, prompt in enumerate(prompts):
        for name in rotation(names, i):
            if results[name].failure:
                continue
            outcome = attempt(name, prompt)
            if outcome is not None:
                tokens, seconds, *info = outcome
                results[name].add(tokens, seconds, info[0] if info else {})
        if progress:
            progress(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(
                f"{n} {results[n].tokens_per_second[-1]:.1f} tok/s" for n in names
                if not results[n].failure))
    return results


def summarize(results: dict[str, MethodResult], baseline: str,
              categories: list[str | None] | None = None) -> dict[str, dict]:
    """Per method: median tokens/s, per-prompt speedup vs `baseline` (median, min, max),
    and how many prompts' outputs differ from the baseline's. With `categories` (one per
    prompt, None where a prompt has none), the same figures per category under "by_category"."""
    base = results[baseline]
    groups = category_groups(categories) if categories and any(categories) else None
    out = {}
    for name, r in results.items():
        if r.failure:  # its row says why; speeds over a part of the prompts would mislead
            out[name] = {"failed": r.failure, "prompts": len(r.tokens)}
            continue
        out[name] = {
            **speed_stats(r, base, baseline),
            "tokens_per_second": r.tokens_per_second,
            "median_time_to_first_token_s": (statistics.median(r.ttft) if r.ttft and None not in r.ttft
                                             else None),
            "accepted_histogram": {n: r.accepted.count(n) for n in sorted(set(r.accepted))},
            "exact": r.exact,
        }
        if groups:
            out[name]["by_category"] = {
                category: speed_stats(r.subset(idx), base.subset(idx), baseline)
                for category, idx in groups.items()}
    return out


def speed_stats(r: MethodResult, base: MethodResult, baseline: str) -> dict:
    """The figures a method gets overall and per category, against `base` on the same prompts."""
    ratios = [a / b for a, b in zip(r.tokens_per_second, base.tokens_per_second)]
    return {
        "prompts": len(r.tokens),
        "median_tokens_per_second": statistics.median(r.tokens_per_second),
        "speedup_vs_" + baseline: {"median": statistics.median(ratios), "min": min(ratios),
                                   "max": max(ratios)},
        "mean_accepted_per_step": r.mean_accepted,
        "mismatches_vs_" + baseline: sum(a != b for a, b in zip(r.tokens, base.tokens)),
    }


UNCATEGORIZED = "uncategorized"  # prompts without a category, in a set where others have one


def category_groups(categories: list[str | None]) -> dict[str, list[int]]:
    """Prompt indices per category, categories in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        groups.setdefault(category or UNCATEGORIZED, []).append(i)
    return groups


def machine_info() -> dict:
    import os
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "processor": cpu_name(), "cpu_flags": cpu_flags(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
               "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """The CPU features that decide which kernels run (AVX-512, BF16, AMX), as Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SPEED_FLAGS if f in have]
    except OSError:
        pass
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(summary: dict[str, dict], baseline: str) -> str:
    """One row per method; memory columns only when the memory pass ran (and CUDA was used),
    time to first token where the methods report it (prefill: the prompt, then one token)."""
    memory = any("peak_memory_mb" in s for s in summary.values())
    cuda = any(s.get("cuda_peak_mb") is not None for s in summary.values())
    header = (f"| method | median tok/s | speedup vs {baseline} (median, min-max) | "
              "tokens per step | outputs differing |")
    roofline = any("bandwidth_fraction" in s for s in summary.values())
    header += " peak RSS MB (while generating) |" * memory + " CUDA peak MB |" * cuda
    header += " weights MB read per token | of read bandwidth |" * roofline
    ttft = any(s.get("median_time_to_first_token_s") is not None for s in summary.values())
    header += " ms to first token (median) |" * ttft
    extra = memory + cuda + 2 * roofline + ttft
    lines = [header, "|---|---:|---:|---:|---:|" + "---:|" * extra]
    for name, s in summary.items():
        if "failed" in s:
            lines.append(f"| {name} | {s['failed']} | - | - | - |" + " - |" * extra)
            continue
        sp = s["speedup_vs_" + baseline]
        acc = s.get("mean_accepted_per_step")
        row = (f"| {name} | {s['median_tokens_per_second']:.1f} | {sp['median']:.2f}x "
               f"({sp['min']:.2f}-{sp['max']:.2f}) | {'-' if acc is None else f'{acc:.2f}'} | "
               f"{s['mismatches_vs_' + baseline]}/{s['prompts']}"
               f"{' (not exact here)' if s.get('exact') is False else ''} |")
        if memory:
            row += f" {_memory_cell(s)} |"
        if cuda:
            row += f" {_mb(s.get('cuda_peak_mb'))} |"
        if roofline:
            row += _roofline_cells(s)
        if ttft:
            first = s.get("median_time_to_first_token_s")
            row += " - |" if first is None else f" {1e3 * first:.1f} |"
        lines.append(row)
    return "\n".join(lines)


def _roofline_cells(s: dict) -> str:
    if "bandwidth_fraction" not in s:
        return " - | - |"
    return f" {s['weight_bytes_per_token'] / 1e6:.0f} | {100 * s['bandwidth_fraction']:.0f}% |"


def _memory_cell(s: dict) -> str:
    cell = _mb(s.get("peak_memory_mb"))
    return cell + (f" ({_mb(s['run_peak_mb'])})" if s.get("run_peak_mb") is not None else "")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def category_table(summary: dict[str, dict], baseline: str) -> str:
    """Rows = categories, one column per method (the baseline is 1.00x by definition): median
    speedup, and tokens per step where the method reports steps. "" without categories."""
    methods = [n for n, s in summary.items() if n != baseline and s.get("by_category")]  # not failed
    if not methods:
        return ""
    lines = [f"Per category: median speedup vs {baseline} (tokens per step).", "",
             "| category | prompts | " + " | ".join(methods) + " |",
             "|---|---:|" + "---:|" * len(methods)]
    for category, stats in summary[methods[0]]["by_category"].items():
        cells = [_category_cell(summary[n]["by_category"][category], baseline) for n in methods]
        lines.append(f"| {category} | {stats['prompts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _category_cell(stats: dict, baseline: str) -> str:
    acc = stats["mean_accepted_per_step"]
    speed = f"{stats['speedup_vs_' + baseline]['median']:.2f}x"
    return speed if acc is None else f"{speed} ({acc:.2f})"


def write_report(path: Path, report: dict) -> None:
    """Write JSON atomically: a crash never leaves a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)


def timed(fn: Callable[[], list[int]]) -> tuple[list[int], float]:
    start = time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - start
