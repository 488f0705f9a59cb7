"""Peers: other projects' generation, run the way their users run it, on our prompts.

- `hf`: `transformers` `generate()` on the same weights folder, greedy
- `hf-lookup`: `generate(prompt_lookup_num_tokens=...)`, transformers' own prompt lookup
- `llamacpp`: llama.cpp (`llama-cpp-python`, optional) on the GGUF file the model came from,
  greedy. It runs the quantized weights, so its tokens may differ from ours: a speed peer,
  not a lossless method.

The bench runs each peer in a process of its own (`isolated.py`): a peer that crashes takes
only its own row down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import HastenError
from .runner import Method, timed

PEERS = ("hf", "hf-lookup", "llamacpp")


class PeerUnavailable(HastenError):
    """The peer cannot run here (not installed, no GGUF source): its row is skipped."""


def build_peer(settings: dict) -> Method:
    """A peer method from plain settings: "method", "folder", "dtype", "device",
    "max_new_tokens", "stop_ids" (what a fresh process needs to build it)."""
    name, folder = settings["method"], Path(settings["folder"])
    stop_ids = tuple(settings.get("stop_ids", ()))
    if name == "llamacpp":
        gguf = source_gguf(folder)
        if gguf is None:
            raise PeerUnavailable("the model does not come from a GGUF file")
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise PeerUnavailable("pip install llama-cpp-python (or the llamacpp extra) to compare "
                                  "with llama.cpp") from None
        return llamacpp_generate(gguf, settings["max_new_tokens"], stop_ids)
    if name not in ("hf", "hf-lookup"):
        raise HastenError(f"unknown peer {name!r}; peers are {', '.join(PEERS)}")
    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, settings.get("dtype", "float32"))
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    hf_model = hf_model.to(settings.get("device", "cpu")).eval()
    return transformers_generate(hf_model, settings["max_new_tokens"], stop_ids,
                                 lookup_tokens=10 if name == "hf-lookup" else 0)


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
