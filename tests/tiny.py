"""Tiny random Llama-family models, built in the test: our runtime and the transformers reference
share the same weights, so any difference is a bug in one of them."""

from __future__ import annotations

import string

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from hasten.models.config import LlamaConfig
from hasten.models.llama import build_llama


def tiny_config(model_type: str = "llama", **overrides) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=56, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                max_position_embeddings=256, tie_word_embeddings=False, model_type=model_type,
                attention_bias=model_type == "qwen2", bos_token_id=1, eos_token_ids=(2,))
    base.update(overrides)
    return LlamaConfig(**base)


def hf_reference(cfg: LlamaConfig, seed: int = 0, dtype=torch.float64):
    """A randomly initialised transformers model for `cfg` (biases randomised too)."""
    torch.manual_seed(seed)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def tiny_pair(model_type: str = "llama", dtype=torch.float64, seed: int = 0, **overrides):
    """(our LlamaModel, transformers model) with identical weights."""
    cfg = tiny_config(model_type, **overrides)
    ref = hf_reference(cfg, seed, dtype)
    ours = build_llama(cfg, ref.state_dict(), dtype=dtype)
    return ours, ref


SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer(extra: tuple[str, ...] = ()) -> transformers.PreTrainedTokenizerFast:
    """One token per printable ASCII character, ChatML's special tokens and template, and
    `extra` added tokens (matched before characters: with "ab" added, the ids of "a", "b" do
    not round-trip)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    fast.chat_template = CHATML
    if extra:
        fast.add_tokens(list(extra))
    return fast
