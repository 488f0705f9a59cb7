"""The FastAPI application: OpenAI-compatible routes in front of the batching `Engine`.

    POST /v1/chat/completions   POST /v1/completions   (stream: true for server-sent events)
    GET  /v1/models             GET  /v1/models/{id}
    GET  /health  GET /metrics  (never need the API key)

`"model"` picks the base model or one of its BitDelta tenants (`tenants`); requests of
different tenants share the batch.

Extra request fields: `draft` ("none", "lookup", "model", "rest", "medusa"; default: the
server's drafter, with the options it was started with),
`tree_size` (draft nodes per step; default: the server's) and `top_k`. Every answer carries a
`hasten` object with the speculative statistics (steps, mean accepted tokens per step, tokens/s).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..drafters import DraftSpec
from ..errors import HastenError
from . import protocol as wire
from .engine import Engine, Job, Outcome, ShuttingDown
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import APIError, error_body

DEFAULT_ALIAS = "default"
OPEN_PATHS = ("/health", "/metrics")  # liveness and monitoring need no API key


class Gate:
    """ASGI middleware: refuses requests without the API key (when one is set) and logs one
    line per request to stderr once its response has ended (streams included)."""

    def __init__(self, app, api_key: str | None, log: bool):
        self.app, self.api_key, self.log = app, api_key, log

    def authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        state = scope.setdefault("state", {})

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"] not in OPEN_PATHS and not self.authorized(scope):
                state["hasten_log"] = "missing or wrong API key"
                response = JSONResponse(error_body("Incorrect or missing API key: send "
                                                   "'Authorization: Bearer <key>'",
                                                   code="invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            if self.log:
                client = scope.get("client") or ("-", 0)
                print(f"hasten serve: {client[0]} \"{scope['method']} {printable(scope['path'])}\" "
                      f"{status[0] or 500} {time.perf_counter() - start:.3f}s "
                      f"{state.get('hasten_log', '')}".rstrip(), file=sys.stderr, flush=True)


def printable(text: str) -> str:
    """`text` with control characters escaped: a request path cannot forge log lines."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def describe(outcome: Outcome | None, prompt_tokens: int) -> str:
    if outcome is None:
        return f"prompt={prompt_tokens} client disconnected"
    s = outcome.stats
    return (f"prompt={prompt_tokens} completion={outcome.completion_tokens} "
            f"finish={outcome.finish_reason} draft={outcome.draft} steps={s.steps} "
            f"accepted/step={s.mean_accepted:.2f} {s.tokens_per_second:.1f}tok/s "
            f"queue={outcome.queue_time:.2f}s")


def generation_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), type="server_error", code="shutting_down")
    if isinstance(e, HastenError):
        return APIError(400, str(e))
    print(f"hasten serve: generation failed: {printable(f'{type(e).__name__}: {e}')}",
          file=sys.stderr, flush=True)
    return APIError(500, "generation failed; the server log has the details", type="server_error")


MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits the context
BODY_TIMEOUT_S = 30.0  # a client that takes longer to send its body is cut off (slow loris)


async def read_json(request: Request, limit: int = MAX_REQUEST_BYTES,
                    timeout: float = BODY_TIMEOUT_S) -> dict:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused before reading a byte of it
        raise APIError(413, f"the request body is {int(declared)} bytes; this server takes at "
                       f"most {limit}", code="request_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the request body exceeds {limit} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
    except ClientDisconnect:  # the client gave up while uploading: one log line, no traceback
        raise APIError(400, "client disconnected while sending the body") from None
    except TimeoutError:
        raise APIError(408, f"the request body took more than {timeout:g} s to arrive",
                       code="request_timeout", headers={"Connection": "close"}) from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body nests too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON in the request body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {wire._type_name(body)}",
                       code="invalid_json")
    return body


def create_app(model, api_key: str | None = None, draft: DraftSpec = DraftSpec(), *,
               tree_size: int | None = None, typical: bool = False, log: bool = True,
               max_queue: int | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               body_timeout: float = BODY_TIMEOUT_S,
               max_batch: int = 8, context: int | None = None,
               request_timeout: float | None = None, tenants: list[str] = (),
               backbone=None, compute=None) -> FastAPI:
    """An OpenAI-compatible app serving `model` (a `hasten.api.Model`), its requests batched.

    `draft`: the drafter used when a request names none, and the options (datastore, heads,
    draft model) of any drafter a request names. `tree_size`: most draft nodes per step
    (None: chosen per step). `max_queue`: requests waiting for a batch row; more are answered
    429 at once (None: no limit). `max_request_bytes`: larger bodies get 413; bodies slower
    than `body_timeout` seconds get 408 (idle keep-alive connections: uvicorn closes them
    after 5 s). `max_batch`:
    requests generating together; `context`: cache entries per request (default: the
    model's context). `request_timeout`: seconds from arrival after which a generation ends
    (finish "length", `time_limit` in its stats). `tenants`: BitDelta tenant names, tenant k
    being route k of `backbone` (`bitdelta.delta_backbone(model.backbone, deltas)`).
    `compute`: the `ComputeThread` the engine decodes on (None: a thread of its own); give
    the one that loaded the model (see server/compute.py)."""
    metrics = Metrics()
    engine = Engine(model, draft, tree_size, typical, max_batch=max_batch, context=context,
                    request_timeout=request_timeout, backbone=backbone, metrics=metrics,
                    compute=compute)
    routes = {model.name: -1, DEFAULT_ALIAS: -1, **{name: k for k, name in enumerate(tenants)}}
    served_names = [model.name, *tenants]
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, 2.0)  # a step stuck past that is not waited for

    app = FastAPI(title="hasten", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.draining = False  # set on SIGTERM (see server/shutdown.py): no new requests
    app.add_middleware(Gate, api_key=api_key or None, log=log)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        request.state.hasten_log = f"{e.type}: {e.message}"
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        # The details go to the log, not to the client.
        request.state.hasten_log = f"internal error: {printable(f'{type(e).__name__}: {e}')}"
        return JSONResponse(error_body("internal error; the server log has the details",
                                       "server_error"), status_code=500)

    def card(name: str) -> dict:
        out = {"id": name, "object": "model", "created": started, "owned_by": "hasten",
               "max_model_len": engine.context}
        if name != model.name:
            out["parent"] = model.name  # a BitDelta tenant of the base
        return out

    @app.get("/health")
    async def health():
        body = {"status": "draining" if app.state.draining else "ok", "model": model.name,
                "active": engine.active, "queued": engine.queued, "capacity": engine.max_batch,
                "busy": engine.active > 0, "served": engine.served}
        return JSONResponse(body, status_code=503 if app.state.draining else 200)

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.render(engine.active, engine.queued), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card(name) for name in served_names]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in routes:
            raise unknown_model(model_id)
        return card(model.name if routes[model_id] < 0 else model_id)

    def unknown_model(name: str) -> APIError:
        return APIError(404, f"The model {name!r} does not exist; this server serves "
                        f"{', '.join(repr(n) for n in served_names)} (alias {DEFAULT_ALIAS!r} "
                        f"for {model.name!r})", param="model", code="model_not_found")

    def encode(body: dict, chat: bool) -> list[int]:
        if chat:
            messages = wire.get_messages(body)
        else:
            prompt = wire.get_prompt(body)
            if isinstance(prompt, list):
                vocab = len(model.tokenizer)
                if any(not 0 <= t < vocab for t in prompt):
                    raise APIError(400, f"token ids in 'prompt' must be in [0, {vocab})",
                                   param="prompt", code="invalid_value")
                return prompt
        try:
            return model.encode(messages) if chat else model.encode(prompt, chat=False)
        except (HastenError, jinja2.TemplateError, ValueError, TypeError) as e:
            raise APIError(400, f"cannot encode the {'messages' if chat else 'prompt'}: {e}",
                           param="messages" if chat else "prompt") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    admitting = [0]  # requests past the queue check, not yet submitted (being tokenised)

    def admit() -> None:
        """Reserve a place, or answer 429 at once: the requests already waiting for a row (and
        those being tokenised) beyond the free rows would make more than `max_queue`."""
        if max_queue is not None:
            waiting = engine.queued + admitting[0] - (engine.max_batch - engine.active)
            if waiting >= max_queue:
                metrics.requests.labels("queue_full").inc()
                raise APIError(429, f"the server is busy: {max(waiting, 0)} requests are waiting; "
                               "retry shortly", type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": "1"})
        admitting[0] += 1

    async def prepare(request: Request, body: dict, chat: bool, opts: wire.Options, limit: int,
                      tenant: int, served_as: str) -> Job:
        """The job for a checked request: its prompt tokenised (off the event loop), its
        lengths checked, its drafter built (a drafter that cannot be built is a 400)."""
        ids = await asyncio.to_thread(encode, body, chat)  # long prompts never stall the loop
        param = "messages" if chat else "prompt"
        if not ids:
            raise APIError(400, f"the {param} is empty", param=param, code="invalid_value")
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} "
                           f"tokens; the {'chat ' if chat else ''}prompt has {len(ids)}. "
                           "Shorten it.", param=param,
                           code="context_length_exceeded")
        room = limit - len(ids)
        try:  # before any stream starts
            spec = engine.spec(opts.draft)
            drafter = await asyncio.to_thread(engine.drafter, spec)
        except HastenError as e:
            raise APIError(400, str(e), param="draft", code="invalid_value") from None
        request.state.hasten_log = f"prompt={len(ids)} queued"
        return Job(ids, min(opts.max_tokens or room, room), opts.temperature, opts.top_p,
                   opts.top_k, opts.seed, spec.name, drafter, opts.tree_size, opts.stop,
                   loop=asyncio.get_running_loop(), events=asyncio.Queue(), tenant=tenant,
                   model_name=served_as, stream=opts.stream)

    async def complete(request: Request, chat: bool):
        body = await read_json(request, max_request_bytes, body_timeout)
        if app.state.draining:
            raise APIError(503, "the server is shutting down; retry on another instance",
                           type="server_error", code="shutting_down", headers={"Retry-After": "5"})
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise wire._wrong_type("model", "a string", name)
        if name is not None and name not in routes:
            raise unknown_model(name)
        tenant = routes.get(name, -1)
        served_as = model.name if tenant < 0 else name
        limit = engine.context
        opts = wire.get_options(body, chat, limit)
        admit()  # a full queue answers 429 now, before any tokenising
        try:
            job = await prepare(request, body, chat, opts, limit, tenant, served_as)
            engine.submit(job)
        finally:
            admitting[0] -= 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if opts.stream:
            return StreamingResponse(stream(chat, rid, created, job, opts, request),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        ids = job.prompt_ids
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        parts, outcome = [], None
        try:
            async for kind, value in job.events_until_done():
                if kind == "text":
                    parts.append(value)
                elif kind == "error":
                    raise generation_error(value)
                else:
                    outcome = value
        finally:
            watcher.cancel()
            job.cancel()  # no-op when done; stops generating if this handler was interrupted
            request.state.hasten_log = describe(outcome, len(ids))
        return wire.completion(chat, rid, created, served_as, "".join(parts),
                               outcome.finish_reason, wire.usage(len(ids), outcome.completion_tokens),
                               outcome.hasten_stats())

    async def cancel_on_disconnect(request: Request, job: Job):
        while not job.cancelled.is_set():
            if await request.is_disconnected():
                job.cancel()
                return
            await asyncio.sleep(0.1)

    async def stream(chat: bool, rid: str, created: int, job: Job, opts: wire.Options,
                     request: Request):
        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        outcome = None
        try:
            if chat:
                yield event(wire.chunk(chat, rid, created, job.model_name, first=True))
            async for kind, value in job.events_until_done():
                if kind == "text":
                    yield event(wire.chunk(chat, rid, created, job.model_name, text=value))
                elif kind == "error":
                    e = generation_error(value)
                    request.state.hasten_log = f"{e.type} mid-stream: {e.message}"
                    yield event(e.body())
                else:
                    outcome = value
                    usage = wire.usage(len(job.prompt_ids), outcome.completion_tokens)
                    extra = {"hasten": outcome.hasten_stats()}
                    if not opts.include_usage:
                        extra["usage"] = usage
                    yield event(wire.chunk(chat, rid, created, job.model_name,
                                           finish=outcome.finish_reason, **extra))
                    if opts.include_usage:
                        yield event({"id": rid, "object": "chat.completion.chunk" if chat
                                     else "text_completion", "created": created,
                                     "model": job.model_name, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:  # runs on normal end and when the client disconnects (the stream is cancelled)
            job.cancel()
            if outcome is not None or "mid-stream" not in request.state.hasten_log:
                request.state.hasten_log = describe(outcome, len(job.prompt_ids))

    return app
