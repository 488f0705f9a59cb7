"""`hasten serve --delta NAME=PATH`: BitDelta tenants of one base, batched together in one
forward, each answer the one its own model gives alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import hasten
from hasten.bitdelta import delta as bd
from hasten.bitdelta.model import with_delta
from hasten.bitdelta.serving import tenant_backbone
from hasten.server import create_app
from test_bitdelta import base_weights, finetuned, save_folder
from test_server import Gate, Server, wait_for

PROMPTS = ["the cat sat", "on a mat", "then it ran", "big dog", "small log"]
ROUTES = ["tiny", "code", "math", "code", "default"]  # base, tenants, base by its alias


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    base_sd, config = base_weights()
    base_sd = {k: v * 10 if v.dim() == 2 else v for k, v in base_sd.items()}  # varied text
    save_folder(folder / "base", base_sd, config)
    paths = {}
    for name, seed in (("code", 1), ("math", 2)):
        ft = finetuned(base_sd, seed=seed, scale=0.3)
        paths[name] = bd.save(bd.compress(base_sd, config, ft, config), folder / name)
    model = hasten.load(str(folder / "base"), dtype="bfloat16", progress=False)
    model.name = "tiny"
    return model, paths


def solo_answers(model, paths) -> list[str]:
    models = {"tiny": model, "default": model, **{n: with_delta(model, p) for n, p in paths.items()}}
    return [models[m].generate(p, 30, chat=False, temperature=0) for m, p in zip(ROUTES, PROMPTS)]


def test_tenants_share_the_batch_and_answer_as_their_own_models(served, monkeypatch):
    model, paths = served
    want = solo_answers(model, paths)
    assert len({want[0], want[1], want[2]}) == 3  # the tenants really are other models
    s = Server(create_app(model, log=False, max_batch=8, tenants=list(paths),
                          backbone=tenant_backbone(model, paths)))
    engine = s.app.state.engine
    gate = Gate(monkeypatch, engine, after=2)
    try:
        def ask(i):
            r = httpx.post(f"{s.url}/v1/completions", timeout=60, json={
                "model": ROUTES[i], "prompt": PROMPTS[i], "max_tokens": 30, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(ask, 0)
            wait_for(lambda: gate.calls > 2, "the first request to reach the gate")
            rest = [pool.submit(ask, i) for i in range(1, 5)]
            wait_for(lambda: engine.queued == 4, "the tenants' requests to queue")
            gate.opened.set()
            answers = [first.result(60)] + [f.result(60) for f in rest]
        assert [a["choices"][0]["text"] for a in answers] == want
        assert [a["model"] for a in answers] == ["tiny", "code", "math", "code", "tiny"]
        assert all(a["hasten"]["max_batch_size"] == 5 for a in answers)
    finally:
        gate.opened.set()
        s.stop()


def test_models_lists_the_base_and_its_tenants_and_unknown_names_get_404(served):
    model, paths = served
    s = Server(create_app(model, log=False, tenants=list(paths),
                          backbone=tenant_backbone(model, paths)))
    try:
        listed = httpx.get(f"{s.url}/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["tiny", "code", "math"]
        assert [m.get("parent") for m in listed] == [None, "tiny", "tiny"]
        assert httpx.get(f"{s.url}/v1/models/math").json()["id"] == "math"
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "poetry", "prompt": "a"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert all(name in r.json()["error"]["message"] for name in ("tiny", "code", "math"))
    finally:
        s.stop()


def test_a_delta_of_another_base_is_refused(served, tmp_path):
    model, _ = served
    other_sd, config = base_weights(seed=9)
    path = bd.save(bd.compress(other_sd, config, finetuned(other_sd), config), tmp_path / "d")
    with pytest.raises(bd.DeltaError, match="another base"):
        tenant_backbone(model, {"stranger": path})


def test_a_tenant_row_does_not_depend_on_how_many_rows_of_its_tenant_share_the_step(served):
    from hasten.decoding.batched import BatchedDecoder
    from hasten.decoding.generate import generate_plain

    model, paths = served
    prompts = [model.encode(f"{p} {i}", chat=False) for i, p in enumerate(PROMPTS * 2)]
    alone = with_delta(model, paths["code"]).backbone
    want = [list(generate_plain(alone, p, 12)) for p in prompts]
    decoder = BatchedDecoder(tenant_backbone(model, paths), len(prompts), 64)
    decoder.route_tenants = True
    seqs = [decoder.add(p, tenant=0) for p in prompts]  # ten rows of one tenant in each step
    for _ in range(11):
        decoder.step()
    assert [s.tokens for s in seqs] == want


def test_tenants_speculate_inside_the_batch_with_their_own_answers(served):
    """Per-tenant speculation: each tenant's rows verify a lookup tree in the same forward as
    the other tenants' rows (routed token by token), and every answer is that tenant's plain
    answer alone."""
    from hasten.decoding.batched import BatchedDecoder
    from hasten.decoding.generate import generate_plain
    from hasten.drafters.lookup import LookupDrafter

    model, paths = served
    text = ["ab ab ab ab ab ab", "cd cd cd cd cd", "ef ef ef ef ef ef"]
    prompts = [model.encode(t, chat=False) for t in text]
    tenants = [0, 1, -1]  # code, math, the base
    solo = [with_delta(model, paths["code"]).backbone, with_delta(model, paths["math"]).backbone,
            model.backbone]
    want = [list(generate_plain(b, p, 24)) for b, p in zip(solo, prompts)]
    decoder = BatchedDecoder(tenant_backbone(model, paths), 3, 96)
    decoder.route_tenants = True
    seqs, drafters = [], []
    for p, k in zip(prompts, tenants):
        seq = decoder.add(p, tenant=k)
        d = LookupDrafter()
        d.reset(p, decoder.capacity)
        d.observe([seq.root], seq.hidden)
        seqs.append(seq)
        drafters.append(d)
    verified = 0
    while min(len(s.tokens) for s in seqs) < 24:
        trees = {}
        for seq, d in zip(seqs, drafters):
            tree = d.propose(prompts[seqs.index(seq)] + seq.tokens, 4)
            if tree.size:
                trees[seq] = tree
        verified = max(verified, len(trees))
        for seq, new in decoder.speculate(trees):
            drafters[seqs.index(seq)].observe(new, seq.hidden)
    assert verified >= 2  # trees of different tenants verified in one forward
    assert [s.tokens[:24] for s in seqs] == want
