"""The hyper-parameters of a Llama-family model, read from a Hugging Face `config.json`.

Llama 2/3, Mistral, Qwen2 and SmolLM2 differ only in these numbers (and Qwen2's q/k/v bias),
so one dataclass and one runtime (`llama.py`) serve them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ModelSourceError

# `model_type` values in config.json that the lean runtime implements.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF `rope_scaling` / `rope_parameters` (llama3, linear, ...)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in LLAMA_FAMILY:
            raise ModelSourceError(
                f"model_type {model_type!r} is not a Llama-family model the lean runtime implements "
                f"({', '.join(LLAMA_FAMILY)}); use the generic adapter (--runtime hf) instead"
            )
        heads = d["num_attention_heads"]
        rope = d.get("rope_scaling") or d.get("rope_parameters") or None
        theta = d.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        if rope and rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=dict(rope) if rope else None,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_dict(self) -> dict:
        """A `config.json` that `transformers` reads back into the same model."""
        d = {
            "model_type": self.model_type,
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1
            else (self.eos_token_ids[0] if self.eos_token_ids else None),
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)
