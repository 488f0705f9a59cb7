"""Peak memory per bench method, each method alone in a fresh process.

The timed bench runs every method in one process, so that process's peak holds all of them
together. Here each method is built the way the bench builds it (`build_methods`) in a new
Python process that loads only what the method needs (our runtime's model and drafter, or the
transformers model, or llama.cpp), runs it once on the first prompt and reports its own peak.

`python -m hasten.bench.memory` reads the settings as JSON on stdin and prints one JSON line:
{"peak_memory_mb", "baseline_mb"} (+ "run_peak_mb", the peak while generating, where Linux
lets the peak be reset after loading; + "cuda_peak_mb" on CUDA), or {"error": why}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory in MB. Not ru_maxrss where
    /proc exists: Linux carries a parent's peak over fork+exec, so a child of a big bench
    process would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else kB


def reset_peak() -> bool:
    """Start VmHWM afresh from the current RSS (Linux 4.0+); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---- in the fresh process ---------------------------------------------------------------------

def probe(spec: dict) -> dict:
    """Build `spec["method"]` as the bench does, run it once on `spec["prompt"]`, and measure."""
    import io
    from contextlib import redirect_stderr

    import torch
    import transformers  # every method needs it (tokenizer at least): part of the baseline

    from ..errors import HastenError
    from ..drafters import DraftSpec
    from .methods import build_methods
    transformers.logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    baseline = rss_mb("VmRSS")  # imports done, nothing loaded yet
    name = spec["method"]
    model = load_for(spec)
    notes = io.StringIO()  # build_methods says on stderr why it skips a method
    with redirect_stderr(notes):
        methods = build_methods([name], model, spec["max_new_tokens"],
                                stop=spec.get("stop", True), tree_size=spec.get("tree_size"),
                                draft=DraftSpec.of(**spec.get("draft", {})), isolate=False)
    if name not in methods:
        raise HastenError(notes.getvalue().strip() or f"{name} was not built")
    load_peak = rss_mb("VmHWM")
    split = reset_peak()  # loading can peak far above what generating needs: measure both
    methods[name](model.encode(spec["prompt"]))
    run_peak = rss_mb("VmHWM")
    result = {"peak_memory_mb": round(max(load_peak, run_peak), 1), "baseline_mb": round(baseline, 1)}
    if split:
        result["run_peak_mb"] = round(run_peak, 1)
    if model.backbone.device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def load_for(spec: dict):
    """Our runtime's model for our methods. The others load their own weights (transformers,
    llama.cpp), so they get a Model with the tokenizer, stop ids and folder but no weights."""
    from ..api import load
    from .methods import OURS  # run on our runtime's model
    if spec["method"] in OURS:
        return load(spec.get("model"), device=spec.get("device", "cpu"),
                    dtype=spec.get("dtype", "float32"), runtime=spec.get("runtime", "auto"),
                    progress=False, weights=spec.get("weights", "dense"))
    return weightless_model(spec)


def weightless_model(spec: dict):
    from types import SimpleNamespace

    from ..api import Model
    from ..models.loader import parse_device, parse_dtype, stop_ids
    from ..models.sources import load_tokenizer, resolve_model
    resolved = resolve_model(spec.get("model"), progress=False)
    config = json.loads((resolved.folder / "config.json").read_text())
    tokenizer = load_tokenizer(resolved.folder)
    # build_methods reads only dtype and device from the backbone for these methods
    backbone = SimpleNamespace(dtype=parse_dtype(spec.get("dtype", "float32")),
                               device=parse_device(spec.get("device", "cpu")))
    return Model(backbone, tokenizer, resolved.name, config.get("max_position_embeddings") or 4096,
                 stop_ids(config, tokenizer), folder=resolved.folder)


def main() -> None:
    spec = json.loads(sys.stdin.read())
    try:
        result = probe(spec)
    except Exception as e:  # reported, not raised: the parent records a note and goes on
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


# ---- in the bench process ---------------------------------------------------------------------

def measure(spec: dict, timeout: float = 600) -> dict:
    """One method's memory from a fresh process. A probe that fails gives
    {"peak_memory_mb": None, "memory_note": why}, never an exception: one broken method must
    not stop the benchmark."""
    try:
        done = subprocess.run([sys.executable, "-m", "hasten.bench.memory"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return failed(f"no result within {timeout:.0f} s")
    except OSError as e:
        return failed(f"could not start a process: {e}")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        result = None  # crashed before printing: its stderr says why
    if not isinstance(result, dict):
        errors = done.stderr.strip().splitlines()
        return failed(errors[-1] if errors else f"the probe exited with status {done.returncode}")
    if "error" in result:
        return failed(result["error"])
    return result


def failed(note: str) -> dict:
    return {"peak_memory_mb": None, "memory_note": note}


def memory_pass(names: list[str], settings: dict, prompt: str,
                log: Callable[[str], None] = lambda msg: None, timeout: float = 600) -> dict[str, dict]:
    """Each method's memory, one fresh process after another (never two at once: they would
    compete for memory)."""
    out = {}
    for name in names:
        log(f"memory: {name} ...")
        start = time.perf_counter()
        out[name] = measure({**settings, "method": name, "prompt": prompt}, timeout)
        log(f"memory: {name} {describe(out[name])} ({time.perf_counter() - start:.0f} s)")
    return out


def describe(result: dict) -> str:
    if result.get("peak_memory_mb") is None:
        return f"failed: {result.get('memory_note')}"
    text = f"peak {result['peak_memory_mb']:.0f} MB"
    if "run_peak_mb" in result:
        text += f", {result['run_peak_mb']:.0f} MB while generating"
    text += f" (baseline after imports {result['baseline_mb']:.0f} MB)"
    if "cuda_peak_mb" in result:
        text += f", CUDA peak {result['cuda_peak_mb']:.0f} MB"
    return text


if __name__ == "__main__":
    main()
