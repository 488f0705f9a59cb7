import pytest
import torch

from hasten.decoding.generate import GenerationStats, generate_batch, generate_plain
from hasten.decoding.sampling import SamplingParams, choose, probabilities
from hasten.errors import ContextFullError
from tiny import tiny_pair


def hf_greedy(ref, prompt, n):
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                       eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_greedy_equals_transformers_generate(model_type):
    ours, ref = tiny_pair(model_type)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        prompt = torch.randint(3, 97, (int(torch.randint(1, 12, (1,), generator=gen)),),
                               generator=gen).tolist()
        got = list(generate_plain(ours, prompt, 20))
        assert got == hf_greedy(ref, prompt, 20)


def test_stop_token_ends_generation_and_is_reported():
    ours, ref = tiny_pair()
    prompt = [5, 6, 7]
    full = hf_greedy(ref, prompt, 20)
    stop = full[4]
    stats = GenerationStats()
    got = list(generate_plain(ours, prompt, 20, stop_ids=(stop,), stats=stats))
    assert got == full[:full.index(stop) + 1]
    assert stats.finish_reason == "stop"
    assert stats.new_tokens == len(got)


def test_batch_of_ragged_prompts_equals_one_at_a_time():
    ours, _ = tiny_pair()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    want = [list(generate_plain(ours, p, 12)) for p in prompts]
    assert generate_batch(ours, prompts, 12) == want


def test_batch_rows_stop_independently():
    ours, _ = tiny_pair()
    prompts = [[5, 6, 7], [20, 21]]
    solo = [list(generate_plain(ours, p, 10)) for p in prompts]
    stop = solo[0][2]
    got = generate_batch(ours, prompts, 10, stop_ids=(stop,))
    for g, s in zip(got, solo):
        cut = s.index(stop) + 1 if stop in s else len(s)
        assert g == s[:cut]


def test_seeded_sampling_is_reproducible():
    ours, _ = tiny_pair()
    params = SamplingParams(temperature=0.8, top_k=10)
    a = list(generate_plain(ours, [5, 6], 15, params, generator=torch.Generator().manual_seed(7)))
    b = list(generate_plain(ours, [5, 6], 15, params, generator=torch.Generator().manual_seed(7)))
    c = list(generate_plain(ours, [5, 6], 15, params, generator=torch.Generator().manual_seed(8)))
    assert a == b and a != c


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return float((counts / counts.sum() - probs).abs().sum() / 2)


def test_sampled_tokens_follow_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(97, dtype=torch.float64) * 2
    for params in (SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=10),
                   SamplingParams(temperature=1.0, top_p=0.7)):
        probs = probabilities(logits, params)
        draws = choose(logits.expand(20000, -1), params, torch.Generator().manual_seed(1))
        counts = torch.bincount(draws, minlength=97).double()
        assert total_variation(counts, probs) < 0.03
        assert counts[probs == 0].sum() == 0  # never outside top-k / top-p
    # the same through generation: first tokens over many seeds follow the model's distribution
    ours, _ = tiny_pair()
    params = SamplingParams(temperature=0.9, top_k=4)
    ours.reset(1, 8)
    probs = probabilities(ours.forward(torch.tensor([[5, 6]])).logits[0, -1], params)
    firsts = [next(iter(generate_plain(ours, [5, 6], 1, params,
                                       generator=torch.Generator().manual_seed(s))))
              for s in range(1500)]
    assert total_variation(torch.bincount(torch.tensor(firsts), minlength=97).double(), probs) < 0.06


def test_sampling_is_safe_at_extreme_settings():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0 - 1e-6])
    for params in (SamplingParams(temperature=1e-40), SamplingParams(temperature=1e-30, top_k=2),
                   SamplingParams(temperature=1.0, top_p=1e-46)):
        p = probabilities(logits, params)
        assert torch.isfinite(p).all() and float(p.sum()) == pytest.approx(1.0)
        assert int(choose(logits, params, torch.Generator().manual_seed(0))) == 1  # the argmax


def test_prompt_longer_than_context_is_refused():
    ours, _ = tiny_pair()
    with pytest.raises(ContextFullError, match="shorten the prompt"):
        list(generate_plain(ours, [3] * 300, 5, max_positions=256))


def test_context_limit_stops_gracefully():
    ours, _ = tiny_pair()
    stats = GenerationStats()
    got = list(generate_plain(ours, [3] * 250, 50, max_positions=256, stats=stats))
    assert len(got) == 7  # 250 prompt + 6 committed = 256 slots, plus the last chosen token
    assert stats.finish_reason == "context"
