"""Turn a Llama-family GGUF file (llama.cpp's format) into a Hugging Face config and weights.

GGUF keeps the hyper-parameters as `<arch>.*` metadata and the weights under llama.cpp's own
names, often quantized. This module reads both with the `gguf` package, dequantizes with
`gguf.quants.dequantize` (we write no dequantizer of our own), renames tensors to Hugging
Face names, and undoes the one layout change llama.cpp's converter makes: for Llama (and
Mistral, which llama.cpp also calls "llama") it permutes the rows of q_proj/k_proj so RoPE can
rotate adjacent pairs. Qwen2 is stored unpermuted.

Every problem a user can fix (not a GGUF, truncated, unsupported architecture or quant
type) surfaces as `ModelSourceError` naming the problem and the way out.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelSourceError
from ..paths import write_json

# GGUF `general.architecture` values the lean runtime implements; they map to HF model_type.
LLAMA_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# Architectures whose q/k rows llama.cpp permutes for its RoPE layout.
PERMUTED_ARCHS = ("llama", "mistral")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

# llama.cpp tensor names -> Hugging Face names (per layer, then global).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+: per-frequency divisors instead of config keys


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` for `path`, after checking it is a complete GGUF file."""
    import gguf

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelSourceError(f"{path} is not a GGUF file (it does not start with the bytes "
                               "'GGUF'); pass a .gguf file or a Hugging Face model folder")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, ... on damaged headers
        raise ModelSourceError(f"{path} is a damaged or truncated GGUF file ({exc}); "
                               "download or copy it again") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        # memmap slicing silently shortens a tensor that runs past the end; check explicitly.
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ModelSourceError(
                f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                f"{t.data_offset + t.n_bytes:,} but the file has {size:,}; "
                "download or copy it again")
    return reader


@dataclass(frozen=True)
class IndexedTensor:
    """A tensor of a GGUF file as `gguf.ReaderTensor` describes it (the attributes our loaders
    read), its data a read-only map of the file."""
    name: str
    tensor_type: "gguf.GGMLQuantizationType"  # noqa: F821
    shape: tuple[int, ...]
    data: np.ndarray


def gguf_tensors(path: str | Path, cache_dir: Path) -> tuple[str, list[IndexedTensor]]:
    """(architecture, tensors) of a GGUF file. The gguf reader parses every metadata field,
    the tokenizer's 100k strings included (3.6 s for the default model), to reach the
    tensors; so where and how each tensor lies is kept in `cache_dir`, keyed by the file's
    path, size and modification time, and later loads map the data directly."""
    import gguf

    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    index_file = cache_dir / f"{key}.json"
    index = None
    if index_file.exists():
        try:
            index = json.loads(index_file.read_text())
        except ValueError:
            index = None  # unreadable: parse the file again
    if index is None:
        reader = open_gguf(path)
        index = {"architecture": architecture(reader), "tensors": [
            {"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in t.shape],
             "offset": int(t.data_offset), "dtype": t.data.dtype.str,
             "data_shape": list(t.data.shape)} for t in reader.tensors]}
        write_json(index_file, index)
    tensors = [IndexedTensor(t["name"], gguf.GGMLQuantizationType(t["type"]), tuple(t["shape"]),
                             np.memmap(path, dtype=np.dtype(t["dtype"]), mode="r",
                                       offset=t["offset"], shape=tuple(t["data_shape"])))
               for t in index["tensors"]]
    return index["architecture"], tensors


def field(reader, key: str, default=None):
    """The value of metadata `key` (scalars unwrapped), or `default` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture(reader) -> str:
    return field(reader, "general.architecture", "unknown")


def convert_gguf_weights(reader, progress: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config.json dict, float32 HF-named state dict) of a Llama-family GGUF reader."""
    arch = architecture(reader)
    if arch not in LLAMA_ARCHS:
        raise ModelSourceError(f"GGUF architecture {arch!r} is not Llama-family "
                               f"({', '.join(LLAMA_ARCHS)}); the lean converter cannot read it")
    _check_tensor_types(reader)
    config = gguf_config(reader)
    weights = {}
    for t in _progress(reader.tensors, progress):
        if t.name == _ROPE_FREQS:
            continue  # folded into config["rope_scaling"] by gguf_config
        name = hf_tensor_name(t.name)
        w = _dequantize(t)
        if arch in PERMUTED_ARCHS and name.startswith("model.layers."):
            if ".q_proj." in name:
                w = unpermute_rope_rows(w, config["num_attention_heads"])
            elif ".k_proj." in name:
                w = unpermute_rope_rows(w, config["num_key_value_heads"])
        weights[name] = w
    return config, weights


def gguf_config(reader) -> dict:
    """A Hugging Face `config.json` dict from the GGUF metadata of a Llama-family model."""
    arch = architecture(reader)

    def meta(key, default=None):
        return field(reader, f"{arch}.{key}", default)

    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    if heads is None or hidden is None or meta("block_count") is None:
        raise ModelSourceError(f"GGUF metadata lacks {arch}.attention.head_count, "
                               "embedding_length or block_count; the file is incomplete")
    head_dim = meta("attention.key_length") or hidden // heads
    rope_dim = meta("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ModelSourceError(f"partial rotary embeddings ({rope_dim} of {head_dim} dims) are not "
                               "supported by the lean runtime; use a Hugging Face folder instead")
    names = {t.name for t in reader.tensors}
    config = {
        "model_type": LLAMA_ARCHS[arch],
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[LLAMA_ARCHS[arch]]],
        "vocab_size": _vocab_size(reader, arch),
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "rms_norm_eps": _clean_float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _clean_float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": meta("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(reader),
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    scaling = _rope_scaling(reader, arch, config)
    if scaling:
        config["rope_scaling"] = scaling
    return config


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (and the globals)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m[2] in _LAYER_NAMES:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m[1] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m[1]]}.{m[2]}"
    raise ModelSourceError(f"GGUF tensor {gguf_name!r} has no Llama-family counterpart; this file "
                           "needs a Hugging Face folder or the generic adapter (--runtime hf)")


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's `reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)` on q/k rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's converter does to HF q/k rows (tests use it to write GGUF files)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- helpers ---------------------------------------------------------------------------------

def _check_tensor_types(reader) -> None:
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ModelSourceError(
                f"tensor {t.name!r} is stored as {t.tensor_type.name}, which the converter does "
                f"not read (supported: {', '.join(SUPPORTED_TYPES)}); use a GGUF quantized to one "
                "of those (Q8_0, Q4_K_M, Q6_K, ...) or a Hugging Face folder")


def _dequantize(t) -> torch.Tensor:
    from gguf.quants import dequantize

    arr = dequantize(t.data, t.tensor_type)
    # GGUF lists dims fastest-first; numpy/torch want them slowest-first.
    arr = np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    if not arr.flags.writeable:  # F32 comes back as a read-only view of the memory map
        arr = arr.copy()
    return torch.from_numpy(arr)


def _progress(tensors, enabled: bool):
    if not enabled:
        return tensors
    import sys

    from tqdm import tqdm
    return tqdm(tensors, desc="dequantizing", unit="tensor", file=sys.stderr, leave=False)


def _vocab_size(reader, arch: str) -> int:
    size = field(reader, f"{arch}.vocab_size")
    if size is None and "tokenizer.ggml.tokens" in reader.fields:
        size = len(reader.fields["tokenizer.ggml.tokens"].data)
    if size is None:
        embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
        size = int(embed.shape[-1])
    return int(size)


def _eos_ids(reader):
    # Chat models often end a turn with an "end of turn" token distinct from eos: stop on both.
    ids = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else (ids or None)


def _clean_float(x: float) -> float:
    """GGUF stores float32; 9.99999974e-06 reads better (and compares equal) as 1e-05."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _rope_scaling(reader, arch: str, config: dict) -> dict | None:
    kind = field(reader, f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": float(field(reader, f"{arch}.rope.scaling.factor"))}
        original = field(reader, f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none"):
        raise ModelSourceError(f"RoPE scaling {kind!r} in this GGUF is not supported by the lean "
                               "runtime; use a Hugging Face folder and the generic adapter")
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if freqs is None:
        return None
    return llama3_scaling_from_factors(_dequantize(freqs).double(), config["rope_theta"],
                                       config["head_dim"])


def llama3_scaling_from_factors(factors: torch.Tensor, theta: float, head_dim: int) -> dict:
    """Recover Llama 3.1's `rope_scaling` from llama.cpp's `rope_freqs` divisors.

    llama.cpp bakes the scaling into one divisor per frequency; the lean runtime takes the
    four HF parameters. Try the values Llama 3.x ships with (and the context length implied
    by the blended band) and keep the one that reproduces the divisors exactly.
    """
    from .config import LlamaConfig
    from .llama import rope_inv_freq

    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor = float(factors.max())
    candidates = [8192, 4096, 2048, 16384, 32768, 131072]
    # In the blended band: 1/f = (1 - s)/factor + s with s = (ctx/wavelen - low)/(high - low).
    s = (1 / factors - 1 / factor) / (1 - 1 / factor) if factor > 1 else factors * 0
    wavelen = 2 * math.pi / inv_freq
    band = (s > 1e-3) & (s < 1 - 1e-3)
    candidates += [int(round(float(x))) for x in (wavelen * (3 * s + 1))[band]]
    for ctx in dict.fromkeys(candidates):
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": ctx}
        cfg = LlamaConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                          num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta,
                          rope_scaling=scaling)
        ours, _ = rope_inv_freq(cfg)
        if torch.allclose(inv_freq / ours, factors, rtol=1e-4):
            return scaling
    raise ModelSourceError("this GGUF's rope_freqs tensor matches no Llama 3 RoPE scaling the "
                           "lean runtime knows; use a Hugging Face folder instead")
