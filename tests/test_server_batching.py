"""`hasten serve` batches: requests that arrive while others generate join them at the next step,
and every answer is the one the request gets alone (bfloat16: exact attention, rows independent
of the batch). /health and /metrics report the batch."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from hasten.api import Model
from hasten.models.llama import build_llama
from hasten.server import create_app
from test_server import Gate, Server, wait_for
from tiny import char_tokenizer, hf_reference, tiny_config

CONTEXT = 256
QUESTIONS = [[{"role": "user", "content": f"Question {i}: {'xyz' * i}"}] for i in range(5)]


@pytest.fixture(scope="module")
def model() -> Model:
    tok = char_tokenizer()
    cfg = tiny_config(vocab_size=len(tok), max_position_embeddings=CONTEXT, bos_token_id=None,
                      eos_token_ids=(tok.eos_token_id,))
    weights = {k: v * 10 if v.dim() == 2 else v
               for k, v in hf_reference(cfg, 0, torch.float32).state_dict().items()}
    backbone = build_llama(cfg, weights, dtype=torch.bfloat16)  # exact attention
    return Model(backbone, tok, name="tiny", max_positions=CONTEXT, stop_ids=(tok.eos_token_id,))


@pytest.fixture(scope="module")
def solo(model) -> list[str]:
    return [model.generate(q, 40, temperature=0) for q in QUESTIONS]


def ask(client, messages, stream=False, max_tokens=40, draft=None):
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                       temperature=0, stream=stream,
                                       extra_body={"draft": draft} if draft else None)
    if stream:
        chunks = list(r)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1]
    return r.choices[0].message.content, r


def test_requests_arriving_mid_generation_join_the_batch_with_their_solo_answers(model, solo,
                                                                                  monkeypatch):
    assert len(set(solo)) == len(solo) and min(map(len, solo)) >= 10
    s = Server(create_app(model, log=False, max_batch=4))
    engine = s.app.state.engine
    gate = Gate(monkeypatch, engine, after=3)  # the first request holds at its 4th step
    try:
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(ask, s.client(), QUESTIONS[0])
            wait_for(lambda: gate.calls > 3, "the first request to reach the gate")
            rest = [pool.submit(ask, s.client(), q, stream=i % 2 == 1)
                    for i, q in enumerate(QUESTIONS[1:], 1)]
            wait_for(lambda: engine.queued == 4, "the others to wait for the step boundary")
            health = httpx.get(f"{s.url}/health").json()
            assert (health["active"], health["queued"], health["capacity"]) == (1, 4, 4)
            gate.opened.set()
            answers = [first.result(30)] + [f.result(30) for f in rest]
        assert [text for text, _ in answers] == solo
        stats = [r.model_extra["hasten"] for _, r in answers]
        assert stats[0]["max_batch_size"] == 4  # three joined it; the fifth waited for a row
        assert all(st["max_batch_size"] >= 2 and st["exact"] for st in stats)
        assert httpx.get(f"{s.url}/health").json()["active"] == 0
    finally:
        gate.opened.set()
        s.stop()


def test_metrics_report_tokens_batch_and_requests(model):
    s = Server(create_app(model, log=False, max_batch=2))
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda q: ask(s.client(), q), QUESTIONS[:3]))
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": QUESTIONS[0], "n": 2})
        assert r.status_code == 400
        text = httpx.get(f"{s.url}/metrics").text
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line and not line.startswith("#")}
        assert values["hasten_generated_tokens_total"] == 3 * 40
        assert values['hasten_requests_total{status="length"}'] == 3
        assert values["hasten_time_to_first_token_seconds_count"] == 3
        assert values["hasten_step_batch_size_count"] >= 39  # at least the longest one's steps
        assert values["hasten_tokens_per_second"] > 0
        assert values["hasten_batch_size"] == 0 and values["hasten_queue_length"] == 0
        assert "hasten_accepted_tokens_per_step_bucket" in text
    finally:
        s.stop()


def test_the_time_limit_ends_a_generation_with_what_it_has(model, monkeypatch):
    s = Server(create_app(model, log=False, request_timeout=0.3))
    engine = s.app.state.engine
    gate = Gate(monkeypatch, engine, after=2)
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(ask, s.client(), QUESTIONS[1], max_tokens=200)
            wait_for(lambda: gate.calls > 2, "the request to reach the gate")
            time.sleep(0.4)  # held at the gate past its limit, whatever the machine's speed
            gate.opened.set()
            text, r = held.result(30)
        assert r.choices[0].finish_reason == "length" and r.model_extra["hasten"]["time_limit"]
        n = r.usage.completion_tokens  # the first token + 3 steps (fewer on a slow machine)
        assert 1 <= n <= 4
        assert text == model.generate(QUESTIONS[1], n, temperature=0)
    finally:
        gate.opened.set()
        s.stop()


def test_the_queue_limit_counts_free_rows_and_answers_429_before_tokenising(model, monkeypatch):
    s = Server(create_app(model, log=False, max_batch=2, max_queue=0))
    engine = s.app.state.engine
    gate = Gate(monkeypatch, engine, after=2)
    encoded = []
    real_encode = model.encode
    monkeypatch.setattr(model, "encode", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, s.client(), QUESTIONS[0])
            wait_for(lambda: gate.calls > 2, "the first request to hold the gate")
            second = pool.submit(ask, s.client(), QUESTIONS[1])  # a row is free: no queue needed
            wait_for(lambda: engine.queued == 1, "the second request to wait for the boundary")
            before = len(encoded)
            r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": QUESTIONS[2]})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert len(encoded) == before  # refused before its prompt was tokenised
            gate.opened.set()
            assert first.result(30)[0] and second.result(30)[0]
    finally:
        gate.opened.set()
        s.stop()


class ForwardGate(Gate):
    """Holds the model's own forward (the lone speculative path) instead of the batch's step."""

    def __init__(self, monkeypatch, backbone, after: int):
        self.opened, self.calls, self.after = threading.Event(), 0, after
        forward = backbone.forward

        def gated(*args, **kwargs):
            self.calls += 1
            if self.calls > self.after:
                assert self.opened.wait(30), "the test never opened the gate"
            return forward(*args, **kwargs)
        monkeypatch.setattr(backbone, "forward", gated)


REPEAT = [{"role": "user", "content": "abcabcabcabcabcabc"}]


def test_a_lone_plain_request_decodes_on_the_solo_engine(model, solo, monkeypatch):
    """Alone and greedy, a request without a drafter runs `hasten generate`'s loop, not a batch
    row of one (which costs more per step), and gives the same answer."""
    s = Server(create_app(model, log=False))
    engine = s.app.state.engine
    gate = Gate(monkeypatch, engine, after=2)
    try:
        with ThreadPoolExecutor(1) as pool:
            lone = pool.submit(ask, s.client(), QUESTIONS[2])
            wait_for(lambda: gate.calls > 2, "the lone request to reach the gate")
            assert engine.solo is not None and not engine.decoder.sequences
            gate.opened.set()
            text, r = lone.result(30)
        assert text == solo[2]
        stats = r.model_extra["hasten"]
        assert stats["draft"] == "none" and stats["steps"] == r.usage.completion_tokens - 1
    finally:
        gate.opened.set()
        s.stop()


def test_a_lone_request_with_a_drafter_decodes_speculatively(model):
    want = model.generate(REPEAT, 60, temperature=0)
    s = Server(create_app(model, log=False, tree_size=4))
    try:
        text, r = ask(s.client(), REPEAT, max_tokens=60, draft="lookup")
    finally:
        s.stop()
    stats = r.model_extra["hasten"]
    assert text == want and len(want) >= 20
    assert stats["draft"] == "lookup" and stats["mean_accepted_tokens_per_step"] > 1
    assert stats["steps"] < r.usage.completion_tokens - 1  # fewer forwards than tokens


def lone_then_company(s: Server, monkeypatch, backbone, draft: str, other_draft: str | None = None):
    """A lone speculating request (REPEAT, 60 tokens) held after its prefill and 2 speculative
    steps; a second (QUESTIONS[2]) arrives and waits for the step boundary; both (text,
    response) once the gate opens."""
    engine = s.app.state.engine
    gate = ForwardGate(monkeypatch, backbone, after=3)
    try:
        with ThreadPoolExecutor(2) as pool:
            lone = pool.submit(ask, s.client(), REPEAT, max_tokens=60, draft=draft)
            wait_for(lambda: gate.calls > 3, "the lone request to reach the gate")
            assert engine.solo is not None
            other = pool.submit(ask, s.client(), QUESTIONS[2], draft=other_draft)
            wait_for(lambda: engine.queued == 1, "the second request to wait")
            gate.opened.set()
            return lone.result(30), other.result(30)
    finally:
        gate.opened.set()


def test_a_speculating_request_joins_the_batch_when_company_arrives(model, monkeypatch):
    want = [model.generate(REPEAT, 60, temperature=0), model.generate(QUESTIONS[2], 40, temperature=0)]
    s = Server(create_app(model, log=False, tree_size=4))
    try:
        (text_a, ra), (text_b, rb) = lone_then_company(s, monkeypatch, model.backbone, "lookup")
        assert [text_a, text_b] == want
        stats = ra.model_extra["hasten"]
        assert stats["draft"] == "lookup" and stats["max_batch_size"] == 2
        assert rb.model_extra["hasten"]["max_batch_size"] == 2
    finally:
        s.stop()


def test_a_request_arriving_during_a_lone_speculative_prefill_joins_it_in_the_batch(model,
                                                                                   monkeypatch):
    """Company that arrives while the lone request prefills must not be admitted beside it:
    the loop steps only the lone request while it is alone, so the newcomer sat unstepped in
    the batch until the other finished (both max_batch_size 1, the second at half speed)."""
    want = [model.generate(REPEAT, 60, temperature=0), model.generate(QUESTIONS[2], 40, temperature=0)]
    s = Server(create_app(model, log=False, tree_size=4))
    engine = s.app.state.engine
    gate = ForwardGate(monkeypatch, model.backbone, after=0)  # holds the lone one's prefill
    try:
        with ThreadPoolExecutor(2) as pool:
            lone = pool.submit(ask, s.client(), REPEAT, max_tokens=60, draft="lookup")
            wait_for(lambda: gate.calls >= 1, "the lone request to start its prefill")
            other = pool.submit(ask, s.client(), QUESTIONS[2])
            wait_for(lambda: engine.queued == 1, "the second request to wait")
            gate.opened.set()
            (text_a, ra), (text_b, rb) = lone.result(30), other.result(30)
        assert [text_a, text_b] == want
        assert ra.model_extra["hasten"]["max_batch_size"] == 2
        assert rb.model_extra["hasten"]["max_batch_size"] == 2
    finally:
        gate.opened.set()
        s.stop()


def test_sampled_requests_with_a_drafter_decode_plain(model):
    s = Server(create_app(model, log=False, tree_size=4))
    try:
        r = s.client().chat.completions.create(model="tiny", messages=REPEAT, max_tokens=20,
                                               temperature=0.8, seed=3, extra_body={"draft": "lookup"})
    finally:
        s.stop()
    assert r.model_extra["hasten"]["draft"] == "none"
    assert r.model_extra["hasten"]["draft_requested"] == "lookup"
    assert r.choices[0].message.content == model.generate(REPEAT, 20, temperature=0.8, seed=3)


def test_a_client_that_stalls_while_sending_its_body_gets_408(model):
    import socket

    s = Server(create_app(model, log=False, body_timeout=0.3))
    try:
        host, port = s.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.settimeout(20)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 5000\r\n\r\n{\"messages\": ")
        # The rest of the body never comes. Read until the server closes the connection: the
        # reply's head and body can arrive in separate packets.
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        sock.close()
        reply = b"".join(chunks).decode()
        assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply
        assert httpx.get(f"{s.url}/health").json()["status"] == "ok"
    finally:
        s.stop()


def test_the_engine_decodes_on_the_compute_thread_it_is_given(model, solo):
    """`hasten serve` loads the model on a ComputeThread and hands it to the app: the engine's
    worker must run there (one thread for all torch work: OpenMP teams are per thread, and two
    of them on 2 cores made every parallel region sleep; see server/compute.py)."""
    from hasten.server.compute import ComputeThread
    compute = ComputeThread("test-compute")
    with pytest.raises(ZeroDivisionError):
        compute.call(lambda: 1 / 0)  # a job's exception reaches the caller
    loader = compute.call(threading.get_ident)
    assert loader != threading.get_ident()
    seen: list[int] = []
    before = set(threading.enumerate())
    app = create_app(model, compute=compute)
    engine = app.state.engine
    step = engine.decoder.step

    def recording_step(*args, **kwargs):
        seen.append(threading.get_ident())
        return step(*args, **kwargs)

    engine.decoder.step = recording_step
    s = Server(app)
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda q: ask(s.client(), q)[0], QUESTIONS[:2]))
    finally:
        s.stop()
    assert answers == solo[:2]
    assert seen and set(seen) == {loader}
    assert not any(t.name == "hasten-engine" for t in set(threading.enumerate()) - before)


def test_eagle_over_several_layers_speculates_inside_the_batch_with_solo_answers(model, monkeypatch,
                                                                                 tmp_path):
    """A head reading several layers (`feature_layers`): the batch keeps those layers' outputs
    for every row, each request's drafter reads its own, and answers stay the solo ones."""
    from hasten.drafters.spec import DraftSpec
    from hasten.eagle.drafter import EagleDrafter
    from hasten.eagle.head import EagleConfig, EagleHead, save_head
    from hasten.medusa.heads import base_identity
    torch.manual_seed(0)
    head = EagleHead(EagleConfig.like(model.backbone.config, feature_layers=[0, 1]))
    save_head(head, tmp_path / "head", base_identity(model.backbone, "tiny"))
    want = [model.generate(REPEAT, 60, temperature=0), model.generate(QUESTIONS[2], 40, temperature=0)]
    widths = []
    observe = EagleDrafter.observe
    monkeypatch.setattr(EagleDrafter, "observe", lambda self, tokens, feats=None: (
        widths.append(None if feats is None else feats.shape[-1]), observe(self, tokens, feats))[1])
    s = Server(create_app(model, draft=DraftSpec("eagle", eagle_head=str(tmp_path / "head")),
                          log=False, tree_size=4))
    try:
        (text_a, ra), (text_b, rb) = lone_then_company(s, monkeypatch, model.backbone, "eagle", "eagle")
        assert [text_a, text_b] == want
        assert s.app.state.engine.decoder.taps == (0, 1)
        assert set(widths) == {2 * model.backbone.config.hidden_size}  # solo and in the batch
        for r in (ra, rb):
            stats = r.model_extra["hasten"]
            assert stats["draft"] == "eagle" and stats["max_batch_size"] == 2
    finally:
        s.stop()
