"""BitDelta numbers: quality table, bytes, resident memory, decoding speed.

    python scripts/bitdelta_report.py quality --base B --finetune code=FT --delta code=DELTA ...
    python scripts/bitdelta_report.py memory --base B --delta D1 --delta D2 ... --tenants 1 4 8
    python scripts/bitdelta_report.py speed --base B --delta D [--tokens 64 --prompts 4]
    python scripts/bitdelta_report.py batch --base B --delta D1 ... (4 tenants x 2 clients)
    python scripts/bitdelta_report.py speculate --base B --delta code=D1 ... [--dtype bfloat16]

quality: per fine-tune, domain perplexity (held-out windows) and teacher-forced greedy agreement
with the fine-tune (its greedy continuations of held-out prompts) for the base, the fine-tune,
BitDelta with mean |delta| scales and BitDelta with distilled scales (merged weights).
memory: each configuration in a fresh process (VmRSS after loading, VmHWM = peak): one base +
N delta tenants in one model, versus N full fine-tune folders loaded as N models (--finetune
FOLDER, cycled). N separate servers would hold N x the one-model process instead.
speculate: per tenant, on its own domain's held-out prompts, the base's drafters (lookup and the
base's Medusa and EAGLE heads) on the delta-aware model: tokens per step, tok/s against plain
decoding of the same tenant, and whether every greedy answer equals plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def rss_mb() -> tuple[float, float]:
    fields = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        fields[k] = v
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def quality(args) -> None:
    from hasten.bitdelta import data, delta as bd, evaluate
    from hasten.bitdelta.finetune import load_llama
    from hasten.models.llama import build_llama
    from hasten.models.sources import load_weights

    base, tokenizer, _ = load_llama(args.base)
    base_sd = load_weights(bd.model_folder(args.base))
    rows = []
    for spec in args.finetune:
        domain, ft_path = spec.split("=", 1)
        delta = bd.load(dict(s.split("=", 1) for s in args.delta)[domain])
        ft, _, _ = load_llama(ft_path)
        held = data.windows(tokenizer, data.documents(domain, "eval"), args.windows, 129)
        prompts = data.prompts(tokenizer, domain, args.prompts)
        t = time.perf_counter()
        reference = evaluate.greedy_continuations(ft, prompts, args.tokens)
        models = {"base": base, "fine-tune": ft,
                  "bitdelta, scales = mean abs delta": build_llama(
                      base.config, bd.merged_state_dict(base_sd, delta, initial=True)),
                  "bitdelta, distilled scales": build_llama(
                      base.config, bd.merged_state_dict(base_sd, delta))}
        for name, model in models.items():
            row = {"finetune": domain, "model": name,
                   "ppl": evaluate.perplexity(model, held),
                   "agreement": evaluate.agreement(model, prompts, reference)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"# {domain}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    print("\n| fine-tune | model | domain perplexity | greedy agreement with the fine-tune |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['finetune']} | {r['model']} | {r['ppl']:.3f} | {r['agreement']:.3f} |")


def memory_child(spec: dict) -> dict:
    """One configuration, in this (fresh) process."""
    from hasten.api import load
    from hasten.bitdelta import delta as bd
    from hasten.bitdelta.model import with_delta
    from hasten.bitdelta.runtime import set_route

    torch.set_num_threads(1)
    base = load(spec["base"])
    deltas = [bd.load(p) for p in spec["deltas"]]
    ids = torch.tensor([base.encode("Write a function that adds two numbers.")])
    if spec["kind"] == "tenants":
        bd.check_base(deltas[0], bd.load_weights(base.folder))
        model = bd.delta_backbone(base.backbone, deltas)
        models = [model]
        set_route(model, [0])
    else:  # full copies: each fine-tune's own Hugging Face folder, as separate models
        del base
        models = [load(folder).backbone for folder in spec["finetunes"]]
    import gc
    gc.collect()
    for m in models:  # touch every model once
        m.reset(1, 64)
        m(ids)
    now, peak = rss_mb()
    return {"kind": spec["kind"], "tenants": len(spec["finetunes"]), "rss_mb": round(now),
            "peak_mb": round(peak)}


def memory(args) -> None:
    results = []
    for n in args.tenants:
        deltas = [args.delta[i % len(args.delta)] for i in range(n)]
        finetunes = [args.finetune[i % len(args.finetune)] for i in range(n)]
        for kind in ("tenants", "merged"):
            spec = json.dumps({"base": args.base, "deltas": deltas if kind == "tenants" else [],
                               "finetunes": finetunes, "kind": kind})
            out = subprocess.run([sys.executable, __file__, "memory-child"], input=spec,
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"memory-child ({kind}, {n} tenants) failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print("\n| tenants | one base + N deltas: RSS / peak MB | N full models: RSS / peak MB |")
    print("|---|---|---|")
    for n in args.tenants:
        t = next(r for r in results if r["tenants"] == n and r["kind"] == "tenants")
        m = next(r for r in results if r["tenants"] == n and r["kind"] == "merged")
        print(f"| {n} | {t['rss_mb']} / {t['peak_mb']} | {m['rss_mb']} / {m['peak_mb']} |")


def decode(backbone, prompt: list[int], n: int) -> tuple[list[int], float]:
    backbone.reset(1, len(prompt) + n + 1)
    with torch.inference_mode():
        out = backbone(torch.tensor([prompt]), last_only=True)
        backbone.commit()
        tokens = [int(out.logits[0, -1].argmax())]
        t = time.perf_counter()
        for _ in range(n - 1):
            out = backbone(torch.tensor([[tokens[-1]]]), last_only=True)
            backbone.commit()
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, (n - 1) / (time.perf_counter() - t)


def speed(args) -> None:
    from hasten.api import load
    from hasten.bitdelta.model import with_delta

    torch.set_num_threads(args.threads)
    base = load(args.base, dtype=args.dtype)
    aware, merged = with_delta(base, args.delta[0]), with_delta(base, args.delta[0], merged=True)
    prompts = [base.encode(p) for p in ("Write a Python function that reverses a list.",
                                        "What is 17 times 23?", "Explain what a licence is.",
                                        "Name three colours.")][:args.prompts]
    rates = {"base": [], "merged": [], "delta-aware": []}
    same = 0
    for p in prompts:  # interleaved
        rates["base"].append(decode(base.backbone, p, args.tokens)[1])
        tm, rm = decode(merged.backbone, p, args.tokens)
        ta, ra = decode(aware.backbone, p, args.tokens)
        rates["merged"].append(rm)
        rates["delta-aware"].append(ra)
        same += tm == ta
    med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    print(json.dumps({"threads": args.threads, "tokens": args.tokens, "median_tok_s": med,
                      "aware_over_merged": med["delta-aware"] / med["merged"],
                      "same_greedy_tokens": f"{same}/{len(prompts)}"}))


def batch(args) -> None:
    """4 tenants x 2 clients: one batched multi-tenant forward per step vs the merged models
    one after another (each decoding its 2 clients as a batch of 2)."""
    from hasten.api import load
    from hasten.bitdelta import delta as bd
    from hasten.bitdelta.model import with_delta
    from hasten.bitdelta.runtime import set_route

    torch.set_num_threads(args.threads)
    base = load(args.base, dtype=args.dtype)
    deltas = [bd.load(args.delta[i % len(args.delta)]) for i in range(args.tenant_count)]
    multi = bd.delta_backbone(base.backbone, deltas)
    merged = [with_delta(base, d, merged=True).backbone for d in deltas]
    clients = 2
    prompt = base.encode("Write a short story about a robot.")
    n = args.tokens

    def run(backbone, rows: int, route=None) -> float:
        if route is not None:
            set_route(backbone, route)
        backbone.reset(rows, len(prompt) + n + 1)
        with torch.inference_mode():
            out = backbone(torch.tensor([prompt] * rows), last_only=True)
            backbone.commit()
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(n - 1):
                out = backbone(tok, last_only=True)
                backbone.commit()
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
        return rows * n

    results = {"batched": [], "sequential": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        made = run(multi, clients * len(deltas), [k for k in range(len(deltas)) for _ in range(clients)])
        results["batched"].append(made / (time.perf_counter() - t))
        t = time.perf_counter()
        made = sum(run(m, clients) for m in merged)
        results["sequential"].append(made / (time.perf_counter() - t))
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    print(json.dumps({"threads": args.threads, "tenants": len(deltas), "clients": clients,
                      "tokens_each": n, "median_aggregate_tok_s": med,
                      "batched_over_sequential": med["batched"] / med["sequential"]}))


def speculate(args) -> None:
    from hasten.api import load
    from hasten.bitdelta import data
    from hasten.bitdelta.model import with_delta

    torch.set_num_threads(args.threads)
    base = load(args.base, dtype=args.dtype)
    methods = ("plain", "lookup", "medusa", "eagle")
    for spec in args.delta:
        domain, path = spec.split("=", 1)
        tenant = with_delta(base, path)
        prompts = data.prompts(base.tokenizer, domain, args.prompts)
        seconds = dict.fromkeys(methods, 0.0)
        gained = {m: [] for m in methods}  # tokens gained per decode step
        made, same, answers = 0, dict.fromkeys(methods, 0), {}
        for method in methods:  # untimed: measures the tenant's verify costs and exactness once
            list(tenant.generate_ids(prompts[0], 8, draft=None if method == "plain" else method))
        for i, p in enumerate(prompts):  # methods interleaved per prompt
            for method in methods:
                t = time.perf_counter()
                out = list(tenant.generate_ids(p, args.tokens, draft=None if method == "plain" else method,
                                               ignore_eos=True))
                seconds[method] += time.perf_counter() - t
                gained[method] += tenant.last_stats.accepted or [1] * tenant.last_stats.steps
                if method == "plain":
                    answers[i] = out
                    made += len(out)
                same[method] += out == answers[i]
        print(json.dumps({"tenant": domain, "dtype": args.dtype, "threads": args.threads,
                          "prompts": len(prompts), "tokens_each": args.tokens,
                          "tok_s": {m: round(made / seconds[m], 1) for m in methods},
                          "speedup": {m: round(seconds["plain"] / seconds[m], 2) for m in methods},
                          "tokens_per_step": {m: round(sum(g) / max(1, len(g)), 2) for m, g in gained.items()},
                          "same_as_plain": {m: f"{same[m]}/{len(prompts)}" for m in methods}}), flush=True)


def main() -> None:
    if sys.argv[1:] == ["memory-child"]:
        print(json.dumps(memory_child(json.loads(sys.stdin.read()))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("quality", "memory", "speed", "batch", "speculate"))
    p.add_argument("--base", default=None)
    p.add_argument("--finetune", action="append", default=[], help="DOMAIN=FOLDER")
    p.add_argument("--delta", action="append", default=[], help="quality: DOMAIN=DELTA; else DELTA")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--tenants", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tenant-count", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="speed, batch: the compute dtype")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"quality": quality, "memory": memory, "speed": speed, "batch": batch,
     "speculate": speculate}[args.what](args)


if __name__ == "__main__":
    main()
