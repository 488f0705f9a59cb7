"""The methods `hasten bench` compares, each a function `prompt ids -> (new ids, seconds)`.

- `plain`: our runtime, plain decoding (the baseline every speedup is measured against)
- `lookup`, `model`, `rest`, `medusa`: our speculative engine with that drafter (must match `plain`)
- `hf`: `transformers` `generate()` on the same weights folder, greedy
- `hf-lookup`: `generate(prompt_lookup_num_tokens=...)`, transformers' own prompt lookup
- `llamacpp`: llama.cpp (`llama-cpp-python`, optional) on the GGUF file the model came from,
  greedy. It runs the quantized weights, so its tokens may differ from ours: a speed peer,
  not a lossless method.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..api import Model
from ..drafters import make_drafter
from ..errors import HastenError
from .runner import Method, timed

METHODS = ("plain", "lookup", "model", "rest", "medusa", "hf", "hf-lookup", "llamacpp")


def ours(model: Model, drafter, max_new_tokens: int, stop: bool, tree_size: int | None) -> Method:

    def run(prompt: list[int]):
        tokens, seconds = timed(lambda: list(model.generate_ids(
            prompt, max_new_tokens, draft=drafter, tree_size=tree_size, ignore_eos=not stop)))
        stats = model.last_stats
        return tokens, seconds, {"steps": stats.steps, "ttft": stats.time_to_first_token,
                                 "accepted": list(stats.accepted)}
    return run


def transformers_generate(hf_model, max_new_tokens: int, stop_ids: tuple[int, ...],
                          lookup_tokens: int = 0) -> Method:
    def run(prompt: list[int]):
        ids = torch.tensor([prompt], device=hf_model.device)
        extra = {"prompt_lookup_num_tokens": lookup_tokens} if lookup_tokens else {}
        if stop_ids:
            extra["eos_token_id"] = list(stop_ids)
        else:
            extra["min_new_tokens"] = max_new_tokens

        clock = FirstTokenClock()

        def gen():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=0,
                                    streamer=clock, **extra)
            return out[0, len(prompt):].tolist()
        clock.start = time.perf_counter()
        tokens, seconds = timed(gen)
        return tokens, seconds, {"ttft": clock.first - clock.start if clock.first else None}
    return run


def llamacpp_generate(gguf: Path, max_new_tokens: int, stop_ids: tuple[int, ...]) -> Method:
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=torch.get_num_threads(), verbose=False)

    def run(prompt: list[int]):
        tokens, start, first = [], time.perf_counter(), None
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                  repeat_penalty=1.0, reset=True):
            first = first or time.perf_counter()
            tokens.append(int(token))
            if int(token) in stop_ids or len(tokens) >= max_new_tokens:
                break
        return tokens, time.perf_counter() - start, {"ttft": first - start if first else None}
    return run


def source_gguf(folder: Path) -> Path | None:
    """The GGUF file a cached model folder was converted from (None for Hugging Face folders)."""
    try:
        source = Path(json.loads((folder / "manifest.json").read_text())["source"])
    except (OSError, ValueError, KeyError):
        return None
    return source if source.is_file() else None


class FirstTokenClock:
    """A `generate(streamer=...)` that notes when the first new token arrives (the first
    `put` carries the prompt)."""

    def __init__(self):
        self.start, self.first, self.puts = 0.0, None, 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def build_methods(names: list[str], model: Model, folder: Path, max_new_tokens: int,
                  stop: bool = True, tree_size: int | None = None,
                  datastore: str | None = None, medusa_heads: str | None = None) -> dict[str, Method]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise HastenError(f"unknown bench methods {unknown}; choose from {', '.join(METHODS)}")
    methods: dict[str, Method] = {}
    hf_model = None
    for name in names:
        if name == "llamacpp":
            gguf = source_gguf(folder)
            if gguf is None:
                print("bench: llamacpp skipped: the model does not come from a GGUF file",
                      file=sys.stderr)
                continue
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("bench: llamacpp skipped: pip install llama-cpp-python (or the llamacpp "
                      "extra) to compare with llama.cpp", file=sys.stderr)
                continue
            methods[name] = llamacpp_generate(gguf, max_new_tokens, model.stop_ids if stop else ())
            continue
        if name in ("plain", "lookup", "model", "rest", "medusa"):
            drafter = None if name == "plain" else make_drafter(
                name, model, datastore=datastore, medusa_heads=medusa_heads)
            methods[name] = ours(model, drafter, max_new_tokens, stop, tree_size)
            continue
        if hf_model is None:
            from transformers import AutoModelForCausalLM
            hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=model.backbone.dtype)
            hf_model = hf_model.to(model.backbone.device).eval()
        stop_ids = model.stop_ids if stop else ()
        methods[name] = transformers_generate(hf_model, max_new_tokens, stop_ids,
                                              lookup_tokens=10 if name == "hf-lookup" else 0)
    return methods
