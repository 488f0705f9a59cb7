"""One run: a method (gcg or probe) against one goal, step by step, seeded and resumable.

A run's whole state is a `RunState` (plain JSON): the current and best suffix, the step,
counters, the loss-against-time history and the generator's state. `run_steps` advances a
state by up to `steps` steps and calls `on_step(state)` after each one, which is where the
caller saves it; a state loaded back continues exactly as if never interrupted (same
candidates, same losses), because the only randomness is that generator.

Counters: `target_rows` / `draft_rows` are candidate rows scored by the target / draft
(`target_grads` the gradient passes, one per step); `wall_s` is search time only, the reply
check at the end is timed apart (`check_s`). A run stops early (`early_stop`) at the first
step whose suffix makes greedy decoding start with the target (free to know: the target's
argmax at every target position is in the logits it just computed).

With `check_every`, the runner also generates a reply every that many steps
(`check_progress`) to find the first step with a reply free of refusals (`success_step`).
After the search, `check_reply` generates the model's greedy reply to the prompt with the
best suffix: success = none of llm-attacks' refusal strings in it; exact = it starts with
the target.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass, field

import torch

from .gcg import Search, gcg_step
from .goals import Goal, is_refusal
from .probe import probe_step

METHODS = ("gcg", "probe")


@dataclass
class RunState:
    goal_index: int
    method: str
    goal: str
    target: str
    suffix: list[int]
    best_suffix: list[int]
    best_loss: float = float("inf")
    step: int = 0
    target_rows: int = 0
    target_grads: int = 0
    draft_rows: int = 0
    wall_s: float = 0.0
    exact_step: int | None = None   # first step whose suffix gives the target exactly
    success_step: int | None = None  # first checked step whose reply has no refusal
    history: list[list[float]] = field(default_factory=list)  # [wall_s, step loss, best loss]
    alphas: list[float] = field(default_factory=list)
    rng: str = ""                   # base64 of the torch.Generator state
    done: bool = False
    suffix_text: str = ""
    reply: str | None = None
    success: bool | None = None
    exact: bool | None = None
    check_s: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "RunState":
        return cls(**d)


def run_seed(seed: int, goal_index: int) -> int:
    """Each (seed, goal) has its own stream; both methods of a goal start from the same one."""
    return (seed * 1_000_003 + goal_index) % (1 << 63)


def new_state(goal: Goal, method: str, init_suffix: list[int], seed: int) -> RunState:
    g = torch.Generator().manual_seed(run_seed(seed, goal.index))
    return RunState(goal.index, method, goal.goal, goal.target, list(init_suffix),
                    list(init_suffix), rng=_pack(g.get_state()))


def _pack(t: torch.Tensor) -> str:
    return base64.b64encode(bytes(t.tolist())).decode("ascii")


def _unpack(s: str) -> torch.Tensor:
    return torch.tensor(list(base64.b64decode(s)), dtype=torch.uint8)


def run_steps(state: RunState, search: Search, steps: int, draft=None, probe_fraction=1 / 8,
              reduction=8.0, early_stop=False, on_step=None) -> RunState:
    """Advance `state` until it has `steps` steps (or stops early); returns it."""
    generator = torch.Generator()
    generator.set_state(_unpack(state.rng))
    while state.step < steps and not state.done:
        t0 = time.perf_counter()
        if state.method == "gcg":
            r = gcg_step(search, state.suffix, generator)
        else:
            r = probe_step(search, draft, state.suffix, generator, probe_fraction, reduction)
        state.wall_s += time.perf_counter() - t0
        state.step += 1
        state.suffix = r.suffix
        state.target_rows += r.target_rows
        state.target_grads += 1
        state.draft_rows += r.draft_rows
        if r.alpha is not None:
            state.alphas.append(round(r.alpha, 4))
        if r.loss < state.best_loss:
            state.best_loss, state.best_suffix = r.loss, list(r.suffix)
        state.history.append([round(state.wall_s, 4), r.loss, state.best_loss])
        if r.exact and state.exact_step is None:
            state.exact_step = state.step
            state.best_loss, state.best_suffix = r.loss, list(r.suffix)  # the suffix that works
            if early_stop:
                state.done = True
        state.rng = _pack(generator.get_state())
        if on_step is not None:
            on_step(state)
    state.done = True
    return state


def reply_for(model, layout, suffix: list[int], target: str, max_new_tokens: int | None = None):
    """(greedy reply, success = no refusal string in it, exact = it starts with the target)."""
    ids = layout.before + suffix + layout.after
    n = max_new_tokens or len(layout.target) + 32
    reply_ids = [t for t in model.generate_ids(ids, max_new_tokens=n) if t not in model.stop_ids]
    reply = model.tokenizer.decode(reply_ids, skip_special_tokens=True)
    return reply, not is_refusal(reply), reply.strip().startswith(target.strip())


def check_progress(model, state: RunState, layout) -> None:
    """A reply check during the search (`--check-every`): records the first step whose best
    suffix gets a reply without refusal. Timed as `check_s`, not as search time."""
    t0 = time.perf_counter()
    _, success, _ = reply_for(model, layout, state.best_suffix, state.target)
    if success and state.success_step is None:
        state.success_step = state.step
    state.check_s += time.perf_counter() - t0


def check_reply(model, state: RunState, layout, max_new_tokens: int | None = None) -> RunState:
    """Greedy reply with the best suffix: success (no refusal) and exact (starts with target)."""
    t0 = time.perf_counter()
    state.reply, state.success, state.exact = reply_for(model, layout, state.best_suffix,
                                                        state.target, max_new_tokens)
    state.suffix_text = model.tokenizer.decode(state.best_suffix)
    state.check_s += time.perf_counter() - t0
    return state
