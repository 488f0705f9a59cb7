"""A model spec -> a ready backbone with its tokenizer: the one place that picks the runtime.

`hasten.api.load` wraps the result in a `Model`; drafters that bring a model of their own (a
draft model) load it here too, so nothing below the API needs the API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import HastenError
from .backbone import Backbone
from .config import LlamaConfig
from .hf_adapter import HFBackbone
from .llama import build_llama
from .sources import load_tokenizer, load_weights, resolve_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}
RUNTIMES = ("auto", "lean", "hf")
# "dense": every weight dequantized to the dtype (the float32 reference); "compact": the GGUF
# file's Q4_1 / Q8_0 blocks kept as they are, float32 activations (see `compact.py`).
# "compact-q8": the same blocks, activations rounded to int8 blocks per matmul (llama.cpp's numerics).
WEIGHTS = ("dense", "compact", "compact-q8")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise HastenError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HastenError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HastenError("--device cuda was asked for but this torch build sees no CUDA GPU; "
                          "use --device cpu")
    return device


@dataclass
class LoadedModel:
    backbone: Backbone
    tokenizer: object
    name: str
    max_positions: int
    stop_ids: tuple[int, ...]
    folder: Path


def load_backbone(spec: str | None = None, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype = "float32", runtime: str = "auto",
                  progress: bool = True, weights: str = "dense") -> LoadedModel:
    """Load a model by spec (see `sources.resolve_model`). `runtime`: "lean" (our Llama-family
    runtime), "hf" (the generic transformers adapter) or "auto" (lean when the architecture
    allows). `weights`: "dense", "compact" (a GGUF's quantized blocks, lean runtime, float32
    on the CPU) or "compact-q8" (those blocks, activations rounded to int8 blocks)."""
    if runtime not in RUNTIMES:
        raise HastenError(f"unknown runtime {runtime!r}; choose auto, lean or hf")
    if weights not in WEIGHTS:
        raise HastenError(f"unknown weights {weights!r}; choose {', '.join(WEIGHTS)}")
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    resolved = resolve_model(spec, progress=progress)
    if weights != "dense":
        return _load_compact(resolved, torch_dtype, torch_device, runtime,
                             "q8" if weights == "compact-q8" else "float32")
    config = json.loads((resolved.folder / "config.json").read_text())
    if runtime == "lean" and not resolved.lean:
        raise HastenError(f"{resolved.name} ({config.get('model_type')}) is not a Llama-family "
                          "model; use --runtime hf or auto")
    tokenizer = load_tokenizer(resolved.folder)
    if runtime in ("auto", "lean") and resolved.lean:
        cfg = LlamaConfig.from_hf_dict(config)
        backbone = build_llama(cfg, load_weights(resolved.folder), torch_dtype, torch_device)
        max_positions = cfg.max_position_embeddings
    else:
        backbone = HFBackbone.from_folder(resolved.folder, torch_dtype, torch_device)
        max_positions = config.get("max_position_embeddings") or 4096
    return LoadedModel(backbone, tokenizer, resolved.name, max_positions,
                       stop_ids(config, tokenizer), resolved.folder)


def _load_compact(resolved, dtype: torch.dtype, device: torch.device, runtime: str,
                  activations: str) -> LoadedModel:
    from .compact import build_compact_llama

    if resolved.gguf is None or not resolved.lean or runtime == "hf":
        raise HastenError("--weights compact needs a Llama-family GGUF file on the lean runtime "
                          f"({resolved.name} is not one); use --weights dense")
    if activations == "q8":
        from .quant_kernels import kernel_failure, kernel_module
        if kernel_module() is None:
            raise HastenError("--weights compact-q8 runs on the compiled kernel, which cannot be "
                              f"built here ({kernel_failure()}); use --weights compact")
    if dtype != torch.float32 or device.type != "cpu":
        raise HastenError("--weights compact computes in float32 on the CPU; drop --dtype / "
                          "--device or use --weights dense")
    config = json.loads((resolved.folder / "config.json").read_text())
    cfg = LlamaConfig.from_hf_dict(config)
    backbone, summary = build_compact_llama(cfg, resolved.gguf, activations)
    backbone.compact_summary = summary
    tokenizer = load_tokenizer(resolved.folder)
    return LoadedModel(backbone, tokenizer, resolved.name, cfg.max_position_embeddings,
                       stop_ids(config, tokenizer), resolved.folder)


def stop_ids(config: dict, tokenizer) -> tuple[int, ...]:
    """EOS ids from the model config and the tokenizer (chat models often end turns with both)."""
    ids = config.get("eos_token_id")
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
