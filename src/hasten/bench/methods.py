"""The methods `hasten bench` compares, each a function `prompt ids -> (new ids, seconds[, info])`.

- `plain`: our runtime, plain decoding (the baseline every speedup is measured against)
- `lookup`, `model`, `rest`, `medusa`, `eagle`: our speculative engine with that drafter (must match
  `plain`), all from one `DraftSpec` of options (`--datastore`, `--draft-model`, ...)
- peers (`peers.py`): `hf`, `hf-lookup` (transformers), `llamacpp`; each in a process of its
  own (`isolated.py`) unless `isolate=False`
"""

from __future__ import annotations

import sys

from ..api import Model
from ..drafters import DraftSpec
from ..errors import HastenError
from .isolated import IsolatedMethod
from .peers import PEERS, PeerUnavailable, build_peer
from .runner import Method, timed

OURS = ("plain", "lookup", "model", "rest", "medusa", "eagle")
METHODS = OURS + PEERS


def ours(model: Model, drafter, max_new_tokens: int, stop: bool, tree_size: int | None) -> Method:

    def run(prompt: list[int]):
        tokens, seconds = timed(lambda: list(model.generate_ids(
            prompt, max_new_tokens, draft=drafter, tree_size=tree_size, ignore_eos=not stop)))
        stats = model.last_stats
        return tokens, seconds, {"steps": stats.steps, "ttft": stats.time_to_first_token,
                                 "accepted": list(stats.accepted), "exact": stats.exact}
    return run


def peer_settings(name: str, model: Model, max_new_tokens: int, stop: bool,
                  threads: int | None = None) -> dict:
    """What a fresh process needs to build peer `name` on the same weights and prompts."""
    return {"method": name, "folder": str(model.folder),
            "dtype": str(model.backbone.dtype).removeprefix("torch."),
            "device": str(model.backbone.device), "max_new_tokens": max_new_tokens,
            "stop_ids": list(model.stop_ids) if stop else [], "threads": threads}


def build_methods(names: list[str], model: Model, max_new_tokens: int, stop: bool = True,
                  tree_size: int | None = None, draft: DraftSpec = DraftSpec(),
                  isolate: bool = True, threads: int | None = None) -> dict[str, Method]:
    """Methods by name. Peers that cannot run here are skipped with a note on stderr."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise HastenError(f"unknown bench methods {unknown}; choose from {', '.join(METHODS)}")
    methods: dict[str, Method] = {}
    for name in names:
        if name in OURS:
            drafter = None if name == "plain" else model.drafter(draft.named(name))
            methods[name] = ours(model, drafter, max_new_tokens, stop, tree_size)
            continue
        settings = peer_settings(name, model, max_new_tokens, stop, threads)
        if isolate:
            methods[name] = IsolatedMethod(settings)
            continue
        try:
            methods[name] = build_peer(settings)
        except PeerUnavailable as e:
            print(f"bench: {name} skipped: {e}", file=sys.stderr)
    return methods
