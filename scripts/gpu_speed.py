"""Plain decoding speed and verify-cost curve on a GPU, on a SmolLM2-135M-shaped model with
random weights (speed does not depend on the weight values). Usage: python scripts/gpu_speed.py"""

import statistics
import time

import torch
import transformers

from hasten.decoding.budget import measure_cost_curve
from hasten.decoding.generate import generate_plain
from hasten.models.config import LlamaConfig
from hasten.models.llama import build_llama

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
               num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
               tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


def main():
    cfg = LlamaConfig(**SMOLLM2)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg.to_hf_dict())).eval()
    for dtype in (torch.float32, torch.bfloat16):
        ref = hf.to("cuda", dtype)
        ours = build_llama(cfg, {k: v for k, v in ref.state_dict().items()}, dtype=dtype, device="cuda")
        prompt = torch.randint(0, 49152, (64,)).tolist()
        n = 128
        rows = {"ours": [], "hf": []}
        for rep in range(4):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            list(generate_plain(ours, prompt, n))
            torch.cuda.synchronize(); rows["ours"].append(n / (time.perf_counter() - t0))
            ids = torch.tensor([prompt], device="cuda")
            torch.cuda.synchronize(); t0 = time.perf_counter()
            ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0)
            torch.cuda.synchronize(); rows["hf"].append(n / (time.perf_counter() - t0))
        med = {k: statistics.median(v[1:]) for k, v in rows.items()}
        print(f"{dtype}: ours {med['ours']:.1f} tok/s, transformers {med['hf']:.1f} tok/s, "
              f"ratio {med['ours'] / med['hf']:.2f}x")
        curve = measure_cost_curve(ours)
        print(f"{dtype}: verify cost relative to 1 token: {curve.relative()}")


if __name__ == "__main__":
    main()
