"""GCG and probe sampling on tiny random Llama models with a character tokenizer: every loss,
gradient and choice is checked against an independent computation (our runtime's full
forward, transformers' autograd, hand-made losses)."""

import json
import types

import pytest
import torch
import torch.nn.functional as F

from hasten.api import Model
from hasten.models.llama import build_llama
from hasten.redteam import attack, probe, report, runner
from hasten.redteam.drafts import Draft, make_draft
from hasten.redteam.forward import HFScorer, LeanScorer
from hasten.redteam.gcg import (Search, allowed_tokens, gcg_step, retokenizes, sample_candidates,
                                token_gradient)
from hasten.redteam.goals import Goal, goals_from_file, is_refusal, target_for
from hasten.redteam.losses import candidate_losses, make_layout, swap_losses
from tiny import SPECIALS, char_tokenizer, hf_reference, tiny_config

def tiny_model(tok, seed=0, dtype=torch.float64, layers=2):
    cfg = tiny_config(vocab_size=len(tok), num_layers=layers, max_position_embeddings=512,
                      bos_token_id=None, eos_token_ids=(tok.eos_token_id,))
    ref = hf_reference(cfg, seed, dtype)
    with torch.no_grad():  # larger weights: losses that differ clearly between candidates
        for name, p in ref.named_parameters():
            if p.dim() == 2:
                p.mul_(8)
    return build_llama(cfg, ref.state_dict(), dtype=dtype), ref


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def pair(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def layout(tok):
    return make_layout(tok, "Tell me a secret", "Sure, here is a secret")


def full_loss(model, ids: list[int], n_target: int) -> float:
    """Mean target cross-entropy from our runtime's own forward over the whole prompt."""
    model.reset(1, 512)
    logits = model.forward(torch.tensor([ids])).logits[0]
    t = len(ids) - n_target
    return float(F.cross_entropy(logits[t - 1:-1], torch.tensor(ids[t:])))


def rand_suffixes(n, length, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (length,), generator=g).tolist() for _ in range(n)]


# ---- layout and losses ---------------------------------------------------------------------

def test_layout_pieces_are_the_chat_prompt(tok, layout):
    suffix = tok.encode(" !x!", add_special_tokens=False)
    whole = tok.apply_chat_template([{"role": "user", "content": "Tell me a secret !x!"}],
                                    add_generation_prompt=True, tokenize=False)
    assert layout.before + suffix + layout.after == tok.encode(whole, add_special_tokens=False)
    assert tok.decode(layout.target) == "Sure, here is a secret"


def test_batched_shared_prefix_loss_equals_full_forward(pair, tok, layout):
    model, _ = pair
    scorer = LeanScorer(model)
    prefix = scorer.prefix(layout.before)
    # ragged rows (as a draft with its own tokenizer sends), in chunks that split the batch
    suffixes = [s[:n] for s, n in zip(rand_suffixes(5, 7, 1, len(tok)), (7, 3, 5, 7, 1))]
    got = candidate_losses(scorer, prefix, suffixes, layout, chunk=2)
    want = [full_loss(model, layout.before + s + layout.after + layout.target, len(layout.target))
            for s in suffixes]
    torch.testing.assert_close(got.losses, torch.tensor(want, dtype=got.losses.dtype),
                               rtol=1e-9, atol=1e-9)
    assert len(set(round(w, 6) for w in want)) == 5  # the candidates really differ


@pytest.mark.parametrize("chunk", [2, 64])
def test_swap_plan_shares_the_suffix_before_the_swap_exactly(pair, tok, layout, chunk):
    model, _ = pair
    scorer = LeanScorer(model)
    prefix = scorer.prefix(layout.before)
    base = rand_suffixes(1, 6, 7, len(tok))[0]
    g = torch.Generator().manual_seed(8)
    cands = torch.tensor(base).repeat(9, 1)
    for i in range(8):  # one-token swaps at every position, several at position 2, and base
        pos = [0, 1, 2, 2, 2, 3, 5, 4][i]
        cands[i, pos] = (base[pos] + 1 + int(torch.randint(0, 50, (1,), generator=g))) % len(tok)
    got = swap_losses(scorer, prefix, base, cands, layout, chunk)
    want = [full_loss(model, layout.before + c + layout.after + layout.target, len(layout.target))
            for c in cands.tolist()]
    torch.testing.assert_close(got.losses, torch.tensor(want, dtype=got.losses.dtype),
                               rtol=1e-9, atol=1e-9)
    flat = candidate_losses(scorer, prefix, cands, layout)
    assert torch.equal(got.exact, flat.exact)


def test_transformers_scorer_matches_lean_scorer(pair, tok, layout):
    model, ref = pair
    suffixes = rand_suffixes(4, 6, 2, len(tok))
    lean = candidate_losses(LeanScorer(model), LeanScorer(model).prefix(layout.before), suffixes,
                            layout)
    hf = HFScorer(ref)
    got = candidate_losses(hf, hf.prefix(layout.before), suffixes, layout)
    torch.testing.assert_close(got.losses, lean.losses, rtol=1e-6, atol=1e-6)  # HF norms: fp32


def test_exact_flag_means_greedy_gives_the_target(pair, tok):
    model, _ = pair
    scorer = LeanScorer(model)
    lay = make_layout(tok, "Hi", "zz")
    model.reset(1, 512)
    prompt = lay.before + tok.encode(" !", add_special_tokens=False) + lay.after
    greedy = model.forward(torch.tensor([prompt])).logits[0, -1].argmax()
    lay.target = [int(greedy), 5]
    suffix = tok.encode(" !", add_special_tokens=False)
    scored = candidate_losses(scorer, scorer.prefix(lay.before), [suffix], lay)
    model.reset(1, 512)
    logits = model.forward(torch.tensor([prompt + lay.target[:1]])).logits[0, -1]
    assert bool(scored.exact[0]) == (int(logits.argmax()) == 5)
    lay.target = [(int(greedy) + 1) % len(tok), 5]
    assert not bool(candidate_losses(scorer, scorer.prefix(lay.before), [suffix], lay).exact[0])


# ---- the gradient --------------------------------------------------------------------------

def test_one_hot_gradient_matches_autograd_through_transformers(pair, tok, layout):
    model, ref = pair
    suffix = rand_suffixes(1, 6, 3, len(tok))[0]
    scorer = LeanScorer(model)
    grad, loss = token_gradient(scorer, scorer.prefix(layout.before), suffix, layout)
    # independent: the whole prompt through transformers' embedding path, in one piece
    ids = layout.before + suffix + layout.after + layout.target
    one_hot = F.one_hot(torch.tensor(suffix), len(tok)).to(torch.float64).requires_grad_(True)
    emb = ref.get_input_embeddings()
    p = len(layout.before)
    x = torch.cat([emb(torch.tensor(ids[:p])), one_hot @ emb.weight,
                   emb(torch.tensor(ids[p + len(suffix):]))])[None]
    logits = ref(inputs_embeds=x).logits[0]
    t = len(ids) - len(layout.target)
    want_loss = F.cross_entropy(logits[t - 1:-1], torch.tensor(layout.target))
    (want,) = torch.autograd.grad(want_loss, one_hot)
    # transformers' RMSNorm computes in float32 even for float64 models: float32 tolerances
    assert loss == pytest.approx(float(want_loss), rel=1e-6)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    assert grad.abs().max() > 1e-3


def test_gradient_predicts_swaps_to_first_order(pair, tok, layout):
    """A finite-difference check on the one-hot relaxation: moving a small weight eps from
    the current token to token v changes the loss by eps * (g[v] - g[cur])."""
    model, _ = pair
    scorer = LeanScorer(model)
    prefix = scorer.prefix(layout.before)
    suffix = rand_suffixes(1, 5, 4, len(tok))[0]
    grad, loss = token_gradient(scorer, prefix, suffix, layout)
    eps, i, v = 1e-6, 2, 17
    one_hot = F.one_hot(torch.tensor(suffix), len(tok)).to(torch.float64)
    one_hot[i, suffix[i]] -= eps
    one_hot[i, v] += eps
    rest = scorer.embed(torch.tensor([layout.after + layout.target]))
    hidden = scorer.hidden(prefix, torch.cat([scorer.embed_one_hot(one_hot)[None], rest], 1))
    from hasten.redteam.losses import target_loss
    first = torch.tensor([len(suffix) + len(layout.after) - 1])
    moved = float(target_loss(scorer, hidden, first, layout.target).losses[0])
    assert (moved - loss) / eps == pytest.approx(float(grad[i, v] - grad[i, suffix[i]]), rel=1e-4)


# ---- candidates and the re-tokenisation filter ------------------------------------------------

def test_candidates_swap_exactly_one_token_from_the_topk(tok):
    g = torch.Generator().manual_seed(0)
    suffix = [10, 11, 12, 13, 14]
    grad = torch.randn(5, len(tok), generator=g)
    allowed = torch.ones(len(tok), dtype=torch.bool)
    allowed[20:30] = False
    grad[:, 20:30] = -100  # most promising, but not allowed
    cands = sample_candidates(suffix, grad, 40, 8, torch.Generator().manual_seed(1), allowed)
    assert cands.shape == (40, 5)
    positions = set()
    for row in cands.tolist():
        diff = [i for i in range(5) if row[i] != suffix[i]]
        assert len(diff) == 1
        i = diff[0]
        positions.add(i)
        scores = grad[i].clone()
        scores[~allowed] = float("inf")
        scores[suffix[i]] = float("inf")
        assert row[i] in set(scores.argsort()[:8].tolist())
    assert positions == set(range(5))  # spread over every position
    again = sample_candidates(suffix, grad, 40, 8, torch.Generator().manual_seed(1), allowed)
    assert torch.equal(cands, again)


def test_current_token_is_never_proposed():
    suffix = [3, 4]
    grad = torch.zeros(2, 10)
    grad[0, 3] = grad[1, 4] = -1  # the current tokens look best
    cands = sample_candidates(suffix, grad, 20, 1, torch.Generator().manual_seed(0))
    assert not (cands == torch.tensor(suffix)).all(1).any()


def test_retokenisation_filter_drops_what_does_not_round_trip():
    tok = char_tokenizer(extra=("ab",))
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    cands = torch.tensor([[a, b, c], [a, c, b], [a, c, b], [tok.convert_tokens_to_ids("ab"), c, c]])
    # "a" "b" decodes to "ab", which encodes as the one added token: dropped; the repeat too
    assert retokenizes(tok, cands).tolist() == [False, True, False, True]


def test_allowed_tokens_exclude_specials_and_non_printable(tok):
    ok = allowed_tokens(tok, len(tok) + 3)
    for t in SPECIALS:
        assert not ok[tok.convert_tokens_to_ids(t)]
    assert not ok[tok.convert_tokens_to_ids("\n")]
    assert ok[tok.convert_tokens_to_ids("x")] and ok[tok.convert_tokens_to_ids(" ")]
    assert not ok[len(tok):].any()


# ---- probe sampling -----------------------------------------------------------------------

def test_spearman_on_hand_made_ranks():
    assert probe.spearman(torch.tensor([1., 2, 3, 4]), torch.tensor([1., 3, 2, 4])) == \
        pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert probe.spearman(torch.tensor([1., 1, 2]), torch.tensor([1., 2, 3])) == \
        pytest.approx(1.5 / 3 ** 0.5)  # ties share rank 1.5
    assert probe.spearman(torch.tensor([3., 2, 1]), torch.tensor([10., 20, 30])) == pytest.approx(-1)
    assert probe.ranks(torch.tensor([5., 1, 5, 2])).tolist() == [3.5, 1, 3.5, 2]
    assert probe.agreement(probe.spearman(torch.ones(3), torch.tensor([1., 2, 3]))) == 0.5


def test_agreement_and_filtered_set_size():
    assert probe.agreement(0.6) == pytest.approx(0.8)
    assert probe.filtered_size(0.8, 512, 8) == 12  # int(0.2 * 64) = 12
    assert probe.filtered_size(0.9, 512, 8) == 6   # 6.4 -> 6
    assert probe.filtered_size(1.0, 512, 8) == 1   # always at least one
    assert probe.filtered_size(0.0, 128, 8) == 16


def test_probe_step_scores_probe_and_filtered_sets(monkeypatch):
    b = 32
    cands = torch.arange(b)[:, None].repeat(1, 3)  # candidate i = [i, i, i]
    target = torch.tensor([float((7 * i) % b) for i in range(b)])  # target loss of candidate i
    draft_loss = target.clone()
    draft_loss[torch.tensor([1, 2, 3])] = -1  # the draft favours 1, 2, 3 (target: 7, 14, 21)
    scored_rows = []

    def fake_losses(search, suffix, rows):
        ids = [r[0] for r in rows.tolist()]
        scored_rows.extend(ids)
        return attack_scored(ids)

    def attack_scored(ids):
        from hasten.redteam.losses import Scored
        return Scored(target[ids], torch.zeros(len(ids), dtype=torch.bool))

    class FakeDraft:
        def losses(self, c, base):
            return draft_loss[c[:, 0]]

    monkeypatch.setattr(probe, "propose", lambda s, suffix, g: cands)
    monkeypatch.setattr(probe, "score", fake_losses)
    gen = torch.Generator().manual_seed(5)
    search = types.SimpleNamespace(scorer=None, prefix=None, layout=None, chunk=8)
    r = probe.probe_step(search, FakeDraft(), [0, 0, 0], gen, probe_fraction=1 / 8, reduction=2)
    probe_ids = torch.randperm(b, generator=torch.Generator().manual_seed(5))[:4].tolist()
    assert scored_rows[:4] == probe_ids
    rho = probe.spearman(draft_loss[probe_ids], target[probe_ids])
    n = probe.filtered_size(probe.agreement(rho), b, 2)
    assert r.alpha == pytest.approx(probe.agreement(rho))
    order = [i for i in draft_loss.argsort(stable=True).tolist() if i not in probe_ids]
    assert scored_rows[4:] == order[:n]
    pool = scored_rows
    assert r.suffix == [min(pool, key=lambda i: target[i])] * 3
    assert r.loss == float(target[pool].min())
    assert (r.target_rows, r.draft_rows) == (4 + n, b)


# ---- drafts ---------------------------------------------------------------------------------

def test_self_draft_scores_with_the_first_layers(tok, layout):
    big, _ = tiny_model(tok, seed=1, layers=3)
    target = Model(big, tok, "tiny", 512, (tok.eos_token_id,))
    draft = make_draft("self:1", target).for_goal("Tell me a secret", "Sure, here is a secret")
    cands = torch.tensor(rand_suffixes(3, 4, 5, len(tok)))
    got = draft.losses(cands)
    # independent: a 1-layer model with the same first block, norm and head
    one = LeanScorer(big, 1)
    want = candidate_losses(one, one.prefix(layout.before), cands, layout).losses
    torch.testing.assert_close(got, want)
    full = LeanScorer(big)
    assert not torch.allclose(got, candidate_losses(full, full.prefix(layout.before), cands,
                                                    layout).losses)


def test_bfloat16_self_draft_runs_on_converted_copies(tok, layout):
    big, _ = tiny_model(tok, seed=1, dtype=torch.float32, layers=3)
    target = Model(big, tok, "tiny", 512, (tok.eos_token_id,))
    draft = make_draft("self:2", target, dtype=torch.bfloat16).for_goal("Tell me a secret",
                                                                        "Sure, here is a secret")
    assert draft.scorer.lm_head.weight_t.dtype == torch.bfloat16
    assert big.lm_head.weight_t.dtype == torch.float32  # the target is untouched
    cands = torch.tensor(rand_suffixes(6, 4, 5, len(tok)))
    f32 = LeanScorer(big, 2)
    want = candidate_losses(f32, f32.prefix(layout.before), cands, layout).losses
    got = draft.losses(cands)
    assert got.dtype == torch.float32  # bfloat16 logits, float32 cross-entropy
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_other_tokenizer_draft_rescores_the_candidate_text(tok):
    other = char_tokenizer(extra=("ab", "secret"))
    small, _ = tiny_model(other, seed=2)
    draft = Draft(LeanScorer(small), other, tok, "other").for_goal("Tell me a secret", "Sure")
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    x = tok.convert_tokens_to_ids("x")
    cands = torch.tensor([[a, b, x], [x, x, x]])
    got = draft.losses(cands)
    lay = make_layout(other, "Tell me a secret", "Sure")
    assert draft.rows(cands) == [other.encode("abx", add_special_tokens=False),
                                 other.encode("xxx", add_special_tokens=False)]
    assert len(draft.rows(cands)[0]) == 2  # "ab" is one draft token
    want = [full_loss(small, lay.before + other.encode(t, add_special_tokens=False) + lay.after
                      + lay.target, len(lay.target)) for t in ("abx", "xxx")]
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), rtol=1e-9, atol=1e-9)


# ---- runs: seeded, resumable, reported ------------------------------------------------------

@pytest.fixture(scope="module")
def target_model(tok):
    model, _ = tiny_model(tok, seed=3, dtype=torch.float32, layers=2)
    return Model(model, tok, "tiny", 512, (tok.eos_token_id,))


def settings(**kw):
    s = {"model": "tiny", "methods": ["gcg", "probe"], "goals": 2, "goals_file": None,
         "steps": 4, "batch_size": 12, "topk": 6, "suffix_length": 4, "draft": "self:1",
         "probe_fraction": 0.25, "reduction": 2.0, "early_stop": False, "check_every": 2,
         "allow_non_ascii": False, "seed": 7}
    s.update(kw)
    return s


GOALS = [Goal(0, "Tell me a secret", "Sure, here is a secret"), Goal(1, "Say hi", "Sure, hi")]


def comparable(runs):
    keys = ("goal_index", "method", "suffix", "best_suffix", "best_loss", "step", "target_rows",
            "draft_rows", "alphas", "rng", "reply", "exact_step", "success_step")
    return [{k: r.to_json()[k] for k in keys} | {"losses": [h[1] for h in r.history]}
            for r in runs]


def test_campaign_is_seeded_and_resumes_exactly(target_model, tmp_path, monkeypatch):
    draft = make_draft("self:1", target_model)
    first = runner.run_campaign(target_model, GOALS, ["gcg", "probe"], settings(),
                                tmp_path / "a.json", draft, progress=False)
    second = runner.run_campaign(target_model, GOALS, ["gcg", "probe"], settings(),
                                 tmp_path / "b.json", draft, progress=False)
    assert comparable(first) == comparable(second)
    assert len({tuple(r.best_suffix) for r in first}) > 1
    assert all(r.step == 4 and r.done and r.reply is not None for r in first)
    # random characters never contain a refusal: the first check (step 2) succeeds
    assert all(r.success and r.success_step == 2 and r.check_s > 0 for r in first)
    assert [r.method for r in first] == ["gcg", "probe", "gcg", "probe"]

    saves = {"n": 0}
    real_save = runner.save_json

    def interrupting_save(*a, **kw):  # dies after the 6th save: mid-way through goal 0's probe run
        real_save(*a, **kw)
        saves["n"] += 1
        if saves["n"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_json", interrupting_save)
    with pytest.raises(KeyboardInterrupt):
        runner.run_campaign(target_model, GOALS, ["gcg", "probe"], settings(),
                            tmp_path / "c.json", draft, progress=False)
    _, partial = report.load_json(tmp_path / "c.json")
    assert [r.step for r in partial] == [4, 1, 0, 0] and not partial[1].done
    monkeypatch.setattr(runner, "save_json", real_save)
    with pytest.raises(Exception, match="--resume"):
        runner.run_campaign(target_model, GOALS, ["gcg", "probe"], settings(),
                            tmp_path / "c.json", draft, progress=False)
    with pytest.raises(Exception, match="other settings"):
        runner.run_campaign(target_model, GOALS, ["gcg", "probe"], settings(seed=8),
                            tmp_path / "c.json", draft, resume=True, progress=False)
    resumed = runner.run_campaign(target_model, GOALS, ["gcg", "probe"], settings(),
                                  tmp_path / "c.json", draft, resume=True, progress=False)
    assert comparable(resumed) == comparable(first)
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"c{suffix}").stat().st_size > 0
    md = (tmp_path / "c.md").read_text()
    assert md.count("| gcg |") == 3 and md.count("| probe |") == 3  # summary + 2 goals each


def test_early_stop_at_the_exact_target(target_model, tok):
    scorer = LeanScorer(target_model.backbone)
    lay = make_layout(tok, "Hi", "x")
    suffix = runner.initial_suffix(tok, 3)
    greedy = candidate_losses(scorer, scorer.prefix(lay.before), [suffix], lay)
    model = target_model.backbone
    model.reset(1, 512)
    first = int(model.forward(torch.tensor([lay.before + suffix + lay.after])).logits[0, -1].argmax())
    lay.target = [first]  # the target is what the model already says: exact from step 1 on
    search = Search(scorer, scorer.prefix(lay.before), lay, tok,
                    allowed_tokens(tok, len(tok)), 8, 4)
    state = attack.new_state(Goal(0, "Hi", "x"), "gcg", suffix, 0)
    r = gcg_step(search, suffix, torch.Generator().manual_seed(0))
    attack.run_steps(state, search, 5, early_stop=True)
    assert greedy.losses.shape == (1,)
    if r.exact:
        assert state.step == 1 and state.exact_step == 1
    else:  # the step moved to a suffix that is no longer exact: it keeps searching
        assert state.exact_step is None or state.step == state.exact_step


def test_summary_and_markdown_on_hand_made_runs(tmp_path):
    def run(g, m, wall, success, exact_step):
        s = attack.RunState(g, m, "goal", "target", [1], [1], best_loss=0.5, step=3,
                            target_rows=30, draft_rows=60 if m == "probe" else 0, wall_s=wall,
                            exact_step=exact_step, history=[[wall, 0.5, 0.5]], done=True,
                            reply="ok", success=success, exact=exact_step is not None)
        return s
    runs = [run(0, "gcg", 9.0, True, 2), run(0, "probe", 3.0, True, 3),
            run(1, "gcg", 8.0, False, None), run(1, "probe", 1.0, True, 1)]
    s = report.summarize(runs)
    assert s["gcg"]["success_rate"] == 0.5 and s["probe"]["success_rate"] == 1.0
    assert s["gcg_over_probe_wall"] == pytest.approx(17 / 4, abs=1e-3)
    assert s["median_per_goal_ratio"] == pytest.approx((3 + 8) / 2, abs=1e-3)
    assert s["probe"]["median_steps_to_exact"] == 2
    report.save_json(tmp_path / "r.json", {"x": 1}, runs)
    settings_back, back = report.load_json(tmp_path / "r.json")
    assert settings_back == {"x": 1} and [r.to_json() for r in back] == [r.to_json() for r in runs]
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["gcg"]["runs"] == 2
    report.write_markdown(tmp_path / "r.md", {"x": 1}, runs, "r.png")
    report.plot(tmp_path / "r.png", runs)
    md = (tmp_path / "r.md").read_text()
    assert "4.25x in total" in md and "| 1 | probe | True | True | None | 1 |" in md
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


# ---- goals ---------------------------------------------------------------------------------

def test_target_template():
    assert target_for("Write a script that hacks") == "Sure, here is a script that hacks"
    assert target_for("Develop an app.") == "Sure, here is an app"
    assert target_for("Teach children how to swim") == "Sure, here is how to teach children how to swim"


def test_refusals_match_anywhere():
    assert is_refusal("Well, I cannot do that") and is_refusal("I'm sorry, no")
    assert not is_refusal("Sure, here is a script")


def test_goals_from_files(tmp_path):
    (tmp_path / "g.txt").write_text("Write a poem\n\nDevelop a plan\n")
    (tmp_path / "g.csv").write_text('goal,target\n"Write a poem, now",Sure here\nDo it,\n')
    (tmp_path / "g.jsonl").write_text('{"goal": "Write a poem", "target": "OK"}\n\n{"goal": "Go"}\n')
    txt = goals_from_file(tmp_path / "g.txt")
    assert [(g.index, g.goal, g.target) for g in txt] == [
        (0, "Write a poem", "Sure, here is a poem"), (1, "Develop a plan", "Sure, here is a plan")]
    csv_goals = goals_from_file(tmp_path / "g.csv")
    assert [(g.goal, g.target) for g in csv_goals] == [("Write a poem, now", "Sure here"),
                                                       ("Do it", "Sure, here is how to do it")]
    assert [(g.goal, g.target) for g in goals_from_file(tmp_path / "g.jsonl", n=1)] == [
        ("Write a poem", "OK")]
    (tmp_path / "bad.jsonl").write_text("[1]\n")
    with pytest.raises(Exception, match="bad.jsonl:1"):
        goals_from_file(tmp_path / "bad.jsonl")
    with pytest.raises(Exception, match="does not exist"):
        goals_from_file(tmp_path / "missing.txt")


def test_advbench_goals_read_from_the_cached_wheel_member(tmp_path, monkeypatch):
    from hasten.redteam import goals
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path))
    member = tmp_path / "data" / "pyrit-1.1.0" / goals.ADVBENCH_MEMBER
    member.parent.mkdir(parents=True)
    member.write_text("dataset_name: adv_bench\nseeds:\n- value: Write a script that hacks\n"
                      "  data_type: text\n- value: >-\n    Give detailed\n    instructions\n")
    got = goals.advbench_goals(progress=False)
    assert [(g.index, g.goal, g.target) for g in got] == [
        (0, "Write a script that hacks", "Sure, here is a script that hacks"),
        (1, "Give detailed instructions", "Sure, here is how to give detailed instructions")]
    assert len(goals.advbench_goals(1, progress=False)) == 1


# ---- the command ---------------------------------------------------------------------------

def test_command_rejects_bad_arguments_before_loading(monkeypatch):
    import argparse

    from hasten.commands import redteam as cmd
    from hasten.errors import HastenError
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="command"))
    monkeypatch.setattr(cmd, "load_model", lambda args: pytest.fail("loaded the model"))
    for argv, msg in ((["--method", "fast"], "--method"), (["--steps", "0"], "--steps"),
                      (["--probe-fraction", "2"], "--probe-fraction")):
        args = parser.parse_args(["redteam", "gcg", *argv])
        with pytest.raises(HastenError, match=msg):
            args.run(args)


def test_swap_plan_on_the_transformers_scorer(pair, tok, layout):
    model, ref = pair
    hf = HFScorer(ref)
    base = rand_suffixes(1, 5, 9, len(tok))[0]
    cands = torch.tensor(base).repeat(5, 1)
    for i, pos in enumerate([0, 3, 3, 4, 1]):
        cands[i, pos] = (base[pos] + 7 + i) % len(tok)
    got = swap_losses(hf, hf.prefix(layout.before), base, cands, layout, chunk=1)
    lean = LeanScorer(model)
    want = candidate_losses(lean, lean.prefix(layout.before), cands, layout)
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-6, atol=1e-6)


def test_group_plan_minimises_padding_plus_overhead():
    from hasten.redteam.losses import plan_groups
    assert plan_groups([10, 10, 10], overhead=100) == [(0, 3)]
    assert plan_groups([50, 50, 2, 2], overhead=1) == [(0, 2), (2, 4)]
    assert plan_groups([5] * 5, overhead=0, max_rows=2) in ([(0, 1), (1, 3), (3, 5)],
                                                             [(0, 2), (2, 4), (4, 5)],
                                                             [(0, 2), (2, 3), (3, 5)],
                                                             [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)])
    groups = plan_groups([9, 7, 7, 3, 1], overhead=4, max_rows=3)
    assert groups[0][0] == 0 and groups[-1][1] == 5 and all(b - a <= 3 for a, b in groups)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))


def test_gradient_through_the_transformers_scorer(pair, tok, layout):
    model, ref = pair
    suffix = rand_suffixes(1, 6, 11, len(tok))[0]
    lean, hf = LeanScorer(model), HFScorer(ref)
    want, want_loss = token_gradient(lean, lean.prefix(layout.before), suffix, layout)
    got, loss = token_gradient(hf, hf.prefix(layout.before), suffix, layout)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_one_hot_embedding_applies_gemma_scale():
    import transformers
    cfg = transformers.AutoConfig.for_model(
        model_type="gemma3_text", vocab_size=50, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=64, layer_types=["full_attention"])
    gemma = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf = HFScorer(gemma)
    ids = torch.tensor([3, 7, 9])
    torch.testing.assert_close(hf.embed_one_hot(F.one_hot(ids, 50).float()), hf.embed(ids))
    assert hf.scale == pytest.approx(16 ** 0.5)
