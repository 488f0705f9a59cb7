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
from collections.abc import Iterator
from pathlib import Path

import torch

from .decoding.budget import AdaptiveBudget, CalibratedBudget, CostCurve, cached_cost_curve
from .decoding.engine import generate_speculative
from .decoding.generate import GenerationStats, generate_plain
from .decoding.sampling import SamplingParams
from .drafters import make_drafter
from .errors import HastenError
from .models.backbone import Backbone
from .models.config import LlamaConfig
from .models.hf_adapter import HFBackbone
from .models.llama import build_llama
from .models.sources import cache_root, load_tokenizer, load_weights, resolve_model

# Upper bound on draft nodes per step; the measured verify costs pick the size actually used
# (a CPU settles on a few nodes, a GPU, where 64 tokens cost about what one does, on many).
MAX_TREE_SIZE = 64

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise HastenError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HastenError("--device cuda was asked for but this torch build sees no CUDA GPU; "
                          "use --device cpu")
    return device


class Detokenizer:
    """Turns a growing list of token ids into text pieces, holding back incomplete characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


class Model:
    def __init__(self, backbone: Backbone, tokenizer, name: str, max_positions: int,
                 stop_ids: tuple[int, ...], folder: Path | None = None):
        self.backbone = backbone
        self.folder = folder  # the resolved Hugging Face-format folder the weights came from
        # Identifies the weights in cache keys: cache entries are named by content hash.
        self.fingerprint = folder.name if folder else name
        self._cost_curve: CostCurve | None = None
        self.tokenizer = tokenizer
        self.name = name
        self.max_positions = max_positions
        self.stop_ids = stop_ids
        self.last_stats = GenerationStats()

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
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 256,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None, draft=None, tree_size: int | None = None,
                     typical: bool = False, ignore_eos: bool = False) -> Iterator[int]:
        """New token ids, streamed. `draft`: None (plain decoding), a drafter name ("lookup",
        "model", "medusa"; "rest" needs `make_drafter(..., datastore=...)`) or a drafter
        object. `tree_size`: draft nodes per step; None = chosen for this hardware from
        measured verify costs. `typical`: Medusa's lossy acceptance (opt-in). `ignore_eos`:
        always generate `max_new_tokens` (benchmarks: the same work for every method)."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        self.last_stats = GenerationStats()
        stop_ids = () if ignore_eos else self.stop_ids
        if isinstance(draft, str):
            draft = make_drafter(draft, self)
        if draft is None:
            return generate_plain(self.backbone, prompt_ids, max_new_tokens, params, stop_ids,
                                  generator, self.max_positions, self.last_stats)
        adaptive = None
        if tree_size is None and getattr(draft, "expected_lengths", None):
            # A static tree with measured expected lengths (Medusa): its size is picked from
            # them and the verify costs, corrected each step by how the drafts actually do.
            adaptive = CalibratedBudget(self.cost_curve(), draft.expected_lengths, MAX_TREE_SIZE)
        elif tree_size is None:
            adaptive = AdaptiveBudget(self.cost_curve(), MAX_TREE_SIZE)
        return generate_speculative(self.backbone, draft, prompt_ids, max_new_tokens, params,
                                    stop_ids, generator, self.max_positions,
                                    MAX_TREE_SIZE if tree_size is None else tree_size, typical,
                                    adaptive, self.last_stats)

    def cost_curve(self) -> CostCurve:
        """Verify cost per tree size on this model/device/dtype, measured once and cached."""
        if self._cost_curve is None:
            b = self.backbone
            key = (f"v4-{self.fingerprint}-{type(b).__name__}-{b.device.type}-"
                   f"{str(b.dtype).removeprefix('torch.')}-t{torch.get_num_threads()}")
            self._cost_curve = cached_cost_curve(b, key, cache_root() / "costs")
        return self._cost_curve

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 256, chat: bool | None = None,
               system: str | None = None, **options) -> Iterator[str]:
        """Yield text pieces as they are generated (stop tokens are not shown); `options` are
        those of `generate_ids` (sampling, draft, tree_size, typical)."""
        detok = Detokenizer(self.tokenizer)
        for token in self.generate_ids(self.encode(prompt, chat, system), max_new_tokens,
                                       **options):
            if token not in self.stop_ids:
                yield detok.add(token)

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 256, **kwargs) -> str:
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))


def load(model: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32",
         runtime: str = "auto", progress: bool = True) -> Model:
    """Load a model by spec: None/"smollm2-135m-instruct" (embedded default), a .gguf file, or a
    Hugging Face folder. `runtime`: "lean" (our Llama-family runtime), "hf" (the generic
    transformers adapter) or "auto" (lean when the architecture allows)."""
    if runtime not in ("auto", "lean", "hf"):
        raise HastenError(f"unknown runtime {runtime!r}; choose auto, lean or hf")
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    resolved = resolve_model(model, progress=progress)
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
    return Model(backbone, tokenizer, resolved.name, max_positions, stop_ids(config, tokenizer),
                 folder=resolved.folder)


def stop_ids(config: dict, tokenizer) -> tuple[int, ...]:
    """EOS ids from the model config and the tokenizer (chat models often end turns with both)."""
    ids = config.get("eos_token_id")
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
