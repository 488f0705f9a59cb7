"""Continuous batching (`decoding/batched.py`): every sequence gets exactly the tokens it gets
alone, whoever joins or leaves the batch around it."""

from __future__ import annotations

import random

import pytest
import torch

from hasten.decoding.batched import BatchedDecoder, batched_exact_attention, row_count_invariant
from hasten.decoding.generate import generate_plain
from hasten.decoding.sampling import SamplingParams
from hasten.errors import ContextFullError
from hasten.models.exact_attention import exact_attention, plan_keys
from hasten.models.llama import build_llama
from tiny import hf_reference, tiny_config

CONTEXT = 512
NEW = 80
MODES = [pytest.param(torch.float32, False, id="float32-sdpa"),
         pytest.param(torch.float32, True, id="float32-exact"),
         pytest.param(torch.bfloat16, True, id="bfloat16-exact")]


def tiny_model(dtype, exact):
    cfg = tiny_config(max_position_embeddings=CONTEXT)
    # Larger weights than the default init, so greedy text varies instead of repeating.
    weights = {k: v * 10 if v.dim() == 2 else v
               for k, v in hf_reference(cfg, 0, torch.float32).state_dict().items()}
    model = build_llama(cfg, weights, dtype=dtype)
    model.exact = exact
    return model


def prompts(n=6, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(97) for _ in range(rng.randint(3, 140))] for _ in range(n)]


def serve(model, prompts_, rows, order, lengths=None, params=None, seeds=None):
    """Run prompts through one decoder, admitting in `order` as rows free up; prompt i stops
    after lengths[i] tokens. Returns each prompt's tokens."""
    decoder = BatchedDecoder(model, rows, CONTEXT)
    lengths = lengths or [NEW] * len(prompts_)
    waiting, live, out = list(order), {}, {}
    while waiting or live:
        while waiting and decoder.free:
            i = waiting.pop(0)
            gen = None if seeds is None else torch.Generator().manual_seed(seeds[i])
            live[decoder.add(prompts_[i], params or SamplingParams(), gen)] = i
        for seq, _ in [(s, t) for s, t in decoder.step()]:
            if len(seq.tokens) >= lengths[live[seq]]:
                out[live.pop(seq)] = seq.tokens
                decoder.remove(seq)
        assert len(decoder.sequences) == len(live)
    return [out[i] for i in range(len(prompts_))]


@pytest.mark.parametrize("dtype,exact", MODES)
def test_a_lone_sequence_decodes_exactly_as_solo_plain_decoding(dtype, exact):
    model = tiny_model(dtype, exact)
    ps = prompts()
    solo = [list(generate_plain(model, p, NEW)) for p in ps]
    assert len({tuple(s[-20:]) for s in solo}) == len(ps)  # not equal by being degenerate
    assert serve(model, ps, rows=1, order=range(len(ps))) == solo


@pytest.mark.parametrize("dtype,exact", [m for m in MODES if m.values[1]])
def test_batched_rows_do_not_depend_on_who_else_is_in_the_batch(dtype, exact):
    model = tiny_model(dtype, exact)
    ps = prompts()
    solo = [list(generate_plain(model, p, NEW)) for p in ps]
    # Different company, join order and leave times: sequences stop after different lengths.
    stops = [NEW, NEW - 30, NEW, NEW - 55, NEW - 5, NEW]
    want = [s[:n] for s, n in zip(solo, stops)]
    assert serve(model, ps, rows=4, order=range(6), lengths=stops) == want
    assert serve(model, ps, rows=6, order=[5, 3, 1, 0, 2, 4], lengths=stops) == want
    assert serve(model, ps, rows=3, order=[2, 0, 4, 1, 5, 3]) == solo


def test_seeded_sampling_in_a_batch_matches_solo_sampling():
    model = tiny_model(torch.bfloat16, True)
    ps, params = prompts(4, seed=1), SamplingParams(temperature=0.9, top_p=0.95)
    solo = [list(generate_plain(model, p, NEW, params, generator=torch.Generator().manual_seed(i)))
            for i, p in enumerate(ps)]
    got = serve(model, ps, rows=4, order=[3, 1, 2, 0], params=params, seeds=[0, 1, 2, 3])
    assert got == solo
    greedy = serve(model, ps, rows=4, order=range(4))
    assert got != greedy  # really sampled


def test_rows_are_reused_and_the_cache_moves_with_the_last_row():
    model = tiny_model(torch.float32, True)
    decoder = BatchedDecoder(model, 2, CONTEXT)
    a, b = decoder.add([5, 6, 7]), decoder.add([8, 9])
    assert decoder.free == 0
    with pytest.raises(RuntimeError):
        decoder.add([1])
    decoder.step()
    kept = decoder.k[:, 1, :, :b.length].clone()
    decoder.remove(a)  # b moves into row 0, its committed cache with it
    assert decoder.sequences == [b] and torch.equal(decoder.k[:, 0, :, :b.length], kept)
    c = decoder.add([3, 3, 3, 3])
    assert decoder.sequences == [b, c]


def test_a_full_row_is_refused_before_anything_is_written():
    model = tiny_model(torch.float32, False)
    decoder = BatchedDecoder(model, 1, 64)
    with pytest.raises(ContextFullError):
        decoder.add(list(range(64)))
    seq = decoder.add(list(range(62)))
    decoder.step()
    assert seq.length == 63
    decoder.step()
    with pytest.raises(ContextFullError):
        decoder.step()


def test_batched_exact_attention_equals_the_solo_plan_bit_for_bit():
    torch.manual_seed(0)
    heads, kv, d, cap = 4, 2, 8, 256
    k = torch.randn(3, kv, cap, d, dtype=torch.bfloat16)
    v = torch.randn(3, kv, cap, d, dtype=torch.bfloat16)
    q = torch.randn(3, heads, 1, d, dtype=torch.bfloat16)
    keys = torch.tensor([5, 64, 130])  # one block, exactly one, three blocks
    got = batched_exact_attention(q, k, v, keys, d ** -0.5)
    for r, n in enumerate(keys.tolist()):
        # The solo plain step: the row and its copy, each over its own keys.
        mask = torch.ones(2, n + 1, dtype=torch.bool)
        mask[0, n] = mask[1, n - 1] = False
        kc = torch.cat([k[r:r + 1, :, :n], k[r:r + 1, :, n - 1:n]], 2)
        vc = torch.cat([v[r:r + 1, :, :n], v[r:r + 1, :, n - 1:n]], 2)
        kc = torch.nn.functional.pad(kc, (0, 0, 0, cap - n - 1))
        vc = torch.nn.functional.pad(vc, (0, 0, 0, cap - n - 1))
        want = exact_attention(q[r:r + 1].repeat(1, 1, 2, 1), kc, vc,
                               plan_keys(mask, n - 1, 2, "cpu"), d ** -0.5)
        assert torch.equal(got[r, :, 0], want[0, :, 0])


def test_row_count_invariance_is_checked_on_the_weights():
    model = tiny_model(torch.bfloat16, True)
    assert row_count_invariant(model, 1) is None  # nothing to compare
    result = row_count_invariant(model, 8)
    assert result is None or len(result) > 1


def compact_exact_model(tmp_path, monkeypatch):
    """A tiny compact-weights model in exact mode on the compiled kernels (skips where they
    cannot be built)."""
    from hasten.models import quant_kernels as qk
    from hasten.models.loader import load_backbone
    from test_compact import tiny_gguf

    if qk.kernel_module() is None:
        pytest.skip(f"the quantized matmul kernel cannot be built here: {qk.kernel_failure()}")
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    _, path = tiny_gguf(tmp_path)
    model = load_backbone(str(path), weights="compact").backbone
    model.exact = True  # as hasten.load sets it where the check finds it exact
    assert model.fused_attention
    return model


def test_compact_weights_rows_equal_solo_decoding(tmp_path, monkeypatch):
    """Compact weights attend through a compiled kernel (other bits than the blocked torch
    attention): every row of a step in one call, each getting the solo step's logits bit for
    bit."""
    model = compact_exact_model(tmp_path, monkeypatch)
    ps = [p[:40] for p in prompts(3)]
    decoder = BatchedDecoder(model, 3, CONTEXT)
    seqs = [decoder.add(p) for p in ps]
    seen = []
    forward = decoder._forward

    def watched(step):
        logits, hidden, taps = forward(step)
        seen.append(logits)
        return logits, hidden, taps
    monkeypatch.setattr(decoder, "_forward", watched)
    decoder.step()
    for r, (p, seq) in enumerate(zip(ps, seqs)):
        model.reset(1, CONTEXT)
        model.forward(torch.tensor([p]))
        model.commit()
        solo = model.forward(torch.tensor([[seq.tokens[0]]])).logits[0, -1]
        assert torch.equal(seen[0][r], solo), r
