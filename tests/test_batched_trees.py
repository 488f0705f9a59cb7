"""Draft trees verified inside the continuous batch (`BatchedDecoder.speculate`): in bfloat16
every sequence gets exactly its solo plain answer, whoever else is in the batch and whatever
their trees, and the trees really are verified there (more than one token per step)."""

from __future__ import annotations

import random

import torch

from hasten.decoding.batched import BatchCurve, BatchedDecoder, share_tokens
from hasten.decoding.budget import AdaptiveTreeSize, CostCurve
from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import generate_plain
from hasten.decoding.sampling import SamplingParams
from hasten.decoding.stats import GenerationStats
from hasten.decoding.tree import DraftTree
from hasten.drafters.lookup import LookupDrafter
from test_batched import CONTEXT, NEW, prompts, tiny_model
from test_server_batching import model  # noqa: F401 - the tiny chat model fixture


class Oracle:
    """Knows the plain answer: drafts it (after a wrong branch that comes first in node
    order, so a mask that let a node see other branches would change its numbers)."""

    def __init__(self, prompt, answer, vocab=97):
        self.prompt, self.answer, self.vocab = prompt, answer, vocab

    def reset(self, prompt, capacity):
        pass

    def observe(self, accepted, hidden=None):
        pass

    def propose(self, context, size, hidden=None):
        done = len(context) - len(self.prompt)  # answer tokens so far, the root included
        right = self.answer[done:done + max(size - 2, 0)]
        if not right:
            return DraftTree.empty()
        wrong = [(right[0] + 1) % self.vocab, (right[0] + 2) % self.vocab]
        return DraftTree.from_sequences([wrong, right], weights=[2, 1])


class Wrong(Oracle):
    """Always wrong: nothing is ever accepted (only the root's K/V are kept)."""

    def propose(self, context, size, hidden=None):
        done = len(context) - len(self.prompt)
        chain = [(t + 1) % self.vocab for t in self.answer[done:done + size]]
        return DraftTree.from_chain(chain) if chain else DraftTree.empty()


def serve(model, prompts_, drafters, rows, order, stops, size=6, params=None, seeds=None):
    """Run the prompts through one decoder, admitting in `order` as rows free up; prompt i
    drafts with drafters[i] (None: plain) and stops after stops[i] tokens. Returns each
    prompt's tokens and its tokens gained per step."""
    decoder = BatchedDecoder(model, rows, CONTEXT)
    waiting, live, out, steps, counts = list(order), {}, {}, {}, {}
    while waiting or live:
        while waiting and decoder.free:
            i = waiting.pop(0)
            gen = None if seeds is None else torch.Generator().manual_seed(seeds[i])
            seq = decoder.add(prompts_[i], params or SamplingParams(), gen)
            if drafters[i] is not None:
                drafters[i].reset(prompts_[i], decoder.capacity)
                drafters[i].observe([seq.root], seq.hidden)
            live[seq], steps[i] = i, 0
        trees = {}
        for seq, i in live.items():
            if drafters[i] is not None:
                context = prompts_[i] + seq.tokens
                trees[seq] = drafters[i].propose(context, size, seq.hidden[-1]).truncated(size)
        for seq, new in decoder.speculate(trees):
            i = live[seq]
            steps[i] += 1
            if drafters[i] is not None:
                drafters[i].observe(new, seq.hidden)
            if len(seq.tokens) >= stops[i]:
                out[live.pop(seq)] = seq.tokens[:stops[i]]
                counts[i] = steps[i]
                steps[i] = (len(seq.tokens) - 1) / steps[i]  # the first token came from the prefill
                decoder.remove(seq)
    serve.steps = [counts[i] for i in range(len(prompts_))]
    return [out[i] for i in range(len(prompts_))], [steps[i] for i in range(len(prompts_))]


def company(ps, solo):
    """Drafters of every quality: oracle, lookup, always wrong, none, oracle, lookup."""
    kinds = [Oracle, LookupDrafter, Wrong, None, Oracle, LookupDrafter]
    return [None if kind is None else kind() if kind is LookupDrafter else kind(p, s)
            for kind, p, s in zip(kinds, ps, solo)]


def test_every_answer_is_the_solo_plain_answer_whoever_drafts_beside_it():
    model = tiny_model(torch.bfloat16, True)
    ps = prompts()
    solo = [list(generate_plain(model, p, NEW)) for p in ps]
    stops = [NEW, NEW - 30, NEW, NEW - 55, NEW - 5, NEW]  # they leave at different steps
    want = [s[:n] for s, n in zip(solo, stops)]
    got, per_step = serve(model, ps, company(ps, solo), 4, range(6), stops)
    assert got == want
    assert per_step[0] > 2 and per_step[4] > 2  # the oracles' trees were verified in the batch
    assert per_step[2] == 1 and per_step[3] == 1  # wrong drafts and no drafter: one per step
    # Other company, join order and tree sizes.
    got, _ = serve(model, ps, company(ps, solo), 3, [5, 3, 1, 0, 2, 4], stops, size=3)
    assert got == want


def test_tree_nodes_get_the_logits_of_plain_decoding_of_their_paths():
    """The sharp check: one step, three sequences with random trees (siblings, deep
    branches) beside a plain one; each node's logits against plain decoding of its path, bit
    for bit. Fails if a node sees another sequence's or another branch's keys."""
    model = tiny_model(torch.bfloat16, True)
    rng = random.Random(1)
    ps = prompts(4, seed=2)
    decoder = BatchedDecoder(model, 4, CONTEXT)
    seqs = [decoder.add(p) for p in ps]
    decoder.step()  # every row has committed a generated token too
    trees = {}
    for seq in seqs[:3]:
        n = rng.randint(5, 12)
        parents = [-1] + [rng.randrange(-1, i) for i in range(1, n)]
        trees[seq] = DraftTree(torch.tensor([rng.randrange(97) for _ in range(n)]),
                               torch.tensor(parents))
    seen = []
    forward = decoder._forward
    decoder._forward = lambda step: seen.append(forward(step)) or seen[-1]
    decoder.speculate(trees)
    logits = seen[0][0]
    start = 0
    for p, seq in zip(ps, seqs):
        tree = trees.get(seq)
        for node in [-1] + list(range(tree.size if tree else 0)):
            # plain steps: the first token, the root, then the node's path
            path = seq.tokens[:2] + ([tree.token_list[i] for i in tree.path_to(node)] if tree else [])
            model.reset(1, CONTEXT)
            model.forward(torch.tensor([p]))
            model.commit()
            for token in path:
                plain = model.forward(torch.tensor([[token]])).logits[0, -1]
                model.commit()
            assert torch.equal(logits[start + node + 1], plain), (seqs.index(seq), node)
        start += 1 + (tree.size if tree else 0)


def test_accepted_paths_are_packed_into_the_row():
    """After a step that accepts a path behind a rejected branch, the row holds the root's
    and the path's K/V in consecutive slots: the next plain steps continue the solo answer."""
    model = tiny_model(torch.bfloat16, True)
    ps = prompts(2, seed=3)
    solo = [list(generate_plain(model, p, 30)) for p in ps]
    drafters = [Oracle(ps[0], solo[0]), None]
    got, per_step = serve(model, ps, drafters, 2, [0, 1], [30, 30], size=8)
    assert got == solo and per_step[0] > 2


def test_seeded_sampling_with_trees_in_a_batch_is_the_solo_speculative_sample():
    """The promise for sampling: lossless acceptance, and a sequence's draws depend on its own
    trees only. So with the same drafter, tree size and seed, a sequence sampled in a batch
    beside others (greedy, sampled, drafting) gets the sample the solo speculative engine
    draws. (That sample is not the plain one: the server keeps seeded requests plain.)"""
    model = tiny_model(torch.bfloat16, True)
    ps = prompts(4, seed=4)
    params = SamplingParams(temperature=0.8, top_p=0.95)
    size = 4
    solo = [list(generate_speculative(model, LookupDrafter(), p, NEW, params,
                                      generator=torch.Generator().manual_seed(i),
                                      tree_size=size)) for i, p in enumerate(ps)]
    got, per_step = serve(model, ps, [LookupDrafter() for _ in ps], 3, [2, 0, 3, 1], [NEW] * 4,
                          size=size, params=params, seeds=range(4))
    assert got == solo
    plain = [list(generate_plain(model, p, NEW, params, generator=torch.Generator().manual_seed(i)))
             for i, p in enumerate(ps)]
    assert got != plain  # speculative sampling draws differently from plain sampling


def test_float32_sdpa_trees_in_a_batch_keep_a_lone_sequence_exact_enough():
    """Not exact mode: trees go through SDPA with their masks, as the solo verify does there;
    with one sequence the answers match the solo speculative engine."""
    model = tiny_model(torch.float32, False)
    p = prompts(1, seed=5)[0]
    solo = list(generate_plain(model, p, 40))
    got, per_step = serve(model, [p], [Oracle(p, solo)], 1, [0], [40])
    assert got == [solo] and per_step[0] > 2


def test_the_tree_size_rule_sees_the_batch():
    curve = CostCurve([0, 4, 8, 16, 64], [1.0, 1.1, 1.2, 1.6, 3.0])
    shared = BatchCurve(curve)
    assert [shared.cost(n) for n in (0, 4, 16)] == [curve.cost(n) for n in (0, 4, 16)]  # alone
    shared.rows = 4  # 4 nodes now cost what 4 more rows cost after 3 roots, for all 4 rows
    assert shared.cost(0) == curve.cost(3)
    assert shared.cost(4) == curve.cost(3) + 4 * (curve.cost(7) - curve.cost(3))
    measured = BatchedDecoder(tiny_model(torch.bfloat16, True), 2, CONTEXT)
    measured.tree_attention_seconds = 0.25  # a tree's own attention calls, as measured
    charged = BatchCurve(curve, measured)
    charged.rows = 4
    assert charged.cost(0) == shared.cost(0)  # no tree, no attention call of its own
    assert charged.cost(4) == shared.cost(4) + 4 * 0.25  # the whole batch waits for it
    measured.step_seconds[4] = 2.0  # a plain step of 4 rows, as measured: the base
    assert charged.cost(0) == 2.0 and charged.cost(4) == 2.0 + (shared.cost(4) - shared.cost(0)) + 1.0
    measured.tree_token_seconds = 0.1  # and what a tree token adds, as measured
    assert charged.cost(0) == 2.0 and abs(charged.cost(4) - (2.0 + 4 * 4 * 0.1)) < 1e-12
    # Where tree tokens cost the batch more than a plain step gains, the rule drafts nothing.
    measured.step_seconds[8], measured.tree_token_seconds = 9.4, 0.75
    charged.rows = 8
    rule = AdaptiveTreeSize(charged, 8, prior_rate=0.5)
    assert rule.best() == 0
    charged.rows, measured.tree_token_seconds = 1, 0.01  # alone, with cheap tokens: it drafts
    measured.step_seconds[1] = 3.7
    assert rule.best() > 0
    assert share_tokens([8, 8, 0], 3, 65) == [8, 8, 0]
    assert share_tokens([40, 20, 0], 3, 33) == [20, 10, 0]  # 3 roots + 30 nodes


def test_the_decoder_measures_what_its_steps_cost():
    """`step_seconds` (plain steps by row count) and `tree_token_seconds` (what a tree token
    adds), the EMAs `BatchCurve` charges; fed by every step."""
    decoder = BatchedDecoder(tiny_model(torch.bfloat16, True), 3, CONTEXT)
    decoder._measure(3, 0, 1.0)  # noqa: SLF001
    decoder._measure(3, 4, 3.0)  # noqa: SLF001 - 2 s more than plain for 4 tokens
    assert decoder.step_seconds == {3: 1.0} and decoder.tree_token_seconds == 0.5
    decoder._measure(3, 0, 2.0)  # noqa: SLF001
    decoder._measure(2, 2, 9.0)  # noqa: SLF001 - no plain step of 2 rows seen: not counted
    assert decoder.step_seconds == {3: 1.2} and decoder.tree_token_seconds == 0.5
    seqs = [decoder.add(p) for p in prompts(2, seed=1)]
    decoder.step()
    assert set(decoder.step_seconds) == {2, 3} and decoder.step_seconds[2] > 0
    decoder.speculate({seqs[0]: DraftTree(torch.tensor([5, 6]), torch.tensor([-1, 0]))})
    assert decoder.tree_token_seconds != 0.5  # the tree step was folded in


# ---- the server: requests with drafters speculate inside the batch ------------------------

REPEATS = [[{"role": "user", "content": "abcabcabcabcabcabc"}],
           [{"role": "user", "content": "xyzxyzxyzxyzxyz"}]]


def watch_speculate(monkeypatch, decoder) -> list[int]:
    """Records how many trees each batched `speculate` call verified."""
    calls = []
    speculate = decoder.speculate

    def watched(trees=None):
        calls.append(len(trees or {}))
        return speculate(trees)
    monkeypatch.setattr(decoder, "speculate", watched)
    return calls


def test_two_concurrent_lookup_requests_speculate_in_the_batch_with_their_solo_answers(
        model, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from hasten.server import create_app
    from test_server import Server, wait_for
    from test_server_batching import ForwardGate, ask

    want = [model.generate(q, 60, temperature=0) for q in REPEATS]
    s = Server(create_app(model, log=False, tree_size=4, max_batch=2))
    engine = s.app.state.engine
    trees = watch_speculate(monkeypatch, engine.decoder)
    gate = ForwardGate(monkeypatch, model.backbone, after=2)  # the first one, alone: prefill + 1
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, s.client(), REPEATS[0], max_tokens=60, draft="lookup")
            wait_for(lambda: gate.calls > 2, "the first request to speculate alone")
            second = pool.submit(ask, s.client(), REPEATS[1], max_tokens=60, draft="lookup")
            wait_for(lambda: engine.queued == 1, "the second request to wait")
            gate.opened.set()  # the first joins the batch and both speculate there
            answers = [first.result(60), second.result(60)]
    finally:
        gate.opened.set()
        s.stop()
    assert [text for text, _ in answers] == want and min(map(len, want)) >= 20
    stats = [r.model_extra["hasten"] for _, r in answers]
    assert all(st["draft"] == "lookup" and st["max_batch_size"] == 2 for st in stats)
    assert all(st["mean_accepted_tokens_per_step"] > 1 for st in stats)
    assert 2 in trees  # steps verified both requests' trees in one forward


def test_a_seeded_sample_beside_speculating_requests_is_its_solo_sample(model, monkeypatch):
    """DESIGN/issue: with a seed, the same sample whoever else is served. Seeded requests
    decode plain (speculative sampling draws differently), so it is the plain sample."""
    from concurrent.futures import ThreadPoolExecutor

    from hasten.server import create_app
    from test_server import Gate, Server, wait_for
    from test_server_batching import ask

    want = model.generate(REPEATS[1], 30, temperature=0.8, seed=3)
    s = Server(create_app(model, log=False, tree_size=4, max_batch=3))
    engine = s.app.state.engine
    gate = Gate(monkeypatch, engine, after=1)  # a plain request holds the batch open
    trees = watch_speculate(monkeypatch, engine.decoder)

    def sampled():
        return s.client().chat.completions.create(
            model="tiny", messages=REPEATS[1], max_tokens=30, temperature=0.8, seed=3,
            extra_body={"draft": "lookup"})
    try:
        with ThreadPoolExecutor(3) as pool:
            holder = pool.submit(ask, s.client(), REPEATS[0], max_tokens=40)
            wait_for(lambda: gate.calls > 1, "the plain request to reach the gate")
            greedy = pool.submit(ask, s.client(), REPEATS[0], max_tokens=60, draft="lookup")
            seeded = pool.submit(sampled)
            wait_for(lambda: engine.queued == 2, "both to wait for the step boundary")
            gate.opened.set()
            r, (text, _), _ = seeded.result(60), greedy.result(60), holder.result(60)
    finally:
        gate.opened.set()
        s.stop()
    assert r.choices[0].message.content == want
    assert r.model_extra["hasten"]["draft"] == "none"
    assert text == model.generate(REPEATS[0], 60, temperature=0)
    assert any(trees)  # the greedy one speculated beside it


def test_draft_model_drafters_forked_per_sequence_keep_their_own_caches():
    """Two sequences drafting with one self-draft model side by side: `fork` gives each its own
    draft cache (a shared one would draft one sequence from the other's context)."""
    from hasten.drafters.draft_model import ModelDrafter, self_draft

    model = tiny_model(torch.bfloat16, True)
    ps = prompts(3, seed=6)
    solo = [list(generate_plain(model, p, 40)) for p in ps]
    template = ModelDrafter(self_draft(model, 1), depth=3)
    drafters = [template.fork() for _ in ps]
    assert len({id(d.draft) for d in drafters}) == len(ps)
    got, _ = serve(model, ps, drafters, 3, range(3), [40] * 3, size=3)
    assert got == solo
    alone = []  # steps of the solo speculative engine with a drafter of its own
    for p in ps:
        stats = GenerationStats()
        list(generate_speculative(model, template.fork(), p, 40, tree_size=3, stats=stats))
        alone.append(stats.steps)
    assert serve.steps == alone  # each drafted from its own context: the same trees


def test_compiled_kernels_attend_the_whole_step_in_one_call_with_solo_answers(tmp_path, monkeypatch):
    """Compact weights (and dense float32 on AVX-512) run every block of a step in one
    compiled call (`compact.run_fused_blocks`: attention included): every token of the step,
    roots and tree nodes of every sequence, each over its own cache row in its solo plan's key
    order; answers equal solo plain decoding."""
    from hasten.models import compact
    from test_batched import compact_exact_model

    model = compact_exact_model(tmp_path, monkeypatch)
    calls = []

    def counted(m, x, *args, **kwargs):
        out = compact.run_fused_blocks(m, x, *args, **kwargs)
        calls.append(x.shape[0] if out is not None else 0)
        return out
    monkeypatch.setattr(model, "run_blocks", counted)  # solo steps count too: one row each
    ps = [p[:40] for p in prompts(4)]
    solo = [list(generate_plain(model, p, 40)) for p in ps]
    drafters = [Oracle(ps[0], solo[0]), LookupDrafter(), Wrong(ps[2], solo[2]), None]
    got, per_step = serve(model, ps, drafters, 4, range(4), [40, 30, 40, 25])
    assert got == [s[:n] for s, n in zip(solo, [40, 30, 40, 25])]
    assert per_step[0] > 2  # the oracle's trees were verified in the batch
    assert max(calls) > 4  # roots and tree nodes of several sequences in one call
