"""The roofline column of `hasten bench`: how close each method runs to the memory limit.

Decoding a small model on a CPU is bound by reading the weights: every forward of the target
reads every matrix once (the embedding table only as the LM head, when tied; a lookup reads one
row of it). So per generated token a method reads

    bytes per forward / tokens gained per forward

and at its measured tokens/s it streams that many bytes per second, a fraction of the machine's
read bandwidth (measured once per thread count and cached, like the verify cost curve). A draft
model's own forwards are not counted: the column is about the target's weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..paths import cache_root, write_json

BANDWIDTH_KEY = "bandwidth-v1"  # bump (or delete the file) to measure again


def matrix_bytes(backbone) -> int:
    """Bytes of the weight matrices one forward of our lean runtime reads (dense or compact)."""
    from ..models.compact import QuantDense
    from ..models.llama import Dense

    total = 0
    for module in backbone.modules():
        if isinstance(module, QuantDense):
            total += module.blocks.numel()  # uint8 blocks
        elif isinstance(module, Dense):
            total += module.weight_t.numel() * module.weight_t.element_size()
    return total


def resident_bytes(backbone) -> int:
    """Bytes of a backbone's weights in memory: parameters and buffers (compact blocks), each
    storage once (a tied LM head shares the embedding's)."""
    seen, total = set(), 0
    for t in [*backbone.parameters(), *backbone.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def gguf_bytes(path: str | Path) -> int:
    """Bytes of a GGUF's matrices one llama.cpp forward reads: every 2-D tensor (a tied table
    once, as the output matrix)."""
    from ..models.gguf_convert import open_gguf

    return sum(int(t.n_bytes) for t in open_gguf(path).tensors if len(t.shape) >= 2)


def folder_bytes(folder: str | Path, dtype: torch.dtype) -> int:
    """Bytes of a Hugging Face folder's matrices in `dtype` (transformers reads each once per
    forward; a tied embedding once, as the LM head; an untied one not at all)."""
    from safetensors import safe_open

    numel, tied = 0, True
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                tied &= name != "lm_head.weight"
                if len(shape) >= 2:
                    numel += shape[0] * shape[1]
                    if name == "model.embed_tokens.weight":
                        embed = shape[0] * shape[1]
    if not tied:
        numel -= embed
    return numel * torch.empty(0, dtype=dtype).element_size()


def read_bandwidth(threads: int | None = None, size_mb: int = 128, repeats: int = 7) -> float:
    """Bytes per second this machine streams from memory into the cores (a sum over a buffer
    far larger than the caches), fastest of `repeats`: load from others only adds time."""
    threads = threads or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(size_mb << 18)  # float32: size_mb MiB
        buf.sum()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
        return buf.numel() * 4 / best
    finally:
        torch.set_num_threads(before)


def cached_read_bandwidth(threads: int | None = None) -> float:
    """`read_bandwidth`, measured once per thread count and cached under `cache_root()/machine`."""
    threads = threads or torch.get_num_threads()
    path = cache_root() / "machine" / f"{BANDWIDTH_KEY}-t{threads}.json"
    try:
        return float(json.loads(path.read_text())["bytes_per_second"])
    except (OSError, ValueError, KeyError):
        pass
    value = read_bandwidth(threads)
    write_json(path, {"bytes_per_second": value, "threads": threads,
                      "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    return value


def add_roofline(summary: dict[str, dict], bytes_per_forward: dict[str, int],
                 bandwidth: float) -> None:
    """Per method with known bytes: weight bytes read per generated token and the fraction of
    `bandwidth` its median tokens/s achieves (in place, beside the other figures)."""
    for name, s in summary.items():
        if "failed" in s or name not in bytes_per_forward:
            continue
        per_step = s.get("mean_accepted_per_step") or 1.0  # peers: one forward per token
        per_token = bytes_per_forward[name] / per_step
        s["weight_bytes_per_token"] = per_token
        s["bandwidth_fraction"] = per_token * s["median_tokens_per_second"] / bandwidth


def method_bytes(names, model) -> dict[str, int]:
    """Bytes per forward for each method whose weights we can count: ours (this backbone), the
    transformers peers (the folder's matrices in the bench dtype), llama.cpp (the GGUF file)."""
    from .methods import OURS
    from .peers import source_gguf

    out = {}
    for name in names:
        if name in OURS and hasattr(model.backbone, "blocks"):
            out[name] = matrix_bytes(model.backbone)
        elif name in ("hf", "hf-lookup") and model.folder is not None:
            out[name] = folder_bytes(model.folder, model.backbone.dtype)
        elif name == "llamacpp" and model.folder is not None:
            gguf = source_gguf(Path(model.folder))
            if gguf is not None:
                out[name] = gguf_bytes(gguf)
    return out
