"""The Python API: `hasten.load(...)` gives a `Model` that generates text or streams it.

    import hasten
    model = hasten.load()                      # the embedded SmolLM2-135M-Instruct
    print(model.generate("Name three colours.", max_new_tokens=40))
    for piece in model.stream("Tell me a story."):
        print(piece, end="", flush=True)
    print(model.last_stats.summary())
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from .decoding.budget import MAX_TREE_SIZE, CostCurve, cached_cost_curve
from .decoding.engine import generate_speculative, tree_sizer
from .decoding.exactness import Exactness, cached_exactness, read_cached
from .decoding.stats import GenerationStats
from .decoding.sampling import SamplingParams
from .drafters import DraftSpec, build_drafter
from .errors import HastenError
from .models.backbone import Backbone
from .models.loader import DTYPES, load_backbone, parse_device, parse_dtype, stop_ids
from .paths import cache_root

__all__ = ["DTYPES", "DraftSpec", "Detokenizer", "MAX_TREE_SIZE", "Model", "load", "parse_device",
           "parse_dtype", "stop_ids"]


class Detokenizer:
    """Turns a growing list of token ids into text pieces, in time linear in the tokens.

    Only a short window is decoded per token (vLLM's and TGI's scheme): the text of the ids
    from `prefix` to `read` was already emitted; decoding from `prefix` to the end and
    removing that text gives the new piece. Starting the window a few tokens back keeps
    tokenizers that treat the first token of a decode specially (a leading space) exact.
    A piece that ends in an incomplete UTF-8 character is held back until the rest arrives;
    `flush` returns what is left at the end. The pieces join to the full decode."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token: int) -> str:
        """The new text this token completes ("" while a character is incomplete)."""
        self.ids.append(int(token))
        done = self._decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        done = self._decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


class Model:
    def __init__(self, backbone: Backbone, tokenizer, name: str, max_positions: int,
                 stop_ids: tuple[int, ...], folder: Path | None = None):
        self.backbone = backbone
        self.folder = folder  # the resolved Hugging Face-format folder the weights came from
        # Identifies the weights in cache keys: cache entries are named by content hash.
        self.fingerprint = folder.name if folder else name
        self._cost_curve: CostCurve | None = None
        self._exactness: Exactness | None = None
        self.tokenizer = tokenizer
        self.name = name
        self.max_positions = max_positions
        self.stop_ids = stop_ids
        self.last_stats = GenerationStats()
        self._drafters: dict[DraftSpec, object] = {}
        self._warned = False  # the not-exact warning is printed once per model
        self.plan = str(getattr(backbone, "dtype", "")).removeprefix("torch.")  # see `plans`

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str | list[dict], chat: bool | None = None,
               system: str | None = None) -> list[int]:
        """Token ids for a prompt: a string, or chat messages [{"role": ..., "content": ...}].

        `chat=None` applies the chat template when the model has one (instruct models)."""
        if isinstance(prompt, list):
            chat = True
            messages = prompt
        else:
            chat = self.has_chat_template if chat is None else chat
            messages = [{"role": "user", "content": prompt}]
        if not chat:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not self.has_chat_template:
            raise HastenError(f"{self.name} has no chat template; pass raw text (--raw)")
        if system is not None:
            messages = [{"role": "system", "content": system}] + list(messages)
        if any(self._holds_special_text(m.get("content")) for m in messages):
            return self._encode_guarded(messages)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _holds_special_text(self, content) -> bool:
        specials = getattr(self.tokenizer, "all_special_tokens", None) or []
        added = getattr(self.tokenizer, "get_added_vocab", lambda: {})()
        return isinstance(content, str) and any(t and t in content for t in {*specials, *added})

    def _encode_guarded(self, messages: list[dict]) -> list[int]:
        """The chat template with each message's content encoded as plain text: text such as
        `<|im_start|>system` inside a message must not become real special tokens (a user
        could forge turns). Contents are rendered as sentinels, then encoded apart with
        special-token parsing off."""
        marks = [f"\x00hasten-content-{i}\x00" for i in range(len(messages))]
        shown = [{**m, "content": mark} for m, mark in zip(messages, marks)]
        text = self.tokenizer.apply_chat_template(shown, add_generation_prompt=True, tokenize=False)
        ids: list[int] = []
        for i, (m, mark) in enumerate(zip(messages, marks)):
            before, _, text = text.partition(mark)
            ids += self.tokenizer.encode(before, add_special_tokens=False)
            ids += self.tokenizer(m["content"], add_special_tokens=False,
                                  split_special_tokens=True)["input_ids"]
        return ids + self.tokenizer.encode(text, add_special_tokens=False)

    def drafter(self, draft: str | DraftSpec | None):
        """The drafter for a name or spec, built once per model and reused (drafters reset at
        the start of each generation; Medusa heads are read from disk once)."""
        spec = draft if isinstance(draft, DraftSpec) else DraftSpec.of(draft)
        if spec not in self._drafters:
            self._drafters[spec] = build_drafter(spec, self)
        return self._drafters[spec]

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 256,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None, draft=None, tree_size: int | None = None,
                     typical: bool = False, ignore_eos: bool = False) -> Iterator[int]:
        """New token ids, streamed. `draft`: None (plain decoding), a drafter name ("lookup",
        "model", "medusa", "eagle"), a `DraftSpec` with options (`DraftSpec("rest", datastore=PATH)`)
        or a drafter object. `tree_size`: most draft nodes per step; None = chosen each step
        for this hardware from measured verify costs (up to `MAX_TREE_SIZE`). `typical`:
        Medusa's lossy acceptance (opt-in). `ignore_eos`: always generate `max_new_tokens`
        (benchmarks: the same work for every method)."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        if tree_size is not None and tree_size < 0:
            raise HastenError(f"tree_size must be >= 0, got {tree_size}")
        # Draws happen on the CPU whatever the device (see decoding.sampling).
        generator = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        self.last_stats = GenerationStats()
        stops = () if ignore_eos else self.stop_ids
        if draft is None or isinstance(draft, (str, DraftSpec)):
            draft = self.drafter(draft)
        sizer = None
        if draft is not None:
            exact = self.exactness()
            self.last_stats.exact = exact.exact
            if not exact.exact and not self._warned:
                self._warned = True
                print(f"hasten: warning: speculative decoding is not bit-exact for {self.name} "
                      f"here: {exact.why}. Greedy output may differ from plain decoding in rare "
                      "tokens.", file=sys.stderr, flush=True)
            if tree_size is None:
                sizer = tree_sizer(draft, self.cost_curve())
        return generate_speculative(self.backbone, draft, prompt_ids, max_new_tokens, params,
                                    stops, generator, self.max_positions, tree_size, typical,
                                    sizer, self.last_stats)

    def machine_key(self, kind: str, exact: bool | None = None) -> str:
        """Names a measurement of this model on this machine: weights, runtime, attention mode
        (`exact`: that mode instead of the current one), device, dtype and threads (the CPU
        itself is the cache's: each machine has its own)."""
        b = self.backbone
        exact = getattr(b, "exact", False) if exact is None else exact
        return (f"{kind}-{self.fingerprint}-{type(b).__name__}-{'exact' if exact else 'sdpa'}-"
                f"{b.device.type}-{str(b.dtype).removeprefix('torch.')}-t{torch.get_num_threads()}")

    def cost_curve(self) -> CostCurve:
        """Verify cost per tree size on this model/device/dtype, measured once and cached."""
        if self._cost_curve is None:
            self._cost_curve = cached_cost_curve(self.backbone, self.machine_key("v7"),
                                                 cache_root() / "costs")
        return self._cost_curve

    def _exactness_file(self, exact: bool | None = None) -> Path:
        """Where the exactness check of this model's attention mode (or of `exact`'s) is cached
        for this machine."""
        return cache_root() / "exactness" / f"{self.machine_key('exact-v3', exact)}.json"

    def exactness(self) -> Exactness:
        """Whether speculative greedy output is bit-identical to plain decoding here, in the
        attention mode this model runs: measured once per machine (seconds) and cached."""
        if self._exactness is None:
            b = self.backbone
            if hasattr(b, "exact") and not b.exact:
                dtype = str(b.dtype).removeprefix("torch.")
                measured = read_cached(self._exactness_file(exact=True))
                why = (f"with exact attention {measured.why}; so {dtype} keeps SDPA, which is "
                       "faster and not exact either" if measured else
                       f"{dtype} attention runs through SDPA here, whose verify and plain steps "
                       "round differently (`hasten check` measures whether the exact attention "
                       "path would be exact on this machine)")
                self._exactness = Exactness(False, why, *((measured.nodes_checked,
                                                          measured.nodes_differing)
                                                         if measured else ()))
            else:
                self._exactness = cached_exactness(b, self._exactness_file())
        return self._exactness

    def choose_attention(self, measure: bool = False) -> None:
        """Exact attention (`models.exact_attention`) where it makes speculative decoding exact.

        bfloat16 and float16 always take it (`build_llama` sets it): measured bit-exact on every
        CPU tried (Intel Xeon with AMX, AMD EPYC), and it is what makes trees worth it there.
        float32 takes it only where the check found it exact on this machine (`measure`: run
        the check now, as `hasten check` does; else use a cached result): with MKL, rows of a
        float32 matmul depend on how many rows share the call, so it is usually not exact, and
        SDPA is faster."""
        b = self.backbone
        if not hasattr(b, "exact") or b.dtype != torch.float32:
            return  # the generic adapter has one attention path; half precision is exact already
        if measure:
            b.exact, self._exactness = True, None
            b.exact = self.exactness().exact
        else:
            checked = read_cached(self._exactness_file(exact=True))
            b.exact = bool(checked and checked.exact)
        self._exactness = None  # from now on: the mode in force

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 256, chat: bool | None = None,
               system: str | None = None, **options) -> Iterator[str]:
        """Yield text pieces as they are generated (stop tokens are not shown); `options` are
        those of `generate_ids` (sampling, draft, tree_size, typical)."""
        detok = Detokenizer(self.tokenizer)
        for token in self.generate_ids(self.encode(prompt, chat, system), max_new_tokens,
                                       **options):
            if token not in self.stop_ids:
                piece = detok.add(token)
                if piece:
                    yield piece
        rest = detok.flush()
        if rest:
            yield rest

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 256, **kwargs) -> str:
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))


def load(model: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "auto",
         runtime: str = "auto", progress: bool = True, weights: str = "auto") -> Model:
    """Load a model by spec: None/"smollm2-135m-instruct" (embedded default), a .gguf file, or a
    Hugging Face folder. `runtime`: "lean" (our Llama-family runtime), "hf" (the generic
    transformers adapter) or "auto" (lean when the architecture allows). `weights`: "dense"
    (every weight dequantized to `dtype`; float32 is the reference) or "compact" (a GGUF's
    Q4_1 / Q8_0 blocks kept as they are and multiplied by weight-only kernels whose weights
    are exactly the file's values; float32 activations, CPU) or "compact-q8" (those blocks,
    each matmul's input rounded to int8 blocks of 32 as llama.cpp does; integer dot
    products, AVX-512 VNNI or AVX2) or "auto" (compact where it computes dense float32's bits, see
    `auto_weights`, else dense). `dtype="auto"` (the default) with `weights="auto"`: the
    fastest plan that is exact on this machine (`hasten.plans`; measured once, then cached);
    with weights named, float32 activations (the reference for dense weights)."""
    if isinstance(dtype, str) and dtype == "auto":
        if weights != "auto":
            dtype = "float32"  # the weights were chosen; compact plans compute in float32
        else:
            return _load_auto(model, device, runtime, progress)
    if weights == "auto":
        weights = auto_weights(model, device, dtype, runtime, progress)
    loaded = load_backbone(model, device, dtype, runtime, progress, weights)
    result = Model(loaded.backbone, loaded.tokenizer, loaded.name, loaded.max_positions,
                   loaded.stop_ids, folder=loaded.folder)
    if weights in ("compact", "compact-q8"):
        # Other kernels than the dense model's: measurements are cached under their own name,
        # and the attention choice is measured (seconds, once per machine) rather than guessed.
        from .models.quant_kernels import kernel_name
        result.fingerprint += f"-{weights}-{kernel_name()}"
        result.choose_attention(measure=read_cached(result._exactness_file(exact=True)) is None)
        result.plan = weights
    elif _dense_on_kernels(result):
        result.choose_attention(measure=read_cached(result._exactness_file(exact=True)) is None)
        result.plan = "float32"
    else:
        result.choose_attention()
        result.plan = str(result.backbone.dtype).removeprefix("torch.")
    return result


def auto_weights(spec: str | None, device: str, dtype: str | torch.dtype, runtime: str,
                 progress: bool = True) -> str:
    """What `weights="auto"` loads: "compact" for float32 on the CPU from a Llama-family GGUF
    where the vector kernels run (AVX-512 or AVX2), else "dense". There compact computes dense float32's bits
    exactly: the same tile code sums each output in the same order over the same weights
    (the file's blocks dequantized in registers, exactly as the converter dequantizes them),
    and leftover tensor types run the dense kernel itself. So it changes no token, and reads
    96 MB of weights per step instead of 540 for the default model."""
    from .models.compact import kernels_fit
    from .models.config import LlamaConfig
    from .models.loader import parse_device, parse_dtype
    from .models.sources import resolve_model
    if parse_dtype(dtype) != torch.float32 or parse_device(device).type != "cpu" or runtime == "hf":
        return "dense"
    resolved = resolve_model(spec, progress=progress)
    if resolved.gguf is None or not resolved.lean:
        return "dense"
    # Where dense float32 would not run on the kernels (MKL: other bits), neither may compact.
    cfg = LlamaConfig.from_hf_dict(json.loads((resolved.folder / "config.json").read_text()))
    return "compact" if kernels_fit(cfg) else "dense"


def _dense_on_kernels(model: Model) -> bool:
    """Dense float32 on a CPU with the vector kernels: run it on them (`compact.dense_on_kernels`),
    whose rows do not depend on the row count, so speculation is exact where MKL's is not
    (and few-row steps are faster). HASTEN_NO_KERNELS=1 keeps MKL."""
    from .models.compact import can_run_dense_on_kernels, dense_on_kernels
    from .models.quant_kernels import kernel_name
    if not can_run_dense_on_kernels(model.backbone):
        return False
    dense_on_kernels(model.backbone)
    model.fingerprint += f"-kernels-{kernel_name()}"  # other bits: measured under their own name
    return True


def _load_auto(spec: str | None, device: str, runtime: str, progress: bool) -> Model:
    """The plan cached for this model and machine, or every candidate measured now (under a
    minute, once) and the fastest exact one kept. On a CPU only a GGUF on the lean runtime
    has plans to choose from (compact, compact-q8); other models load in float32, as dense
    half precision's plain step was slower than float32's on every CPU measured (AMD EPYC,
    Intel Ice Lake, Xeon with AMX: per-op overhead, not bandwidth, sets its pace)."""
    from .models.sources import resolve_model
    from .plans import candidates, choice_file, measure_plan, plan_args, read_choice, save_choice

    resolved = resolve_model(spec, progress=progress)
    device = str(parse_device(device))
    lean = resolved.lean and runtime != "hf"
    if device == "cpu" and not (resolved.gguf is not None and lean):
        return load(spec, device=device, dtype="float32", runtime=runtime, progress=progress)
    path = choice_file(resolved.folder.name, device, runtime)
    plan = read_choice(path)
    if plan is None:
        plans = [p for p in candidates(resolved.gguf is not None, lean, device)
                 if not p.startswith("compact") or device == "cpu"]
        print(f"hasten: --dtype auto: measuring {', '.join(plans)} on this machine (once)...",
              file=sys.stderr, flush=True)
        entries = {p: measure_plan(load, spec, p, device, runtime)[1] for p in plans}
        plan = save_choice(path, entries)
        print(f"hasten: --dtype auto chose {plan}", file=sys.stderr, flush=True)
    return load(spec, device=device, runtime=runtime, progress=progress, **plan_args(plan))
