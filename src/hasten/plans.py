"""Execution plans and `--dtype auto`: the fastest plan that is exact on this machine, measured.

A plan is how the lean runtime holds and multiplies the weights:

  - "float32": dense float32, the reference (MKL; usually not exact under speculation, see
    `decoding.exactness`);
  - "bfloat16", "float16": dense half precision (oneDNN), exact attention;
  - "compact": the GGUF's Q4_1 / Q8_0 blocks with float32 activations (`models.compact`);
  - "compact-q8": those blocks, each matmul's input rounded to int8 blocks (llama.cpp's
    numerics; integer dot products on AVX-512 VNNI or AVX2).

`measure_plan` loads a model in a plan and reads its verify cost curve and its exactness check
(both cached per machine under their own keys, so they are measured once). `choose` picks the
plan with the cheapest plain step among the exact ones; float32 when none is exact. The choice
and the figures behind it are cached in `cache_root()/plans/` (`hasten check` measures again
and rewrites it); `hasten.load(dtype="auto")` reads it, or measures once when it is absent.

This module takes `load` as an argument instead of importing the API (the API imports it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .paths import cache_root, write_json

PLANS = ("float32", "bfloat16", "float16", "compact", "compact-q8")
AUTO_CANDIDATES = ("float32", "bfloat16", "compact", "compact-q8")  # float16 on a CPU: emulated, slow
PLAN_KEY = "auto-v3"  # bump when what a plan computes changes (or the candidates do)


def plan_args(plan: str) -> dict:
    """`load` keyword arguments of a plan."""
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; choose from {', '.join(PLANS)}")
    return {"dtype": "float32", "weights": plan} if plan.startswith("compact") else \
        {"dtype": plan, "weights": "dense"}


def measure_plan(load: Callable, spec: str | None, plan: str, device: str = "cpu",
                 runtime: str = "auto") -> tuple[object, dict]:
    """(the loaded model, its figures): plain step ms, verify cost per tree size (relative to
    the plain step), whether speculative decoding is exact, and why."""
    model = load(spec, device=device, runtime=runtime, progress=False, **plan_args(plan))
    model.choose_attention(measure=True)  # float32: exact attention only if measured exact
    exact = model.exactness()
    curve = model.cost_curve()
    b = model.backbone
    return model, {"attention": "exact" if getattr(b, "exact", False) else "sdpa",
                   "plain_step_ms": round(curve.seconds[0] * 1000, 2),
                   "verify_cost": {str(n): r for n, r in curve.relative().items()},
                   "exact": exact.exact, "why": exact.why}


def choose(entries: dict[str, dict]) -> str:
    """The exact plan with the cheapest plain step; "float32" (the reference) if none is."""
    exact = {p: e for p, e in entries.items() if e.get("exact")}
    if not exact:
        return "float32"
    return min(exact, key=lambda p: exact[p]["plain_step_ms"])


def choice_file(fingerprint: str, device: str, runtime: str) -> Path:
    threads = torch.get_num_threads()
    return cache_root() / "plans" / f"{PLAN_KEY}-{fingerprint}-{runtime}-{device}-t{threads}.json"


def save_choice(path: Path, entries: dict[str, dict]) -> str:
    plan = choose(entries)
    write_json(path, {"choice": plan, "plans": entries,
                      "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    return plan


def read_choice(path: Path) -> str | None:
    try:
        plan = json.loads(path.read_text())["choice"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return plan if plan in PLANS else None


def candidates(has_gguf: bool, lean: bool, device: str = "cpu") -> list[str]:
    """The plans worth measuring for a model: compact only for a GGUF on the lean runtime,
    compact-q8 only where its kernel builds (it has no pure-torch fallback), half precision
    only where the machine computes in it (`emulated`)."""
    from .models.quant_kernels import kernel_module

    def worth(plan: str) -> bool:
        if plan.startswith("compact"):
            return has_gguf and (plan == "compact" or kernel_module() is not None)
        return not emulated(plan, device)
    return [p for p in (AUTO_CANDIDATES if lean else ("float32", "bfloat16")) if worth(p)]


EMULATED_RATIO = 4.0  # a half-precision product this many times float32's: not the CPU's own
_emulated: dict[str, float] = {}


def half_cost_ratio(plan: str) -> float:
    """How many times a float32 product an [8, 576] x [576, 1536] product in the plan's half
    precision costs on this CPU (fastest of 5, measured once per process). Where the CPU has
    no arithmetic for it, torch emulates it: bfloat16 without AVX512-BF16 / AMX measured 35x
    here (AMD EPYC Zen 3: a default-model step 1.5 s against 43 ms), so such a plan can never
    be the fastest, and measuring its curve and exactness would take minutes."""
    if plan not in _emulated:
        def fastest(dtype: torch.dtype) -> float:
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(8, 576, generator=g).to(dtype), torch.randn(576, 1536, generator=g).to(dtype)
            best = float("inf")
            for _ in range(6):  # the first warms up
                start = time.perf_counter()
                x @ w
                best = min(best, time.perf_counter() - start)
            return best
        with torch.inference_mode():
            _emulated[plan] = fastest(getattr(torch, plan)) / fastest(torch.float32)
    return _emulated[plan]


def emulated(plan: str, device: str = "cpu") -> bool:
    """Whether a half-precision plan runs emulated on this CPU (`half_cost_ratio` at least
    EMULATED_RATIO); never on a GPU, never for float32 or compact plans."""
    return plan in ("bfloat16", "float16") and device == "cpu" and half_cost_ratio(plan) >= EMULATED_RATIO
