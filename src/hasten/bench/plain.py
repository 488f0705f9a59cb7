"""The first `hasten bench`: plain greedy decoding, our runtime vs `transformers` `generate()`.

Both run the same model (the same resolved weights folder), the same prompts and a fixed
number of new tokens (EOS ignored, so every run does the same work), interleaved.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..api import Model
from ..decoding.generate import generate_plain
from .runner import machine_info, markdown_table, run_interleaved, summarize, timed, write_report


def ours_method(model: Model, max_new_tokens: int):
    def run(prompt: list[int]):
        return timed(lambda: list(generate_plain(model.backbone, prompt, max_new_tokens,
                                                 max_positions=model.max_positions)))
    return run


def transformers_method(hf_model, max_new_tokens: int):
    def run(prompt: list[int]):
        ids = torch.tensor([prompt], device=hf_model.device)

        def gen():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    pad_token_id=0)
            return out[0, len(prompt):].tolist()
        return timed(gen)
    return run


def load_transformers_model(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def run_plain_bench(model: Model, folder: Path, prompts: list[str], max_new_tokens: int,
                    output: Path, settings: dict) -> dict:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    prompt_ids = [model.encode(p) for p in prompts]
    hf = load_transformers_model(folder, model.backbone.dtype, model.backbone.device)
    methods = {"plain": ours_method(model, max_new_tokens),
               "hf": transformers_method(hf, max_new_tokens)}
    log(f"bench: {len(prompts)} prompts x {len(methods)} methods, {max_new_tokens} new tokens each")
    started = time.time()
    results = run_interleaved(methods, prompt_ids, progress=log)
    summary = summarize(results, baseline="hf")
    report = {"kind": "plain-vs-transformers", "model": model.name, "settings": settings,
              "machine": machine_info(), "started": started, "seconds": time.time() - started,
              "prompts": prompts, "summary": summary,
              "outputs": {n: r.tokens for n, r in results.items()}}
    write_report(output, report)
    table = markdown_table(summary, "hf")
    output.with_suffix(".md").write_text(table + "\n")
    print(table)
    log(f"bench: report written to {output}")
    return report
