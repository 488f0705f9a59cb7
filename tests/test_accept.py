import math
import random

import pytest
import torch

import hasten.decoding.accept as accept_mod
from hasten.decoding.accept import accept, accept_greedy, accept_sampling, accept_typical
from hasten.decoding.sampling import SamplingParams, probabilities
from hasten.decoding.tree import DraftTree

V = 8


def logits_with_argmax(*tokens: int, vocab: int = V) -> torch.Tensor:
    """One logits row per token, each peaked (but not one-hot) at that token."""
    rows = torch.linspace(0, 1, vocab).repeat(len(tokens), 1)
    rows[torch.arange(len(tokens)), list(tokens)] = 5.0
    return rows.double()


# ---- greedy ---------------------------------------------------------------------------------

def branchy_tree() -> DraftTree:
    # root -> 0:3 -> 2:1 ; root -> 1:5 -> 3:2 -> 4:6
    return DraftTree(torch.tensor([3, 5, 1, 2, 6]), torch.tensor([-1, -1, 0, 1, 3]))


def test_greedy_full_path_partial_and_none():
    tree = branchy_tree()
    # rows: root, node0, node1, node2, node3, node4
    full = logits_with_argmax(5, 0, 2, 0, 6, 7)
    assert accept_greedy(tree, full) == ([1, 3, 4], 7)
    partial = logits_with_argmax(5, 0, 2, 0, 4, 7)
    assert accept_greedy(tree, partial) == ([1, 3], 4)
    none = logits_with_argmax(4, 1, 2, 0, 6, 7)
    assert accept_greedy(tree, none) == ([], 4)


def test_greedy_picks_the_right_sibling_and_takes_a_batch_dimension():
    tree = branchy_tree()
    logits = logits_with_argmax(3, 1, 2, 7, 6, 0)
    assert accept_greedy(tree, logits) == ([0, 2], 7)
    assert accept_greedy(tree, logits[None]) == ([0, 2], 7)
    with pytest.raises(ValueError, match="1 \\+ N"):
        accept_greedy(tree, logits[:3])


def test_greedy_with_duplicate_siblings_takes_the_deepest_match():
    # two children of the root carry token 3; only the second has a matching child
    tree = DraftTree(torch.tensor([3, 3, 4]), torch.tensor([-1, -1, 1]))
    logits = logits_with_argmax(3, 0, 4, 2)
    assert accept_greedy(tree, logits) == ([1, 2], 2)
    logits = logits_with_argmax(3, 0, 5, 2)  # neither extends: the first duplicate wins
    assert accept_greedy(tree, logits) == ([0], 0)


def test_greedy_from_precomputed_argmax_ids_matches_logits():
    tree = branchy_tree()
    for rows in [(5, 0, 2, 0, 6, 7), (5, 0, 2, 0, 4, 7), (4, 1, 2, 0, 6, 7), (3, 1, 2, 7, 6, 0)]:
        assert accept_greedy(tree, argmax_ids=list(rows)) == accept_greedy(tree, logits_with_argmax(*rows))
    with pytest.raises(ValueError, match="argmax ids"):
        accept_greedy(tree, argmax_ids=[5, 0, 2])


def test_greedy_on_an_empty_tree_is_a_plain_step():
    assert accept_greedy(DraftTree.empty(), logits_with_argmax(6)) == ([], 6)


def random_tree(rng: random.Random, n: int, vocab: int) -> DraftTree:
    parents = [rng.randrange(-1, i) for i in range(n)]
    return DraftTree(torch.tensor([rng.randrange(vocab) for _ in range(n)], dtype=torch.long),
                     torch.tensor(parents, dtype=torch.long))


def test_greedy_equals_a_manual_argmax_walk_on_random_trees():
    rng = random.Random(0)
    for trial in range(300):
        vocab = rng.choice([2, 3, 5])  # small vocabularies so that matches happen
        tree = random_tree(rng, rng.randrange(0, 20), vocab)
        logits = torch.randn(tree.size + 1, vocab, generator=torch.Generator().manual_seed(trial))
        target = logits.argmax(-1).tolist()
        path, bonus = accept_greedy(tree, logits)
        # every accepted token is the argmax after its parent, the bonus the argmax after the path
        pos = 0
        for node in path:
            assert tree.parent_list[node] + 1 == pos and tree.token_list[node] == target[pos]
            pos = node + 1
        assert bonus == target[pos]
        # and no matching path is deeper (brute force over all nodes)
        deepest = max((len(tree.path_to(i)) for i in range(tree.size)
                       if all(tree.token_list[j] == target[tree.parent_list[j] + 1]
                              for j in tree.path_to(i))), default=0)
        assert len(path) == deepest
        # on a deduplicated tree the walk is unique: follow the matching child step by step
        dedup = tree.deduplicated()
        dlogits = torch.randn(dedup.size + 1, vocab, generator=torch.Generator().manual_seed(trial))
        dtarget = dlogits.argmax(-1).tolist()
        walk, pos = [], 0
        while True:
            nxt = [c for c in dedup.children_at(pos) if dedup.token_list[c] == dtarget[pos]]
            if not nxt:
                break
            walk.append(nxt[0])
            pos = nxt[0] + 1
        assert accept_greedy(dedup, dlogits) == (walk, dtarget[pos])


# ---- a tiny "language model" for end-to-end checks --------------------------------------------

class TableModel:
    """A fixed random model: context tuple -> logits over a tiny vocabulary (memoised)."""

    def __init__(self, vocab: int, seed: int, scale: float = 1.5):
        self.vocab, self.seed, self.scale, self.memo = vocab, seed, scale, {}

    def __call__(self, ctx: tuple[int, ...]) -> torch.Tensor:
        if ctx not in self.memo:
            key = self.seed
            for t in ctx:
                key = (key * 1_000_003 + t + 1) % (2 ** 61 - 1)
            gen = torch.Generator().manual_seed(key)
            self.memo[ctx] = torch.randn(self.vocab, generator=gen, dtype=torch.float64) * self.scale
        return self.memo[ctx]

    def verify_logits(self, ctx: tuple[int, ...], tree: DraftTree) -> torch.Tensor:
        """What a backbone returns for [root, nodes...] when `ctx` ends with the root token."""
        key = (ctx, tuple(tree.token_list), tuple(tree.parent_list))
        if key not in self.memo:
            contexts = [ctx]  # forward position j holds the context ending with its token
            for tok, par in zip(tree.token_list, tree.parent_list):
                contexts.append(contexts[par + 1] + (tok,))
            self.memo[key] = torch.stack([self(c) for c in contexts])
        return self.memo[key]


def test_speculative_greedy_reproduces_plain_greedy_decoding():
    model = TableModel(vocab=6, seed=1)
    draft = TableModel(vocab=6, seed=2)  # a different model proposes the trees
    prompt = (0, 3)
    plain = list(prompt)
    for _ in range(25):
        plain.append(int(model(tuple(plain)).argmax()))
    rng = random.Random(3)
    out = list(prompt)
    while len(out) < len(plain):
        ctx = tuple(out)
        # a random mix of draft-model guesses, right answers, and duplicates
        seqs = []
        for _ in range(rng.randrange(0, 4)):
            seq, c = [], ctx
            for _ in range(rng.randrange(1, 4)):
                tok = int((model if rng.random() < 0.6 else draft)(c).argmax())
                seq.append(tok)
                c = c + (tok,)
            seqs.append(seq)
        tokens = [t for s in seqs for t in s]
        parents, offset = [], 0
        for s in seqs:  # concatenated chains: duplicates across chains are kept on purpose
            parents += [-1] + [offset + j for j in range(len(s) - 1)]
            offset += len(s)
        tree = DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
        path, bonus = accept(tree, model.verify_logits(ctx, tree), SamplingParams())
        out += tree.tokens[path].tolist() + [bonus]
    assert out[:len(plain)] == plain


# ---- lossless sampling: statistical tests ----------------------------------------------------

VOCAB = 5
PARAMS = SamplingParams(temperature=0.9, top_k=4, top_p=0.95)  # truncation: some p[x] are 0
PLAIN = SamplingParams(temperature=1.3)  # cheaper to evaluate: used where truncation adds nothing
CTX0 = (1, 2)


def exact_two_token_distribution(model: TableModel, params: SamplingParams) -> torch.Tensor:
    """P(first two emitted tokens = a, b) under plain sampling, as a [VOCAB, VOCAB] table."""
    p1 = probabilities(model(CTX0), params)
    return torch.stack([p1[a] * probabilities(model(CTX0 + (a,)), params) for a in range(VOCAB)])


def empirical_two_token_distribution(step, n: int, seed: int) -> torch.Tensor:
    """Run speculative steps from CTX0 until two tokens are out; histogram those two tokens.

    `step(ctx, gen) -> list of emitted tokens` is one verify + accept step.
    """
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for _ in range(n):
        out = []
        while len(out) < 2:
            out += step(CTX0 + tuple(out), gen)
        counts[out[0], out[1]] += 1
    return counts / n


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def tv_bound(exact: torch.Tensor, n: int) -> float:
    """Three times the expected TV distance between n exact draws and the exact distribution.

    Each cell's count deviates by about sqrt(2/pi) * sqrt(p(1-p)/n) on average, so a correct
    sampler sits near a third of this bound; the deliberately wrong rules below land well
    above it with the same harness and seeds.
    """
    p = exact.flatten()
    return 3 * 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())


def deterministic_draft_tree(draft: TableModel, ctx: tuple[int, ...]) -> DraftTree:
    """A Medusa/REST-like tree: the drafter's top 3 first tokens, top 2 after each of the
    first two, a chain of 3 under the best one, plus a duplicate sibling (allowed: point-mass
    drafts are lossless with duplicates)."""
    top = draft(ctx).argsort(descending=True).tolist()
    tokens, parents = [top[0], top[1], top[2], top[0]], [-1, -1, -1, -1]
    for parent in (0, 1):
        for tok in draft(ctx + (tokens[parent],)).argsort(descending=True)[:2].tolist():
            tokens.append(tok)
            parents.append(parent)
    c, parent = ctx + (tokens[4],), 4
    for _ in range(2):
        tok = int(draft(c).argmax())
        tokens.append(tok)
        parents.append(parent)
        c, parent = c + (tok,), len(tokens) - 1
    return DraftTree(torch.tensor(tokens), torch.tensor(parents))


def make_point_mass_step(model: TableModel, draft: TableModel, params: SamplingParams):
    cache = {}  # the tree and logits depend only on the context: build each once

    def step(ctx, gen):
        if ctx not in cache:
            tree = deterministic_draft_tree(draft, ctx)
            cache[ctx] = tree, model.verify_logits(ctx, tree)
        tree, logits = cache[ctx]
        path, bonus = accept_sampling(tree, logits, params, gen)
        return [tree.token_list[i] for i in path] + [bonus]
    return step


@pytest.mark.parametrize("params", [PARAMS, PLAIN], ids=["topk-topp", "plain"])
def test_sampling_with_a_deterministic_tree_matches_the_model(params):
    model, draft = TableModel(VOCAB, seed=10), TableModel(VOCAB, seed=11, scale=3.0)
    exact = exact_two_token_distribution(model, params)
    n = 8_000
    got = empirical_two_token_distribution(make_point_mass_step(model, draft, params), n, seed=0)
    assert total_variation(got, exact) < tv_bound(exact, n)


def test_the_statistical_test_rejects_wrong_acceptance_rules(monkeypatch):
    """The same harness and bound fail for plausible mistakes, so the test above has teeth."""
    model, draft = TableModel(VOCAB, seed=10), TableModel(VOCAB, seed=11, scale=3.0)
    exact = exact_two_token_distribution(model, PARAMS)
    n = 3_000  # the failures are large; fewer draws keep the suite quick

    def tv_with(name, replacement):
        with monkeypatch.context() as m:
            m.setattr(accept_mod, name, replacement)
            step = make_point_mass_step(model, draft, PARAMS)
            return total_variation(empirical_two_token_distribution(step, n, seed=0), exact)

    # accept any drafted token the model does not rule out
    assert tv_with("_try_accept", lambda p_x, tok, q, gen: p_x > 0) > 2 * tv_bound(exact, n)
    # forget to remove a rejected token from the distribution before the next sibling/bonus
    assert tv_with("_remove_proposal", lambda p, mass, tok, q: mass) > 2 * tv_bound(exact, n)


# ---- stochastic drafters: draft_probs --------------------------------------------------------

class SamplingDrafter:
    """A draft model that samples: q(.|ctx) = softmax of another table model's logits.

    Draws use Python's `random` (its own seeded stream) and trees are memoised by content:
    this keeps tens of thousands of speculative steps within a few seconds.
    """

    def __init__(self, seed: int, scale: float = 1.5):
        self.table, self.rng, self.memo, self.trees = TableModel(VOCAB, seed, scale), random.Random(seed), {}, {}

    def q(self, ctx: tuple[int, ...]) -> torch.Tensor:
        if ctx not in self.memo:
            q = probabilities(self.table(ctx), SamplingParams(temperature=1.0))
            self.memo[ctx] = q, q.tolist()
        return self.memo[ctx][0]

    def draw(self, ctx, exclude=()) -> int:
        self.q(ctx)
        weights = [0.0 if t in exclude else w for t, w in enumerate(self.memo[ctx][1])]
        return self.rng.choices(range(VOCAB), weights)[0]

    def tree(self, tokens, parents, rows) -> tuple[DraftTree, torch.Tensor]:
        key = (tuple(tokens), tuple(parents), tuple(id(r) for r in rows))
        if key not in self.trees:
            self.trees[key] = DraftTree(torch.tensor(tokens), torch.tensor(parents)), torch.stack(rows)
        return self.trees[key]

    def chain(self, depth: int):
        """Standard speculative sampling: a chain drawn token by token from q."""
        def build(ctx):
            tokens, rows, c = [], [], ctx
            for _ in range(depth):
                rows.append(self.q(c))
                tokens.append(self.draw(c))
                c = c + (tokens[-1],)
            return self.tree(tokens, range(-1, depth - 1), rows)
        return build

    def siblings(self, k: int, replacement: bool, conditional: bool = True):
        """k root children drawn from q (i.i.d., or without replacement), a sampled child
        under each. `conditional=False` declares the unconditional q for without-replacement
        siblings: the documented mistake."""
        def build(ctx):
            tokens, rows = [], []
            for _ in range(k):
                taken = () if replacement else tuple(tokens)
                rows.append(self.conditional_q(ctx, taken) if conditional else self.q(ctx))
                tokens.append(self.draw(ctx, exclude=taken))
            for tok in tokens[:k]:
                rows.append(self.q(ctx + (tok,)))
                tokens.append(self.draw(ctx + (tok,)))
            return self.tree(tokens, [-1] * k + list(range(k)), rows)
        return build

    def conditional_q(self, ctx, taken) -> torch.Tensor:
        """q with the tokens already drawn removed and renormalised (memoised)."""
        key = (ctx, tuple(sorted(set(taken))))
        if key not in self.memo:
            q = self.q(ctx).clone()
            q[list(key[1])] = 0
            self.memo[key] = q / q.sum(), None
        return self.memo[key][0]

    def top2_declared_as_sampled(self, ctx):
        """Deterministic top-2 picks passed with q as if they had been sampled: a mistake."""
        q = self.q(ctx)
        return self.tree(q.argsort(descending=True)[:2].tolist(), [-1, -1], [q, q])


def make_stochastic_step(model, params, build):
    """`build(ctx) -> (tree, draft_probs)` samples a fresh tree from the drafter."""
    def step(ctx, gen):
        tree, q = build(ctx)
        path, bonus = accept_sampling(tree, model.verify_logits(ctx, tree), params, gen, q)
        return [tree.token_list[i] for i in path] + [bonus]
    return step


def stochastic_tv(model, build, n, seed, params=PARAMS):
    """TV distance of the first two tokens from the exact law, and the bound for n draws."""
    exact = exact_two_token_distribution(model, params)
    got = empirical_two_token_distribution(make_stochastic_step(model, params, build), n, seed)
    return total_variation(got, exact), tv_bound(exact, n)


def test_sampling_with_a_stochastic_chain_is_standard_speculative_sampling():
    model, drafter = TableModel(VOCAB, seed=20), SamplingDrafter(seed=21)
    tv, bound = stochastic_tv(model, drafter.chain(depth=3), n=6_000, seed=1)
    assert tv < bound


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
def test_sampling_with_sampled_siblings_is_lossless(replacement):
    model, drafter = TableModel(VOCAB, seed=30), SamplingDrafter(seed=31)
    tv, bound = stochastic_tv(model, drafter.siblings(3, replacement), n=8_000, seed=2, params=PLAIN)
    assert tv < bound


def test_misdeclared_draft_probs_are_caught_by_the_same_bound():
    """Documented non-guarantees: without-replacement siblings declared with the unconditional
    q, and deterministic top-k picks declared with q, are not lossless."""
    model = TableModel(VOCAB, seed=40)
    wrong = SamplingDrafter(seed=41, scale=3.0).siblings(3, replacement=False, conditional=False)
    tv, bound = stochastic_tv(model, wrong, n=3_000, seed=3, params=PLAIN)
    assert tv > 2 * bound
    wrong = SamplingDrafter(seed=41, scale=3.0).top2_declared_as_sampled
    tv, bound = stochastic_tv(model, wrong, n=3_000, seed=4, params=PLAIN)
    assert tv > 2 * bound


def test_one_hot_draft_rows_equal_the_point_mass_rule():
    tree = branchy_tree()
    logits = torch.randn(tree.size + 1, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    one_hot = torch.nn.functional.one_hot(tree.tokens, V).double()
    params = SamplingParams(temperature=1.0)
    for seed in range(50):
        a = accept_sampling(tree, logits, params, torch.Generator().manual_seed(seed))
        b = accept_sampling(tree, logits, params, torch.Generator().manual_seed(seed), one_hot)
        assert a == b


def test_sampling_input_checks_and_greedy_fallback():
    tree = branchy_tree()
    logits = logits_with_argmax(5, 0, 2, 0, 6, 7)
    assert accept_sampling(tree, logits, SamplingParams()) == accept_greedy(tree, logits)
    params = SamplingParams(temperature=1.0)
    with pytest.raises(ValueError, match="draft_probs"):
        accept_sampling(tree, logits, params, None, torch.ones(2, V))
    zero_q = torch.full((tree.size, V), 1.0 / (V - 1))
    zero_q[0, tree.token_list[0]] = 0.0
    with pytest.raises(ValueError, match="draft probability"):
        accept_sampling(tree, logits, params, torch.Generator().manual_seed(0), zero_q)
    path, bonus = accept_sampling(DraftTree.empty(), logits[:1], params, torch.Generator().manual_seed(0))
    assert path == [] and 0 <= bonus < V


def test_acceptance_leaves_its_inputs_untouched():
    """accept_sampling edits probabilities in place: never the caller's logits or draft rows."""
    tree = branchy_tree()
    gen = torch.Generator().manual_seed(0)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=3, top_p=0.8)):
        logits = torch.randn(tree.size + 1, V, generator=gen)
        q = torch.softmax(torch.randn(tree.size, V, generator=gen), -1)
        before = logits.clone(), q.clone()
        for _ in range(50):
            accept_sampling(tree, logits, params, gen)
            accept_sampling(tree, logits, params, gen, q)
            accept_typical(tree, logits, params)
        assert torch.equal(logits, before[0]) and torch.equal(q, before[1])


def test_a_draft_token_outside_top_k_is_never_accepted():
    tree = DraftTree.from_chain([0])  # token 0 has the lowest logit at the root
    logits = logits_with_argmax(7, 3)
    params = SamplingParams(temperature=1.0, top_k=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        path, bonus = accept_sampling(tree, logits, params, gen)
        assert path == [] and bonus in logits[0].topk(3).indices.tolist()


# ---- typical acceptance ----------------------------------------------------------------------

def typical_threshold(row: torch.Tensor, temperature: float, epsilon=0.09, delta=0.3) -> float:
    p = torch.softmax(row.double() / temperature, -1)
    entropy = float(-(p * p.log()).sum())
    return min(epsilon, delta * math.exp(-entropy))


def test_typical_acceptance_follows_medusas_threshold():
    params = SamplingParams(temperature=0.7)
    root = torch.tensor([2.0, 1.6, 0.0, -1.0, -3.0, -3.0, -3.0, -3.0], dtype=torch.float64)
    p = torch.softmax(root / 0.7, -1)
    thr = typical_threshold(root, 0.7)
    assert p[1] > thr > p[3]  # token 1 is acceptable although it is not the argmax; 3 is not
    # root children: 3 (rejected), 1 (accepted, leads deeper), 0 (accepted, a leaf)
    tree = DraftTree(torch.tensor([3, 1, 0, 4]), torch.tensor([-1, -1, -1, 1]))
    node1 = torch.full((V,), -3.0, dtype=torch.float64)
    node1[4], node1[6] = 1.0, 2.0  # token 4 acceptable, argmax 6
    logits = torch.stack([root, root, node1, root, logits_with_argmax(5)[0]])
    assert accept_typical(tree, logits, params) == ([1, 3], 5)  # the deeper path wins, bonus = argmax
    assert accept_greedy(tree, logits) == ([2], 0)  # what lossless greedy would have done


def test_typical_ties_go_to_the_likelier_path_and_rejections_stop_the_walk():
    params = SamplingParams(temperature=1.0)
    root = torch.tensor([1.0, 1.5, -4, -4, -4, -4, -4, -4], dtype=torch.float64)
    tree = DraftTree(torch.tensor([0, 1]), torch.tensor([-1, -1]))
    logits = torch.stack([root, logits_with_argmax(2)[0], logits_with_argmax(3)[0]])
    assert accept_typical(tree, logits, params) == ([1], 3)  # both depth 1: token 1 is likelier
    flat = torch.zeros(V, dtype=torch.float64)  # uniform: threshold = min(0.09, 0.3/8) = 0.0375 < 1/8
    assert accept_typical(tree, torch.stack([flat, flat, flat]), params) == ([0], 0)
    peaked = logits_with_argmax(6)[0] * 4  # token 6 takes nearly all mass: drafts rejected
    assert accept_typical(tree, torch.stack([peaked, flat, flat]), params) == ([], 6)
    assert accept_typical(DraftTree.empty(), peaked[None], params) == ([], 6)


def test_typical_with_temperature_zero_is_greedy():
    tree = branchy_tree()
    logits = logits_with_argmax(5, 0, 2, 0, 4, 7)
    assert accept_typical(tree, logits, SamplingParams()) == accept_greedy(tree, logits)
