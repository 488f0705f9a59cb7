"""The methods `hasten bench` compares, each a function `prompt ids -> (new ids, seconds)`.

- `plain`: our runtime, plain decoding (the baseline every speedup is measured against)
- `lookup`, `model`, `rest`, `medusa`: our speculative engine with that drafter (must match `plain`)
- `hf`: `transformers` `generate()` on the same weights folder, greedy
- `hf-lookup`: `generate(prompt_lookup_num_tokens=...)`, transformers' own prompt lookup
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..api import Model
from ..drafters import make_drafter
from ..errors import HastenError
from .runner import Method, timed

METHODS = ("plain", "lookup", "model", "rest", "medusa", "hf", "hf-lookup")


def ours(model: Model, drafter, max_new_tokens: int, stop: bool, tree_size: int | None) -> Method:

    def run(prompt: list[int]):
        stop_ids, model.stop_ids = model.stop_ids, (model.stop_ids if stop else ())
        try:
            tokens, seconds = timed(lambda: list(model.generate_ids(
                prompt, max_new_tokens, draft=drafter, tree_size=tree_size)))
        finally:
            model.stop_ids = stop_ids
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
