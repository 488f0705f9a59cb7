"""BitDelta: many fine-tunes of one base, each stored as a 1-bit delta (arXiv 2402.10193).

Files, bottom up:
  pack.py      sign bits: the packed layout, unpacking, a matmul that reads packed bits
  runtime.py   Hugging Face names vs the lean runtime's fused layers, a cache-free
               differentiable forward, `DeltaDense` (shared base matmul + per-tenant binary)
  delta.py     compress (signs + per-matrix scales + changed other tensors), save/load with
               fingerprints, checks, merged weights, a delta-aware backbone sharing the base
  evaluate.py  perplexity, greedy agreement, logit MSE / KL
  distill.py   scale distillation on ShareGPT windows (resumable)
  data.py      domain texts (stdlib code, reasoning-gym math, Debian licences, ShareGPT)
  finetune.py  `hasten finetune`: full-rank fine-tuning of the block linear layers
  model.py     `with_delta(model, path)`: a `hasten.api.Model` for base + delta
"""
