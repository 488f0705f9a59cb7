"""CUDA checks: run where a GPU is present (skipped on CPU-only machines, such as CI)."""

import pytest
import torch

from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import generate_plain
from hasten.drafters.lookup import LookupDrafter
from hasten.models.llama import build_llama
from tiny import hf_reference, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1), (torch.float16, 0.05)])
def test_logits_on_cuda_match_cpu_float64(dtype, tol):
    cfg = tiny_config()
    ref = hf_reference(cfg)
    want = ref(torch.arange(3, 40)[None]).logits
    ours = build_llama(cfg, ref.state_dict(), dtype=dtype, device="cuda")
    ours.reset(1, 64)
    got = ours.forward(torch.arange(3, 40, device="cuda")[None]).logits
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)


def test_speculative_greedy_matches_plain_on_cuda():
    cfg = tiny_config()
    ours = build_llama(cfg, hf_reference(cfg).state_dict(), dtype=torch.float64, device="cuda")
    for prompt in ([1, 2, 3, 1, 2, 3, 1], [5, 6, 7, 8, 5, 6]):
        want = list(generate_plain(ours, prompt, 30))
        assert list(generate_speculative(ours, LookupDrafter(), prompt, 30, tree_size=8)) == want


def test_seeded_sampling_on_cuda_plain_speculative_and_api():
    """A CPU generator with CUDA logits used to make torch.multinomial raise; draws now happen
    on the host, so seeds work on every device and give the same sample as on the CPU when the
    logits agree (float64 here)."""
    from hasten.api import Model
    from hasten.decoding.sampling import SamplingParams
    cfg = tiny_config()
    weights = hf_reference(cfg).state_dict()
    params = SamplingParams(temperature=0.9, top_k=20)
    runs = {}
    for device in ("cpu", "cuda"):
        ours = build_llama(cfg, weights, dtype=torch.float64, device=device)
        plain = [list(generate_plain(ours, [5, 6, 7], 20, params,
                                     generator=torch.Generator().manual_seed(s))) for s in range(3)]
        spec = [list(generate_speculative(ours, LookupDrafter(), [1, 2, 3, 1, 2, 3], 20, params,
                                          generator=torch.Generator().manual_seed(s), tree_size=4))
                for s in range(3)]
        model = Model(ours, tokenizer=None, name="tiny", max_positions=256, stop_ids=())
        api = list(model.generate_ids([5, 6, 7], 20, temperature=0.9, top_k=20, seed=0))
        runs[device] = (plain, spec, api)
        assert api == plain[0]  # the API's seed is the same CPU generator
    assert runs["cuda"] == runs["cpu"]
