"""The generic adapter against the transformers models it wraps: tiny random Llama, GPT-2
(learned absolute positions) and Gemma 3 (mixed sliding-window and full layers, with a window
shorter than the test sequences so the windowing is exercised), built here in float64."""

import hashlib
import zipfile

import pytest
import torch
import transformers

from hasten.errors import ContextFullError, ModelSourceError
from hasten.models.hf_adapter import HFBackbone
from hasten.models.llama import causal_mask

VOCAB = 97

CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=56,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2),
    # GPT-2 gets larger random weights: at the default scale greedy decoding repeats one token.
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                 n_positions=128, bos_token_id=1, eos_token_id=2, initializer_range=0.5),
    "gemma3_text": dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32,
                        intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, sliding_window=6,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0),
}
KINDS = list(CONFIGS)


def tiny_model(kind: str, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**CONFIGS[kind])
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    with torch.no_grad():  # random norms and biases, so that no weight is trivially neutral
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(torch.float64).eval()


def rand_ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def close(got, want, tol=1e-9):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_full_pass_equals_model_forward(kind, attn):
    model = tiny_model(kind, attn)
    ids = rand_ids(20, seed=1, batch=2)
    with torch.no_grad():
        want = model(ids, output_hidden_states=True)
    bb = HFBackbone(model)
    bb.reset(batch_size=2, capacity=32)
    out = bb.forward(ids)
    close(out.logits, want.logits)
    close(out.hidden, want.hidden_states[-1])
    assert bb.forward(ids, last_only=True).logits.shape == (2, 1, VOCAB)


def test_hidden_is_the_lm_head_input():
    model = tiny_model("llama")
    bb = HFBackbone(model)
    bb.reset(capacity=16)
    out = bb.forward(rand_ids(8, seed=2))
    close(model.lm_head(out.hidden), out.logits)


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoding_equals_full_pass(kind):
    model = tiny_model(kind)
    ids = rand_ids(30, seed=3)
    with torch.no_grad():
        want = model(ids).logits
    bb = HFBackbone(model)
    bb.reset(capacity=64)
    chunks = [bb.forward(ids[:, :10]).logits]
    bb.commit()
    for i in range(10, 30, 5):  # multi-token steps against a non-empty cache, past the window
        chunks.append(bb.forward(ids[:, i:i + 5]).logits)
        bb.commit()
    assert bb.length == 30
    close(torch.cat(chunks, dim=1), want)


def step_over_candidates(bb, prefix, cand, keep):
    """Prefix, then every candidate at the next position seeing only the past (a depth-1
    tree), commit `keep`, and return the logits of one more token."""
    bb.reset(capacity=64)
    bb.forward(prefix)
    bb.commit()
    past, n = bb.length, cand.shape[1]
    mask = torch.cat([torch.ones(n, past, dtype=torch.bool), torch.eye(n, dtype=torch.bool)], 1)
    bb.forward(cand, positions=torch.full((1, n), past), mask=mask[None])
    bb.commit(torch.tensor(keep, dtype=torch.long))
    return bb.forward(torch.tensor([[5]]), positions=torch.tensor([[past + 1]])).logits


@pytest.mark.parametrize("kind", KINDS)
def test_commit_of_scattered_candidates_equals_recompute(kind):
    model = tiny_model(kind)
    bb = HFBackbone(model)
    prefix, cand = rand_ids(12, seed=4), rand_ids(8, seed=5)
    past = prefix.shape[1]
    for keep in ([0, 2, 5], [1], [], [7, 3]):
        got = step_over_candidates(bb, prefix, cand, keep)
        # From scratch: prefix, the kept candidates (all at position `past`, each seeing only
        # the prefix and itself), then the probe token seeing everything.
        k = len(keep)
        ids = torch.cat([prefix, cand[:, keep], torch.tensor([[5]])], dim=1)
        pos = torch.cat([torch.arange(past), torch.full((k,), past), torch.tensor([past + 1])])
        mask = causal_mask(0, past + k + 1)
        mask[past:past + k, past:past + k] = torch.eye(k, dtype=torch.bool)
        bb.reset(capacity=64)
        want = bb.forward(ids, positions=pos[None], mask=mask[None]).logits[:, -1:]
        close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_commit_of_a_chain_prefix_matches_plain_forward(kind):
    model = tiny_model(kind)
    ids = rand_ids(20, seed=6)
    with torch.no_grad():
        want = model(ids).logits[:, -1]
    bb = HFBackbone(model)
    bb.reset(capacity=64)
    bb.forward(ids[:, :10])
    bb.commit()
    bb.forward(torch.cat([ids[:, 10:16], torch.tensor([[3, 3, 3]])], 1))  # 6 right, 3 wrong
    bb.commit(torch.arange(6))
    close(bb.forward(ids[:, 16:]).logits[:, -1], want)


def test_second_forward_without_commit_replaces_the_first():
    model = tiny_model("llama")
    ids = rand_ids(12, seed=7)
    with torch.no_grad():
        want = model(ids).logits[:, -4:]
    bb = HFBackbone(model)
    bb.reset(capacity=32)
    bb.forward(ids[:, :8])
    bb.commit()
    bb.forward(torch.tensor([[9, 9, 9]]))  # rejected outright: never committed
    close(bb.forward(ids[:, 8:]).logits, want)


def test_gpt2_reads_the_given_positions():
    model = tiny_model("gpt2")
    ids = rand_ids(6, seed=8)
    pos = torch.tensor([[10, 11, 12, 12, 13, 20]])
    with torch.no_grad():
        want = model(ids, position_ids=pos).logits
    bb = HFBackbone(model)
    bb.reset(capacity=16)
    got = bb.forward(ids, positions=pos).logits
    close(got, want)
    assert (got - bb.forward(ids).logits).abs().max() > 1e-3  # positions do matter


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_loop_equals_generate(kind):
    model = tiny_model(kind)
    prompt = rand_ids(7, seed=9)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, prompt.shape[1]:]
    bb = HFBackbone(model)
    bb.reset(capacity=64)
    logits = bb.forward(prompt, last_only=True).logits
    bb.commit()
    got = []
    for _ in range(24):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        got.append(int(nxt))
        logits = bb.forward(nxt).logits
        bb.commit()
    assert got == want.tolist()


def test_context_full_raises_clear_error():
    bb = HFBackbone(tiny_model("gpt2"))
    bb.reset(capacity=16)
    bb.forward(rand_ids(10, seed=10))
    bb.commit()
    with pytest.raises(ContextFullError, match="capacity 16"):
        bb.forward(rand_ids(7, seed=11))
    assert bb.length == 10
    assert bb.forward(rand_ids(6, seed=11)).logits.shape == (1, 6, VOCAB)  # what fits, runs
    bb.reset(capacity=200)  # beyond GPT-2's 128 learned positions
    with pytest.raises(ContextFullError, match="128"):
        bb.forward(rand_ids(3, seed=12), positions=torch.tensor([[126, 127, 128]]))


def test_commit_rejects_out_of_range_indices():
    bb = HFBackbone(tiny_model("llama"))
    bb.reset(capacity=16)
    bb.forward(rand_ids(4, seed=13))
    with pytest.raises(IndexError):
        bb.commit(torch.tensor([4]))


# ---- Gemma 3 package assembly, on fake parts (the real ones are 240 MB) --------------------

@pytest.fixture
def fake_gemma_parts(tmp_path, monkeypatch):
    from hasten.models import gemma_package as gp

    chunks = [bytes([k]) * (1000 + k) for k in range(4)]
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gp, "SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    monkeypatch.setattr(gp, "PARTS", [(f"fake-part{k}", f"hasten_fake_part{k}", f"data/m.part0{k}")
                                      for k in range(4)])
    monkeypatch.setattr(gp, "_pip_download", lambda *a: pytest.fail("must not download"))
    return gp, chunks, tmp_path


def test_gemma_gguf_from_installed_parts(fake_gemma_parts, monkeypatch):
    gp, chunks, tmp = fake_gemma_parts
    for (_, module, file), chunk in zip(gp.PARTS, chunks):
        (tmp / "site" / module / "data").mkdir(parents=True)
        (tmp / "site" / module / "__init__.py").write_text("")
        (tmp / "site" / module / file).write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp / "site"))
    path = gp.gemma3_gguf_path(progress=False)
    assert path.read_bytes() == b"".join(chunks)
    assert gp.gemma3_gguf_path(progress=False) == path  # second call: served from the cache


def test_gemma_gguf_from_wheels_and_checksum(fake_gemma_parts):
    gp, chunks, tmp = fake_gemma_parts
    wheels = tmp / "cache" / "downloads" / f"{gp.GEMMA3_MODEL}-wheels"
    wheels.mkdir(parents=True)
    for (_, module, file), chunk in zip(gp.PARTS, chunks):
        with zipfile.ZipFile(wheels / f"{module}-{gp.VERSION}-py3-none-any.whl", "w") as z:
            z.writestr(f"{module}/{file}", chunk)
    good = gp.SHA256
    gp.SHA256 = "0" * 64  # a damaged part: refused, nothing left behind
    with pytest.raises(ModelSourceError, match="SHA-256"):
        gp.gemma3_gguf_path(progress=False)
    assert [p.name for p in (tmp / "cache" / "downloads").iterdir()] == [wheels.name]
    gp.SHA256 = good
    assert gp.gemma3_gguf_path(progress=False).read_bytes() == b"".join(chunks)
    assert not wheels.exists()  # the wheels are dropped once assembled
