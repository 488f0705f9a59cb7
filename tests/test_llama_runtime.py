import pytest
import torch

from hasten.errors import ContextFullError
from hasten.models.llama import causal_mask
from tiny import tiny_pair

CONFIGS = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"num_kv_heads": 4}),  # plain multi-head attention
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("qwen2", {}),
    ("mistral", {}),
]


@pytest.mark.parametrize("model_type,overrides", CONFIGS)
def test_logits_match_transformers_float64(model_type, overrides):
    ours, ref = tiny_pair(model_type, **overrides)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    ours.reset(batch_size=2, capacity=64)
    got = ours.forward(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_incremental_decoding_matches_full_pass():
    ours, ref = tiny_pair()
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    ours.reset(capacity=64)
    chunks = [ours.forward(ids[:, :10]).logits]
    ours.commit()
    for i in range(10, 30, 5):  # multi-token steps against a non-empty cache
        chunks.append(ours.forward(ids[:, i:i + 5]).logits)
        ours.commit()
    torch.testing.assert_close(torch.cat(chunks, dim=1), want, rtol=1e-6, atol=1e-6)


def test_a_cache_made_under_inference_mode_is_replaced_outside_it():
    """Measurements (exactness, cost curves) run under inference_mode and leave the cache
    allocated there; a later forward outside it must not fail writing it ("Inplace update to
    inference tensor outside InferenceMode"), however the measurements were cached."""
    ours, _ = tiny_pair()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours.reset(capacity=64)
        want = ours.forward(ids).logits.clone()
    ours.reset(capacity=32)  # smaller than the allocation: it would have been reused
    assert not ours._k.is_inference()
    with torch.no_grad():
        assert torch.equal(ours.forward(ids).logits, want)
    with torch.inference_mode():  # and inside it, the allocation is reused as before
        ours.reset(capacity=16)
        kept = ours._k
        ours.reset(capacity=16)
        assert ours._k is kept


def test_commit_with_arbitrary_keep_indices_equals_recompute():
    """Verify a batch of candidates, keep a scattered subset, then check the next logits
    against a fresh pass over the prefix + kept tokens."""
    ours, _ = tiny_pair()
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 97, (1, 12), generator=gen)
    cand = torch.randint(0, 97, (1, 8), generator=gen)
    for keep in ([0, 2, 5], [1], [], [7, 3], list(range(8))):
        ours.reset(capacity=64)
        ours.forward(prefix)
        ours.commit()
        # candidates all at the next position each, seeing only the past (a depth-1 tree)
        past = ours.length
        mask = torch.cat([torch.ones(8, past, dtype=torch.bool), torch.eye(8, dtype=torch.bool)], 1)
        pos = torch.full((1, 8), past)
        ours.forward(cand, positions=pos, mask=mask[None])
        kept = torch.tensor(keep, dtype=torch.long)
        ours.commit(kept)
        # Positions of kept entries were all `past`: rebuild what a fresh model should see.
        nxt = torch.tensor([[5]])
        got = ours.forward(nxt, positions=torch.tensor([[past + 1]])).logits
        ours.reset(capacity=64)
        ours.forward(prefix)
        ours.commit()
        if keep:
            ours.forward(cand[:, kept], positions=torch.full((1, len(keep)), past),
                         mask=torch.cat([torch.ones(len(keep), past, dtype=torch.bool),
                                         torch.eye(len(keep), dtype=torch.bool)], 1)[None])
            ours.commit()
        want = ours.forward(nxt, positions=torch.tensor([[past + 1]])).logits
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_commit_of_a_chain_prefix_matches_plain_decoding():
    ours, ref = tiny_pair()
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids).logits[:, -1]
    ours.reset(capacity=64)
    ours.forward(ids[:, :10])
    ours.commit()
    ours.forward(torch.cat([ids[:, 10:16], torch.tensor([[3, 3, 3]])], 1))  # 6 right, 3 wrong
    ours.commit(torch.arange(6))
    got = ours.forward(ids[:, 16:]).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_causal_mask_shape_and_content():
    m = causal_mask(2, 3)
    assert m.tolist() == [[True, True, True, False, False],
                          [True, True, True, True, False],
                          [True, True, True, True, True]]


def test_context_full_raises_clear_error():
    ours, _ = tiny_pair()
    ours.reset(capacity=16)
    ours.forward(torch.zeros(1, 10, dtype=torch.long))
    ours.commit()
    with pytest.raises(ContextFullError, match="capacity 16"):
        ours.forward(torch.zeros(1, 7, dtype=torch.long))
    assert ours.length == 10  # nothing half-written was committed


def test_float32_and_bfloat16_run_close_to_float64():
    ours64, ref = tiny_pair()
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        from hasten.models.llama import build_llama
        m = build_llama(ours64.config, ref.state_dict(), dtype=dtype)
        m.reset(capacity=32)
        got = m.forward(ids).logits.double()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_a_model_shell_is_built_without_random_init():
    """Loaders fill a shell built on the meta device; a random init there would import
    torch._dynamo (1.6 s of every load). In a fresh process, so nothing else imported it."""
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "from hasten.models.config import LlamaConfig\n"
            "from hasten.models.llama import LlamaModel\n"
            "cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=56, num_layers=2,"
            " num_heads=4, num_kv_heads=2, head_dim=8)\n"
            "with torch.device('meta'):\n"
            "    model = LlamaModel(cfg)\n"
            "assert model.embed.weight.is_meta\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
