"""Compact weights: GGUF Q4_1 / Q8_0 blocks kept in memory, multiplied with exactly the file's
dequantized values; rows that do not depend on how many rows share the call; a compact model
that computes what the float32 reference computes and decodes exactly under speculation."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import hasten
from hasten.errors import HastenError
from hasten.decoding.exactness import check_exactness
from hasten.models import quant_kernels as qk
from hasten.models.compact import QuantDense, QuantEmbedding, build_compact_llama
from hasten.models.llama import Dense
from hasten.models.loader import load_backbone
from test_sources import tiny_model, write_gguf

KINDS = {"Q4_1": Q.Q4_1, "Q8_0": Q.Q8_0}


def file_blocks(kind: str, n: int, k: int, seed: int = 0):
    """(blocks [n, k/32*bytes] as gguf writes them, float32 [n, k] as gguf dequantizes them)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(1e-3, 2, (n, 1))).astype(np.float32)
    blocks = gguf.quants.quantize(w, KINDS[kind])
    ref = np.asarray(gguf.quants.dequantize(blocks, KINDS[kind]), dtype=np.float32)
    return torch.from_numpy(np.array(blocks)), torch.from_numpy(ref.reshape(n, k))


@pytest.fixture(scope="module")
def kernel():
    module = qk.kernel_module()  # built once per machine into the user cache
    if module is None:
        pytest.skip(f"the quantized matmul kernel cannot be built here: {qk.kernel_failure()}")
    return module


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_torch_dequantizer_gives_the_files_values_bit_for_bit(kind):
    blocks, ref = file_blocks(kind, 24, 96)
    assert torch.equal(qk.dequantize_blocks(blocks, kind), ref)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_kernel_weights_are_the_files_values(kernel, kind):
    """One-hot rows read every weight out of the kernel: x = I gives y = W.T exactly."""
    blocks, ref = file_blocks(kind, 40, 128, seed=1)
    assert torch.equal(qk.block_matmul(torch.eye(128), blocks, kind), ref.t())
    assert torch.equal(qk.torch_block_matmul(torch.eye(128), blocks, kind), ref.t())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_kernel_rows_do_not_depend_on_the_row_count(kernel, kind):
    blocks, ref = file_blocks(kind, 72, 160, seed=2)
    x = torch.randn(40, 160, generator=torch.Generator().manual_seed(0))
    alone = torch.cat([qk.block_matmul(x[i:i + 1], blocks, kind) for i in range(40)])
    for m in (2, 3, 7, 8, 9, 16, 17, 33, 40):
        assert torch.equal(qk.block_matmul(x[:m], blocks, kind), alone[:m]), m
    torch.testing.assert_close(alone, x @ ref.t(), rtol=1e-5, atol=1e-4)


# ---- the compact model ------------------------------------------------------------------------

QTYPES = {"attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.Q4_1,
          "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0,
          "output": Q.Q8_0}


def tiny_gguf(tmp_path, qtypes=QTYPES, **overrides):
    overrides = {"hidden_size": 64, "head_dim": 16, "intermediate_size": 96, **overrides}
    cfg, weights = tiny_model(**overrides)
    return cfg, write_gguf(tmp_path / "tiny.gguf", cfg, weights, qtypes=qtypes)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("tied", [False, True])
def test_compact_model_keeps_the_blocks_and_matches_the_reference(tmp_path, cache, kernel, tied):
    cfg, path = tiny_gguf(tmp_path, tie_word_embeddings=tied)
    compact = load_backbone(str(path), weights="compact").backbone
    dense = load_backbone(str(path)).backbone  # the float32 reference: dequantized at conversion
    assert isinstance(compact.embed, QuantEmbedding) and compact.embed.kind == "Q8_0"
    assert all(isinstance(b.wqkv, QuantDense) and b.wqkv.kind == "Q4_1" for b in compact.blocks)
    assert all(b.w_down.kind == "Q8_0" for b in compact.blocks)
    if tied:
        assert compact.lm_head.blocks is compact.embed.blocks  # one copy of the table
    for ours, ref in ((compact.blocks[0].wqkv, dense.blocks[0].wqkv), (compact.lm_head, dense.lm_head),
                      (compact.blocks[1].w_gate_up, dense.blocks[1].w_gate_up)):
        assert torch.equal(ours.weight_t, ref.weight_t)  # q/k rows unpermuted like the converter
    assert compact.compact_summary.dense_weights == 0
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    for m in (compact, dense):
        m.reset(capacity=64)
    torch.testing.assert_close(compact.forward(ids).logits, dense.forward(ids).logits,
                               rtol=1e-4, atol=1e-4)


def test_types_without_a_kernel_are_dequantized_like_the_reference(tmp_path, cache):
    qtypes = {**QTYPES, "attn_k": Q.F16, "ffn_up": Q.Q4_0}
    cfg, path = tiny_gguf(tmp_path, qtypes)
    compact = load_backbone(str(path), weights="compact").backbone
    dense = load_backbone(str(path)).backbone
    block = compact.blocks[0]
    assert isinstance(block.wqkv, Dense) and isinstance(block.w_gate_up, Dense)  # mixed parts
    assert isinstance(block.wo, QuantDense)
    assert torch.equal(block.wqkv.weight_t, dense.blocks[0].wqkv.weight_t)
    s = compact.compact_summary
    assert 0 < s.compact_fraction < 1 and s.kinds["Q4_1"] == cfg.num_layers  # wo only


def test_compact_speculative_verify_is_exact(tmp_path, cache, kernel):
    """Every node of random trees gets the logits plain decoding of its path gets, bit for bit."""
    _, path = tiny_gguf(tmp_path)
    model = load_backbone(str(path), weights="compact").backbone
    result = check_exactness(model, trials=4)
    assert result.exact, result.why


def test_load_compact_greedy_lookup_equals_plain(tmp_path, cache, kernel):
    _, path = tiny_gguf(tmp_path)
    model = hasten.load(str(path), weights="compact", progress=False)
    assert model.backbone.exact  # measured exact, so exact attention is on
    assert model.fingerprint.endswith("-compact-" + qk.kernel_name())
    ids = model.encode("hello hello hello", chat=False)
    plain = list(model.generate_ids(ids, 24, ignore_eos=True))
    assert list(model.generate_ids(ids, 24, ignore_eos=True, draft="lookup", tree_size=4)) == plain


def test_compact_refuses_what_it_cannot_do(tmp_path, cache, tiny_folder):
    with pytest.raises(HastenError, match="GGUF"):
        load_backbone(str(tiny_folder), weights="compact")
    _, path = tiny_gguf(tmp_path)
    with pytest.raises(HastenError, match="float32"):
        load_backbone(str(path), dtype="bfloat16", weights="compact")


@pytest.mark.parametrize("heads,kv,d", [(6, 2, 32), (9, 3, 64), (4, 1, 128)])
def test_logical_attention_depends_on_a_querys_own_keys_only(kernel, heads, kv, d):
    """The compiled float32 attention: one query's output is the same bits alone or among
    others, wherever its keys sit in the cache, and close to softmax(q k) v. Shapes: two with
    a register-resident loop (head sizes 32 and 64, the default model's 9 heads over 3), one
    on the general loop."""
    from hasten.models.exact_attention import plan_keys
    from hasten.models.quant_kernels import logical_attention
    g = torch.Generator().manual_seed(0)
    start, t = 70, 5
    q = torch.randn(1, heads, t, d, generator=g)
    k, v = torch.randn(1, kv, 96, d, generator=g), torch.randn(1, kv, 96, d, generator=g)
    mask = torch.ones(t, start + t, dtype=torch.bool)
    mask[:, start:] = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                                    [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    out = logical_attention(q, k, v, plan_keys(mask, start, t, "cpu", False, True), d ** -0.5)
    for i in range(t):  # query i alone, its keys moved to the front of another cache
        slots = mask[i].nonzero().squeeze(1)
        k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
        k2[:, :, :len(slots)], v2[:, :, :len(slots)] = k[:, :, slots], v[:, :, slots]
        plan = plan_keys(None, len(slots) - 1, 1, "cpu", False, True)
        alone = logical_attention(q[:, :, i:i + 1], k2, v2, plan, d ** -0.5)
        assert torch.equal(alone[0, :, 0], out[0, :, i]), i
        kk = k[0, :, slots].repeat_interleave(heads // kv, 0)
        vv = v[0, :, slots].repeat_interleave(heads // kv, 0)
        want = torch.softmax(q[0, :, i:i + 1] @ kk.transpose(-1, -2) * d ** -0.5, -1) @ vv
        torch.testing.assert_close(out[0, :, i], want[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_logical_attention_weights_are_exact_softmax_over_a_wide_range(kernel, spread):
    """The kernel's own exp (kernels/vector_math.h) against float64 softmax: scores spread over
    ~[-spread * 20, 0] after the max (spread 30: weights from 1 down to below float32's range),
    37 keys (a tail of 5 after two blocks of 16)."""
    from hasten.models.exact_attention import plan_keys
    from hasten.models.quant_kernels import logical_attention
    g = torch.Generator().manual_seed(1)
    heads, kv, d, n = 9, 3, 64, 37
    q = torch.randn(1, heads, 1, d, generator=g) * spread
    k, v = torch.randn(1, kv, n, d, generator=g), torch.randn(1, kv, n, d, generator=g)
    out = logical_attention(q, k, v, plan_keys(None, n - 1, 1, "cpu", False, True), d ** -0.5)
    kk = k[0].double().repeat_interleave(heads // kv, 0)
    vv = v[0].double().repeat_interleave(heads // kv, 0)
    want = torch.softmax(q[0].double() @ kk.transpose(-1, -2) * d ** -0.5, -1) @ vv
    assert (out[0].double() - want).abs().max() < 2e-6


@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_long_key_sequences_split_into_parts_keep_row_invariance(kernel, spread):
    """Queries with more than 512 keys are computed in parts of 512 logical positions (spread
    over the threads) and combined in order: a query gives the same bits alone or beside
    queries with fewer or more keys, and stays within float32 noise of float64 softmax even
    when the parts' maxima differ by hundreds (spread 30)."""
    from hasten.models.exact_attention import plan_keys
    from hasten.models.quant_kernels import logical_attention
    g = torch.Generator().manual_seed(2)
    heads, kv, d, start, t = 9, 3, 64, 1290, 4
    q = torch.randn(1, heads, t, d, generator=g) * spread
    k = torch.randn(1, kv, start + t, d, generator=g)
    v = torch.randn(1, kv, start + t, d, generator=g)
    k[:, :, 600:700] *= 3  # the second part's scores reach higher than the first's
    mask = torch.ones(t, start + t, dtype=torch.bool).tril(diagonal=start)
    mask[0, 300:] = False  # one query with 300 keys: a single part, as before the split
    out = logical_attention(q, k, v, plan_keys(mask, start, t, "cpu", False, True), d ** -0.5)
    for i in range(t):
        slots = mask[i].nonzero().squeeze(1)
        sub = torch.zeros(t, start + t, dtype=torch.bool)
        sub[0] = mask[i]
        alone = logical_attention(q[:, :, i:i + 1], k, v, plan_keys(sub[:1], start + t - 1, 1, "cpu",
                                                                    False, True), d ** -0.5)
        assert torch.equal(alone[0, :, 0], out[0, :, i]), i
        kk = k[0, :, slots].double().repeat_interleave(heads // kv, 0)
        vv = v[0, :, slots].double().repeat_interleave(heads // kv, 0)
        want = torch.softmax(q[0, :, i:i + 1].double() @ kk.transpose(-1, -2) * d ** -0.5, -1) @ vv
        # spread 30: scores of a few hundred, which float32 rounds by ~1e-5 (unsplit: the same)
        assert (out[0, :, i].double() - want[:, 0]).abs().max() < 5e-6 * spread ** 0.5, i


# ---- dense float32 on the same kernels ------------------------------------------------------

def test_dense_float32_kernel_rows_do_not_depend_on_the_row_count(kernel):
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(70, 96, generator=g), torch.randn(65, 96, generator=g)
    y = qk.dense_matmul(x, w)
    assert torch.allclose(y.double(), x.double() @ w.double().t(), atol=1e-4)
    for rows in (1, 2, 3, 4, 5, 9, 17):
        assert torch.equal(qk.dense_matmul(x[:rows], w), y[:rows])


@pytest.mark.parametrize("kind", ["Q4_1", "F32"])
def test_kernels_split_work_across_threads_without_changing_a_bit(kernel, kind):
    """Built with OpenMP (without it at::parallel_for runs serially: 2 threads as slow as 1),
    and each output computed by one thread whole: 1 and 2 threads give the same bits, also
    with a weight prefetched chunk ahead (N > 64 rows a thread, several row tiles)."""
    assert kernel.threaded()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 128, generator=g)
    if kind == "F32":
        w = torch.randn(1000, 128, generator=g)
        run = lambda: qk.dense_matmul(x, w)  # noqa: E731
    else:
        w, _ = file_blocks(kind, 1000, 128, seed=5)
        run = lambda: qk.block_matmul(x, w, kind)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        assert torch.equal(run(), one)
    finally:
        torch.set_num_threads(threads)


def test_dense_float32_runs_on_the_kernels_exactly(tmp_path, cache, kernel):
    """Where the vector kernels build (AVX-512 or AVX2), `load(dtype="float32")` multiplies with them: the same
    function as MKL's float32 (to rounding), measured exact under speculation, so exact
    attention is on and greedy lookup equals plain."""
    from hasten.models.compact import KernelDense
    if not qk.vector_kernels():
        pytest.skip("dense float32 stays on MKL without vector kernels")
    _, path = tiny_gguf(tmp_path, tie_word_embeddings=True)
    model = hasten.load(str(path), weights="dense", progress=False)
    mkl = load_backbone(str(path)).backbone
    b = model.backbone
    assert all(isinstance(getattr(blk, n), KernelDense) for blk in b.blocks
               for n in ("wqkv", "wo", "w_gate_up", "w_down"))
    assert isinstance(b.lm_head, KernelDense) and b.lm_head.w is b.embed.weight  # one table
    assert model.fingerprint.endswith("-kernels-" + qk.kernel_name())
    assert b.exact and model.exactness().exact
    ids = torch.tensor([[5, 9, 11, 40, 3, 7]])
    b.exact = mkl.exact = False  # the same attention on both sides: only the matmuls differ
    with torch.inference_mode():
        b.reset(1, 16), mkl.reset(1, 16)
        assert torch.allclose(b.forward(ids).logits, mkl.forward(ids).logits, atol=1e-4)
    b.exact = True
    prompt = model.encode("hello hello hello", chat=False)
    plain = list(model.generate_ids(prompt, 24, ignore_eos=True))
    assert list(model.generate_ids(prompt, 24, ignore_eos=True, draft="lookup", tree_size=4)) == plain


def test_linear_uses_the_kernel_at_inference_and_torch_under_autograd(kernel):
    """`quant_kernels.linear` (EAGLE's and Medusa's heads): the kernel's rows (independent of
    the row count) at inference, torch's differentiable product when training."""
    from hasten.models.compact import KernelLinear, linears_on_kernels
    g = torch.Generator().manual_seed(6)
    w, x = torch.randn(48, 64, generator=g), torch.randn(5, 64, generator=g)
    with torch.no_grad():
        y = qk.linear(x, w)
    assert torch.allclose(y.double(), x.double() @ w.double().t(), atol=1e-4)
    if qk.vector_kernels():
        assert torch.equal(y, qk.dense_matmul(x, w))
    xr = x.clone().requires_grad_(True)
    qk.linear(xr, w).sum().backward()
    assert torch.allclose(xr.grad, w.sum(0).expand(5, -1))
    net = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(48, 8))
    linears_on_kernels(net)
    assert type(net[0]) is KernelLinear and type(net[1]) is torch.nn.Linear  # biased: as is
    with torch.no_grad():
        assert torch.allclose(net[0](x), x @ net[0].weight.t(), atol=1e-4)


@pytest.mark.parametrize("weights", ["compact", "compact-q8", "dense"])
def test_a_block_in_one_compiled_call_gives_the_python_blocks_bits(tmp_path, cache, kernel,
                                                                   monkeypatch, weights):
    """Prefill, decode and verify steps run every block in one compiled call
    (`run_fused_blocks`), or each block as one (`compact.block_step`, where some block cannot
    join): the same kernels and ops in the same order as the Python block, so the same logits
    bit for bit, compact and dense float32 alike (the batched decoder's use of it is checked
    against solo answers in test_batched_trees)."""
    from hasten.models import compact
    if not qk.vector_kernels():
        pytest.skip("the dense float32 model stays on MKL without vector kernels")
    _, path = tiny_gguf(tmp_path)
    model = hasten.load(str(path), weights=weights, progress=False)
    b = model.backbone
    assert b.exact and b.fused_attention and b.run_blocks is compact.run_fused_blocks
    stacks, blocks = [], []

    def counted(calls, fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls.append(out is not None)
            return out
        return call
    b.run_blocks = counted(stacks, compact.run_fused_blocks)
    monkeypatch.setattr(compact, "block_step", counted(blocks, compact.block_step))
    ids = torch.tensor([[5, 9, 11, 40, 3, 7, 21, 8, 30, 2]])

    def run():
        b.reset(1, 32)
        with torch.inference_mode():
            prompt = b.forward(ids[:, :6]).logits; b.commit()  # a prefill (`prefill_plan`)
            one = b.forward(ids[:, 6:7]).logits; b.commit()  # a plain step
            tree = b.forward(ids[:, 7:10]).logits; b.commit()  # a chain verify
        return prompt, one, tree
    all_at_once = run()
    assert stacks == [True, True, True] and not blocks
    b.run_blocks = None
    one_by_one = run()
    assert len(blocks) == 3 * len(b.blocks)
    monkeypatch.setattr(compact, "fused_layers", lambda block: None)
    python = run()
    for got in (all_at_once, one_by_one):
        assert all(torch.equal(f, p) for f, p in zip(got, python))
    b.run_blocks, stacks[:] = counted(stacks, compact.run_fused_blocks), []
    # A layer the kernel cannot take (as BitDelta's are) swapped in after loading: the cached
    # stack is noticed stale, run_fused_blocks declines and the Python blocks run.
    b.blocks[0].wo = torch.nn.Sequential(b.blocks[0].wo)
    declined = run()
    assert stacks == [False, False, False]
    assert all(torch.equal(f, p) for f, p in zip(declined, python))


@pytest.mark.parametrize("qtypes", [QTYPES, {**QTYPES, "attn_k": Q.F16, "ffn_up": Q.Q4_0}])
def test_auto_weights_are_compact_with_dense_float32s_bits(tmp_path, cache, kernel, qtypes):
    """`weights="auto"` (float32 here: `dtype="auto"`, the default, may pick another plan) loads
    a GGUF's blocks where they compute dense float32's bits exactly, leftover tensor types (F16, Q4_0) on the dense kernel: the same logits bit
    for bit, so the same tokens. Elsewhere (bfloat16, a Hugging Face folder) dense."""
    if not qk.vector_kernels():
        pytest.skip("without vector kernels auto keeps dense float32 (MKL)")
    cfg, path = tiny_gguf(tmp_path, qtypes, tie_word_embeddings=True)
    auto = hasten.load(str(path), dtype="float32", progress=False)
    dense = hasten.load(str(path), weights="dense", progress=False)
    assert auto.plan == "compact" and dense.plan == "float32"
    assert any(isinstance(b.wo, QuantDense) for b in auto.backbone.blocks)
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        outs = []
        for m in (auto, dense):
            m.backbone.reset(1, 64)
            first = m.backbone.forward(ids[:, :20])
            m.backbone.commit()
            outs.append((first.logits, m.backbone.forward(ids[:, 20:]).logits))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    prompt = auto.encode("hello hello hello", chat=False)
    assert list(auto.generate_ids(prompt, 16, ignore_eos=True)) == \
        list(dense.generate_ids(prompt, 16, ignore_eos=True))
    assert hasten.load(str(path), dtype="bfloat16", progress=False).plan == "bfloat16"


def test_gguf_tensor_index_is_cached_and_follows_the_file(tmp_path):
    """The tensors of a GGUF as its reader gives them, the second time from the cached index
    (no metadata parse); a rewritten file is indexed again."""
    import gguf
    from hasten.models.gguf_convert import gguf_tensors
    _, path = tiny_gguf(tmp_path)
    index_dir = tmp_path / "index"
    arch, first = gguf_tensors(path, index_dir)
    assert len(list(index_dir.glob("*.json"))) == 1
    reader = gguf.GGUFReader(path)
    assert arch == "llama" and [t.name for t in first] == [t.name for t in reader.tensors]
    for ours, theirs in zip(first, reader.tensors):
        assert ours.tensor_type == theirs.tensor_type and ours.shape == tuple(theirs.shape)
        assert np.array_equal(ours.data, theirs.data) and ours.data.dtype == theirs.data.dtype
    _, again = gguf_tensors(path, index_dir)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(first, again))
    cfg, path = tiny_gguf(tmp_path, qtypes={**QTYPES, "attn_q": Q.Q8_0})  # the same path, rewritten
    _, rewritten = gguf_tensors(path, index_dir)
    assert len(list(index_dir.glob("*.json"))) == 2
    q = next(t for t in rewritten if t.name == "blk.0.attn_q.weight")
    assert q.tensor_type == Q.Q8_0
