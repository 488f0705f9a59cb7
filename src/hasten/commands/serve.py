"""`hasten serve`: the OpenAI-compatible HTTP server (see `hasten.server`)."""

from __future__ import annotations

import os
import sys

from ..errors import HastenError
from ..server import API_KEY_ENV
from .bitdelta import add_delta_args, parse_tenants
from .common import add_draft_args, add_model_args, draft_spec, load_model

DEFAULT_CONTEXT = 4096  # cache entries per request unless --context says otherwise


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat/completions, streaming)",
        description="Serve the model over an OpenAI-compatible HTTP API: POST /v1/chat/completions "
                    "and /v1/completions (stream: true for server-sent events), GET /v1/models, "
                    "/health and /metrics (Prometheus). Up to --max-batch requests generate "
                    "together, one batched forward per token; a request that arrives joins at the "
                    "next step, and its answer is the one it gets alone. Batched steps decode "
                    "plain: a request's \"draft\" is validated and reported, not run. With "
                    "--delta NAME=PATH, fine-tunes of the model as 1-bit deltas are served too "
                    "(\"model\": NAME), batched with the base in one forward. Answers carry "
                    "statistics in a \"hasten\" object. SIGTERM: stop admitting, let running "
                    "requests finish for --shutdown-timeout seconds, then cancel them and exit 0; "
                    "a second SIGTERM exits at once.")
    add_model_args(s)
    add_draft_args(s)
    add_delta_args(s, serve=True)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}; "
                        "unset = no key)")
    s.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait for a batch row; more get 429 with "
                        "Retry-After at once (default: no limit)")
    s.add_argument("--max-request-bytes", type=int, default=1 << 20,
                   help="largest request body accepted; larger ones get 413 (default: 1 MiB)")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send its request body; slower ones get 408 "
                        "(default 30)")
    s.add_argument("--max-batch", type=int, default=8,
                   help="requests generating together, one batched forward per step (default 8); "
                        "the KV cache holds --max-batch x --context entries")
    s.add_argument("--context", type=int, default=None,
                   help="cache entries (prompt + answer) per request (default: the model's context, "
                        "at most 4096)")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="seconds from arrival after which a generation ends with what it has "
                        "(finish_reason length, \"time_limit\": true; default: no limit)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds running requests get to finish before they are "
                        "cancelled (default 10)")
    s.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (one line per request is always printed to stderr)")
    s.set_defaults(run=run)


def run(args) -> None:
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise HastenError("hasten serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    from ..server.compute import ComputeThread
    from ..server.shutdown import run_server
    if not 0 <= args.port < 65536:
        raise HastenError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue is not None and args.max_queue < 0:
        raise HastenError("--max-queue must be >= 0")
    if args.max_batch < 1:
        raise HastenError("--max-batch must be >= 1")
    if args.context is not None and args.context < 2:
        raise HastenError("--context must be >= 2")
    if args.delta_merged:
        raise HastenError("--delta-merged makes one model per tenant; the server batches tenants "
                          "on one base: leave it out")
    tenants = parse_tenants(args.delta)
    spec = draft_spec(args)
    compute = ComputeThread()  # all torch work on one thread (see server/compute.py)
    app = compute.call(prepare, args, tenants, spec, compute)
    run_server(app, args.host, args.port, args.log_level, args.shutdown_timeout)


def prepare(args, tenants: dict, spec, compute):
    """The model loaded and measured, and the app around it."""
    from ..server import create_app
    model = load_model(args)
    taken = {model.name, "default"} & set(tenants)
    if taken:
        raise HastenError(f"--delta: the name {sorted(taken)[0]!r} is the base model's; pick another")
    backbone = None
    if tenants:
        from ..bitdelta.serving import tenant_backbone
        backbone = tenant_backbone(model, tenants)
    if model.drafter(spec) is not None:  # one that cannot be built fails here, not in a request
        model.exactness()  # measured once (cached on disk), not during the first request
        if args.tree_size is None:
            model.cost_curve()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    context = args.context or min(model.max_positions, DEFAULT_CONTEXT)
    app = create_app(model, api_key=api_key, draft=spec, tree_size=args.tree_size,
                     typical=args.typical, max_queue=args.max_queue,
                     max_request_bytes=args.max_request_bytes, body_timeout=args.body_timeout,
                     max_batch=args.max_batch,
                     context=context, request_timeout=args.request_timeout,
                     tenants=list(tenants), backbone=backbone, compute=compute)
    warn_if_rows_depend_on_the_batch(app.state.engine, args.max_batch)
    served = ", ".join([model.name, *tenants])
    print(f"hasten serve: {served} (batch {args.max_batch} x context {context}) on "
          f"http://{args.host}:{args.port}/v1{' (API key required)' if api_key else ''}",
          file=sys.stderr, flush=True)
    return app


def warn_if_rows_depend_on_the_batch(engine, max_batch: int) -> None:
    """Batched answers equal solo ones only if a matmul row does not depend on the row count
    (2 up to the most tokens a step carries) here: measured on the weights (a second or so),
    said once at start; where only large counts differ, steps are capped below them."""
    from ..decoding.batched import row_count_invariant
    if not engine.exact:
        print("hasten serve: float32 runs attention through SDPA (not exact): a batched answer "
              "may differ from the solo one in rare tokens; --dtype bfloat16 is exact",
              file=sys.stderr, flush=True)
        return
    decoder = engine.decoder
    classes = row_count_invariant(decoder.model, decoder.max_step_tokens)
    if not classes:
        return
    sizes, same = sorted(m for c in classes for m in c), set(classes[0])  # classes[0] holds 2
    safe = max(m for i, m in enumerate(sizes) if set(sizes[:i + 1]) <= same)
    if safe >= max_batch:  # plain steps are fine; speculative steps stay within the safe rows
        decoder.max_step_tokens = safe
        print(f"hasten serve: matmul rows here depend on the row count {classes}: a batched "
              f"step carries at most {safe} tokens (roots + draft trees)", file=sys.stderr,
              flush=True)
        return
    print(f"hasten serve: warning: matmul rows here depend on the row count {classes}: "
          "batched answers may differ from solo ones in rare tokens; a smaller --max-batch "
          "may avoid it", file=sys.stderr, flush=True)
