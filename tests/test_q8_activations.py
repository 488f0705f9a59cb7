"""Compact weights with activations rounded to int8 blocks (`--weights compact-q8`, llama.cpp's
numerics): the kernel's layout holds exactly the file's weights, its products are the exact
dot products of those weights with the rounded activations (up to float32 rounding), its rows
do not depend on the row count, and a model on it decodes exactly under speculation."""

import pytest
import torch

import hasten
import hasten.plans
from hasten.decoding.exactness import check_exactness
from hasten.models import quant_kernels as qk
from hasten.models.compact import Q8Dense, QuantDense
from hasten.models.loader import load_backbone
from hasten.plans import plan_args
from test_compact import cache, file_blocks, kernel, tiny_gguf  # noqa: F401 (fixtures)

# K from 1 block to 48 (the default model's widths among them).
WIDTHS = [32, 96, 224, 576, 1536]


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x with each row's blocks of 32 rounded as the kernel rounds them: d = max|x| / 127,
    q = round-half-even(x * (1 / d)), back to q * d (float64, so nothing else rounds)."""
    b = x.reshape(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(b * inv).clamp(-127, 127)
    return (q.double() * d.double()).reshape(x.shape)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("k", WIDTHS)
def test_the_packed_layout_holds_the_files_weights(kernel, kind, k):
    blocks, ref = file_blocks(kind, 19, k, seed=k)
    packed = qk.q8_pack(blocks, kind, k)  # 19 rows: a group of 16 and a narrower one of 3
    assert packed.shape == blocks.shape and not torch.equal(packed, blocks)  # the same bytes, moved
    assert torch.equal(qk.q8_unpack(packed, kind, k), ref)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("k", WIDTHS)
def test_products_are_the_rounded_activations_dot_the_files_weights(kernel, kind, k):
    blocks, ref = file_blocks(kind, 45, k, seed=k + 1)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(k)) * 3
    x[0, :32] = 0  # an all-zero block: scale 0
    y = qk.q8_matmul(x, qk.q8_pack(blocks, kind, k), kind)
    exact = rounded(x) @ ref.double().t()
    scale = exact.abs().max()
    assert (y.double() - exact).abs().max() / scale < 2e-6
    # ...and the activations really were rounded: float32 ones give visibly other products.
    assert (y.double() - x.double() @ ref.double().t()).abs().max() / scale > 1e-4


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_rows_do_not_depend_on_the_row_count(kernel, kind):
    blocks, _ = file_blocks(kind, 150, 576, seed=5)
    packed = qk.q8_pack(blocks, kind, 576)
    x = torch.randn(37, 576, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([qk.q8_matmul(x[i:i + 1], packed, kind) for i in range(37)])
    for m in (2, 3, 4, 5, 8, 9, 17, 37):
        assert torch.equal(qk.q8_matmul(x[:m], packed, kind), alone[:m]), m


def test_threads_change_no_bit(kernel):
    blocks, _ = file_blocks("Q4_1", 512, 1536, seed=6)
    packed = qk.q8_pack(blocks, "Q4_1", 1536)
    x = torch.randn(9, 1536, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = qk.q8_matmul(x, packed, "Q4_1")
        torch.set_num_threads(2)
        assert torch.equal(qk.q8_matmul(x, packed, "Q4_1"), one)
    finally:
        torch.set_num_threads(before)


def test_a_compact_q8_model_rounds_its_matmuls_and_decodes_exactly(tmp_path, cache, kernel):
    _, path = tiny_gguf(tmp_path)
    q8 = load_backbone(str(path), weights="compact-q8").backbone
    f32 = load_backbone(str(path), weights="compact").backbone
    assert all(type(b.wqkv) is Q8Dense and type(b.w_down) is Q8Dense for b in q8.blocks)
    assert type(q8.lm_head) is Q8Dense and type(f32.lm_head) is QuantDense
    assert torch.equal(q8.blocks[0].w_gate_up.weight, f32.blocks[0].w_gate_up.weight)
    ids = torch.randint(0, q8.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    for m in (q8, f32):
        m.reset(capacity=64)
    a, b = q8.forward(ids).logits, f32.forward(ids).logits
    assert not torch.equal(a, b)  # other numerics...
    torch.testing.assert_close(a, b, rtol=0.1, atol=0.1)  # ...of the same model
    result = check_exactness(q8, trials=4)
    assert result.exact, result.why


def test_load_compact_q8_greedy_lookup_equals_plain(tmp_path, cache, kernel):
    _, path = tiny_gguf(tmp_path)
    model = hasten.load(str(path), weights="compact-q8", progress=False)
    assert model.plan == "compact-q8" and model.backbone.exact
    assert model.fingerprint.endswith("-compact-q8-" + qk.kernel_name())
    ids = model.encode("hello hello hello", chat=False)
    plain = list(model.generate_ids(ids, 24, ignore_eos=True))
    assert list(model.generate_ids(ids, 24, ignore_eos=True, draft="lookup", tree_size=4)) == plain
    assert plan_args("compact-q8") == {"dtype": "float32", "weights": "compact-q8"}


def test_compact_q8_says_what_to_do_where_the_kernel_cannot_be_built(tmp_path, cache, monkeypatch):
    from hasten.errors import HastenError
    _, path = tiny_gguf(tmp_path)
    monkeypatch.setattr(qk, "kernel_module", lambda: None)
    with pytest.raises(HastenError, match="use --weights compact"):
        load_backbone(str(path), weights="compact-q8")
    assert "compact-q8" not in hasten.plans.candidates(has_gguf=True, lean=True)



def test_compact_q8_keeps_a_float16_cache_and_stays_exact(tmp_path, cache, kernel):
    """compact-q8 stores K/V in float16 where the compiled attention reads it (head size 32
    here): the cache is half precision, speculative decoding still gives plain decoding's tokens,
    tree nodes are bit-identical to plain steps, and a batch row gets its solo logits bit for
    bit. A head size without the register-resident loop (16) keeps float32."""
    from hasten.decoding.batched import BatchedDecoder
    from hasten.models.compact import half_cache_fits
    cfg, path = tiny_gguf(tmp_path, head_dim=32, num_heads=4, num_kv_heads=2)
    assert half_cache_fits(cfg)
    if kernel.simd() == "avx512":  # its register-resident loop has no head size 16 (AVX2's has)
        assert not half_cache_fits(cfg.__class__(**{**vars(cfg), "head_dim": 16}))
    model = hasten.load(str(path), weights="compact-q8", progress=False)
    b = model.backbone
    assert b.kv_dtype == torch.float16 and b.exact
    ids = model.encode("hello hello hello", chat=False)
    plain = list(model.generate_ids(ids, 24, ignore_eos=True))
    assert b._k.dtype == torch.float16  # noqa: SLF001
    assert list(model.generate_ids(ids, 24, ignore_eos=True, draft="lookup", tree_size=4)) == plain
    result = check_exactness(b, trials=4)
    assert result.exact, result.why
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (9, 17)]
    decoder = BatchedDecoder(b, 2, 128)
    assert decoder.k.dtype == torch.float16
    seqs = [decoder.add(p) for p in prompts]
    logits, _, _ = decoder._forward(decoder._layout([None, None]))  # noqa: SLF001
    for r, (p, seq) in enumerate(zip(prompts, seqs)):
        b.reset(1, 128)
        b.forward(torch.tensor([p]))
        b.commit()
        assert torch.equal(logits[r], b.forward(torch.tensor([[seq.tokens[0]]])).logits[0, -1]), r


def test_attention_over_a_float16_cache_equals_the_same_values_in_float32(kernel):
    """The compiled attention converts float16 keys and values exactly: the same bits as over a
    float32 cache holding the same (rounded) values, split parts included (> 512 keys)."""
    if not qk.vector_kernels():
        pytest.skip("a float16 cache needs the vector kernels (AVX-512 or AVX2)")
    g = torch.Generator().manual_seed(4)
    heads, kv, d, cap = 9, 3, 64, 1400
    k, v = (torch.randn(kv, cap, d, generator=g).half() for _ in range(2))
    for t, n in ((1, 100), (3, 1300)):
        q = torch.randn(heads, t, d, generator=g)
        slots = torch.arange(n).repeat(t, 1).contiguous()
        counts = torch.arange(n - t + 1, n + 1)
        run = lambda kk, vv: qk.kernel_module().logical_attention(  # noqa: E731
            q, kk, vv, slots, counts, d ** -0.5, qk.NO_ROWS)
        assert torch.equal(run(k, v), run(k.float(), v.float())), (t, n)


def test_training_features_come_from_the_decode_kernels(tmp_path, cache, kernel):
    """Drafter training data on compact-q8: each sequence is computed alone on the compiled
    blocks decoding runs, its states bit-identical to token-by-token decoding's, and
    the padded-batch path (other backbones) gives the same states to its own tolerance."""
    from hasten.medusa.data import padded_forward, sequence_states
    cfg, path = tiny_gguf(tmp_path, head_dim=32, num_heads=4, num_kv_heads=2)
    b = hasten.load(str(path), weights="compact-q8", progress=False).backbone
    seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in (9, 30)]
    assert b.prefill_plan(30) is not None  # the solo path is taken
    states = sequence_states(b, seqs)
    padded = padded_forward(b, seqs).hidden
    for s, h, row in zip(seqs, states, padded):
        b.reset(1, 64)
        decoded = []
        for t in s:
            decoded.append(b.forward(torch.tensor([[t]])).hidden[0])
            b.commit()
        assert h.shape == (len(s), cfg.hidden_size)
        assert torch.equal(h, torch.cat(decoded))
        torch.testing.assert_close(row[-len(s):], h, rtol=1e-3, atol=1e-3)
